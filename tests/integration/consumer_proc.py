"""A verifier-like consumer in its own process, for tests that kill or signal it.

    python -m tests.integration.consumer_proc REDIS_URL PREFIX NAME MODE [LEASE_MS]

It consumes RawGroups from the rollouts stream and publishes a ScoredGroup per group.
MODE says what it does with the first group it handles:
- ``hang``: push the entry id to <prefix>test:holding, then wait forever (to be kill -9'd);
- ``wait``: push to <prefix>test:holding, then wait for an item on <prefix>test:release
  before finishing it (to be SIGTERMed in between);
- ``normal``: nothing special.
"""

from __future__ import annotations

import asyncio
import sys

from redis.asyncio import Redis

from services.common.keys import VERIFIERS, Keys
from services.common.messages import RawGroup
from services.common.streams import DeliveryPolicy, GroupReader
from services.common.worker import Effects, Worker, stop_on_signals
from tests.factories import scoring_handler


async def main(url: str, prefix: str, name: str, mode: str, lease_ms: int) -> None:
    keys = Keys(prefix)
    redis = Redis.from_url(url)
    control = Redis.from_url(url)  # a second connection, so waiting never blocks the worker's
    policy = DeliveryPolicy(lease_ms=lease_ms, batch=5, block_ms=200)
    reader = GroupReader(redis, keys, keys.rollouts, VERIFIERS, name, policy)
    score = scoring_handler(keys)
    first = True

    async def handle(group: RawGroup, effects: Effects) -> None:
        nonlocal first
        if first and mode in ("hang", "wait"):
            first = False
            await control.rpush(f"{prefix}test:holding", group.group_id)
            if mode == "hang":
                await asyncio.Event().wait()
            await control.blpop([f"{prefix}test:release"], timeout=60)
        await score(group, effects)

    stop = asyncio.Event()
    stop_on_signals(stop)
    await control.rpush(f"{prefix}test:started", name)
    await Worker(reader, RawGroup, handle, key_of=lambda g: g.group_id).run(stop)
    await control.rpush(f"{prefix}test:exited", name)


if __name__ == "__main__":
    url, prefix, name, mode = sys.argv[1:5]
    lease = int(sys.argv[5]) if len(sys.argv) > 5 else 60_000
    asyncio.run(main(url, prefix, name, mode, lease))
