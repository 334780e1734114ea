"""The rollout service: ``pope rollout --port 8000 --model DIR``.

It owns the problems and the user-facing API (api.py: problems and rollouts; hint_jobs.py:
hint-search jobs; dashboard.py: the live page at /; here: GET /v1/status?history=N
(N <= 1000), GET /v1/evaluations?limit=N, /healthz, /readyz, /metrics, /docs, and the
context check posted problems go through, fit.py, when the model's config.json gives a
context), runs the scheduler (scheduler.py) that turns problems into raw groups, and keeps
its own read of ``pope:scored`` (consumer group ``archivers``): every scored sample goes to
the JSONL archive that GET /v1/rollouts pages, and into the per-problem attempt and solve
counts.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import logging
import os
import re
import socket
import threading
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Annotated, Any

from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel
from redis.asyncio import Redis
from starlette.exceptions import HTTPException as StarletteHTTPException

from services.common.http import add_health_routes, api_app, redis_unready, stop_if_failed, validation_error
from services.common.http import serve as run_server
from services.common.keys import ARCHIVERS, TRAINERS, VERIFIERS, Keys
from services.common.messages import ScoredGroup
from services.common.run import read_control
from services.common.streams import GroupReader, group_info
from services.common.worker import Worker
from services.rollout.api import problems_and_rollouts_router
from services.rollout.archive import RolloutArchive
from services.rollout.archiver import Archiver
from services.rollout.attempts import Attempter
from services.rollout.dashboard import dashboard_router
from services.rollout.engines import Engines
from services.rollout.evaluation import MAX_EVAL_HISTORY, PeriodicEval
from services.rollout.fit import FitCheck, model_context
from services.rollout.hint_jobs import HintJobs, hint_jobs_router
from services.rollout.scheduler import Scheduler
from services.rollout.settings import RolloutSettings
from services.rollout.store import ProblemStore

log = logging.getLogger(__name__)

MAX_HISTORY = 1000
"""Most trainer steps GET /v1/status?history= returns (the trainer keeps a bounded list too)."""


class Status(BaseModel):
    """GET /v1/status: where training stands, for people and dashboards (free-form parts)."""

    trainer: dict[str, Any]
    """The trainer's control state (version, buffer, drops) and ``last_step``'s metrics."""
    engine: dict[str, Any]
    """Where generation goes and the weights the engines serve."""
    rollout: dict[str, Any]
    """The scheduler: step, what it waits for, groups per minute."""
    streams: dict[str, Any]
    """Depth and consumer-group lag of pope:rollouts and pope:scored."""
    problems: int
    """Problems stored."""
    evaluation: dict[str, Any]
    """The periodic evaluation's state."""
    at: float
    """Unix time of this answer."""
    history: list[dict[str, Any]]
    """The trainer's last ``history`` steps of metrics, newest first."""


class Evaluations(BaseModel):
    """GET /v1/evaluations: the periodic pass@k evaluations."""

    every_steps: int
    """Trainer steps between evaluations (0: the service runs none)."""
    k: int
    """Samples per problem and variant; the rows' ``pass@<k>`` is with this k."""
    evaluations: list[dict[str, Any]]
    """Newest first: ``weight_version``, ``at``, ``seconds`` and ``<variant>/<stat>`` for stat
    in problems, samples, pass@1, pass@<k>, response_tokens_mean, truncated_frac."""


