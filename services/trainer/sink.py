"""Where the trainer's new weights go: a ``WeightSink``, chosen once from the settings.

    sink = sink_for(settings)          # EngineSink over trainer.engine_url; NoSink if empty
    applied = await sink.push(path, version)   # False: not applied (the loop retries later)
    served = await sink.served_version()        # None: nothing to compare with
    await sink.aclose()

The loop checkpoints every step whatever the sink; the sink only decides whether a
serving engine loads it. With ``NoSink`` (no engine: tests, an offline replay) the
``pushed`` metric stays 0 and no checkpoint is held back from pruning.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Protocol

from services.common.engine_client import EngineClient, EngineError
from services.trainer.settings import TrainerSettings

log = logging.getLogger(__name__)


class WeightSink(Protocol):
    """The engine side of the trainer, as the loop needs it."""

    @property
    def loading(self) -> Path | None:
        """The checkpoint last pushed, which the engine may still be reading or reload
        from: the loop never prunes it. None when nothing reads checkpoints."""
        ...

    async def push(self, path: Path, version: int) -> bool:
        """Have ``path`` served as ``version``; True once applied, False (logged) if not."""
        ...

    async def served_version(self) -> int | None:
        """The version being served, for the re-push of the latest checkpoint to an engine
        that restarted; None when unknown (unreachable) or when nothing serves."""
        ...

    async def aclose(self) -> None: ...


class EngineSink:
    """Pushes to an engine with ``/update_weights_from_disk`` (SGLang or the CPU engine)."""

    def __init__(self, engine: EngineClient) -> None:
        self.engine = engine
        self._loading: Path | None = None

    @property
    def loading(self) -> Path | None:
        return self._loading

    async def push(self, path: Path, version: int) -> bool:
        self._loading = path  # protected from pruning from the moment the engine may read it
        try:
            await self.engine.update_weights_from_disk(str(path), version)
        except EngineError as exc:
            log.warning("pushing weights v%d to the engine failed (will retry): %s", version, exc)
            return False
        return True

    async def served_version(self) -> int | None:
        try:
            return await self.engine.weight_version()
        except EngineError:
            return None

    async def aclose(self) -> None:
        await self.engine.aclose()


class NoSink:
    """No engine: a push goes nowhere and returns False (not applied); nothing is served."""

    loading: Path | None = None

    async def push(self, path: Path, version: int) -> bool:
        return False

    async def served_version(self) -> int | None:
        return None

    async def aclose(self) -> None:
        return None


def sink_for(settings: TrainerSettings) -> WeightSink:
    """``EngineSink`` over ``settings.engine_url``; ``NoSink`` when it is empty."""
    if not settings.engine_url:
        log.info("no engine (trainer.engine_url is empty): checkpoints are written, weights pushed nowhere")
        return NoSink()
    return EngineSink(settings.engine_client())
