"""The streams layer across a Redis restart, with a redis-server of the test's own (AOF on)."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

from redis.asyncio import Redis

from services.common.keys import VERIFIERS, Keys
from services.common.messages import RawGroup, ScoredGroup, decode
from services.common.redis_server import LocalRedis
from services.common.streams import DATA, DeliveryPolicy, GroupReader, publish
from services.common.worker import Worker
from tests.factories import group, scoring_handler

POLICY = DeliveryPolicy(block_ms=100, lease_ms=60_000)


async def wait_scored(client: Redis, keys: Keys, n: int, timeout: float = 30) -> list[str]:
    deadline = time.monotonic() + timeout
    while True:
        try:
            rows = await client.xrange(keys.scored)
            ids = [decode(ScoredGroup, f[DATA]).group_id for _i, f in rows]
            if len(ids) >= n:
                return ids
        except ConnectionError:
            pass
        assert time.monotonic() < deadline, f"timed out waiting for {n} scored groups"
        await asyncio.sleep(0.05)


async def wait_handled(client: Redis, keys: Keys, last_id: str, timeout: float = 30) -> None:
    """Until the group has been handed every entry up to ``last_id`` and acked them all."""
    deadline = time.monotonic() + timeout
    while True:
        [info] = await client.xinfo_groups(keys.rollouts)
        if info["last-delivered-id"].decode() == last_id and info["pending"] == 0:
            return
        assert time.monotonic() < deadline, f"group stuck at {info}"
        await asyncio.sleep(0.05)


async def test_worker_carries_on_across_a_redis_crash_and_restart(tmp_path: Path) -> None:
    server = LocalRedis(aof_dir=tmp_path / "aof").start()
    keys = Keys("restart:")
    client = Redis.from_url(server.url, socket_timeout=2, socket_connect_timeout=1)
    stop = asyncio.Event()
    try:
        reader = GroupReader(client, keys, keys.rollouts, VERIFIERS, "w1", POLICY)
        worker = Worker(reader, RawGroup, scoring_handler(keys), key_of=lambda g: g.group_id)
        task = asyncio.create_task(worker.run(stop))
        for i in range(5):
            await publish(client, keys.rollouts, group(f"a{i}"), POLICY)
        assert len(await wait_scored(client, keys, 5)) == 5

        server.kill()  # SIGKILL: a crash, not a clean shutdown
        await asyncio.sleep(0.3)  # the worker now sees connection errors and backs off
        assert not task.done(), "the worker died with Redis"
        server.start()  # same port, same AOF directory

        # Everything the AOF held survived: stream, consumer group, done markers.
        for i in range(5):
            await publish(client, keys.rollouts, group(f"b{i}"), POLICY)
        last = await publish(client, keys.rollouts, group("a0"), POLICY)  # a redelivery of a done group
        await wait_handled(client, keys, last)
        ids = await wait_scored(client, keys, 10)
        assert sorted(ids) == sorted([f"a{i}" for i in range(5)] + [f"b{i}" for i in range(5)])
        stop.set()
        await asyncio.wait_for(task, 5)
    finally:
        stop.set()
        await client.aclose()
        server.stop()


def test_the_rollout_service_starts_while_redis_is_away_and_resumes_its_hint_job_after(tmp_path: Path) -> None:
    """Started during a Redis outage (as the chaos run's restarts can), the rollout service
    still comes up, unready, and picks up the hint job its last process left running once
    Redis is back; before, reading the jobs at start-up failed the start (exit 3)."""
    import httpx
    import redis

    from services.common.keys import Keys as K
    from services.rollout.hint_jobs import HintJob, HintJobRequest
    from services.rollout.service import create_app
    from services.rollout.settings import HintSettings, RolloutSettings
    from tests.conftest import app_in_thread

    server = LocalRedis(aof_dir=tmp_path / "aof").start()
    keys = K("away:")
    left = HintJob(
        id="left-running",
        state="running",
        request=HintJobRequest(),
        settings=HintSettings(),
        created_at=time.time(),
        updated_at=time.time(),
    )
    with redis.Redis.from_url(server.url) as client:
        client.hset(keys.hint_jobs, left.id, left.model_dump_json())
    server.stop()  # its AOF keeps the job
    settings = RolloutSettings(
        redis_url=server.url,
        key_prefix=keys.prefix,
        schedule=False,
        archive_dir=tmp_path / "rollouts",
        eval_dir=tmp_path / "eval",
        model_path=str(tmp_path / "no-model"),  # the resumed job fails on it: proof it ran
    )
    try:
        with app_in_thread(server.url, lambda _: create_app(settings)) as url:
            assert httpx.get(f"{url}/healthz").status_code == 200  # up, with Redis away
            assert httpx.get(f"{url}/readyz").status_code == 503
            server.start()  # the same port and AOF
            deadline = time.monotonic() + 30
            while (job := httpx.get(f"{url}/v1/hints/jobs/{left.id}").json())["state"] == "running":
                assert time.monotonic() < deadline, job
                time.sleep(0.2)
            assert job["state"] == "failed" and job["error"], job  # resumed, and ran (into the missing model)
            assert httpx.get(f"{url}/readyz").status_code == 200
    finally:
        server.stop()
