"""Scoring throughput of the verifier against raw in-process math-verify, side by side.

    .venv/bin/python bench/verifier.py [--groups 48] [--group-size 8] [--workers 1 2] [--batch 1 16]
        [--code . OTHER_CHECKOUT]

The same answers are scored three ways in one run: raw math-verify in this process
(``verify(parse(gold), parse(answer))``, the floor with no isolation at all), through
``POST /v1/verify`` of a real ``pope verifier``, and through the stream path (RawGroups
published to the rollouts stream, timed until every ScoredGroup is out), once per
``--batch`` (the verifier's ``streams.batch``: entries a stream worker takes at a time).
Prints answers/s, the ratio to raw, and that ratio per scoring worker.

Then what a path costs beyond scoring, two ways:
- its overhead per group: the same number of groups of answers that take math-verify
  next to nothing (no final answer), through the real service: ms per group;
- delivery alone: the stream worker in this process with a handler that scores nothing,
  its time per group and the Redis round trips and commands per group it sent (counted
  on its own connections, so other clients of a shared Redis do not count).

``--code`` runs each service row once per checkout given (e.g. the code before a change
and after it), interleaved, so both see the same machine; delivery alone runs each
checkout's own copy of this script (``--delivery-only``). Redis: REDIS_URL, else
127.0.0.1:6379, else a private redis-server.
"""

from __future__ import annotations

import argparse
import asyncio
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
from redis.asyncio import Redis as AsyncRedis
from redis.asyncio.connection import Connection

from services.common.keys import VERIFIERS, Keys, adelete_prefix, delete_prefix
from services.common.messages import RawGroup, Sample, Score, ScoredGroup, encode
from services.common.redis_server import free_port, redis_for
from services.common.streams import DATA, DeliveryPolicy, GroupReader
from services.common.worker import Effects, Worker

ROOT = Path(__file__).resolve().parent.parent

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


