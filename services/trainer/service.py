"""The trainer service: ``pope trainer --port 8002 --model DIR``.

Runs the GRPO loop (loop.py) and serves /healthz, /readyz, /metrics and GET /v1/state.
SIGTERM finishes the step in progress (checkpointed and acked) and hands back the rest.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI
from redis.asyncio import Redis

from services.common.engine_client import EngineClient
from services.common.http import add_health_routes
from services.trainer.loop import Trainer
from services.trainer.settings import TrainerSettings

log = logging.getLogger(__name__)


def create_app(settings: TrainerSettings) -> FastAPI:
    holder: dict[str, Any] = {}
    stop = asyncio.Event()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        redis = Redis.from_url(settings.redis_url)
        engine = EngineClient(settings.engine_url) if settings.engine_url else None
        trainer = await asyncio.to_thread(Trainer, settings, redis, engine)
        holder["trainer"], holder["redis"] = trainer, redis
        task = asyncio.create_task(trainer.run(stop))
        task.add_done_callback(lambda t: _die_if_failed(t, holder))
        yield
        stop.set()
        await asyncio.gather(task, return_exceptions=True)
        if engine is not None:
            await engine.aclose()
        await redis.aclose()

    app = FastAPI(title="POPE-RL trainer", lifespan=lifespan)
    app.state.holder = holder

    async def ready() -> str | None:
        if "failed" in holder:
            return f"the training loop failed: {holder['failed']}"
        if "trainer" not in holder:
            return "loading the model"
        try:
            await holder["redis"].ping()
        except Exception as exc:
            return f"redis unreachable: {exc}"
        return None

    add_health_routes(app, ready)

    @app.get("/v1/state")
    async def state() -> dict[str, Any]:
        """The trainer's version, buffer and the last step's statistics."""
        trainer: Trainer | None = holder.get("trainer")
        if trainer is None:
            return {"status": "starting"}
        return {"version": trainer.version, "buffered": len(trainer.buffer),
                "dropped_stale": trainer.state.dropped_stale, "last_step": trainer.last}  # fmt: skip

    @app.get("/v1/history")
    async def history(limit: int = 100) -> list[dict[str, Any]]:
        """The last ``limit`` steps' metrics, oldest first (also in the JSONL metrics log)."""
        trainer: Trainer | None = holder.get("trainer")
        rows = list(trainer.history)[-limit:] if trainer else []
        return [{k: (v if v == v else None) for k, v in row.items()} for row in rows]

    return app


def _die_if_failed(task: asyncio.Task[None], holder: dict[str, Any]) -> None:
    """A training loop that raised is a bug: say so, and stop the process (non-zero exit)
    rather than serve a healthy-looking trainer that trains nothing."""
    if task.cancelled() or task.exception() is None:
        return
    holder["failed"] = repr(task.exception())
    log.error("the training loop failed; stopping the trainer", exc_info=task.exception())
    os.kill(os.getpid(), signal.SIGTERM)


def serve(settings: TrainerSettings) -> None:
    import uvicorn

    from services.common.logs import log_resolved_config, setup_logging

    setup_logging("trainer", settings.log_level, settings.log_format)
    log_resolved_config(settings)
    app = create_app(settings)
    uvicorn.run(app, host=settings.host, port=settings.port, log_level=settings.log_level.lower())
    if "failed" in app.state.holder:
        raise SystemExit(f"pope trainer: the training loop failed: {app.state.holder['failed']}")
