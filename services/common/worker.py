"""A stream worker: read entries, run a handler, commit its effect and the ack as one.

This is the loop the verifier (and any stream-to-stream stage) runs:

    reader = GroupReader(redis, keys, keys.rollouts, VERIFIERS, consumer="verifier-1")
    worker = Worker(reader, RawGroup, score_group, key_of=lambda g: g.group_id)
    await worker.run(stop)          # until stop is set (SIGTERM)

Exactly once *in effect*, on top of at-least-once delivery:
- The handler does not write to Redis itself; it queues writes on ``Effects``. They are
  committed in one MULTI/EXEC with a "done" marker for the message's idempotency key
  and the XACK, so either all of them happen or none does.
- Before handling, the done marker is checked: a redelivered or duplicated message whose
  key is already done is only acked. The commit WATCHes the marker and checks it again,
  so if another consumer finishes the same key while this one works, the commit is
  aborted and the entry only acked.
- While an entry is in hand (its handler running, or waiting its turn in the batch), its
  lease is renewed, so only a dead consumer's entries are reclaimed. On stop, the
  handlers running are finished and committed, and the entries not started are handed back.
- A handler exception is a failed attempt (retried, then dead-lettered); a Redis error
  is not the message's fault and is never counted: the worker backs off and carries on.

A batch (the entries one read returns, ``DeliveryPolicy.batch``) costs a few round trips
in all rather than a few per entry: its done markers are checked in one, its leases are
renewed in one, and the entries handled are committed together in one MULTI/EXEC that
WATCHes all their markers. Each entry still gets its own outcome: when that commit
cannot go through whole (a marker is set, the WATCH fired), each entry is committed on
its own, so a duplicate never holds up the others. A key that comes twice in one batch
is handled once; its second entry waits for the first's commit and is then acked as a
duplicate (or handled, if the first failed). The effects of a batch appear together,
once its last entry is handled: up to ``concurrency`` handlers run at a time (1, the
default, runs them in order; the verifier runs more, so its scoring processes never wait
for Redis).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Generic, Literal, TypeVar

from prometheus_client import Counter
from pydantic import BaseModel
from redis.exceptions import RedisError, WatchError

from services.common.messages import MessageError, decode
from services.common.streams import DeliveryPolicy, Entry, GroupReader, queue_publish

log = logging.getLogger(__name__)

M = TypeVar("M", bound=BaseModel)
Outcome = Literal["done", "duplicate", "retry", "dead"]

HANDLED = Counter("pope_stream_handled_total", "Entries handled, by outcome", ["stream", "group", "outcome"])
HANDED_BACK = Counter("pope_stream_handed_back_total", "Entries handed back on stop", ["stream", "group"])


class Effects:
    """Redis writes a handler asks for; committed atomically with the message's ack."""

    def __init__(self, policy: DeliveryPolicy) -> None:
        self._policy = policy
        self._ops: list[Callable[[Any], Any]] = []

    def publish(self, stream: str, message: BaseModel) -> None:
        self._ops.append(lambda pipe: queue_publish(pipe, stream, message, self._policy))

    def call(self, op: Callable[[Any], Any]) -> None:
        """Queue any command on the transaction, e.g. ``effects.call(lambda p: p.incr(k))``."""
        self._ops.append(op)

    def apply(self, pipe: Any) -> None:
        for op in self._ops:
            op(pipe)


Handler = Callable[[M, Effects], Awaitable[None]]


def default_consumer_name(service: str) -> str:
    """A name unique to this process: consumers must differ for reclaim to mean anything."""
    return f"{service}-{socket.gethostname()}-{os.getpid()}"


@dataclass
class _Job(Generic[M]):
    """An entry of a batch, decoded, on its way through the handler to its commit."""

    entry: Entry
    message: M
    done_key: str
    effects: Effects | None = None  # set once the handler has run through
    failed: Outcome | None = None  # "retry" or "dead" once the handler has failed


