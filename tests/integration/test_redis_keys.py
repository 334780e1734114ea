"""``delete_prefix``: every key under a prefix, in batches, and nothing else."""

from __future__ import annotations

import redis
from redis.asyncio import Redis

from services.common.keys import Keys, adelete_prefix, delete_prefix


def test_delete_prefix_deletes_only_its_keys_in_batches(redis_url: str, keys: Keys) -> None:
    client = redis.Redis.from_url(redis_url)
    try:
        mine, near = f"{keys.prefix}run[1]:", f"{keys.prefix}run1:"  # the glob "run[1]" would match near
        client.mset({f"{mine}{i}": i for i in range(5)} | {f"{near}{i}": i for i in range(2)})
        assert delete_prefix(client, mine, batch=2) == 5
        assert sorted(client.scan_iter(match=f"{keys.prefix}*")) == [f"{near}0".encode(), f"{near}1".encode()]
        assert delete_prefix(client, mine) == 0
    finally:
        client.close()


async def test_adelete_prefix(aredis: Redis, keys: Keys) -> None:
    await aredis.mset({f"{keys.prefix}a{i}": i for i in range(3)} | {f"{keys.prefix}b": 1})
    assert await adelete_prefix(aredis, f"{keys.prefix}a", batch=2) == 3
    assert await aredis.exists(f"{keys.prefix}b") == 1
