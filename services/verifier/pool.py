"""A pool of killable math-verify worker processes with a hard wall-clock limit per answer.

Why processes, and why killable: math-verify can spin for minutes in C-level sympy work
(a tower of exponents), which no signal-based timeout interrupts, and a pathological
expression can eat memory. So each answer gets ``timeout_s`` seconds, measured here in
the parent; a worker past it is killed (SIGKILL) and replaced, the answer scores 0 with
``timed_out``, and the rest of the group goes on in the fresh worker. A worker that dies
on its own (a crash, the memory limit, someone's ``kill -9``) is replaced the same way
and its answer is reported with an error. Nothing can hang or crash the service. A worker
also caps its own CPU time per answer (twice the limit, enforced by the kernel), so one
left behind by a verifier that was itself killed (``kill -9``, the OOM killer) stops within
seconds instead of spinning on for minutes with nobody to kill it.

Most such answers never get this far: guard.py refuses them in the worker before
math-verify sees them (a ``Refused`` scores 0 with its reason, and the worker lives on).
The limits here are for what the guard cannot bound.

Workers are forked from a forkserver that has math-verify imported already, so a
replacement is ready in milliseconds rather than the seconds a fresh import takes.

One task is one group: the gold answer is parsed once, then each answer is scored and
reported back as it is done (so the parent knows which answer a timeout belongs to).
A group may carry a deadline (an HTTP request's, service.py): what is not scored by then
scores 0 with ``timed_out`` (the answer in progress is cut off as at its own limit), so
no caller waits on a pool for longer than it said it would.

Each pool waits on its workers from threads of its own, one per worker, so two pools in
one process (the stream's and POST /v1/verify's) never wait on each other for a thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import multiprocessing as mp
import os
import resource
import signal
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any

from prometheus_client import Counter, Histogram

from services.common.messages import Score, ScoringPolicy
from services.common.verifier_client import NOT_SCORED
from services.verifier.guard import Refused
from services.verifier.scoring import final_answer_text

log = logging.getLogger(__name__)

RESTARTS = Counter("pope_verifier_worker_restarts_total", "Worker processes replaced", ["reason"])
ANSWER_SECONDS = Histogram(
    "pope_verifier_answer_seconds",
    "Time to score one answer",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30),
)

SCORER_MEMORY = 4096
"""Parsed golds, and judged (gold, answer) pairs, each worker keeps (the most recently used)."""

_ctx = mp.get_context("forkserver")
_ctx.set_forkserver_preload(["services.verifier.scoring", "math_verify"])


def _limit_cpu(seconds: int) -> None:
    """Let this process use at most ``seconds`` more CPU seconds; past that the kernel ends
    it (SIGXCPU), whatever it is doing, C-level sympy work included."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    _, hard = resource.getrlimit(resource.RLIMIT_CPU)
    soft = math.ceil(usage.ru_utime + usage.ru_stime) + seconds
    resource.setrlimit(resource.RLIMIT_CPU, (soft if hard == resource.RLIM_INFINITY else min(soft, hard), hard))


def _worker_main(
    conn: Connection,
    memory_limit_mb: int | None,
    cpu_limit_s: int,
    policy: ScoringPolicy = ScoringPolicy.JOINED_BOXES_V2,
) -> None:
    """Runs in the worker process: (gold, answers) tasks in, scores out, one by one; each
    parse and score may use at most ``cpu_limit_s`` CPU seconds (the parent's wall-clock
    limit comes first while the parent lives)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides when we stop
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))  # a worker ended by its CPU cap leaves no core file
    if memory_limit_mb:
        limit = memory_limit_mb * 1024 * 1024
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    logging.getLogger("math_verify").setLevel(logging.ERROR)  # "timeout is disabled" notices
    from services.verifier.scoring import Scorer

    # A run scores the same problems step after step: a gold's parse (sympy) costs as much
    # as three answers' (link chains: 37 ms against 12), and a group's samples often agree,
    # so each gold is parsed and each (gold, answer) judged once here (Scorer). A failure is
    # not kept, so it is logged each time.
    scorer = Scorer(policy, SCORER_MEMORY)

    while True:
        try:
            task = conn.recv()
        except EOFError:
            return
        if task is None:
            return
        gold, answers = task
        _limit_cpu(cpu_limit_s)
        try:
            gold_parsed = scorer.gold(gold)
        except Exception as exc:
            gold_parsed = None
            log.warning("gold %r failed to parse: %s", gold[:200], exc)  # a 4 KiB gold is one line
        conn.send(("gold", None))
        for i, answer in enumerate(answers):
            _limit_cpu(cpu_limit_s)
            try:
                score = scorer.score(gold, gold_parsed, answer)
            except Refused as exc:  # cannot be an answer (guard.py): no need to try
                score = Score(reward=0.0, extracted=exc.extracted, error=str(exc))
            except MemoryError:
                score = Score(reward=0.0, error="out of memory while scoring (worker memory limit)")
            except Exception as exc:
                score = Score(reward=0.0, error=f"{type(exc).__name__}: {exc}"[:500])
            conn.send(("score", i, score.model_dump()))


LATE = Score(reward=0.0, timed_out=True, error=NOT_SCORED)
"""The score of an answer whose caller's deadline passed before it was scored."""


@dataclass
class _Proc:
    process: Any  # mp.Process from the forkserver context
    conn: Connection
    busy: bool = False  # scoring an answer right now (read by tests and /readyz detail)


