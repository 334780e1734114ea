"""Nothing breaks the verifier: the whole adversarial corpus (tests/data/verifier/) through
a real ``pope verifier`` over HTTP, each answer on its own request while /healthz is
polled and every process the service starts is watched.

Every answer must get its expected verdict within the per-answer limit without a worker
being killed for it; /healthz must answer throughout; no worker may pass its memory
limit, no process may escape the pool or outlive the service, and no code smuggled into
an answer may run. The long form, with timings per kind and seeded mutations of the
corpus: ``make verifier-fuzz``.
"""

from __future__ import annotations

import time
import uuid
from pathlib import Path

import httpx

from services.common.keys import Keys
from tests.conftest import running_pope
from tests.verifier_fuzz import MARK, HealthPoll, ProcessWatch, load_corpus, restarts, score_each

TIMEOUT_S = 5.0  # the per-answer limit (the service's default)
MEMORY_LIMIT_MB = 2048
WORKERS = 2


def test_the_adversarial_corpus_breaks_nothing(redis_url: str, keys: Keys, tmp_path: Path) -> None:
    canary = tmp_path / "PWNED"
    cases = load_corpus(canary)
    assert len(cases) >= 100 and sum(c.expected for c in cases) >= 20
    marker = uuid.uuid4().hex
    env = {
        "REDIS_URL": redis_url,
        "POPE_VERIFIER__KEY_PREFIX": keys.prefix,
        "POPE_VERIFIER__CONSUME": "false",
        "POPE_VERIFIER__TIMEOUT_S": str(TIMEOUT_S),
        "POPE_VERIFIER__MEMORY_LIMIT_MB": str(MEMORY_LIMIT_MB),
        MARK: marker,
    }
    watch = ProcessWatch(marker)
    with watch.running():
        with running_pope(["verifier", "--workers", str(WORKERS)], "/readyz", env) as proc:
            with HealthPoll(proc.url).running() as health:
                results = score_each(proc.url, cases, concurrency=WORKERS)
            metrics = httpx.get(f"{proc.url}/metrics").text
            workers_at_end = [p for p in watch.workers(proc.pid) if p.pid in watch.alive()]
        deadline = time.monotonic() + 20
        while watch.alive() and time.monotonic() < deadline:
            time.sleep(0.1)

    wrong = [
        (r.case.kind, r.case.completion[:80], r.case.expected, r.score)
        for r in results
        if r.score["reward"] != r.case.expected
    ]
    assert not wrong, wrong
    slow = [
        (r.case.kind, r.case.completion[:80], round(r.seconds, 2), r.score)
        for r in results
        if r.seconds >= TIMEOUT_S or r.score["timed_out"]
    ]
    assert not slow, slow
    assert restarts(metrics) == 0, "a worker was killed: the guard let something slow through"
    assert health.latencies and all(t is not None and t < 2.0 for t in health.latencies), health.latencies
    assert not canary.exists(), "code in an answer ran"
    workers = watch.workers(proc.pid)
    assert len(workers) == WORKERS and len(workers_at_end) == WORKERS, workers
    assert all(w.peak_vm_mb < MEMORY_LIMIT_MB for w in workers), workers
    assert not watch.strays(proc.pid), watch.strays(proc.pid)
    assert not watch.alive(), f"left after the service stopped: {watch.alive()}"
    # The guard answered the hostile ones itself, with its reason.
    assert any("exponent" in (r.score["error"] or "") for r in results if r.case.kind == "tower")
