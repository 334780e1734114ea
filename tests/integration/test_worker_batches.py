"""The stream worker on whole batches against a real Redis: one commit for the batch, yet
each entry its own outcome (duplicate, poison, good), the fall-back to one commit per
entry, a key twice in a batch, handlers run concurrently, and a stop mid-batch."""

from __future__ import annotations

import asyncio
import time

import pytest
from redis.asyncio import Redis
from redis.asyncio.client import Pipeline
from redis.exceptions import WatchError

from services.common.keys import VERIFIERS, Keys
from services.common.messages import DeadLetter, RawGroup, decode
from services.common.streams import DATA, DeliveryPolicy, GroupReader, publish
from services.common.worker import Effects, Handler, Worker
from tests.factories import group, scoring_handler
from tests.integration.test_streams import drain, pending, scored_ids

FAST = DeliveryPolicy(lease_ms=60_000, block_ms=100, batch=8, retry_delay_ms=0)


async def worker_with(
    aredis: Redis,
    keys: Keys,
    handler: Handler[RawGroup],
    *gids: str,
    policy: DeliveryPolicy = FAST,
    concurrency: int = 1,
    name: str = "c1",
) -> Worker[RawGroup]:
    reader = GroupReader(aredis, keys, keys.rollouts, VERIFIERS, name, policy)
    worker = Worker(reader, RawGroup, handler, key_of=lambda g: g.group_id, concurrency=concurrency)
    await reader.ensure_group()
    for gid in gids:
        await publish(aredis, keys.rollouts, group(gid), policy)
    return worker


def count_commits(monkeypatch: pytest.MonkeyPatch, fail_first: bool = False) -> list[int]:
    """Patch transactions to record each commit made under WATCH (its queued commands);
    with ``fail_first``, the first such commit raises WatchError as a dropped connection does."""
    real_execute = Pipeline.execute
    commits: list[int] = []

    async def execute(self: Pipeline, raise_on_error: bool = True) -> list[object]:
        if self.watching:
            if fail_first and not commits:
                commits.append(0)
                await self.reset()
                raise WatchError("A ConnectionError occurred while watching one or more keys")
            commits.append(len(self.command_stack))
        return await real_execute(self, raise_on_error)

    monkeypatch.setattr(Pipeline, "execute", execute)
    return commits


async def test_a_batch_commits_in_one_transaction(aredis: Redis, keys: Keys, monkeypatch: pytest.MonkeyPatch) -> None:
    commits = count_commits(monkeypatch)
    worker = await worker_with(aredis, keys, scoring_handler(keys), *(f"g{i}" for i in range(6)))
    assert await worker.run_once() == 6
    assert len(commits) == 1  # one MULTI/EXEC for the six
    assert await scored_ids(aredis, keys) == [f"g{i}" for i in range(6)] and await pending(aredis, keys) == 0
    for i in range(6):
        assert await aredis.exists(keys.done(VERIFIERS, f"g{i}"))


async def test_a_duplicate_a_poison_and_a_good_entry_each_get_their_own_outcome(aredis: Redis, keys: Keys) -> None:
    score = scoring_handler(keys)
    attempts: list[str] = []

    async def picky(g: RawGroup, effects: Effects) -> None:
        attempts.append(g.group_id)
        if g.group_id == "poison":
            raise ValueError("cannot score this")
        await score(g, effects)

    worker = await worker_with(aredis, keys, picky, "dup")
    await drain(worker, aredis, keys, 1)  # "dup" is done once
    for gid in ("dup", "poison", "good"):
        await publish(aredis, keys.rollouts, group(gid), FAST)
    await aredis.xadd(keys.rollouts, {DATA: b"not json"})
    assert await worker.run_once() == 4
    assert attempts == ["dup", "poison", "good"]  # the duplicate was not handled again
    assert await scored_ids(aredis, keys) == ["dup", "good"]
    assert await pending(aredis, keys) == 1  # the poison, waiting for its retry
    while await pending(aredis, keys):
        await worker.run_once()
    assert attempts.count("poison") == 3 and await scored_ids(aredis, keys) == ["dup", "good"]
    dead = [decode(DeadLetter, f[DATA]) for _i, f in await aredis.xrange(keys.dead)]
    assert [d.failures for d in dead] == [1, 3]  # the invalid payload at once, the poison after 3
    assert "not a valid RawGroup" in dead[0].error and "ValueError: cannot score this" in dead[1].error


async def test_a_key_done_meanwhile_falls_back_to_one_commit_per_entry(aredis: Redis, keys: Keys) -> None:
    score = scoring_handler(keys)

    async def racing(g: RawGroup, effects: Effects) -> None:
        await score(g, effects)
        if g.group_id == "c":  # another consumer finished "b" while this one worked
            await aredis.set(keys.done(VERIFIERS, "b"), "elsewhere")

    worker = await worker_with(aredis, keys, racing, "a", "b", "c")
    assert await worker.run_once() == 3
    assert await scored_ids(aredis, keys) == ["a", "c"]  # "b" only acked
    assert await aredis.get(keys.done(VERIFIERS, "b")) == b"elsewhere"
    assert await pending(aredis, keys) == 0