class ScoringPool:
    """``workers`` processes scoring groups concurrently; ``await score(gold, answers)``."""

    def __init__(
        self,
        workers: int = 2,
        timeout_s: float = 5.0,
        memory_limit_mb: int | None = 2048,
        policy: ScoringPolicy = ScoringPolicy.JOINED_BOXES_V2,
    ) -> None:
        self.size, self.timeout_s, self.memory_limit_mb = workers, timeout_s, memory_limit_mb
        self.policy = policy
        self._idle: asyncio.Queue[_Proc] = asyncio.Queue()
        self._all: list[_Proc] = []
        self._threads = ThreadPoolExecutor(workers, thread_name_prefix="pope-verifier-pool")
        self.restarts = 0

    async def start(self) -> None:
        procs = await asyncio.gather(*(asyncio.to_thread(self._spawn) for _ in range(self.size)))
        for p in procs:
            self._idle.put_nowait(p)

    async def close(self) -> None:
        for p in list(self._all):
            with contextlib.suppress(OSError, ValueError):
                p.conn.send(None)
        for p in list(self._all):
            await asyncio.to_thread(p.process.join, 2)
            if p.process.is_alive():
                p.process.kill()
        self._all.clear()
        self._threads.shutdown(wait=False)

    def pids(self) -> list[int]:
        return [p.process.pid for p in self._all if p.process.pid is not None]

    def busy_pids(self) -> list[int]:
        """Pids of workers in the middle of scoring an answer."""
        return [p.process.pid for p in self._all if p.busy and p.process.pid is not None]

    def alive(self) -> bool:
        return len(self._all) == self.size and all(p.process.is_alive() for p in self._all)

    async def score(self, gold: str, answers: list[str], deadline: float | None = None) -> list[Score]:
        """Score every answer against ``gold``; never raises for bad input, never hangs.
        With ``deadline`` (``time.monotonic()``), what is not scored by then, waiting for
        a worker included, scores 0 with ``timed_out``."""
        if not answers:
            return []
        try:
            wait = None if deadline is None else max(0.0, deadline - time.monotonic())
            proc = await asyncio.wait_for(self._idle.get(), wait)
        except TimeoutError:
            return [LATE] * len(answers)
        loop = asyncio.get_running_loop()
        try:
            proc, scores = await loop.run_in_executor(self._threads, self._run, proc, gold, answers, deadline)
        finally:
            self._idle.put_nowait(proc)
        return scores

    # Runs in a thread: blocking pipe I/O with deadlines.
    def _run(
        self, proc: _Proc, gold: str, answers: list[str], request_deadline: float | None
    ) -> tuple[_Proc, list[Score]]:
        scores: list[Score | None] = [None] * len(answers)
        pending = list(range(len(answers)))
        cap = math.inf if request_deadline is None else request_deadline
        lost_idle = 0
        while pending and time.monotonic() < cap:
            try:
                proc.conn.send((gold, [answers[i] for i in pending]))
            except OSError:  # it died while idle (killed from outside): a fresh one takes the group
                lost_idle += 1
                proc = self._replace(proc, "died")
                if lost_idle > 1:  # fresh ones die too: give up on the group rather than spin
                    break
                continue
            # The gold parse gets one limit; then each answer its own, from the last result.
            deadline = min(time.monotonic() + self.timeout_s, cap)
            started = time.monotonic()
            done_here = 0
            failure: Score | None = None
            while done_here < len(pending):
                remaining = deadline - time.monotonic()
                try:
                    ready = proc.conn.poll(max(0.0, remaining))
                    msg = proc.conn.recv() if ready else None
                except (EOFError, OSError):
                    failure = Score(reward=0.0, error="verifier worker died while scoring this answer")
                    reason = "died"
                    break
                if msg is None and deadline >= cap:
                    failure, reason = LATE, "deadline"
                    break
                if msg is None:
                    failure = Score(reward=0.0, timed_out=True, error=f"scoring took longer than {self.timeout_s:g}s")
                    reason = "timeout"
                    break
                proc.busy = True  # past the gold parse: an answer is in progress
                if msg[0] == "score":
                    _kind, i, data = msg
                    scores[pending[i]] = Score.model_validate(data)
                    ANSWER_SECONDS.observe(time.monotonic() - started)
                    done_here += 1
                started = time.monotonic()
                deadline = min(started + self.timeout_s, cap)
            proc.busy = False
            if failure is None:
                break
            culprit = pending[done_here]
            scores[culprit] = failure.model_copy(update={"extracted": final_answer_text(answers[culprit])})
            log.warning("answer %d of a group: %s; replacing worker pid %s", culprit, failure.error, proc.process.pid)
            proc = self._replace(proc, reason)
            pending = [i for i in pending if scores[i] is None]
        unscored = LATE if lost_idle <= 1 else Score(reward=0.0, error="verifier workers die as they start")
        return proc, [s if s is not None else unscored for s in scores]

    def _spawn(self) -> _Proc:
        parent, child = _ctx.Pipe()
        cpu_limit_s = 2 * math.ceil(self.timeout_s) + 1  # never reached while this process lives
        process = _ctx.Process(
            target=_worker_main,
            args=(child, self.memory_limit_mb, cpu_limit_s, self.policy),
            daemon=True,
            name="pope-verifier-worker",
        )
        process.start()
        child.close()
        proc = _Proc(process, parent)
        self._all.append(proc)
        return proc

    def _replace(self, proc: _Proc, reason: str) -> _Proc:
        with contextlib.suppress(ProcessLookupError):
            if proc.process.pid is not None:
                os.kill(proc.process.pid, signal.SIGKILL)
        proc.process.join(5)
        proc.conn.close()
        self._all.remove(proc)
        self.restarts += 1
        RESTARTS.labels(reason).inc()
        return self._spawn()
