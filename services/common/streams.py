"""Reliable Redis streams: publish, and read through a consumer group at-least-once.

Delivery contract (DESIGN.md 4), what this module guarantees:
- ``publish`` appends one entry with one field, ``data``, holding the message's JSON, to a
  stream capped at ``maxlen`` entries.
- ``GroupReader.read`` hands out, in this order: this consumer's own unacked entries
  (after a restart or a failed attempt), entries other consumers have held longer than the
  lease (XAUTOCLAIM: the consumer is presumed dead), then new entries.
- An entry stays pending until the caller acks it, which it does only after the effect is
  durable. A live consumer that holds entries for long calls ``renew`` so they are not
  reclaimed from it; a stopping one calls ``hand_back`` so others take them at once.
- An entry that fails ``max_failures`` times, or is not a valid message at all, goes to
  the dead-letter stream with its error and is acked.

Idempotency (redelivery never double-counts) is layered on top, in ``worker.Worker``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import Counter
from pydantic import BaseModel, ConfigDict, Field
from redis.asyncio import Redis
from redis.exceptions import ResponseError
from redis.typing import StreamIdT

from services.common.keys import Keys
from services.common.messages import DeadLetter, encode

log = logging.getLogger(__name__)

DATA = b"data"

RECLAIMED = Counter(
    "pope_stream_reclaimed_total", "Entries taken over from a consumer past its lease", ["stream", "group"]
)
DEAD = Counter("pope_stream_dead_lettered_total", "Entries moved to the dead-letter stream", ["stream", "group"])
FAILURES = Counter("pope_stream_failures_total", "Failed attempts at handling an entry", ["stream", "group"])
TRIMMED = Counter(
    "pope_stream_trimmed_unread_total",
    "Pending entries the stream cap removed before they were handled",
    ["stream", "group"],
)


class DeliveryPolicy(BaseModel):
    """How a stream is capped and how its consumers share, retry and give up on work."""

    model_config = ConfigDict(use_attribute_docstrings=True)

    lease_ms: int = Field(60_000, gt=0)
    """A consumer holding an entry longer than this without renewing is presumed dead."""
    max_failures: int = Field(3, ge=1)
    """Failed attempts after which an entry goes to the dead-letter stream."""
    maxlen: int = Field(100_000, gt=0)
    """Cap on each stream's length; the oldest entries are trimmed past it."""
    exact_trim: bool = False
    """Trim to exactly ``maxlen`` (slower) instead of Redis' cheaper approximate trim."""
    block_ms: int = Field(1_000, gt=0)
    """How long one read waits for new entries; also the latency of a graceful stop."""
    retry_delay_ms: int = Field(500, ge=0)
    """Pause before retrying after a failed attempt (a crashing dependency gets time to recover)."""
    batch: int = Field(16, ge=1)
    """Entries read at a time."""
    done_ttl_s: int = Field(7 * 24 * 3600, gt=0)
    """How long a 'done' marker (idempotency key) is remembered."""


@dataclass(frozen=True)
class Entry:
    """One stream entry as read: its id and the raw ``data`` payload."""

    id: str
    data: bytes


async def publish(redis: Redis, stream: str, message: BaseModel, policy: DeliveryPolicy) -> str:
    """Append ``message`` to ``stream`` (capped); return the entry id."""
    entry_id = await redis.xadd(
        stream, {DATA: encode(message)}, maxlen=policy.maxlen, approximate=not policy.exact_trim
    )
    return _s(entry_id)


def queue_publish(pipe: Any, stream: str, message: BaseModel, policy: DeliveryPolicy) -> None:
    """Queue a publish on a pipeline/transaction, to commit it atomically with other writes."""
    pipe.xadd(stream, {DATA: encode(message)}, maxlen=policy.maxlen, approximate=not policy.exact_trim)


