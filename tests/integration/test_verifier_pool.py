"""The scoring pool with real worker processes: hard limits, crashes, concurrency."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import AsyncIterator

import pytest

from services.verifier.pool import ScoringPool

TOWER = "\\boxed{9^{9^{9^{9^{9}}}}}"  # raw math-verify spins on this for minutes; the guard refuses it
# Gets past the guard (services/verifier/guard.py) and takes math-verify about 10 s.
SLOW = "\\boxed{\\sum_{k=0}^{100} \\binom{100}{k} x^{k} y^{100-k}}"


@pytest.fixture
async def pool() -> AsyncIterator[ScoringPool]:
    p = ScoringPool(workers=2, timeout_s=1.5)
    await p.start()
    yield p
    await p.close()


async def test_pathological_answer_is_cut_off_while_others_are_scored(pool: ScoringPool) -> None:
    start = time.monotonic()
    hang, other = await asyncio.gather(
        pool.score("4", ["\\boxed{4}", SLOW, "\\boxed{5}", "\\boxed{2+2}"]),
        pool.score("\\frac{1}{2}", ["\\boxed{0.5}", "\\boxed{0.6}"]),
    )
    elapsed = time.monotonic() - start
    assert [s.reward for s in hang] == [1.0, 0.0, 0.0, 1.0]
    assert hang[1].timed_out and "longer than 1.5s" in (hang[1].error or "")
    assert hang[1].extracted == SLOW[len("\\boxed{") : -1]
    assert [s.reward for s in other] == [1.0, 0.0]
    assert elapsed < 1.5 + 3.0, f"took {elapsed:.1f}s: the limit was not enforced"
    assert pool.restarts == 1 and pool.alive()
    # The replacement worker scores like any other.
    assert [s.reward for s in await pool.score("3", ["\\boxed{3}"] * 4)] == [1.0] * 4


async def test_worker_killed_mid_answer_is_replaced_and_the_group_still_scored() -> None:
    pool = ScoringPool(workers=1, timeout_s=60)  # the kill, not the limit, must end it
    await pool.start()
    try:
        # The slow one comes first: once the worker is busy it can only be on it.
        task = asyncio.create_task(pool.score("2", [SLOW, "\\boxed{2}", "\\boxed{2}", "\\boxed{3}"]))
        deadline = time.monotonic() + 30
        while not pool.busy_pids():
            assert time.monotonic() < deadline, "the worker never started scoring"
            await asyncio.sleep(0.01)
        [pid] = pool.busy_pids()
        os.kill(pid, signal.SIGKILL)
        scores = await asyncio.wait_for(task, 30)
        assert [s.reward for s in scores] == [0.0, 1.0, 1.0, 0.0]
        assert "died" in (scores[0].error or "") and not scores[0].timed_out
        assert pool.restarts == 1 and pool.alive() and pid not in pool.pids()
    finally:
        await pool.close()


async def test_garbage_and_huge_inputs_do_not_break_scoring(pool: ScoringPool) -> None:
    weird = [
        "",
        "\\boxed{",
        "}}}{{{",
        "\\boxed{\\frac{1}{0}}",
        "\x00\xff" * 100,
        "\\boxed{" + "(" * 5000 + "}",
        "a" * 200_000,
    ]
    scores = await pool.score("1", weird)
    assert len(scores) == len(weird) and all(s.reward == 0.0 for s in scores)
    assert pool.alive()


def test_a_worker_whose_parent_is_gone_stops_itself() -> None:
    """A verifier killed with SIGKILL cannot kill its busy worker; the worker's own CPU cap
    (2 CPU seconds here) must end it while it spins on a slow answer, long before math-verify would."""
    from services.verifier.pool import _ctx, _worker_main

    parent, child = _ctx.Pipe()
    worker = _ctx.Process(target=_worker_main, args=(child, None, 2), daemon=True)
    worker.start()
    child.close()
    parent.send(("2", [SLOW]))  # nobody will kill it: this test only waits
    worker.join(30)
    assert worker.exitcode == -signal.SIGXCPU, worker.exitcode


async def test_the_guard_refuses_a_tower_without_losing_the_worker(pool: ScoringPool) -> None:
    start = time.monotonic()
    scores = await pool.score("3", [TOWER, "\\boxed{3}"])
    assert time.monotonic() - start < 1.5, "the tower reached math-verify"
    assert [s.reward for s in scores] == [0.0, 1.0]
    assert not scores[0].timed_out and "exponents" in (scores[0].error or "")
    assert scores[0].extracted == "9^{9^{9^{9^{9}}}}"
    assert pool.restarts == 0