def start_verifier(
    workers: int, redis_url: str, keys: Keys, consume: bool, batch: int = 16, code: Path = ROOT
) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    env = {
        **os.environ,
        # The verifier runs this checkout's code, whichever checkout the venv was installed from.
        "PYTHONPATH": os.pathsep.join(p for p in (str(code), os.environ.get("PYTHONPATH")) if p),
        "REDIS_URL": redis_url,
        "POPE_VERIFIER__KEY_PREFIX": keys.prefix,
        "POPE_VERIFIER__CONSUME": str(consume).lower(),
        "POPE_VERIFIER__LOG_LEVEL": "WARNING",
        "POPE_VERIFIER__STREAMS__BATCH": str(batch),
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


def raw_groups(work: list[tuple[str, list[str]]]) -> list[RawGroup]:
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
    return groups


def bench_stream(r: Redis, keys: Keys, work: list[tuple[str, list[str]]]) -> float:
    groups = raw_groups(work)
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


class CountingConnection(Connection):
    """A connection that counts what it sends: one write is one round trip (a pipeline or
    transaction is one write), and every command packed into it."""

    round_trips = 0
    commands = 0

    async def send_packed_command(self, command, check_health=True):  # type: ignore[no-untyped-def]
        CountingConnection.round_trips += 1
        await super().send_packed_command(command, check_health)

    def pack_command(self, *args):  # type: ignore[no-untyped-def]
        CountingConnection.commands += 1  # pipelines pack theirs one by one through here too
        return super().pack_command(*args)


def bench_delivery(redis_url: str, groups: list[RawGroup], batch: int) -> tuple[float, float, float]:
    """The stream worker alone, in this process, with a handler that scores nothing: ms per
    group from publishing every group until every ScoredGroup is out, and the Redis round
    trips and commands the worker sent per group."""

    async def run() -> tuple[float, float, float]:
        keys = Keys(f"bench:{uuid.uuid4().hex[:8]}:")
        client = AsyncRedis.from_url(redis_url, connection_class=CountingConnection)
        watcher = AsyncRedis.from_url(redis_url)
        reader = GroupReader(client, keys, keys.rollouts, VERIFIERS, "bench", DeliveryPolicy(batch=batch))

        async def null(group: RawGroup, effects: Effects) -> None:
            effects.publish(keys.scored, ScoredGroup.from_raw(group, [Score(reward=0.0)] * len(group.samples)))

        worker = Worker(reader, RawGroup, null, key_of=lambda g: g.group_id, heartbeat=("bench", "bench"))
        stop = asyncio.Event()
        task = asyncio.create_task(worker.run(stop))
        try:
            await reader.ensure_group()
            trips, commands = CountingConnection.round_trips, CountingConnection.commands
            start = time.perf_counter()
            async with watcher.pipeline(transaction=False) as pipe:
                for g in groups:
                    pipe.xadd(keys.rollouts, {DATA: encode(g)})
                await pipe.execute()
            last = "0"
            seen = 0
            while seen < len(groups):
                reply = await watcher.xread({keys.scored: last}, block=1000)
                if reply:
                    rows = reply[0][1]
                    seen += len(rows)
                    last = rows[-1][0]
            elapsed = time.perf_counter() - start
            trips = CountingConnection.round_trips - trips
            commands = CountingConnection.commands - commands
        finally:
            stop.set()
            await task
            await adelete_prefix(watcher, keys.prefix)
            await client.aclose()
            await watcher.aclose()
        n = len(groups)
        return 1000 * elapsed / n, trips / n, commands / n

    return asyncio.run(run())


def row(label: str, rate: float, raw: float, workers: int | None, overhead: str = "") -> None:
    per_worker = f"{rate / raw / workers:10.2f}x" if workers else ""
    print(f"{label:60s} {rate:10.1f} {rate / raw:7.2f}x {per_worker:>11s} {overhead:>18s}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--groups", type=int, default=48)
    parser.add_argument("--group-size", type=int, default=8)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--batch", type=int, nargs="+", default=[16], help="streams.batch values to compare")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--code", type=Path, nargs="+", default=[ROOT], help="checkouts to run the services of")
    parser.add_argument("--delivery-only", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.delivery_only:
        with redis_for(os.environ.get("REDIS_URL")) as redis_url:
            delivery(redis_url, args)
        return
    work = workload(args.groups, args.group_size)
    size = args.group_size
    trivial = [("1", ["no final answer"] * size)] * args.groups  # scoring takes ~nothing
    print(
        f"{args.groups} groups x {size} answers, {len(FORMS)} answer forms, "
        f"medians of {args.repeats} runs, {os.cpu_count()} CPUs"
    )
    bench_raw(work[:4])  # warm-up (imports, caches)
    raw = statistics.median(bench_raw(work) for _ in range(args.repeats))
    print(f"{'path':60s} {'answers/s':>10s} {'vs raw':>8s} {'per worker':>11s} {'overhead ms/group':>18s}")
    row("raw math-verify, in-process", raw, raw, None)
    with redis_for(os.environ.get("REDIS_URL")) as redis_url:
        r = Redis.from_url(redis_url)
        for workers in args.workers:
            runs = [("http", 16)] + [("stream", b) for b in args.batch]
            for path, batch, code in [(p, b, c) for p, b in runs for c in args.code]:
                keys = Keys(f"bench:{uuid.uuid4().hex[:8]}:")
                proc, url = start_verifier(workers, redis_url, keys, path == "stream", batch, code.resolve())

                def measure(w: list[tuple[str, list[str]]]) -> float:
                    fn = (lambda: bench_http(url, w)) if path == "http" else (lambda: bench_stream(r, keys, w))  # noqa: B023
                    fn()  # warm-up
                    return statistics.median(fn() for _ in range(args.repeats))

                try:
                    rate, bare = measure(work), measure(trivial)
                finally:
                    proc.terminate()
                    proc.wait(30)
                    delete_prefix(r, keys.prefix)
                label = f"POST /v1/verify, {workers} worker(s)"
                if path == "stream":
                    label = f"stream rollouts->scored, {workers} worker(s), batch {batch}"
                if len(args.code) > 1:
                    label += f" [{code.resolve().name}]"
                row(label, rate, raw, workers, f"{1000 * size / bare:.2f}")
        r.close()
        for code in args.code:
            if code.resolve() == ROOT:
                delivery(redis_url, args)
            else:  # that checkout's worker, run by its own copy of this script
                flags = ["--groups", str(args.groups), "--group-size", str(size), "--repeats", str(args.repeats)]
                flags += ["--batch", *map(str, args.batch)]
                script = code.resolve() / "bench" / "verifier.py"
                env = {**os.environ, "PYTHONPATH": str(code.resolve()), "REDIS_URL": redis_url}
                subprocess.run([sys.executable, str(script), "--delivery-only", *flags], env=env, check=True)


def delivery(redis_url: str, args: argparse.Namespace) -> None:
    groups = raw_groups(workload(args.groups, args.group_size))
    title = f"delivery alone (in-process stream worker, a handler that scores nothing), {args.groups} groups"
    print(f"\n{title} [{ROOT.name}]:")
    print(f"{'batch':>6s} {'ms/group':>9s} {'round trips/group':>18s} {'commands/group':>15s}")
    for batch in args.batch:
        bench_delivery(redis_url, groups, batch)  # warm-up
        runs = [bench_delivery(redis_url, groups, batch) for _ in range(args.repeats)]
        ms, trips, commands = (statistics.median(run[i] for run in runs) for i in range(3))
        print(f"{batch:6d} {ms:9.2f} {trips:18.2f} {commands:15.2f}", flush=True)


if __name__ == "__main__":
    main()
