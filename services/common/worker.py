"""A stream worker: read entries, run a handler, commit its effect and the ack as one.

This is the loop the verifier (and any stream-to-stream stage) runs:

    reader = GroupReader(redis, keys, keys.rollouts, VERIFIERS, consumer="verifier-1")
    worker = Worker(reader, RawGroup, score_group, key_of=lambda g: g.group_id)
    await worker.run(stop)          # until stop is set (SIGTERM)

Exactly once *in effect*, on top of at-least-once delivery:
- The handler does not write to Redis itself; it queues writes on ``Effects``. They are
  committed in one MULTI/EXEC with a "done" marker for the message's idempotency key
  and the XACK, so either all of them happen or none does.
- Before handling, the done marker is WATCHed and checked: a redelivered or duplicated
  message whose key is already done is only acked. If another consumer finishes the
  same key while this one works, the WATCH aborts this commit.
- While a handler runs, its entry's lease is renewed, so only a dead consumer's entries
  are reclaimed. On stop, the message in hand is finished and the rest are handed back.
- A handler exception is a failed attempt (retried, then dead-lettered); a Redis error
  is not the message's fault and is never counted: the worker backs off and carries on.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
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
    ) -> None:
        self.reader = reader
        self.model = model
        self.handler = handler
        self.key_of = key_of
        # (service, instance): written as a short-lived health key while the loop runs.
        self.heartbeat = heartbeat
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
        entries = await self.reader.read()
        for i, entry in enumerate(entries):
            if stop is not None and stop.is_set():
                rest = [e.id for e in entries[i:]]
                await self.reader.hand_back(*rest)
                HANDED_BACK.labels(self.reader.stream, self.reader.group).inc(len(rest))
                log.info("stopping: handed back %d unstarted entries", len(rest))
                return i
            await self.handle(entry)
        return len(entries)

    async def handle(self, entry: Entry) -> Outcome:
        outcome = await self._handle(entry)
        HANDLED.labels(self.reader.stream, self.reader.group, outcome).inc()
        return outcome

    async def _handle(self, entry: Entry) -> Outcome:
        reader = self.reader
        try:
            message = decode(self.model, entry.data)
            key = self.key_of(message)
        except MessageError as exc:
            await reader.fail(entry, str(exc), retryable=False)
            return "dead"
        done_key = reader.keys.done(reader.group, key)
        if await reader.redis.exists(done_key):
            await reader.ack(entry.id)
            log.info("entry %s: %s already done, acked without handling", entry.id, key)
            return "duplicate"
        # The handler runs with no transaction open: WATCH is taken only for the commit,
        # so a connection that idles through a long handler cannot break it.
        effects = Effects(reader.policy)
        try:
            async with self._renewing(entry.id):
                await self.handler(message, effects)
        except RedisError:
            raise
        except Exception as exc:
            log.exception("handler failed on entry %s (%s)", entry.id, key)
            dead = await reader.fail(entry, f"{type(exc).__name__}: {exc}")
            self._failed = not dead
            return "dead" if dead else "retry"
        return await self._commit(entry, done_key, effects)

    async def _commit(self, entry: Entry, done_key: str, effects: Effects) -> Outcome:
        """Effects + done marker + ack in one MULTI/EXEC, unless the key got done meanwhile.

        Effects must not fail inside EXEC (Redis does not roll back a transaction whose
        command errors at run time): queue only well-formed writes to keys of the right type.
        """
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
    async def _renewing(self, entry_id: str) -> AsyncIterator[None]:
        """Keep renewing the entry's lease (and the heartbeat) while the handler runs."""
        period = self.reader.policy.lease_ms / 3000

        async def renew() -> None:
            while True:
                await asyncio.sleep(period)
                with contextlib.suppress(RedisError):
                    await self._beat()
                    if await self.reader.renew(entry_id):
                        log.warning("entry %s was taken over by another consumer while in hand", entry_id)

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
