"""The engine registry: every engine of a run, what state it is in and which weights it
serves, in Redis (DESIGN.md 8).

    registry = Registry(redis, keys)
    await registry.put([EngineRecord(url=..., state=EngineState.SERVING, weight_version="12", routed=True)])
    await registry.all()                     # sorted by url
    routed_versions(records)                 # (step, lineage) of each engine generation may reach

One hash, ``<prefix>engines``: url -> the record's JSON. The trainer's rank 0 writes it
(services/trainer/fleet.py): it pushes every version to every engine and decides which of
them generation may reach (the router's workers). The rollout service reads it: the
versions of the routed engines gate its steps, since the router answers for an arbitrary
engine, and ``/v1/status`` shows every record. Records are advice about the recent past,
never a lock: the scheduler still checks the version each sample reports.
"""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum
from typing import Literal

from pydantic import Field, NonNegativeInt
from redis.asyncio import Redis

from services.common.keys import Keys
from services.common.messages import Message, NonEmptyStr, decode, encode, parse_version, utc_now


class EngineState(StrEnum):
    """Where an engine stands, as its trainer sees it."""

    SERVING = "serving"
    """Answers, on weights within the staleness bound: generation may reach it."""
    UPDATING = "updating"
    """Loading weights the trainer is pushing. Still routed: its requests wait for the load
    (SGLang's disk update waits for the requests in flight), nothing is lost."""
    LAGGING = "lagging"
    """Answers, but on weights past the staleness bound or of a lost lineage (a restart
    serves its start-up weights; a new engine has not been loaded yet): out of the router
    until it serves the trainer's weights again."""
    DEAD = "dead"
    """Does not answer (``dead_after`` checks in a row, or a push that could not reach it):
    out of the router; checked again every interval and loaded before it rejoins."""


class EngineRecord(Message):
    """One engine in the registry."""

    kind: Literal["engine"] = "engine"
    url: NonEmptyStr
    state: EngineState
    weight_version: str | None = None
    """The version name the engine last reported ("12", "12@3"); None while unknown."""
    routed: bool = False
    """Whether generation can reach it: one of the router's workers (with no router, the
    rollout service's own engine, routed while serving or updating)."""
    failures: NonNegativeInt = 0
    """Failed checks or pushes in a row."""
    error: str | None = None
    """The last failure, while failing."""
    since: datetime = Field(default_factory=utc_now)
    """When it entered this state."""
    checked_at: datetime = Field(default_factory=utc_now)

    @property
    def version(self) -> tuple[int, int] | None:
        """(step, lineage) of ``weight_version``; None when unknown or not one the trainer names."""
        try:
            return parse_version(self.weight_version) if self.weight_version is not None else None
        except ValueError:
            return None


class Registry:
    """The registry's hash under one run's keys."""

    def __init__(self, redis: Redis, keys: Keys) -> None:
        self.redis, self.key = redis, keys.engines

    async def all(self) -> list[EngineRecord]:
        raw: dict[bytes, bytes] = await self.redis.hgetall(self.key)  # type: ignore[misc]
        return sorted((decode(EngineRecord, v) for v in raw.values()), key=lambda r: r.url)

    async def put(self, records: list[EngineRecord]) -> None:
        if records:
            await self.redis.hset(self.key, mapping={r.url: encode(r) for r in records})  # type: ignore[misc]

    async def remove(self, *urls: str) -> None:
        if urls:
            await self.redis.hdel(self.key, *urls)  # type: ignore[misc]


def routed_versions(records: list[EngineRecord]) -> list[tuple[int, int] | None]:
    """The served version of every engine generation may reach now (None: one whose version
    is unknown or not the trainer's)."""
    return [r.version for r in records if r.routed and r.state in (EngineState.SERVING, EngineState.UPDATING)]
