"""The problem store: every Problem the system knows, and per-variant solve counts, in Redis.

    store = ProblemStore(redis, keys)
    ids = await store.put_many(problems)      # all-or-nothing, replaces by id
    problem = await store.get(ids[0])
    effects.call(lambda pipe: store.queue_record(pipe, scored_group))   # in a stream handler
    await store.stats(ids[0])  # {"hinted": {"attempts": 8, "solves": 3}, "unhinted": {...}}
    await store.stats_many(ids)  # {problem-id: {"hinted": VariantStats(...), ...}}, two reads in all
    await store.update(pid, lambda p: p.model_copy(update={"excluded": "why"}))  # None: gone
    await store.delete(pid)                   # False when it was not stored

A deleted problem is no longer drawn (the scheduler reads the store each step, and skips
a planned group whose problem is gone); groups already published are still scored and
trained on. ``update`` re-reads the problem under WATCH, so a change made meanwhile (an
exclusion, a hint search's result, a deletion) is never overwritten with an old copy.

Layout (services/common/keys.py):

    <prefix>problems   hash  problem-id -> Problem JSON
    <prefix>stats      hash  "<problem-id>:<variant>:attempts" | ":solves" -> count
    <prefix>first_solves  sorted set  "<problem-id>:<variant>" -> the step of its first solve

The step of a first solve is the training step a group was generated for (RawGroup.step),
the smallest of every solving group's (ZADD LT), so groups scored out of order still give
the first: for an unhinted variant it is the transfer, the step from which the problem is
solved without its hint.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from redis.asyncio import Redis
from redis.asyncio.client import Pipeline
from redis.exceptions import WatchError

from services.common.keys import Keys
from services.common.messages import Problem, ScoredGroup, Variant, decode, encode

ATTEMPTS = "attempts"
SOLVES = "solves"


def stats_field(problem_id: str, variant: Variant, counter: str) -> str:
    """The field of the stats hash holding one counter of one problem variant."""
    return f"{problem_id}:{variant.value}:{counter}"


def first_solve_member(problem_id: str, variant: Variant) -> str:
    """The member of the first-solves sorted set for one problem variant."""
    return f"{problem_id}:{variant.value}"


@dataclass
class VariantStats:
    """One problem variant's counts: samples drawn, samples solved, and the step of its
    first solve (None: never solved)."""

    attempts: int = 0
    solves: int = 0
    first_solve_step: int | None = None


class ProblemStore:
    """Problems by id, plus attempt and solve counts per problem and prompt variant."""

    def __init__(self, redis: Redis, keys: Keys) -> None:
        self.redis = redis
        self.keys = keys

    async def put_many(self, problems: list[Problem]) -> list[str]:
        """Store ``problems`` in one MULTI/EXEC, so a batch lands whole or not at all.

        A problem whose id is already stored is replaced; within the batch, the last
        problem with a given id wins. Returns one id per problem, in order.
        """
        ids = [p.id for p in problems]
        if not problems:
            return ids  # HSET with no fields is a Redis error; nothing to store anyway
        # A dict keeps the last value per id, which is the "last one wins" rule.
        mapping: dict[str | bytes, bytes] = {p.id: encode(p) for p in problems}
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.hset(self.keys.problems, mapping=mapping)
            await pipe.execute()
        return ids

    async def get(self, problem_id: str) -> Problem | None:
        data: bytes | None = await self.redis.hget(self.keys.problems, problem_id)  # type: ignore[misc]
        return None if data is None else decode(Problem, data)

    async def all(self) -> list[Problem]:
        """Every stored problem, in id order (HGETALL order is not stable across writes)."""
        rows: dict[bytes, bytes] = await self.redis.hgetall(self.keys.problems)  # type: ignore[misc]
        return [decode(Problem, rows[k]) for k in sorted(rows)]

    async def update(self, problem_id: str, change: Callable[[Problem], Problem | None]) -> Problem | None:
        """Store ``change(stored)`` in place of the stored problem, atomically against any
        other write to the store (optimistic: retried when one lands between the read and
        the write). Returns what was stored; None, storing nothing, when the problem is not
        stored or ``change`` returns None."""
        while True:
            async with self.redis.pipeline(transaction=True) as pipe:
                try:
                    await pipe.watch(self.keys.problems)
                    data = await pipe.hget(self.keys.problems, problem_id)  # type: ignore[misc]
                    new = None if data is None else change(decode(Problem, data))
                    if new is None:
                        return None
                    if new.id != problem_id:
                        raise ValueError(f"an update may not change a problem's id ({problem_id!r} -> {new.id!r})")
                    pipe.multi()
                    pipe.hset(self.keys.problems, mapping={problem_id: encode(new)})
                    await pipe.execute()
                    return new
                except WatchError:
                    continue

    async def delete(self, problem_id: str) -> bool:
        """Remove the problem and its solve counts; False when it was not stored."""
        fields = [stats_field(problem_id, v, c) for v in Variant for c in (ATTEMPTS, SOLVES)]
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.hdel(self.keys.problems, problem_id)
            pipe.hdel(self.keys.stats, *fields)
            pipe.zrem(self.keys.first_solves, *(first_solve_member(problem_id, v) for v in Variant))
            removed, _, _ = await pipe.execute()
        return bool(removed)

    async def count(self) -> int:
        n: int = await self.redis.hlen(self.keys.problems)  # type: ignore[misc]
        return n

    def queue_record(self, pipe: Pipeline, group: ScoredGroup) -> None:
        """Queue the group's attempt and solve counts onto a transaction.

        Used from a stream handler (``effects.call(lambda p: store.queue_record(p, g))``)
        so the counts commit with the message's ack and a redelivered group, being
        skipped as done, is never counted twice. A sample solves when its reward is > 0; a
        group that solves lowers its variant's first-solve step to its own if earlier.
        """
        solves = sum(score.reward > 0 for score in group.scores)
        pipe.hincrby(self.keys.stats, stats_field(group.problem_id, group.variant, ATTEMPTS), len(group.samples))
        pipe.hincrby(self.keys.stats, stats_field(group.problem_id, group.variant, SOLVES), solves)
        if solves:
            member = first_solve_member(group.problem_id, group.variant)
            pipe.zadd(self.keys.first_solves, {member: group.step}, lt=True)

    async def stats(self, problem_id: str) -> dict[str, dict[str, int]]:
        """{"hinted": {"attempts": a, "solves": s}, "unhinted": {...}}; zeros when absent."""
        fields = [stats_field(problem_id, v, c) for v in Variant for c in (ATTEMPTS, SOLVES)]
        values: list[bytes | None] = await self.redis.hmget(self.keys.stats, fields)  # type: ignore[misc]
        counts = iter(int(v) if v is not None else 0 for v in values)
        return {v.value: {c: next(counts) for c in (ATTEMPTS, SOLVES)} for v in Variant}

    async def ids(self) -> list[str]:
        """Every stored problem's id, sorted (the ids alone: no problem is read)."""
        raw: list[bytes] = await self.redis.hkeys(self.keys.problems)  # type: ignore[misc]
        return sorted(k.decode() for k in raw)

    async def get_many(self, problem_ids: list[str]) -> list[Problem]:
        """The stored problems of ``problem_ids``, in that order (one gone meanwhile is left out)."""
        if not problem_ids:
            return []
        rows: list[bytes | None] = await self.redis.hmget(self.keys.problems, problem_ids)  # type: ignore[misc]
        return [decode(Problem, row) for row in rows if row is not None]

    async def stats_many(self, problem_ids: list[str]) -> dict[str, dict[str, VariantStats]]:
        """Each problem's stats by variant value, read for these problems only (two reads in
        all); zeros and no first solve for one never sampled."""
        if not problem_ids:
            return {}
        pairs = [(pid, v) for pid in problem_ids for v in Variant]
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.hmget(self.keys.stats, [stats_field(pid, v, c) for pid, v in pairs for c in (ATTEMPTS, SOLVES)])
            pipe.zmscore(self.keys.first_solves, [first_solve_member(pid, v) for pid, v in pairs])
            counts, firsts = await pipe.execute()
        out: dict[str, dict[str, VariantStats]] = {pid: {} for pid in problem_ids}
        for i, (pid, v) in enumerate(pairs):
            attempts, solves, first = counts[2 * i], counts[2 * i + 1], firsts[i]
            out[pid][v.value] = VariantStats(
                attempts=int(attempts or 0),
                solves=int(solves or 0),
                first_solve_step=None if first is None else int(first),
            )
        return out
