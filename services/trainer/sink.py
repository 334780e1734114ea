"""Where the trainer's new weights go: a ``WeightSink``, chosen once from the settings.

    sink = sink_for(settings)          # EngineSink over trainer.engine_url; NoSink if empty
    applied = await sink.push(path, step, lineage)  # False: not applied (the loop retries later)
    served = await sink.served_version()  # (step, lineage); None: nothing to compare with
    sink.in_use                           # model directories an engine serves or is loading
    await sink.aclose()

The loop writes the engine's model directory every step whatever the sink; the sink only
decides whether a serving engine loads it. With ``NoSink`` (no engine: tests, an offline
replay) the ``pushed`` metric stays 0 and no directory is held back from pruning.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Protocol

from services.common.engine_client import EngineClient, EngineError
from services.common.messages import version_name
from services.trainer.settings import TrainerSettings

log = logging.getLogger(__name__)


class WeightSink(Protocol):
    """The engine side of the trainer, as the loop needs it."""

    @property
    def in_use(self) -> frozenset[Path]:
        """The model directories an engine serves or may be reading (the last one pushed
        successfully, and one being pushed): the loop never prunes them."""
        ...

    async def push(self, path: Path, step: int, lineage: int = 0) -> bool:
        """Have ``path`` served as version (``step``, ``lineage``); True once applied,
        False (logged) if not."""
        ...

    async def served_version(self) -> tuple[int, int] | None:
        """(step, lineage) being served, for the re-push of the current version to an
        engine that restarted or kept a lost lineage's; None when unknown (unreachable) or
        when nothing serves."""
        ...

    async def aclose(self) -> None: ...


class EngineSink:
    """Pushes to an engine with ``/update_weights_from_disk`` (SGLang or the CPU engine)."""

    def __init__(self, engine: EngineClient) -> None:
        self.engine = engine
        self._loading: Path | None = None
        self._served: Path | None = None

    @property
    def in_use(self) -> frozenset[Path]:
        return frozenset(p for p in (self._loading, self._served) if p is not None)

    async def push(self, path: Path, step: int, lineage: int = 0) -> bool:
        self._loading = path  # protected from pruning from the moment the engine may read it
        try:
            await self.engine.update_weights_from_disk(str(path), step, lineage=lineage)
        except EngineError as exc:
            log.warning("pushing weights v%s to the engine failed (will retry): %s", version_name(step, lineage), exc)
            return False
        self._served, self._loading = path, None
        return True

    async def served_version(self) -> tuple[int, int] | None:
        try:
            return await self.engine.served_version()
        except EngineError:
            return None

    async def aclose(self) -> None:
        await self.engine.aclose()


class NoSink:
    """No engine: a push goes nowhere and returns False (not applied); nothing is served."""

    in_use: frozenset[Path] = frozenset()

    async def push(self, path: Path, step: int, lineage: int = 0) -> bool:
        return False

    async def served_version(self) -> tuple[int, int] | None:
        return None

    async def aclose(self) -> None:
        return None


def sink_for(settings: TrainerSettings) -> WeightSink:
    """``EngineSink`` over ``settings.engine_url``; ``NoSink`` when it is empty."""
    if not settings.engine_url:
        log.info("no engine (trainer.engine_url is empty): checkpoints are written, weights pushed nowhere")
        return NoSink()
    return EngineSink(settings.engine_client())
