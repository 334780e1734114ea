"""Where the trainer's new weights go: a ``WeightSink``, chosen once from the settings.

    sink = sink_for(settings, redis)      # a Fleet over the configured engines; NoSink if none
    applied = await sink.push(path, step, lineage)  # False: not applied everywhere (retried later)
    await sink.reconcile(path, step, history)       # now and then: every engine on those weights
    served = await sink.served_versions()           # (step, lineage) of each engine that answers
    sink.in_use                           # model directories an engine serves or is loading
    await sink.aclose()

The loop writes the engine's model directory every step whatever the sink; the sink only
decides which engines load it (fleet.py). With ``NoSink`` (no engine: tests, an offline
replay) the ``pushed`` metric stays 0 and no directory is held back from pruning.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Protocol

import torch
from redis.asyncio import Redis

from services.common.messages import Lineage
from services.trainer.fleet import Fleet
from services.trainer.operations import Ranks
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
        """Have ``path`` served as version (``step``, ``lineage``); True once applied
        everywhere, False (logged) if not."""
        ...

    async def reconcile(self, path: Path | None, step: int, history: Lineage) -> bool:
        """Have every engine serve ``path`` as ``step`` of ``history`` (None: the engines'
        start-up weights are the current ones); True when every engine not dead answered and
        serves them."""
        ...

    async def served_versions(self) -> list[tuple[int, int]]:
        """(step, lineage) served by each engine that answers, for the lineage check at
        start-up; empty when none answers or nothing serves."""
        ...

    def bind(self, ranks: Ranks, dtype: torch.dtype, history: Lineage) -> None:
        """The trainer's ranks and serving dtype (a broadcast gathers the weights through
        them) and its lineage, once the trainer has them."""
        ...

    async def aclose(self) -> None: ...


class NoSink:
    """No engine: a push goes nowhere and returns False (not applied); nothing is served."""

    in_use: frozenset[Path] = frozenset()

    async def push(self, path: Path, step: int, lineage: int = 0) -> bool:
        return False

    async def reconcile(self, path: Path | None, step: int, history: Lineage) -> bool:
        return False

    async def served_versions(self) -> list[tuple[int, int]]:
        return []

    def bind(self, ranks: Ranks, dtype: torch.dtype, history: Lineage) -> None:
        return None

    async def aclose(self) -> None:
        return None


def sink_for(settings: TrainerSettings, redis: Redis | None = None) -> WeightSink:
    """A ``Fleet`` of the configured engines (``engine_url``, ``engine_urls``,
    ``engine_discovery``), writing the registry in ``redis``; ``NoSink`` when there are none."""
    if not settings.engine_list() and not settings.engine_discovery:
        log.info("no engine (trainer.engine_url is empty): checkpoints are written, weights pushed nowhere")
        return NoSink()
    return Fleet(settings, redis)
