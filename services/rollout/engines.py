"""The rollout service's engines: where generation goes and which weights it may meet.

    engines = Engines(settings, redis)
    engines.client                            # generation: engine_url (an engine, or the router)
    await engines.served_version(lineage)     # the oldest weights generation may meet now
    await engines.abort(rid)                  # a lost row, on every registered engine
    await engines.records()                   # the registry, for /v1/status

With one engine the answer is the engine's own ``/model_info``. With many behind SGLang's
router, which answers for an arbitrary engine, it is the engine registry the trainer keeps
(services.common.engines): the oldest version among the engines generation may reach.
The registry decides as soon as it holds an engine; while it is empty (no trainer has
checked the engines yet) the engine at ``engine_url`` is asked.
"""

from __future__ import annotations

import asyncio
import logging

from redis.asyncio import Redis

from services.common.engine_client import EngineClient, EngineError
from services.common.engines import EngineRecord, Registry, routed_versions
from services.common.keys import Keys
from services.common.messages import Lineage
from services.rollout.settings import RolloutSettings

log = logging.getLogger(__name__)


class Engines:
    """See the module docstring; ``aclose`` closes the clients."""

    def __init__(self, settings: RolloutSettings, redis: Redis, client: EngineClient | None = None) -> None:
        """``client``: generation's (default: ``engine_url``'s, as ``engine_router`` says)."""
        self.settings = settings
        self.registry = Registry(redis, Keys(settings.key_prefix))
        abort = self.abort if settings.engine_router else None
        self.client = client or settings.engine_client(retries=2, abort_lost=abort)

    async def records(self) -> list[EngineRecord]:
        return await self.registry.all()

    async def served_version(self, lineage: Lineage) -> tuple[int, int]:
        """(step, lineage) of the oldest weights generation may meet: one ``lineage`` does
        not hold if any (the scheduler waits for its reload), else the lowest step.
        EngineError when no engine can serve (the scheduler waits, saying so)."""
        records = await self.registry.all()
        if not records:
            return await self.client.served_version()
        versions = routed_versions(records)
        if not versions:
            states = ", ".join(f"{r.url} {r.state.value}" for r in records)
            raise EngineError(f"no engine serves the trainer's weights yet (registry: {states})")
        if None in versions:
            unknown = [r for r in records if r.routed and r.version is None]
            raise EngineError(f"engine {unknown[0].url} serves {unknown[0].weight_version!r}, not a trainer's version")
        known = [v for v in versions if v is not None]
        lost = [v for v in known if not lineage.holds(*v)]
        return lost[0] if lost else min(known)

    async def weight_version(self) -> int:
        """The step of the oldest weights generation may meet (for the periodic evaluation)."""
        return (await self.served_version(Lineage()))[0]

    async def abort(self, rid: str) -> bool:
        """Abort ``rid`` on every engine of the registry (one of them runs it); True if one
        could be reached."""
        urls = [r.url for r in await self.registry.all()]

        async def one(url: str) -> bool:
            async with self.settings.engine_client(url, retries=0, timeout=5.0) as engine:
                try:
                    await engine.abort(rid)
                except EngineError as exc:
                    log.warning("could not abort %s on %s: %s", rid, url, exc)
                    return False
            return True

        return any(await asyncio.gather(*(one(u) for u in urls)))

    async def status(self) -> dict[str, object]:
        """``/v1/status``'s engine part: where generation goes, the step of the oldest weights
        it may meet, and every engine of the registry."""
        try:
            version: int | None = (await self.served_version(Lineage()))[0]
        except EngineError:
            version = None
        records = await self.records()
        return {
            "url": self.settings.engine_url,
            "router": self.settings.engine_router,
            "weight_version": version,
            "engines": [r.model_dump(mode="json", exclude={"schema_version", "kind"}) for r in records],
        }

    async def aclose(self) -> None:
        await self.client.aclose()
