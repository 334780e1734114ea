"""Every Redis stream and key name the system uses, in one place.

All names share one prefix (default ``pope:``) so several runs, or several tests, can
share a Redis without touching each other's data. Nothing outside this module spells a
key name.

    pope:rollouts            stream, RawGroup         consumer group "verifiers"
    pope:scored              stream, ScoredGroup      consumer group "trainers"
    pope:dead                stream, DeadLetter
    pope:done:<group>:<key>  string with TTL: "this consumer group finished this message"
    pope:failures:<group>    hash entry-id -> failed handler attempts  } dead-letter
    pope:reclaims:<group>    hash entry-id -> times taken from a dead  } bookkeeping
                             consumer
    pope:archiving:<group-id>  list with TTL: archive offsets where the archiver began
                             appending this group, until its done marker commits
    pope:problems            hash problem-id -> Problem JSON
    pope:stats               hash "<problem-id>:<variant>:attempts|solves" -> count
    pope:run                 string, RunShape JSON: the run's shape and format (first writer wins)
    pope:state:trainer       string, TrainerControl JSON: the trainer's version and buffer
    pope:state:<name>        hash: a service's state for /v1/status (rollout step, evaluation)
    pope:history:<name>      list, newest first: e.g. the trainer's per-step metrics
    pope:health:<service>:<instance>   string with TTL: a live worker's heartbeat
    pope:hints:jobs          hash job-id -> hint-search job JSON (request, state, progress)

``delete_prefix`` (and ``adelete_prefix``, for asyncio clients) deletes every key under a
prefix: a run's or a test's whole state.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, cast

if TYPE_CHECKING:
    import redis
    import redis.asyncio

DEFAULT_PREFIX = "pope:"

# Consumer groups of DESIGN.md 4.
VERIFIERS = "verifiers"
TRAINERS = "trainers"
ARCHIVERS = "archivers"  # the rollout service's own read of pope:scored (archive, counts)


@dataclass(frozen=True)
class Keys:
    """Stream and key names under one prefix; build with ``Keys("run42:")``."""

    prefix: str = DEFAULT_PREFIX

    def __post_init__(self) -> None:
        if not self.prefix or any(c.isspace() for c in self.prefix):
            raise ValueError(f"key prefix must be non-empty without whitespace, got {self.prefix!r}")

    # Streams.
    @property
    def rollouts(self) -> str:
        return f"{self.prefix}rollouts"

    @property
    def scored(self) -> str:
        return f"{self.prefix}scored"

    @property
    def dead(self) -> str:
        return f"{self.prefix}dead"

    # Delivery bookkeeping.
    def done(self, group: str, key: str) -> str:
        return f"{self.prefix}done:{group}:{key}"

    def failures(self, group: str) -> str:
        return f"{self.prefix}failures:{group}"

    def reclaims(self, group: str) -> str:
        return f"{self.prefix}reclaims:{group}"

    def archiving(self, group_id: str) -> str:
        """List: the archive offsets where appends of this scored group began (rollout/archiver.py)."""
        return f"{self.prefix}archiving:{group_id}"

    # Stores and state.
    @property
    def run(self) -> str:
        """String: the run's RunShape JSON (services.common.run)."""
        return f"{self.prefix}run"

    @property
    def problems(self) -> str:
        return f"{self.prefix}problems"

    @property
    def stats(self) -> str:
        return f"{self.prefix}stats"

    @property
    def first_solves(self) -> str:
        """Sorted set: "<problem-id>:<variant>" scored by the step of its first solve."""
        return f"{self.prefix}first_solves"

    def state(self, name: str) -> str:
        return f"{self.prefix}state:{name}"

    def history(self, name: str) -> str:
        """A capped list, newest first, of JSON records (e.g. the trainer's step metrics)."""
        return f"{self.prefix}history:{name}"

    def health(self, service: str, instance: str) -> str:
        return f"{self.prefix}health:{service}:{instance}"

    @property
    def engines(self) -> str:
        """Hash: engine url -> its EngineRecord JSON (services.common.engines)."""
        return f"{self.prefix}engines"

    @property
    def hint_jobs(self) -> str:
        """Hash: hint-search job id -> the job's JSON (its request, state and progress)."""
        return f"{self.prefix}hints:jobs"


def prefix_glob(prefix: str) -> str:
    """The SCAN pattern matching exactly the keys that start with ``prefix`` (its glob
    characters escaped, so a prefix such as ``run[1]:`` matches only itself)."""
    return "".join(f"\\{c}" if c in "*?[]\\" else c for c in prefix) + "*"


def delete_prefix(client: redis.Redis, prefix: str, batch: int = 1000) -> int:
    """Delete every key under ``prefix``, ``batch`` at a time (SCAN, never KEYS: the Redis
    may be shared and large); the number deleted."""
    deleted, names = 0, []
    for name in client.scan_iter(match=prefix_glob(prefix), count=batch):
        names.append(name)
        if len(names) >= batch:
            deleted += cast(int, client.delete(*names))
            names = []
    return deleted + (cast(int, client.delete(*names)) if names else 0)


async def adelete_prefix(client: redis.asyncio.Redis, prefix: str, batch: int = 1000) -> int:
    """``delete_prefix`` for an asyncio client."""
    deleted, names = 0, []
    async for name in client.scan_iter(match=prefix_glob(prefix), count=batch):
        names.append(name)
        if len(names) >= batch:
            deleted += await client.delete(*names)
            names = []
    return deleted + (await client.delete(*names) if names else 0)
