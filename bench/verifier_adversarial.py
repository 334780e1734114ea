"""The adversarial corpus against a real ``pope verifier``, the long form of
tests/integration/test_verifier_adversarial.py: timings per kind, worker memory, restarts.

    .venv/bin/python bench/verifier_adversarial.py [--mutations 400] [--seed 0] [--workers 2]
    make verifier-fuzz

Scores every case of tests/data/verifier/adversarial.jsonl on its own request (as many
at a time as there are workers) while /healthz is polled and every process of the service
is watched, then ``--mutations`` seeded variants of the cases: a case's completion spliced
with another's, wrapped in prose, sprinkled with invisible characters, repeated, or cut at
a random point. A mutant's verdict is not known, so for mutants only the limits are
checked. Prints a table per kind (cases, median and max seconds per answer, wrong
verdicts, timeouts), the peak memory of the workers, the worker restarts and the slowest
answers; exits 1 when any check fails. Redis: REDIS_URL, else 127.0.0.1:6379, else a
private redis-server.
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import tempfile
import time
import uuid
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import httpx

from services.common.keys import Keys, delete_prefix
from services.common.redis_server import redis_for
from tests.conftest import running_pope
from tests.verifier_fuzz import MARK, Case, HealthPoll, ProcessWatch, Result, load_corpus, restarts, score_each

INVISIBLE = ["\u0000", "\u001b", "\u200b", "\u202e", "\ufeff", "\u0007"]
PROSE = "Let us check this once more, carefully. "


def mutate(case: Case, other: Case, rng: random.Random) -> Case:
    """One seeded variant of ``case``; its kind says how it was made."""
    text, how = case.completion, rng.choice(["splice", "prose", "invisible", "repeat", "cut"])
    if how == "splice":
        text = other.completion[: rng.randint(0, len(other.completion))] + text
    elif how == "prose":
        text = PROSE * rng.randint(1, 2000) + text + PROSE * rng.randint(0, 3)
    elif how == "invisible":
        chars = list(text[:20_000])
        for _ in range(rng.randint(1, 50)):
            chars.insert(rng.randint(0, len(chars)), rng.choice(INVISIBLE))
        text = "".join(chars) + text[20_000:]
    elif how == "repeat":
        text = text * rng.randint(2, max(2, 2_000_000 // max(len(text), 1)))
    else:
        text = text[: rng.randint(0, len(text))]
    return Case(f"mutant:{how}", case.gold, text[:3_000_000], expected=-1.0)


def table(results: list[Result], timeout_s: float) -> list[str]:
    by_kind: dict[str, list[Result]] = defaultdict(list)
    for r in results:
        by_kind[r.case.kind].append(r)
    lines = [f"{'kind':<18}{'cases':>6}{'median s':>10}{'max s':>8}{'wrong':>7}{'timeouts':>10}{'refused':>9}"]
    for kind, rs in sorted(by_kind.items()):
        times = [r.seconds for r in rs]
        wrong = sum(r.case.expected >= 0 and r.score["reward"] != r.case.expected for r in rs)
        timeouts = sum(r.score["timed_out"] or r.seconds >= timeout_s for r in rs)
        refused = sum(r.score["error"] is not None and not r.score["timed_out"] for r in rs)
        lines.append(
            f"{kind:<18}{len(rs):>6}{statistics.median(times):>10.3f}{max(times):>8.2f}{wrong:>7}{timeouts:>10}{refused:>9}"
        )
    return lines


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mutations", type=int, default=400)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--timeout-s", type=float, default=5.0, help="the per-answer limit")
    ap.add_argument("--memory-limit-mb", type=int, default=2048)
    args = ap.parse_args()

    canary = Path(tempfile.mkdtemp()) / "PWNED"
    cases = load_corpus(canary)
    rng = random.Random(args.seed)
    mutants = [mutate(rng.choice(cases), rng.choice(cases), rng) for _ in range(args.mutations)]
    marker, keys = uuid.uuid4().hex, Keys(f"bench:{uuid.uuid4().hex[:12]}:")
    with redis_for(None) as redis_url:
        env = {
            "REDIS_URL": redis_url,
            "POPE_VERIFIER__KEY_PREFIX": keys.prefix,
            "POPE_VERIFIER__CONSUME": "false",
            "POPE_VERIFIER__TIMEOUT_S": str(args.timeout_s),
            "POPE_VERIFIER__MEMORY_LIMIT_MB": str(args.memory_limit_mb),
            MARK: marker,
        }
        watch = ProcessWatch(marker)
        with watch.running():
            with running_pope(["verifier", "--workers", str(args.workers)], "/readyz", env) as proc:
                start = time.monotonic()
                with HealthPoll(proc.url).running() as health:
                    results = score_each(proc.url, cases, args.workers)
                    results += score_each(proc.url, mutants, args.workers)
                elapsed = time.monotonic() - start
                metrics = httpx.get(f"{proc.url}/metrics").text
            deadline = time.monotonic() + 20
            while watch.alive() and time.monotonic() < deadline:
                time.sleep(0.1)
        from redis import Redis

        with Redis.from_url(redis_url) as r:
            delete_prefix(r, keys.prefix)

    workers = watch.workers(proc.pid)
    polls = [t for t in health.latencies if t is not None]
    failures = {
        "wrong verdicts": sum(r.case.expected >= 0 and r.score["reward"] != r.case.expected for r in results),
        "answers at the limit": sum(r.score["timed_out"] or r.seconds >= args.timeout_s for r in results),
        "/healthz polls failed or over 2 s": sum(t is None or t >= 2.0 for t in health.latencies),
        "workers over the memory limit": sum(w.peak_vm_mb >= args.memory_limit_mb for w in workers),
        "stray processes": len(watch.strays(proc.pid)),
        "processes left after stop": len(watch.alive()),
        "canary created": int(canary.exists()),
    }
    print("\n".join(table(results, args.timeout_s)))
    print(f"\n{len(results)} answers ({len(cases)} cases, {len(mutants)} mutants, seed {args.seed}) in {elapsed:.1f}s")
    print(f"worker restarts: {restarts(metrics):g}; workers seen: {len(workers)}")
    print(f"worker peak RSS (VmHWM): {max(w.peak_rss_mb for w in workers):.0f} MB; peak VM: ", end="")
    print(f"{max(w.peak_vm_mb for w in workers):.0f} MB (limit {args.memory_limit_mb} MB)")
    print(f"/healthz: {len(health.latencies)} polls, max {max(polls, default=0):.3f}s")
    print("slowest:")
    for r in sorted(results, key=lambda r: -r.seconds)[:5]:
        print(f"  {r.seconds:6.2f}s {r.case.kind:<16} {r.case.completion[:60]!r} -> {r.score['error']}")
    for what, n in failures.items():
        if n:
            print(f"FAIL: {what}: {n}")
    return 1 if any(failures.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
