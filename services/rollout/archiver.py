"""The archiver: the rollout service's own read of ``pope:scored`` (consumer group
``archivers``, run by a ``Worker`` in service.py). Every scored sample is appended to the
JSONL archive (archive.py) and counted in the problem's attempt and solve counts.

    archiver = Archiver(redis, keys, archive, store, settings.streams)
    Worker(GroupReader(..., keys.scored, ARCHIVERS, ...), ScoredGroup, archiver, key_of=lambda g: g.group_id)

The counts commit with the done marker and the ack in one transaction (worker.py); the
file append cannot, so a crash between the append and the commit redelivers a group that
is already in the archive, maybe to a new process. So that the archive never holds a
sample twice, the archiver writes down, before it appends, where the lines will land: it
pushes the archive's end offset onto ``pope:archiving:<group_id>``. A delivery that finds
earlier offsets there reads the archive at each (``samples_at``) and appends only the
samples not found; the commit deletes the list. This is exact whatever happened between
crash and redelivery (a lease to expire, other groups appended, more crashes), since a
complete line never moves; a first delivery costs one Redis round trip, and only a
redelivery reads the file. The list is the one write a handler makes outside Effects: it
must be in Redis before the append, hence before the commit.
"""

from __future__ import annotations

import asyncio
import logging

from redis.asyncio import Redis

from services.common.keys import Keys
from services.common.messages import ScoredGroup
from services.common.streams import DeliveryPolicy
from services.common.worker import Effects
from services.rollout.archive import RolloutArchive, RolloutRecord
from services.rollout.store import ProblemStore

log = logging.getLogger(__name__)


class Archiver:
    """The ``archivers`` handler: archive a scored group's samples once, count them once."""

    def __init__(
        self, redis: Redis, keys: Keys, archive: RolloutArchive, store: ProblemStore, policy: DeliveryPolicy
    ) -> None:
        self.redis, self.keys, self.archive, self.store, self.policy = redis, keys, archive, store, policy

    async def __call__(self, group: ScoredGroup, effects: Effects) -> None:
        records = RolloutRecord.from_group(group)
        pending = self.keys.archiving(group.group_id)
        at = await asyncio.to_thread(self.archive.end)
        # Recorded even if nothing is appended below: an offset where the group's lines are
        # not is harmless, a missing one where they are would let them be appended again.
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.lrange(pending, 0, -1)
            pipe.rpush(pending, at)
            pipe.expire(pending, self.policy.done_ttl_s)
            earlier, _, _ = await pipe.execute()
        if earlier:
            found = await asyncio.to_thread(self.archive.samples_at, [int(x) for x in earlier], group.group_id)
            records = [r for r in records if r.sample_index not in found]
            log.info(
                "group %s came again before its commit: %d of its %d samples were archived already",
                group.group_id,
                len(found),
                len(group.samples),
            )
        await asyncio.to_thread(self.archive.append, records, at)
        effects.call(lambda pipe: self.store.queue_record(pipe, group))
        effects.call(lambda pipe: pipe.delete(pending))
