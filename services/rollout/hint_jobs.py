"""Hint-search jobs over HTTP: the rollout service runs ``pope hints build``'s work for you.

    POST /v1/hints/jobs        {"split": "train", "problem_ids": null, "redo": false,
                                "hints": {"k": 16, ...}}   -> 202 {"job": {...}}
    GET  /v1/hints/jobs/{id}   the job: state (running | done | failed), progress with ETA,
                               counts by label, the settings it runs with
    GET  /v1/hints/jobs        every job, newest first

One job runs at a time (a second POST while one runs is a 409 naming it). Jobs live in
Redis; a job left ``running`` by a service that died is resumed when the service starts
again, and, like the CLI, skips every problem it already finished.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Callable
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Body, HTTPException
from pydantic import BaseModel, ConfigDict, Field
from redis.asyncio import Redis

from services.common.engine_client import EngineClient
from services.common.keys import Keys
from services.common.messages import Problem
from services.rollout.attempts import Attempter
from services.rollout.hint_builder import HintBuilder, Progress
from services.rollout.settings import HintSettings, RolloutSettings
from services.rollout.store import ProblemStore

log = logging.getLogger(__name__)


class HintJobRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    split: Literal["train", "eval"] | None = "train"
    """Search the problems of this split (None: every split)."""
    problem_ids: list[str] | None = None
    """Only these problems (all of the split when None)."""
    redo: bool = False
    """Search again problems already searched with the same settings."""
    hints: dict[str, Any] = Field(default_factory=dict)
    """Overrides of the service's ``rollout.hints`` settings (k, k_hint, max_new_tokens, ...)."""


class HintJob(BaseModel):
    id: str
    state: Literal["running", "done", "failed"]
    request: HintJobRequest
    settings: HintSettings
    progress: dict[str, Any] = Field(default_factory=dict)
    error: str | None = None
    created_at: float
    updated_at: float


class HintJobs:
    """Starts, tracks and resumes hint-search jobs for the rollout service."""

    def __init__(
        self,
        settings: RolloutSettings,
        redis: Redis,
        store: ProblemStore,
        engine: EngineClient,
        tokenizer: Callable[[], Any],
    ) -> None:
        self.settings, self.redis, self.store, self.engine = settings, redis, store, engine
        self.keys = Keys(settings.key_prefix)
        self.tokenizer = tokenizer  # loads the model's tokenizer on first use
        self.task: asyncio.Task[None] | None = None
        self.running: str | None = None

    async def get(self, job_id: str) -> HintJob | None:
        raw = await self.redis.hget(self.keys.hint_jobs, job_id)  # type: ignore[misc]
        return None if raw is None else HintJob.model_validate_json(raw)

    async def all(self) -> list[HintJob]:
        rows = await self.redis.hvals(self.keys.hint_jobs)  # type: ignore[misc]
        return sorted((HintJob.model_validate_json(r) for r in rows), key=lambda j: -j.created_at)

    async def _save(self, job: HintJob) -> None:
        await self.redis.hset(self.keys.hint_jobs, job.id, job.model_dump_json())  # type: ignore[misc]

    async def start(self, request: HintJobRequest) -> HintJob:
        if self.running is not None:
            raise HTTPException(
                409, f"hint job {self.running} is running; wait for it (GET /v1/hints/jobs/{self.running})"
            )
        if not self.settings.model_path:
            raise HTTPException(409, "the rollout service has no model (--model DIR): the search needs its tokenizer")
        try:
            cfg = HintSettings.model_validate({**self.settings.hints.model_dump(), **request.hints})
        except ValueError as exc:
            raise HTTPException(422, f"hints: {exc}") from None
        now = time.time()
        job = HintJob(
            id=uuid.uuid4().hex[:12], state="running", request=request, settings=cfg, created_at=now, updated_at=now
        )
        await self._save(job)
        self._launch(job)
        return job

    async def resume_interrupted(self) -> None:
        """Restart the job a previous process of this service left running, if any."""
        for job in await self.all():
            if job.state == "running" and self.running is None:
                log.info("resuming hint job %s", job.id)
                self._launch(job)

    def _launch(self, job: HintJob) -> None:
        self.running = job.id
        self.task = asyncio.create_task(self._run(job))

    async def _run(self, job: HintJob) -> None:
        try:
            tokenizer = await asyncio.to_thread(self.tokenizer)
            async with self.settings.verifier_client() as verifier:
                attempter = Attempter(self.engine, verifier, tokenizer, self.settings.prompt_template)
                builder = HintBuilder(
                    job.settings,
                    attempter,
                    tokenizer,
                    self.store,
                    self.settings.prompt_template.version,
                    self.settings.model_path,
                )
                req = job.request
                problems = [p for p in await self.store.all() if _chosen(p, req)]
                pending: list[asyncio.Task[None]] = []

                def on_progress(problem: Problem, progress: Progress) -> None:
                    job.progress = progress.as_dict()
                    job.updated_at = time.time()
                    pending.append(asyncio.create_task(self._save(job)))

                progress = await builder.run(problems, redo=req.redo, on_progress=on_progress)
                await asyncio.gather(*pending)
            job.progress, job.state = progress.as_dict(), "done"
        except Exception as exc:  # any failure ends the job with its reason, never the service
            log.exception("hint job %s failed", job.id)
            job.state, job.error = "failed", f"{type(exc).__name__}: {exc}"
        finally:
            job.updated_at = time.time()
            self.running = None
            await self._save(job)


def _chosen(p: Problem, req: HintJobRequest) -> bool:
    return (
        not p.excluded
        and (req.split is None or p.split == req.split)
        and (req.problem_ids is None or p.id in req.problem_ids)
    )


def hint_jobs_router(jobs: HintJobs) -> APIRouter:
    router = APIRouter(prefix="/v1/hints")

    @router.post("/jobs", status_code=202)
    async def start_job(request: Annotated[HintJobRequest, Body()]) -> HintJob:
        """Start the hard-problem filter and hint search over the stored problems."""
        return await jobs.start(request)

    @router.get("/jobs")
    async def list_jobs() -> list[HintJob]:
        return await jobs.all()

    @router.get("/jobs/{job_id}")
    async def get_job(job_id: str) -> HintJob:
        job = await jobs.get(job_id)
        if job is None:
            raise HTTPException(404, f"no hint job {job_id!r}")
        return job

    return router