class Worker(Generic[M]):
    """Runs ``handler`` on every message of a consumer group, exactly once in effect."""

    def __init__(
        self,
        reader: GroupReader,
        model: type[M],
        handler: Handler[M],
        *,
        key_of: Callable[[M], str],
        heartbeat: tuple[str, str] | None = None,
        concurrency: int = 1,
    ) -> None:
        self.reader = reader
        self.model = model
        self.handler = handler
        self.key_of = key_of
        # (service, instance): written as a short-lived health key while the loop runs.
        self.heartbeat = heartbeat
        # Handlers of one batch running at a time; more than 1 only for handlers that
        # do not depend on each other's order (the archiver's appends do).
        self.concurrency = concurrency
        self._failed = False  # a retryable failure happened in the current batch

    async def run(self, stop: asyncio.Event) -> None:
        """Work until ``stop`` is set; then finish the message in hand and hand back the rest.

        Redis errors never end the loop: a lost connection, a failover (READONLY), an
        out-of-memory refusal or a group that vanished with a Redis that came back empty
        are logged, and the worker backs off and starts over from its own pending list.
        """
        backoff = 0.1
        ready = False
        while not stop.is_set():
            try:
                if not ready:
                    await self.reader.ensure_group()
                    ready = True
                await self._beat()
                self._failed = False
                await self.run_once(stop)
                backoff = 0.1
                if self._failed:  # pause before the retry, not before other work
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(stop.wait(), self.reader.policy.retry_delay_ms / 1000)
            except RedisError as exc:
                log.warning("redis error (%s: %s); retrying in %.1fs", type(exc).__name__, exc, backoff)
                self.reader.reset()
                ready = False
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), backoff)
                backoff = min(backoff * 2, 5.0)
        with contextlib.suppress(RedisError):
            if n := await self.reader.hand_back_pending():
                HANDED_BACK.labels(self.reader.stream, self.reader.group).inc(n)
                log.info("stopping: handed back %d entries waiting for a retry", n)

    async def run_once(self, stop: asyncio.Event | None = None) -> int:
        """Read one batch and handle it; return how many entries were handled."""
        return await self.handle_batch(await self.reader.read(), stop)

    async def handle_batch(self, entries: Sequence[Entry], stop: asyncio.Event | None = None) -> int:
        """Handle entries read together; return how many were handled (not handed back).

        Once ``stop`` is set no further handler starts: those running finish and are
        committed with the ones done, and the entries not started are handed back.
        """
        jobs: list[_Job[M]] = []
        again: list[Entry] = []  # a key already in this batch: handled after its commit
        for entry in entries:
            if (job := await self._decode(entry)) is None:
                self._count("dead")
            elif any(job.done_key == j.done_key for j in jobs):
                again.append(entry)
            else:
                jobs.append(job)
        fresh = await self._skip_done(jobs)
        for _ in range(len(jobs) - len(fresh)):
            self._count("duplicate")
        jobs = fresh
        started = await self._run_handlers(jobs, stop)
        for job in started:
            if job.failed:
                self._count(job.failed)
        for outcome in await self._commit_batch([(j, j.effects) for j in started if j.effects is not None]):
            self._count(outcome)
        unstarted = [j.entry for j in jobs[len(started) :]]
        for i, entry in enumerate(again):
            if unstarted or (stop is not None and stop.is_set()):
                unstarted += again[i:]
                break
            await self.handle(entry)
        if unstarted:
            await self.reader.hand_back(*(e.id for e in unstarted))
            HANDED_BACK.labels(self.reader.stream, self.reader.group).inc(len(unstarted))
            log.info("stopping: handed back %d unstarted entries", len(unstarted))
        return len(entries) - len(unstarted)

    async def handle(self, entry: Entry) -> Outcome:
        """Handle one entry on its own (decode, check, handle, commit); its outcome."""
        outcome = await self._handle(entry)
        self._count(outcome)
        return outcome

    def _count(self, outcome: Outcome) -> None:
        HANDLED.labels(self.reader.stream, self.reader.group, outcome).inc()

    async def _handle(self, entry: Entry) -> Outcome:
        if (job := await self._decode(entry)) is None:
            return "dead"
        if not await self._skip_done([job]):
            return "duplicate"
        await self._run_handlers([job], None)
        if job.effects is None:
            return job.failed or "retry"
        return await self._commit(entry, job.done_key, job.effects)

    async def _decode(self, entry: Entry) -> _Job[M] | None:
        """The entry as a message; None when it is none (dead-lettered at once)."""
        try:
            message = decode(self.model, entry.data)
            key = self.key_of(message)
        except MessageError as exc:
            await self.reader.fail(entry, str(exc), retryable=False)
            return None
        return _Job(entry, message, self.reader.keys.done(self.reader.group, key))

    async def _skip_done(self, jobs: list[_Job[M]]) -> list[_Job[M]]:
        """Ack the jobs whose key is done already (one round trip to check them all, one
        to ack); return the others."""
        if not jobs:
            return []
        reader = self.reader
        async with reader.redis.pipeline(transaction=False) as pipe:
            for job in jobs:
                pipe.exists(job.done_key)
            done = await pipe.execute()
        duplicates = [job for job, d in zip(jobs, done, strict=True) if d]
        if duplicates:
            await reader.ack(*(job.entry.id for job in duplicates))
            for job in duplicates:
                log.info("entry %s: %s already done, acked without handling", job.entry.id, job.done_key)
        return [job for job, d in zip(jobs, done, strict=True) if not d]

    async def _run_handlers(self, jobs: list[_Job[M]], stop: asyncio.Event | None) -> list[_Job[M]]:
        """Run the handler on each job, ``concurrency`` at a time, in order, while the
        batch's leases are renewed; return the jobs started (a prefix: none starts once
        ``stop`` is set), each with its ``effects`` or how it ``failed``."""
        slots = asyncio.Semaphore(self.concurrency)
        started: list[_Job[M]] = []
        tasks: list[asyncio.Task[None]] = []

        async def attempt(job: _Job[M]) -> None:
            try:
                await self._attempt(job)
            finally:
                slots.release()

        async with self._renewing([job.entry.id for job in jobs]):
            try:
                for job in jobs:
                    await slots.acquire()
                    if stop is not None and stop.is_set():
                        break
                    started.append(job)
                    tasks.append(asyncio.create_task(attempt(job)))
            except BaseException:
                for task in tasks:
                    task.cancel()
                raise
            # A Redis error in one handler is raised once the others have ended.
            results = await asyncio.gather(*tasks, return_exceptions=True)
        for result in results:
            if isinstance(result, BaseException):
                raise result
        return started

    async def _attempt(self, job: _Job[M]) -> None:
        """Run the handler once: its effects go on the job, or, when it raised, a failed
        attempt is recorded (retried later, or dead-lettered)."""
        # The handler runs with no transaction open: WATCH is taken only for the commit,
        # so a connection that idles through a long handler cannot break it.
        effects = Effects(self.reader.policy)
        try:
            await self.handler(job.message, effects)
        except RedisError:
            raise
        except Exception as exc:
            log.exception("handler failed on entry %s (%s)", job.entry.id, job.done_key)
            dead = await self.reader.fail(job.entry, f"{type(exc).__name__}: {exc}")
            self._failed = self._failed or not dead
            job.failed = "dead" if dead else "retry"
            return
        job.effects = effects

    async def _commit_batch(self, handled: list[tuple[_Job[M], Effects]]) -> list[Outcome]:
        """Effects + done markers + acks of the handled jobs in one MULTI/EXEC, WATCHing
        every marker; when a marker is set or the WATCH fires, each job on its own.

        Effects must not fail inside EXEC (Redis does not roll back a transaction whose
        command errors at run time): queue only well-formed writes to keys of the right type.
        """
        if len(handled) <= 1:
            return [await self._commit(job.entry, job.done_key, effects) for job, effects in handled]
        reader = self.reader
        done_keys = [job.done_key for job, _ in handled]
        ids = [job.entry.id for job, _ in handled]
        with contextlib.suppress(WatchError):
            async with reader.redis.pipeline(transaction=True) as pipe:
                await pipe.watch(*done_keys)
                if not await pipe.exists(*done_keys):
                    pipe.multi()
                    for job, effects in handled:
                        effects.apply(pipe)
                        pipe.set(job.done_key, job.entry.id, ex=reader.policy.done_ttl_s)
                    reader.queue_ack(pipe, *ids)
                    await pipe.execute()
                    reader.acked(*ids)
                    return ["done"] * len(handled)
        return [await self._commit(job.entry, job.done_key, effects) for job, effects in handled]

    async def _commit(self, entry: Entry, done_key: str, effects: Effects) -> Outcome:
        """One entry's effects + done marker + ack in one MULTI/EXEC, unless the key got
        done meanwhile."""
        reader = self.reader
        try:
            async with reader.redis.pipeline(transaction=True) as pipe:
                await pipe.watch(done_key)
                duplicate = bool(await pipe.exists(done_key))
                pipe.multi()
                if not duplicate:
                    effects.apply(pipe)
                    pipe.set(done_key, entry.id, ex=reader.policy.done_ttl_s)
                reader.queue_ack(pipe, entry.id)
                await pipe.execute()
        except WatchError:
            # redis-py also raises WatchError when the connection drops mid-WATCH, so
            # "someone else finished it" must be checked, not assumed.
            if not await reader.redis.exists(done_key):
                reader.release(entry.id)
                self._failed = True
                return "retry"
            await reader.ack(entry.id)
            duplicate = True
        reader.acked(entry.id)
        return "duplicate" if duplicate else "done"

    @contextlib.asynccontextmanager
    async def _renewing(self, entry_ids: list[str]) -> AsyncIterator[None]:
        """Keep renewing the leases of the entries still in hand (and the heartbeat),
        all in one call, while the batch is handled."""
        period = self.reader.policy.lease_ms / 3000

        async def renew() -> None:
            while True:
                await asyncio.sleep(period)
                with contextlib.suppress(RedisError):
                    await self._beat()
                    held = [eid for eid in entry_ids if eid in self.reader.in_hand]
                    for eid in await self.reader.renew(*held):
                        log.warning("entry %s was taken over by another consumer while in hand", eid)

        task = asyncio.create_task(renew())
        try:
            yield
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _beat(self) -> None:
        if self.heartbeat is not None:
            service, instance = self.heartbeat
            ttl_ms = max(3 * self.reader.policy.block_ms, 5_000)
            await self.reader.redis.set(self.reader.keys.health(service, instance), "1", px=ttl_ms)


def stop_on_signals(stop: asyncio.Event, signals: tuple[int, ...] = (signal.SIGTERM, signal.SIGINT)) -> None:
    """Set ``stop`` on SIGTERM/SIGINT, so loops finish the work in hand and exit cleanly."""
    loop = asyncio.get_running_loop()
    for sig in signals:
        loop.add_signal_handler(sig, stop.set)