def create_app(settings: RolloutSettings) -> FastAPI:
    keys = Keys(settings.key_prefix)
    redis = Redis.from_url(settings.redis_url)
    engines = Engines(settings, redis)
    engine = engines.client
    store = ProblemStore(redis, keys)
    archive = RolloutArchive(settings.archive_dir / "rollouts.jsonl")
    stop = asyncio.Event()
    held: dict[str, Any] = {}
    loading = threading.Lock()  # called from worker threads; transformers' lazy import is not thread-safe

    def tokenizer() -> Any:  # loaded once, on first use (the scheduler, a hint job, a POST's fit check)
        with loading:
            if "tokenizer" not in held:
                from transformers import AutoTokenizer

                held["tokenizer"] = AutoTokenizer.from_pretrained(settings.model_path)
        return held["tokenizer"]

    hint_jobs = HintJobs(settings, redis, store, engine, tokenizer)
    context = model_context(settings.model_path)
    if context is None:
        log.warning(
            "no model context (model_path %s, no max_position_embeddings in its config.json): posted problems "
            "are checked against Problem's character bounds only, not against the model's context",
            settings.model_path,
        )

    elif settings.max_new_tokens >= context:
        log.warning(
            "max_new_tokens %d leaves no room in the model's context of %d tokens: every train problem "
            "posted will be refused (POST /v1/problems, 422)",
            settings.max_new_tokens,
            context,
        )

    def fit() -> FitCheck | None:  # POST /v1/problems's context check
        if context is None:
            return None
        # An eval problem's response budget is the periodic evaluation's when the service
        # runs one; otherwise evaluation is `pope eval`'s, with its own, so the prompt must fit.
        evaluates = settings.evaluation.every_steps > 0
        budgets = {"train": settings.max_new_tokens, "eval": settings.evaluation.max_new_tokens if evaluates else 0}
        source = f"{settings.model_path}/config.json"
        return FitCheck(tokenizer(), settings.prompt_template, context, budgets, settings.hints.max_fraction, source)

    verifier = settings.verifier_client()

    async def attempter() -> Attempter:
        return Attempter(engine, verifier, await asyncio.to_thread(tokenizer), settings.prompt_template)

    evaluator = PeriodicEval(
        settings.evaluation,
        settings.eval_dir,
        redis,
        keys,
        store,
        attempter,
        engines.weight_version,
        settings.poll_interval_s,
    )

    archive_group = Archiver(redis, keys, archive, store, settings.streams)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        instance = f"rollout-{socket.gethostname()}-{os.getpid()}"
        archiver = Worker(
            GroupReader(redis, keys, keys.scored, ARCHIVERS, instance, settings.streams),
            ScoredGroup,
            archive_group,
            key_of=lambda g: g.group_id,
        )
        tasks = [asyncio.create_task(archiver.run(stop))]
        cut_short = [asyncio.create_task(evaluator.run(stop))]  # cancelled on shutdown, see below
        if settings.schedule:
            if not settings.model_path:
                raise SystemExit("pope rollout: the scheduler needs the model's tokenizer: --model DIR")
            held["scheduler"] = Scheduler(settings, redis, engines, store, await asyncio.to_thread(tokenizer))
            scheduling = asyncio.create_task(held["scheduler"].run(stop))
            scheduling.add_done_callback(lambda t: stop_if_failed(app, t, "scheduler"))
            cut_short.append(scheduling)
        # In the background: a service started while Redis is away must still come up (its
        # /readyz says Redis is unready meanwhile) and resume the job once Redis answers.
        tasks.append(asyncio.create_task(hint_jobs.resume_interrupted(stop)))
        yield
        stop.set()  # the archiver finishes the group in hand (its commit is one transaction)
        # The rest wait on generations that can run for minutes, so they are cancelled: a
        # step cut short is finished from the plan log under the same group ids by the next
        # start, an evaluation cut short runs again from state:eval, and a hint job stays
        # "running" in Redis, so the next start resumes it.
        if hint_jobs.task is not None:
            cut_short.append(hint_jobs.task)
        for task in cut_short:
            task.cancel()
        await asyncio.gather(*tasks, *cut_short, return_exceptions=True)
        await engine.aclose()
        await verifier.aclose()
        await redis.aclose()

    app = api_app(
        settings,
        title="POPE-RL rollout service",
        lifespan=lifespan,
        description="Problems in, hinted and unhinted rollouts out (POPE).",
    )
    app.include_router(problems_and_rollouts_router(store, archive, fit))
    app.include_router(hint_jobs_router(hint_jobs))
    app.include_router(dashboard_router())

    @app.exception_handler(RequestValidationError)
    async def unreadable_body(request: Request, exc: RequestValidationError) -> JSONResponse:
        """POST /v1/problems answers every 422 in its row-error shape (api.RowErrors): a
        body that is not JSON at all, or a bad query; every other route FastAPI's own."""
        if not (request.method == "POST" and request.url.path == "/v1/problems"):
            return validation_error(exc)
        rows = []
        for e in exc.errors():
            if e.get("type") == "json_invalid":
                reason = e.get("ctx", {}).get("error", "")
                message = f"the body is not valid JSON: {reason}".rstrip(": ")
                rows.append({"row": None, "field": None, "message": message})
            else:
                rows.append({"row": None, "field": ".".join(str(p) for p in e["loc"]) or None, "message": e["msg"]})
        return JSONResponse({"detail": rows}, 422)

    plain_http_error = app.exception_handlers[StarletteHTTPException]

    @app.exception_handler(StarletteHTTPException)
    async def method_not_allowed(request: Request, exc: StarletteHTTPException) -> Response:
        """A 405's Allow names every method of the path: Starlette names only those of the
        first route matching it (GET /v1/problems and POST /v1/problems are two routes)."""
        if exc.status_code == 405:
            exc = StarletteHTTPException(405, exc.detail, headers={"Allow": ", ".join(_methods(app, request))})
        answer = plain_http_error(request, exc)
        return await answer if inspect.isawaitable(answer) else answer

    async def ready() -> str | None:
        failed: str | None = getattr(app.state, "failed", None)
        return failed or await redis_unready(redis)

    add_health_routes(app, ready)

    @app.get("/v1/status", response_model=Status)
    async def status(history: Annotated[int, Query(ge=0, le=MAX_HISTORY)] = 0) -> dict[str, Any]:
        """Training state: the trainer's control state (version, buffer, drops) and its last
        step's metrics, engine weight version, stream depths, rates; with ``history=N``, the
        trainer's last N steps of metrics (newest first)."""
        control = await read_control(redis, keys)
        last = await redis.lindex(keys.history("trainer"), 0)  # type: ignore[misc]
        trainer: dict[str, Any] = control.model_dump(mode="json", exclude={"schema_version", "kind"}) if control else {}
        trainer["last_step"] = json.loads(last) if last else None
        rollout = {k.decode(): _num(v) for k, v in (await redis.hgetall(keys.state("rollout"))).items()}  # type: ignore[misc]
        scheduler: Scheduler | None = held.get("scheduler")
        return {
            "trainer": trainer,
            "engine": await engines.status(),
            "rollout": {
                **rollout,
                "step": scheduler.step if scheduler else rollout.get("step"),
                "waiting_for": scheduler.waiting_for if scheduler else "scheduler disabled",
                "groups_per_min": scheduler.rate_per_min() if scheduler else None,
            },
            "streams": await _streams(redis, keys),
            "problems": await store.count(),
            "evaluation": {
                **{k.decode(): _num(v) for k, v in (await redis.hgetall(keys.state("eval"))).items()},  # type: ignore[misc]
                "every_steps": settings.evaluation.every_steps,
                "waiting_for": evaluator.waiting_for,
            },
            "at": time.time(),
            "history": [json.loads(x) for x in await redis.lrange(keys.history("trainer"), 0, history - 1)]  # type: ignore[misc]
            if history > 0
            else [],
        }

    @app.get("/v1/evaluations", response_model=Evaluations)
    async def evaluations(limit: Annotated[int, Query(ge=1, le=MAX_EVAL_HISTORY)] = 100) -> dict[str, Any]:
        """The periodic evaluations, newest first: each one's weight version, time, and per
        variant its problems, samples, pass@1, pass@k, mean response tokens and truncated share."""
        rows = await redis.lrange(keys.history("eval"), 0, limit - 1)  # type: ignore[misc]
        cfg = settings.evaluation
        return {"every_steps": cfg.every_steps, "k": cfg.k, "evaluations": [json.loads(r) for r in rows]}

    return app


async def _streams(redis: Redis, keys: Keys) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, stream, group in (("rollouts", keys.rollouts, VERIFIERS), ("scored", keys.scored, TRAINERS)):
        out[name] = {"length": await redis.xlen(stream), group: await group_info(redis, stream, group)}
    return out


def _methods(app: FastAPI, request: Request) -> list[str]:
    """The methods the API's description (OpenAPI) gives ``request``'s path."""
    for template, operations in app.openapi().get("paths", {}).items():
        if re.fullmatch(re.sub(r"\\{[^/]+?\\}", "[^/]+", re.escape(template)), request.url.path):
            return sorted(m.upper() for m in operations)
    return []


def _num(raw: bytes) -> int | float | str:
    text = raw.decode()
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def serve(settings: RolloutSettings) -> None:
    from services.common.config import model_dir_problem
    from services.common.logs import log_resolved_config, setup_logging

    if settings.schedule and (problem := model_dir_problem(settings.model_path, "rollout")):
        raise SystemExit(problem + " (the scheduler builds prompts with its tokenizer)")
    setup_logging("rollout", settings.log_level, settings.log_format)
    log_resolved_config(settings)
    run_server(create_app(settings), settings, "rollout")
