"""Scoring throughput of the verifier against raw in-process math-verify, side by side.

    .venv/bin/python bench/verifier.py [--groups 48] [--group-size 8] [--workers 1 2]

The same answers are scored three ways in one run: raw math-verify in this process
(``verify(parse(gold), parse(answer))``, the floor with no isolation at all), through
``POST /v1/verify`` of a real ``pope verifier``, and through the stream path (RawGroups
published to the rollouts stream, timed until every ScoredGroup is out). Prints
answers/s, the ratio to raw, and that ratio per scoring worker. Redis: REDIS_URL, else
127.0.0.1:6379, else a private redis-server.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import subprocess
import sys
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import httpx
from redis import Redis

from services.common.keys import Keys, delete_prefix
from services.common.messages import RawGroup, Sample, encode
from services.common.redis_server import free_port, redis_for
from services.common.streams import DATA

FORMS = [
    ("\\boxed{{{a}}}", "{a}"),
    ("so \\boxed{{\\frac{{{a}}}{{{b}}}}}", "{a}/{b}"),
    ("\\boxed{{{a}.5}}", "\\frac{{{c}}}{{2}}"),
    ("The answer is $x^2+{a}x$.", "x(x+{a})"),
    ("\\boxed{{[{a},{b})}}", "[{a},{b})"),
    ("\\boxed{{\\{{{a},{b}\\}}}}", "\\{{{b},{a}\\}}"),
    ("no final answer, sorry", "{a}"),
]


def workload(groups: int, size: int, seed: int = 0) -> list[tuple[str, list[str]]]:
    rng = random.Random(seed)
    out = []
    for _ in range(groups):
        a, b = rng.randint(1, 50), rng.randint(51, 99)
        answer_form, gold_form = rng.choice(FORMS)
        gold = gold_form.format(a=a, b=b, c=2 * a + 1)
        answers = [answer_form.format(a=a if rng.random() < 0.5 else a + 1, b=b) for _ in range(size)]
        out.append((gold, answers))
    return out


def bench_raw(work: list[tuple[str, list[str]]]) -> float:
    from math_verify import parse, verify

    n, start = 0, time.perf_counter()
    for gold, answers in work:
        g = parse(f"${gold}$")
        for ans in answers:
            verify(g, parse(ans))
            n += 1
    return n / (time.perf_counter() - start)


def start_verifier(workers: int, redis_url: str, keys: Keys, consume: bool) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    env = {
        **os.environ,
        "REDIS_URL": redis_url,
        "POPE_VERIFIER__KEY_PREFIX": keys.prefix,
        "POPE_VERIFIER__CONSUME": str(consume).lower(),
        "POPE_VERIFIER__LOG_LEVEL": "WARNING",
    }
    pope = str(Path(sys.executable).parent / "pope")
    proc = subprocess.Popen(
        [pope, "verifier", "--workers", str(workers), "--port", str(port)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:
        try:
            if httpx.get(f"{url}/readyz", timeout=1).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline or proc.poll() is not None:
            raise SystemExit("pope verifier did not become ready")
        time.sleep(0.2)


def bench_http(url: str, work: list[tuple[str, list[str]]], per_request: int = 8) -> float:
    rows = [{"answer": a, "gold": g} for g, answers in work for a in answers]
    chunk = per_request * len(work[0][1])  # several groups per request, so workers run in parallel
    start = time.perf_counter()
    with httpx.Client(timeout=600) as http:
        for i in range(0, len(rows), chunk):
            resp = http.post(f"{url}/v1/verify", json=rows[i : i + chunk])
            resp.raise_for_status()
    return len(rows) / (time.perf_counter() - start)


def bench_stream(r: Redis, keys: Keys, work: list[tuple[str, list[str]]]) -> float:
    groups = []
    for i, (gold, answers) in enumerate(work):
        samples = [
            Sample(
                problem_id=f"p{i}",
                variant="unhinted",
                prompt_ids=[1],
                completion_ids=[2],
                logprobs=[-0.1],
                finish_reason="stop",
                weight_version=0,
                text=a,
            )
            for a in answers
        ]
        groups.append(
            RawGroup(
                group_id=f"{uuid.uuid4().hex}",
                problem_id=f"p{i}",
                variant="unhinted",
                prompt="q",
                answer=gold,
                samples=samples,
                weight_version=0,
                step=0,
                temperature=1.0,
            )
        )
    before = r.xlen(keys.scored)
    start = time.perf_counter()
    pipe = r.pipeline()
    for g in groups:
        pipe.xadd(keys.rollouts, {DATA: encode(g)})
    pipe.execute()
    last = "$"
    while r.xlen(keys.scored) < before + len(groups):
        reply = r.xread({keys.scored: last}, block=1000)
        if reply:
            last = reply[0][1][-1][0]
    return sum(len(a) for _g, a in work) / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--groups", type=int, default=48)
    parser.add_argument("--group-size", type=int, default=8)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    work = workload(args.groups, args.group_size)
    print(
        f"{args.groups} groups x {args.group_size} answers, {len(FORMS)} answer forms, "
        f"medians of {args.repeats} runs, {os.cpu_count()} CPUs"
    )
    bench_raw(work[:4])  # warm-up (imports, caches)
    raw = statistics.median(bench_raw(work) for _ in range(args.repeats))
    print(f"{'path':38s} {'answers/s':>10s} {'vs raw':>8s} {'per worker':>11s}")
    print(f"{'raw math-verify, in-process':38s} {raw:10.1f} {1.0:7.2f}x {'':>11s}")
    with redis_for(os.environ.get("REDIS_URL")) as redis_url:
        r = Redis.from_url(redis_url)
        for workers in args.workers:
            for path in ("http", "stream"):
                keys = Keys(f"bench:{uuid.uuid4().hex[:8]}:")
                proc, url = start_verifier(workers, redis_url, keys, consume=path == "stream")
                try:
                    fn = (lambda: bench_http(url, work)) if path == "http" else (lambda: bench_stream(r, keys, work))  # noqa: B023
                    fn()  # warm-up
                    rate = statistics.median(fn() for _ in range(args.repeats))
                finally:
                    proc.terminate()
                    proc.wait(30)
                    delete_prefix(r, keys.prefix)
                label = f"{'POST /v1/verify' if path == 'http' else 'stream rollouts->scored'}, {workers} worker(s)"
                print(f"{label:38s} {rate:10.1f} {rate / raw:7.2f}x {rate / raw / workers:10.2f}x")
        r.close()


if __name__ == "__main__":
    main()
