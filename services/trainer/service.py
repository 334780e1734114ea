"""The trainer service: ``pope trainer --port 8002 --model DIR``.

Runs the GRPO loop (loop.py) and serves /healthz, /readyz, /metrics and GET /v1/state.
SIGTERM lets the step in progress finish, and the resume state of the steps trained since
the last one be written (then their groups acked), for up to ``trainer.stop_grace_s``,
then cancels the loop, so a stop keeps its deadline (``pope up``: 3 s, within its 12 s;
compose and Kubernetes give it 840 s, inside their 900 s). What a cancel cuts short is not
lost: a step's groups stay unacked and are trained again after the restart, once (or
skipped, by ``trained_group_ids``, if a resume state holding them was written), and a
weight push is made again by the next start, which reloads an engine serving any other
version.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import os
import signal
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Annotated, Any, NoReturn

from fastapi import FastAPI, Query
from redis.asyncio import Redis

from services.common import threads
from services.common.http import add_health_routes, api_app, redis_unready, stop_if_failed
from services.common.http import serve as run_server
from services.trainer.loop import MAX_HISTORY, Trainer
from services.trainer.settings import TrainerSettings
from services.trainer.sink import sink_for
from services.trainer.world import World, join, launched_by_torchrun, leave

log = logging.getLogger(__name__)


def create_app(settings: TrainerSettings, world: World | None = None) -> FastAPI:
    holder: dict[str, Any] = {}
    stop = asyncio.Event()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        redis = Redis.from_url(settings.redis_url)
        sink = sink_for(settings, redis)
        trainer = await asyncio.to_thread(Trainer, settings, redis, sink, world)
        holder["trainer"], holder["redis"] = trainer, redis
        task = asyncio.create_task(trainer.run(stop))
        task.add_done_callback(lambda t: stop_if_failed(app, t, "training loop"))
        yield
        stop.set()  # the loop ends at its next read (block_ms)
        done, _ = await asyncio.wait({task}, timeout=settings.stop_grace_s)
        if not done:
            log.warning(
                "the training loop is still busy %.0fs after SIGTERM (a step, a resume state or a push): cancelling "
                "it (trainer.stop_grace_s); the groups it holds are trained again after the restart",
                settings.stop_grace_s,
            )
            task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await asyncio.to_thread(trainer.ranks.stop)  # the other ranks return (under torchrun)
        await sink.aclose()
        await redis.aclose()

    app = api_app(settings, title="POPE-RL trainer", lifespan=lifespan)

    async def ready() -> str | None:
        failed: str | None = getattr(app.state, "failed", None)
        if failed or "trainer" not in holder:
            return failed or "loading the model"
        return await redis_unready(holder["redis"])

    add_health_routes(app, ready)

    @app.get("/v1/state")
    async def state() -> dict[str, Any]:
        """The trainer's version, buffer and the last step's statistics."""
        trainer: Trainer | None = holder.get("trainer")
        if trainer is None:
            return {"status": "starting"}
        return {
            "version": trainer.version,
            "buffered": len(trainer.buffer),
            "dropped_stale": trainer.dropped_count("stale"),
            "dropped_aborted": trainer.dropped_count("aborted"),
            "last_step": trainer.last,
        }

    @app.get("/v1/history")
    async def history(limit: Annotated[int, Query(ge=1, le=MAX_HISTORY)] = 100) -> list[dict[str, Any]]:
        """The last ``limit`` steps' metrics, oldest first (also in the JSONL metrics log)."""
        trainer: Trainer | None = holder.get("trainer")
        rows = list(trainer.history)[-limit:] if trainer else []
        return [{k: (None if math.isnan(v) else v) for k, v in row.items()} for row in rows]

    return app