def _s(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


async def group_info(redis: Redis, stream: str, group: str) -> dict[str, int] | None:
    """Pending entries and lag (entries not yet delivered) of a consumer group; None when
    the stream or the group does not exist yet.

    Whether anything is undelivered is judged by ids (the group's last-delivered id against
    the stream's last id), not by XINFO's lag alone: after a restart from the AOF, Redis
    can report a lag of thousands for good while the group has read the last entry. The
    count, when something is undelivered, is XINFO's (at least 1)."""
    try:
        groups = await redis.xinfo_groups(stream)
    except ResponseError:
        return None  # no stream yet
    for info in groups:
        if _s(info["name"]) == group:
            last = (await redis.xinfo_stream(stream))["last-generated-id"]
            caught_up = _s(info["last-delivered-id"]) == _s(last)
            lag = 0 if caught_up else max(int(info.get("lag") or 0), 1)
            return {"pending": int(info["pending"]), "lag": lag}
    return None


@dataclass
class GroupReader:
    """One named consumer in a consumer group of one stream: read, ack, renew, dead-letter.

    Not safe to share between concurrent tasks; run one reader per task.
    """

    redis: Redis
    keys: Keys
    stream: str
    group: str
    consumer: str
    policy: DeliveryPolicy = field(default_factory=DeliveryPolicy)
    # Entry ids handed out and not yet acked, dead-lettered or handed back.
    in_hand: set[str] = field(default_factory=set)
    # Where to resume paging through our own pending entries; None once read through.
    # Starts at "0" (a restarted consumer first finishes what it held) and goes back to
    # "0" after a failed attempt, which is how a failed entry is retried.
    _backlog_cursor: str | None = "0"
    _claim_cursor: str = "0-0"

    async def ensure_group(self) -> None:
        """Create the stream and the consumer group if missing (from the stream's start)."""
        try:
            await self.redis.xgroup_create(self.stream, self.group, id="0", mkstream=True)
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    async def read(self, count: int | None = None, block_ms: int | None = None) -> list[Entry]:
        """Up to ``count`` entries: own backlog first, then reclaimed, then new (may block)."""
        count = count or self.policy.batch
        entries: list[Entry] = []
        if self._backlog_cursor is not None:
            # Pages on from the last id returned; an empty page ends the backlog.
            entries, self._backlog_cursor = await self._read_group(self._backlog_cursor, count, block_ms=None)
        if not entries:
            entries = await self._reclaim(count)
            if not entries and self._backlog_cursor is not None:  # 6.2: ack what the cap trimmed
                entries, self._backlog_cursor = await self._read_group(self._backlog_cursor, count, block_ms=None)
        if not entries:
            entries, _ = await self._read_group(">", count, block_ms or self.policy.block_ms)
        fresh = [e for e in entries if e.id not in self.in_hand]
        self.in_hand.update(e.id for e in fresh)
        return fresh

    async def _read_group(self, start: str, count: int, block_ms: int | None) -> tuple[list[Entry], str | None]:
        """Entries from XREADGROUP and the last id seen (None when the reply was empty)."""
        reply = await self.redis.xreadgroup(
            self.group, self.consumer, {self.stream: start}, count=count, block=block_ms
        )
        out: list[Entry] = []
        trimmed: list[str] = []
        last: str | None = None
        for _stream, rows in reply or []:
            for entry_id, fields in rows:
                eid = last = _s(entry_id)
                if not fields:  # pending, but the stream cap already removed it
                    trimmed.append(eid)
                else:
                    out.append(Entry(eid, fields.get(DATA, b"")))
        if trimmed:
            await self._forget_trimmed(trimmed)
        return out, last

    async def _reclaim(self, count: int) -> list[Entry]:
        reply = await self.redis.xautoclaim(
            self.stream,
            self.group,
            self.consumer,
            min_idle_time=self.policy.lease_ms,
            start_id=self._claim_cursor,
            count=count,
        )
        # Redis >= 7 answers [cursor, entries, deleted-ids] and drops trimmed entries from
        # the pending list itself. Redis 6.2 answers [cursor, entries] with a trimmed entry
        # as nil, without even its id; it is now pending under us, so reading our own
        # backlog (which does give its id) acks it.
        self._claim_cursor = _s(reply[0])
        out = [Entry(_s(eid), fields.get(DATA, b"")) for eid, fields in reply[1] if eid is not None and fields]
        deleted = [_s(eid) for eid in reply[2]] if len(reply) > 2 else []
        if deleted:
            self._count_trimmed(deleted)
        if any(eid is None or not fields for eid, fields in reply[1]):
            self._backlog_cursor = "0"
        # Entries we hold ourselves come back too when this process stalled past the lease
        # (SIGSTOP, a long pause): no one died holding them, so they are not counted as a
        # takeover (three such stalls would dead-letter an entry still in hand).
        out = await self._drop_crashers([e for e in out if e.id not in self.in_hand])
        if out:
            RECLAIMED.labels(self.stream, self.group).inc(len(out))
            log.warning(
                "reclaimed %d entries of %s/%s from consumers silent past the %d ms lease",
                len(out),
                self.stream,
                self.group,
                self.policy.lease_ms,
            )
        return out

    async def _drop_crashers(self, entries: list[Entry]) -> list[Entry]:
        """Count each reclaim; dead-letter entries that ``max_failures`` consumers died
        holding. A crash is no handler exception, so ``fail`` never saw it. Hand-backs
        (graceful stops) are not counted: ``hand_back`` takes its reclaim off again."""
        keep = []
        for entry in entries:
            reclaims = int(await self.redis.hincrby(self.keys.reclaims(self.group), entry.id, 1))  # type: ignore[misc]
            if reclaims >= self.policy.max_failures:  # as many consumers died holding it
                error = (
                    f"taken over {reclaims} times from consumers that died or stalled past the "
                    f"{self.policy.lease_ms} ms lease while holding it, never acked"
                )
                await self._dead_letter(entry, error, reclaims)
            else:
                keep.append(entry)
        return keep

    async def _forget_trimmed(self, ids: list[str]) -> None:
        self._count_trimmed(ids)
        await self.ack(*ids)

    def _count_trimmed(self, ids: list[str]) -> None:
        # Their payload is gone; nothing can handle them. Counted and logged, never silent.
        TRIMMED.labels(self.stream, self.group).inc(len(ids))
        log.error(
            "%d pending entries of %s were trimmed by the stream cap before being handled "
            "(consumers lag by more than maxlen=%d): %s",
            len(ids),
            self.stream,
            self.policy.maxlen,
            ids[:5],
        )

    def reset(self) -> None:
        """Forget what is in hand (e.g. after a lost connection): it is still pending in
        Redis under this consumer, so the next read takes it up again from the backlog."""
        self.in_hand.clear()
        self._backlog_cursor = "0"

    def release(self, entry_id: str) -> None:
        """Let go of one entry for a later retry from the backlog (it stays pending)."""
        self.in_hand.discard(entry_id)
        self._backlog_cursor = "0"

    async def ack(self, *ids: str) -> None:
        if ids:
            async with self.redis.pipeline(transaction=True) as pipe:
                self.queue_ack(pipe, *ids)
                await pipe.execute()
            self.acked(*ids)

    def queue_ack(self, pipe: Any, *ids: str) -> None:
        """Queue the ack (and the end of its bookkeeping) on a transaction; call ``acked``
        once it has committed."""
        pipe.xack(self.stream, self.group, *ids)
        pipe.hdel(self.keys.failures(self.group), *ids)
        pipe.hdel(self.keys.reclaims(self.group), *ids)

    def acked(self, *ids: str) -> None:
        self.in_hand.difference_update(ids)

    async def renew(self, *ids: str) -> list[str]:
        """Reset the idle time of entries still ours, so no one reclaims them; return the
        ids that are no longer ours (another consumer took them over while we stalled).
        Two round trips, however many ids: their owners, then one XCLAIM of ours."""
        if not ids:
            return []
        async with self.redis.pipeline(transaction=False) as pipe:
            for eid in ids:
                pipe.xpending_range(self.stream, self.group, min=eid, max=eid, count=1)
            replies = await pipe.execute()
        owners = [_s(rows[0]["consumer"]) if rows else None for rows in replies]
        ours: list[StreamIdT] = [eid for eid, owner in zip(ids, owners, strict=True) if owner == self.consumer]
        if ours:
            await self.redis.xclaim(self.stream, self.group, self.consumer, 0, ours, justid=True)
        return [eid for eid, owner in zip(ids, owners, strict=True) if owner != self.consumer]

    async def hand_back(self, *ids: str) -> None:
        """Give entries up now: mark them idle past the lease so any consumer takes them.

        The reclaim that follows is not a crash, so it is taken off the reclaim count now.
        """
        if ids:
            async with self.redis.pipeline(transaction=True) as pipe:
                pipe.xclaim(
                    self.stream, self.group, self.consumer, 0, list(ids), idle=self.policy.lease_ms + 1, justid=True
                )
                for eid in ids:
                    pipe.hincrby(self.keys.reclaims(self.group), eid, -1)
                await pipe.execute()
            self.in_hand.difference_update(ids)

    async def hand_back_pending(self) -> int:
        """Hand back everything pending under this consumer (e.g. entries waiting for a
        retry) that is not in hand; return how many."""
        rows = await self.redis.xpending_range(self.stream, self.group, "-", "+", 10_000, consumername=self.consumer)
        ids = [_s(r["message_id"]) for r in rows if _s(r["message_id"]) not in self.in_hand]
        await self.hand_back(*ids)
        return len(ids)

    async def fail(self, entry: Entry, error: str, *, retryable: bool = True) -> bool:
        """Record a failed attempt; dead-letter the entry once out of attempts.

        Returns True when the entry was dead-lettered (and acked), False when it stays
        pending for another attempt.
        """
        FAILURES.labels(self.stream, self.group).inc()
        failures = int(await self.redis.hincrby(self.keys.failures(self.group), entry.id, 1))  # type: ignore[misc]
        if retryable and failures < self.policy.max_failures:
            log.warning(
                "entry %s of %s failed (attempt %d of %d): %s",
                entry.id,
                self.stream,
                failures,
                self.policy.max_failures,
                error,
            )
            self.release(entry.id)  # retried from our own pending list
            return False
        await self._dead_letter(entry, error, failures)
        return True

    async def _dead_letter(self, entry: Entry, error: str, failures: int) -> None:
        letter = DeadLetter(
            stream=self.stream,
            group=self.group,
            entry_id=entry.id,
            data=entry.data.decode(errors="replace"),
            error=error,
            failures=failures,
        )
        async with self.redis.pipeline(transaction=True) as pipe:
            queue_publish(pipe, self.keys.dead, letter, self.policy)
            self.queue_ack(pipe, entry.id)
            await pipe.execute()
        self.acked(entry.id)
        DEAD.labels(self.stream, self.group).inc()
        log.error(
            "entry %s of %s dead-lettered to %s after %d failure(s): %s",
            entry.id,
            self.stream,
            self.keys.dead,
            failures,
            error,
        )
