"""The rollout service's archiver: each scored sample lands in the archive exactly once,
also when the process dies between the file append and the Redis commit."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from redis.asyncio import Redis

from services.common.keys import ARCHIVERS, Keys
from services.common.messages import Score, ScoredGroup
from services.common.streams import DeliveryPolicy, GroupReader, publish
from services.common.worker import Worker
from services.rollout.archive import RolloutArchive, RolloutRecord
from services.rollout.archiver import Archiver
from services.rollout.service import create_app
from services.rollout.settings import RolloutSettings
from services.rollout.store import ProblemStore
from tests.factories import group

POLICY = DeliveryPolicy(block_ms=50, retry_delay_ms=10)


class Crash(BaseException):
    """Ends the archiver's task the way a kill does: nothing after it runs, nothing is acked."""


def scored(group_id: str, size: int = 3) -> ScoredGroup:
    return ScoredGroup.from_raw(group(group_id, "p1", size=size), [Score(reward=float(i % 2)) for i in range(size)])


def archived(archive: RolloutArchive) -> list[tuple[str, int]]:
    records, cursor = archive.page(1000, None)
    assert cursor is None
    return sorted((r.group_id, r.sample_index) for r in records)


async def until(check: Callable[[], Awaitable[bool]], within_s: float = 20) -> None:
    deadline = time.monotonic() + within_s
    while not await check():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.02)


async def test_a_group_redelivered_after_a_crash_between_append_and_commit_is_archived_once(
    redis_url: str, keys: Keys, aredis: Redis, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = RolloutSettings(
        redis_url=redis_url, key_prefix=keys.prefix, archive_dir=tmp_path, schedule=False, streams=POLICY
    )
    archive = RolloutArchive(tmp_path / "rollouts.jsonl")
    g = scored("5-p1-unhinted")
    await publish(aredis, keys.scored, g, POLICY)

    async def crash(*args: Any) -> None:
        raise Crash

    # First life: the group is appended, then the process dies before the commit.
    with monkeypatch.context() as patch:
        patch.setattr(Worker, "_commit", crash)
        app = create_app(settings)
        async with app.router.lifespan_context(app):

            async def appended() -> bool:
                return len(archived(archive)) == 3

            await until(appended)
    assert not await aredis.exists(keys.done(ARCHIVERS, g.group_id))

    # Second life: a new app redelivers the group (the entry is still pending) and commits.
    app = create_app(settings)
    async with app.router.lifespan_context(app):

        async def committed() -> bool:
            return bool(await aredis.exists(keys.done(ARCHIVERS, g.group_id)))

        await until(committed)
    assert archived(archive) == [(g.group_id, i) for i in range(3)]
    assert await ProblemStore(aredis, keys).stats("p1") == {
        "hinted": {"attempts": 0, "solves": 0},
        "unhinted": {"attempts": 3, "solves": 1},
    }
    assert not await aredis.exists(keys.archiving(g.group_id))


@pytest.mark.parametrize("written", [0, 2], ids=["crash-before-any-line", "crash-mid-append"])
async def test_a_redelivery_appends_exactly_the_samples_the_archive_lacks(
    written: int, keys: Keys, aredis: Redis, tmp_path: Path
) -> None:
    """An earlier attempt recorded its offset and then wrote ``written`` of the group's lines
    before dying (a torn write keeps its complete lines); another group came after them."""
    archive = RolloutArchive(tmp_path / "rollouts.jsonl")
    archive.append(RolloutRecord.from_group(scored("4-p1-unhinted")))
    g = scored("5-p1-unhinted")
    await aredis.rpush(keys.archiving(g.group_id), archive.end())
    archive.append(RolloutRecord.from_group(g)[:written])
    archive.append(RolloutRecord.from_group(scored("6-p1-unhinted")))
    await publish(aredis, keys.scored, g, POLICY)

    reader = GroupReader(aredis, keys, keys.scored, ARCHIVERS, "archiver-test", POLICY)
    await reader.ensure_group()
    worker = Worker(
        reader,
        ScoredGroup,
        Archiver(aredis, keys, archive, ProblemStore(aredis, keys), POLICY),
        key_of=lambda m: m.group_id,
    )
    assert await worker.run_once() == 1
    assert [key for key, _ in archived(archive)].count(g.group_id) == 3
    assert sorted(i for key, i in archived(archive) if key == g.group_id) == [0, 1, 2]
    assert await aredis.exists(keys.done(ARCHIVERS, g.group_id))
    assert not await aredis.exists(keys.archiving(g.group_id))
