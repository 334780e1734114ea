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
import logging
import math
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI
from redis.asyncio import Redis

from services.common.http import add_health_routes, redis_unready, stop_if_failed
from services.common.http import serve as run_server
from services.trainer.loop import Trainer
from services.trainer.settings import TrainerSettings
from services.trainer.sink import sink_for

log = logging.getLogger(__name__)


def create_app(settings: TrainerSettings) -> FastAPI:
    holder: dict[str, Any] = {}
    stop = asyncio.Event()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        redis = Redis.from_url(settings.redis_url)
        sink = sink_for(settings)
        trainer = await asyncio.to_thread(Trainer, settings, redis, sink)
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
        await sink.aclose()
        await redis.aclose()

    app = FastAPI(title="POPE-RL trainer", lifespan=lifespan)

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
    async def history(limit: int = 100) -> list[dict[str, Any]]:
        """The last ``limit`` steps' metrics, oldest first (also in the JSONL metrics log)."""
        trainer: Trainer | None = holder.get("trainer")
        rows = list(trainer.history)[-limit:] if trainer else []
        return [{k: (None if math.isnan(v) else v) for k, v in row.items()} for row in rows]

    return app


def serve(settings: TrainerSettings) -> None:
    from services.common.config import model_dir_problem
    from services.common.logs import log_resolved_config, setup_logging
    from services.trainer.checkpoint import latest

    if latest(settings.checkpoint_dir) is None and (problem := model_dir_problem(settings.model_path, "trainer")):
        raise SystemExit(problem)  # (resuming from a checkpoint needs no model_path)
    setup_logging("trainer", settings.log_level, settings.log_format)
    log_resolved_config(settings)
    run_server(create_app(settings), settings, "trainer")