async def test_a_watch_error_on_the_batch_commit_commits_each_on_its_own(
    aredis: Redis, keys: Keys, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A WatchError (here: the connection dropped mid-WATCH, nothing done elsewhere) on the
    batch's commit commits each entry alone, once, without handling it again."""
    commits = count_commits(monkeypatch, fail_first=True)
    handled: list[str] = []
    score = scoring_handler(keys)

    async def handle(g: RawGroup, effects: Effects) -> None:
        handled.append(g.group_id)
        await score(g, effects)

    worker = await worker_with(aredis, keys, handle, "a", "b", "c")
    assert await worker.run_once() == 3
    assert commits[0] == 0 and len(commits) == 4  # the batch's commit broke; then one each
    assert handled == ["a", "b", "c"] and await scored_ids(aredis, keys) == ["a", "b", "c"]
    assert await pending(aredis, keys) == 0


async def test_a_key_twice_in_a_batch_is_handled_once(aredis: Redis, keys: Keys) -> None:
    score = scoring_handler(keys)
    attempts: list[str] = []

    async def first_g1_fails(g: RawGroup, effects: Effects) -> None:
        attempts.append(g.group_id)
        if g.group_id == "g1" and attempts.count("g1") == 1:
            raise RuntimeError("flaky")
        await score(g, effects)

    worker = await worker_with(aredis, keys, first_g1_fails, "g0", "g0", "g1", "g1")
    assert await worker.run_once() == 4
    # g0's second entry is a duplicate of the first's commit; g1's second is handled, as
    # its first failed (that one then finds g1 done on its retry).
    assert attempts == ["g0", "g1", "g1"]
    assert await scored_ids(aredis, keys) == ["g0", "g1"]
    await drain(worker, aredis, keys, 2)
    while await pending(aredis, keys):
        await worker.run_once()
    assert attempts == ["g0", "g1", "g1"] and await scored_ids(aredis, keys) == ["g0", "g1"]


async def test_handlers_of_a_batch_run_concurrently(aredis: Redis, keys: Keys) -> None:
    all_inside = asyncio.Barrier(3)
    score = scoring_handler(keys)

    async def together(g: RawGroup, effects: Effects) -> None:
        await all_inside.wait()  # never passes unless three handlers run at once
        await score(g, effects)

    worker = await worker_with(aredis, keys, together, "a", "b", "c", concurrency=3)
    assert await asyncio.wait_for(worker.run_once(), 5) == 3
    assert await scored_ids(aredis, keys) == ["a", "b", "c"]


@pytest.mark.parametrize("concurrency", [1, 2])
async def test_a_stop_mid_batch_finishes_what_started_and_hands_back_the_rest(
    aredis: Redis, keys: Keys, concurrency: int
) -> None:
    stop = asyncio.Event()
    score = scoring_handler(keys)

    async def stops_at_g1(g: RawGroup, effects: Effects) -> None:
        if g.group_id == "g1":
            stop.set()  # SIGTERM while g1 is in hand
        await asyncio.sleep(0.05)
        await score(g, effects)

    gids = [f"g{i}" for i in range(5)]
    worker = await worker_with(aredis, keys, stops_at_g1, *gids, concurrency=concurrency)
    assert await worker.run_once(stop) == 2
    assert await scored_ids(aredis, keys) == ["g0", "g1"]  # finished and committed
    assert await pending(aredis, keys) == 3 and not worker.reader.in_hand
    # Handed back: a consumer with the full 60 s lease takes them at once.
    other = await worker_with(aredis, keys, score, name="other")
    await drain(other, aredis, keys, 5, timeout=5)
    assert await scored_ids(aredis, keys) == gids


async def test_entries_waiting_in_a_batch_keep_their_lease(aredis: Redis, keys: Keys) -> None:
    policy = DeliveryPolicy(lease_ms=300, block_ms=50, batch=2)  # renewed every 100 ms
    score = scoring_handler(keys)
    inside = asyncio.Event()

    async def slow_first(g: RawGroup, effects: Effects) -> None:
        if g.group_id == "g0":
            inside.set()
            await asyncio.sleep(1.0)  # g1 waits its turn, three leases long
        await score(g, effects)

    owner = await worker_with(aredis, keys, slow_first, "g0", "g1", policy=policy, name="owner")
    thief = await worker_with(aredis, keys, score, policy=policy, name="thief")
    task = asyncio.create_task(owner.run_once())
    await asyncio.wait_for(inside.wait(), 5)
    deadline = time.monotonic() + 0.9
    while time.monotonic() < deadline:
        assert await thief.run_once() == 0, "an entry waiting in a live consumer's batch was reclaimed"
    assert await task == 2
    assert await scored_ids(aredis, keys) == ["g0", "g1"]


async def test_renew_reports_the_entries_taken_over(aredis: Redis, keys: Keys) -> None:
    worker = await worker_with(aredis, keys, scoring_handler(keys), "g0", "g1", "g2")
    ids = [e.id for e in await worker.reader.read()]
    await aredis.xclaim(keys.rollouts, VERIFIERS, "thief", 0, [ids[1]], justid=True)
    assert await worker.reader.renew(*ids) == [ids[1]]
    rows = await aredis.xpending_range(keys.rollouts, VERIFIERS, "-", "+", 10)
    assert [r["consumer"] for r in rows] == [b"c1", b"thief", b"c1"]
