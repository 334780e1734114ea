"""Shared fixtures: one Redis for the session, a fresh key prefix per test.

Redis is found the way ``make test`` promises (services/common/redis_server.py):
REDIS_URL if set, else the probe URL (POPE_TEST_REDIS_PROBE, default 127.0.0.1:6379) if
it answers, else a private redis-server on a free port, stopped when the session ends.
The Redis may be shared with other runs, so tests only touch keys under their own prefix
and delete them afterwards (never FLUSHALL).
"""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import redis
from redis.asyncio import Redis

from services.common.keys import Keys
from services.common.redis_server import DEFAULT_PROBE_URL, redis_for

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    probe = os.environ.get("POPE_TEST_REDIS_PROBE", DEFAULT_PROBE_URL)
    with redis_for(os.environ.get("REDIS_URL"), probe_url=probe) as url:
        report = os.environ.get("POPE_TEST_REDIS_REPORT")
        if report:  # lets a test see which Redis an inner `make test` used
            Path(report).write_text(url)
        yield url


@pytest.fixture
def keys(redis_url: str) -> Iterator[Keys]:
    k = Keys(f"test:{uuid.uuid4().hex[:12]}:")
    yield k
    client = redis.Redis.from_url(redis_url)
    try:
        names = list(client.scan_iter(match=k.pattern, count=1000))
        if names:
            client.delete(*names)
    finally:
        client.close()


@pytest.fixture
async def aredis(redis_url: str) -> AsyncIterator[Redis]:
    client = Redis.from_url(redis_url)
    yield client
    await client.aclose()