def serve(settings: TrainerSettings) -> None:
    """Run the trainer: this process, or (``nproc`` > 1) torchrun with that many, each a
    rank of it (rank 0 the service, the others following it: operations.py)."""
    from services.common.config import model_dir_problem
    from services.common.logs import log_resolved_config, setup_logging
    from services.trainer.checkpoint import latest

    if latest(settings.checkpoint_dir) is None and (problem := model_dir_problem(settings.model_path, "trainer")):
        raise SystemExit(problem)  # (resuming from a checkpoint needs no model_path)
    if settings.wandb.project is not None:
        from services.trainer.tracking import WandbMissing, require_wandb

        try:
            require_wandb()  # before torchrun and the model load, not after
        except WandbMissing as exc:
            raise SystemExit(str(exc)) from None
    if settings.nproc > 1 and not launched_by_torchrun():
        launch(settings)  # does not return
    threads.apply(settings.torch_threads)
    world = join(settings.device)
    if not world.leader:
        setup_logging(f"trainer-rank{world.rank}", settings.log_level, settings.log_format)
        follow_as_rank(settings, world)
        return
    setup_logging("trainer", settings.log_level, settings.log_format)
    log_resolved_config(settings)
    try:
        run_server(create_app(settings, world), settings, "trainer")
    finally:
        leave(world)


def replay_groups(settings: TrainerSettings, groups: Path) -> int:
    """``pope trainer replay``: train the recorded steps (replay.py), at ``nproc`` ranks."""
    from services.common.logs import setup_logging
    from services.trainer import policy, replay
    from services.trainer.checkpoint import latest
    from services.trainer.operations import Ranks

    if settings.nproc > 1 and not launched_by_torchrun():
        launch(settings)
    threads.apply(settings.torch_threads)
    world = join(settings.device)
    setup_logging("trainer" if world.leader else f"trainer-rank{world.rank}", settings.log_level, settings.log_format)
    if not world.leader:
        follow_as_rank(settings, world)
        return 0
    ranks = Ranks(policy.build(settings, world, latest(settings.checkpoint_dir.resolve())))
    try:
        steps = replay.replay(ranks, groups)
    finally:
        ranks.stop()
        leave(world)
    log.info("replayed %d steps from %s into %s", steps, groups, settings.checkpoint_dir)
    return 0


def follow_as_rank(settings: TrainerSettings, world: World) -> None:
    """A rank > 0: load the same policy as rank 0 and do what it sends until it says stop.
    SIGTERM (torchrun passes a stop to every rank) is left to rank 0, which finishes the
    step and the resume state with this rank's part in them, then releases it."""
    from services.trainer import policy
    from services.trainer.checkpoint import latest
    from services.trainer.operations import follow

    signal.signal(signal.SIGTERM, lambda *_: log.info("SIGTERM: rank 0 decides when this rank stops"))
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        follow(policy.build(settings, world, latest(settings.checkpoint_dir.resolve())))
    finally:
        leave(world)


ARGV_VARIABLE = "POPE_TRAINER_ARGV"


def launch(settings: TrainerSettings) -> NoReturn:
    """Become torchrun over ``settings.nproc`` ranks of this same command (one node; for
    several, run torchrun yourself: docs/deployment.md). torchrun gives its workers
    ``stop_grace_s`` and a little more after SIGTERM before it kills them."""
    argv = torchrun_command(settings.nproc, settings.stop_grace_s)
    os.environ[ARGV_VARIABLE] = json.dumps(sys.argv[1:])
    log.info("starting %d trainer ranks of `pope %s`", settings.nproc, " ".join(sys.argv[1:]))
    os.execv(argv[0], argv)


def torchrun_command(nproc: int, stop_grace_s: float) -> list[str]:
    """torchrun, on this node, of ``nproc`` workers of ``python -m services.trainer``,
    which runs the pope command in $POPE_TRAINER_ARGV (never on torchrun's own command
    line, whose parser would take an option such as ``--nproc`` for one of its own)."""
    return [
        sys.executable,
        "-m",
        "services.trainer.launch",  # torchrun, dying by the signal that stops it (launch.py)
        "--standalone",
        f"--nproc-per-node={nproc}",
        f"--shutdown-timeout={math.ceil(stop_grace_s) + 10}",
        "-m",
        "services.trainer",
    ]
