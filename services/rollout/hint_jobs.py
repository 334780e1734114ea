"""Hint-search jobs over HTTP: the rollout service runs ``pope hints build``'s work for you.

    POST   /v1/hints/jobs        {"split": "train", "problem_ids": null, "redo": false,
                                  "hints": {"k": 16, ...}}   -> 202, the job
    GET    /v1/hints/jobs?limit= the newest jobs first (100 by default, at most 1000)
    GET    /v1/hints/jobs/{id}   the job: state (running | done | failed | cancelled), progress
                                 with ETA, counts by label, the settings it runs with
    POST   /v1/hints/jobs/{id}/cancel
                                 200 with the job, now "cancelled" (a cancelled one is answered
                                 as it is); 409 for one done or failed
    DELETE /v1/hints/jobs/{id}   204: cancelled if it runs, then forgotten (GET: 404 after)

``hints`` overrides the service's ``rollout.hints`` field by field, each within the bounds
of HintSettings; ``max_new_tokens`` is lowered to the model's context and ``max_fraction``
to the service's (problems were admitted against it, fit.py) where asked or configured
above them, which the job's ``adjusted`` says. One job runs at a time (a second POST while
one runs is a 409 naming it).
Jobs live in Redis; a job left ``running`` by a service that died is resumed when the
service starts again, and, like the CLI, skips every problem it already finished. A
cancelled job is never resumed: it is marked so in Redis before its task is stopped.
Problems finished before a cancel keep their results.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import Callable
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Body, HTTPException, Query, Response
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field
from redis.asyncio import Redis
from redis.exceptions import RedisError

from services.common.engine_client import EngineClient
from services.common.keys import Keys
from services.common.messages import MAX_ID_CHARS, Problem
from services.rollout.attempts import Attempter
from services.rollout.fit import model_context
from services.rollout.hint_builder import HintBuilder, Progress
from services.rollout.settings import HintSettings, RolloutSettings
from services.rollout.store import ProblemStore

log = logging.getLogger(__name__)

MAX_JOB_PROBLEMS = 100_000
"""Most ``problem_ids`` one job names."""

CANCEL_WAIT_S = 30.0
"""How long DELETE waits for a cancelled job's task to end (it ends at its next await)."""


def _whole(value: Any) -> Any:
    """A JSON number like 4.0 is an integer in JSON Schema: take it as 4 (strict ints refuse it)."""
    return int(value) if isinstance(value, float) and value.is_integer() else value


JobState = Literal["running", "done", "failed", "cancelled"]


class HintOverrides(BaseModel):
    """Fields of the service's ``rollout.hints`` (HintSettings) a job sets for itself; each
    unset one is the service's. Bounds are HintSettings' (tests/unit/test_hint_jobs.py
    keeps the two in step); strict, so ``true`` is not taken for 1."""

    model_config = ConfigDict(extra="forbid", strict=True, use_attribute_docstrings=True)

    k: Annotated[int, Field(ge=1, le=1024), BeforeValidator(_whole)] | None = None
    """Unhinted attempts per problem."""
    k_hint: Annotated[int, Field(ge=1, le=256), BeforeValidator(_whole)] | None = None
    """Attempts per candidate prefix."""
    max_new_tokens: Annotated[int, Field(ge=1, le=1 << 20), BeforeValidator(_whole)] | None = None
    """Longest response; at most the model's context."""
    temperature: float | None = Field(None, gt=0.0, le=10.0)
    """Sampling temperature."""
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    """Nucleus sampling."""
    max_fraction: float | None = Field(None, gt=0.0, le=1.0)
    """Longest prefix tried, as a share of the solution; at most the service's."""
    method: Literal["linear", "galloping"] | None = None
    """linear or galloping search over the cuts."""
    min_cuts: Annotated[int, Field(ge=1, le=256), BeforeValidator(_whole)] | None = None
    """Natural boundaries collected until there are this many cuts."""
    max_cuts: Annotated[int, Field(ge=1, le=256), BeforeValidator(_whole)] | None = None
    """Most candidate prefixes per problem."""
    concurrency: Annotated[int, Field(ge=1, le=256), BeforeValidator(_whole)] | None = None
    """Problems searched at once."""
    seed: Annotated[int, Field(ge=0, le=2**31 - 1), BeforeValidator(_whole)] | None = None
    """Seeds every request."""


class HintJobRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, use_attribute_docstrings=True)

    split: Literal["train", "eval"] | None = "train"
    """Search the problems of this split (None: every split)."""
    problem_ids: list[Annotated[str, Field(max_length=MAX_ID_CHARS)]] | None = Field(None, max_length=MAX_JOB_PROBLEMS)
    """Only these problems (all of the split when None)."""
    redo: bool = False
    """Search again problems already searched with the same settings."""
    hints: HintOverrides = Field(default_factory=HintOverrides)
    """Overrides of the service's ``rollout.hints`` settings (k, k_hint, max_new_tokens, ...)."""


class HintJob(BaseModel):
    id: str
    state: JobState
    request: HintJobRequest
    settings: HintSettings
    progress: dict[str, Any] = Field(default_factory=dict)
    error: str | None = None
    adjusted: list[str] = Field(default_factory=list)
    """Asked-for settings lowered to what the service allows, each with why."""
    created_at: float
    updated_at: float


class Detail(BaseModel):
    """An error's answer: ``{"detail": "<why>"}``."""

    detail: str


def job_settings(base: HintSettings, overrides: HintOverrides, context: int | None) -> tuple[HintSettings, list[str]]:
    """The settings a job runs with, and what was lowered: ``base`` with ``overrides``,
    ``max_new_tokens`` at most ``context`` and ``max_fraction`` at most ``base``'s (problems
    were admitted against it, fit.py). Lowered, not refused: each is a ceiling of the
    service's, not a mistake in the request, and the job shows what it runs with."""
    merged = {**base.model_dump(), **overrides.model_dump(exclude_none=True)}
    adjusted = []
    if context is not None and merged["max_new_tokens"] > context:
        adjusted.append(f"max_new_tokens {merged['max_new_tokens']} lowered to the model's context, {context}")
        merged["max_new_tokens"] = context
    if merged["max_fraction"] > base.max_fraction:
        adjusted.append(
            f"max_fraction {merged['max_fraction']:g} lowered to the service's rollout.hints.max_fraction, "
            f"{base.max_fraction:g}: problems were admitted against it"
        )
        merged["max_fraction"] = base.max_fraction
    return HintSettings.model_validate(merged), adjusted


class HintJobs:
    """Starts, tracks, cancels and resumes hint-search jobs for the rollout service."""

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
        self.job: HintJob | None = None
        """The job this process runs (its task is ``task``), if any."""

    @property
    def running(self) -> str | None:
        return None if self.job is None else self.job.id

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
        context = await asyncio.to_thread(model_context, self.settings.model_path)
        cfg, adjusted = job_settings(self.settings.hints, request.hints, context)
        now = time.time()
        job = HintJob(
            id=uuid.uuid4().hex[:12],
            state="running",
            request=request,
            settings=cfg,
            adjusted=adjusted,
            created_at=now,
            updated_at=now,
        )
        await self._save(job)
        self._launch(job)
        return job

    async def cancel(self, job_id: str) -> HintJob:
        """Mark the job cancelled (in Redis first, so no restart resumes it), then stop its
        task; 404 unknown, 409 when it already ended otherwise."""
        job = self.job if self.running == job_id else await self.get(job_id)
        if job is None:
            raise HTTPException(404, f"no hint job {job_id!r}")
        if job.state in ("done", "failed"):
            raise HTTPException(409, f"hint job {job_id} is {job.state}: there is nothing to cancel")
        if job.state == "cancelled":
            return job
        job.state, job.updated_at = "cancelled", time.time()
        await self._save(job)
        if self.running == job_id and self.task is not None:
            self.task.cancel()
            await asyncio.wait({self.task}, timeout=CANCEL_WAIT_S)  # its requests are dropped with it
        return job

    async def delete(self, job_id: str) -> None:
        """Cancel the job if it runs, then remove it; 404 unknown. Cancelled first, so a
        crash between the two leaves a cancelled job, never one a restart resumes."""
        job = self.job if self.running == job_id else await self.get(job_id)
        if job is None:
            raise HTTPException(404, f"no hint job {job_id!r}")
        if job.state == "running":
            await self.cancel(job_id)
        await self.redis.hdel(self.keys.hint_jobs, job_id)  # type: ignore[misc]

    async def resume_interrupted(self, stop: asyncio.Event | None = None) -> None:
        """Restart the job a previous process of this service left running, if any
        (never a cancelled one). With ``stop``, a Redis that does not answer (a service
        started during an outage) is asked again, backing off 0.2 s to 5 s, until it does
        or ``stop`` is set."""
        delay = 0.2
        while True:
            try:
                jobs = await self.all()
                break
            except RedisError as exc:
                if stop is None:
                    raise
                log.warning("hint jobs: cannot read the interrupted ones (%s); again in %.1fs", exc, delay)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), delay)
                if stop.is_set():
                    return
                delay = min(delay * 2, 5.0)
        for job in jobs:
            if job.state == "running" and self.running is None:
                log.info("resuming hint job %s", job.id)
                self._launch(job)

    def _launch(self, job: HintJob) -> None:
        self.job = job
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
            # Cancelled by DELETE: saved "cancelled" already; by a shutdown: saved as it
            # stands, still "running", so the next start resumes it.
            job.updated_at = time.time()
            self.job = None
            await self._save(job)


def _chosen(p: Problem, req: HintJobRequest) -> bool:
    return (
        not p.excluded
        and (req.split is None or p.split == req.split)
        and (req.problem_ids is None or p.id in req.problem_ids)
    )


def hint_jobs_router(jobs: HintJobs) -> APIRouter:
    router = APIRouter(prefix="/v1/hints")
    not_found: dict[int | str, dict[str, Any]] = {404: {"model": Detail, "description": "no such job"}}

    @router.post(
        "/jobs",
        status_code=202,
        responses={
            400: {"model": Detail, "description": "a body that is not UTF-8"},
            409: {"model": Detail, "description": "a job runs, or no model"},
        },
    )
    async def start_job(request: Annotated[HintJobRequest, Body()]) -> HintJob:
        """Start the hard-problem filter and hint search over the stored problems."""
        return await jobs.start(request)

    @router.get("/jobs")
    async def list_jobs(limit: Annotated[int, Query(ge=1, le=1000)] = 100) -> list[HintJob]:
        """The newest ``limit`` jobs, newest first."""
        return (await jobs.all())[:limit]

    @router.get("/jobs/{job_id}", responses=not_found)
    async def get_job(job_id: str) -> HintJob:
        job = await jobs.get(job_id)
        if job is None:
            raise HTTPException(404, f"no hint job {job_id!r}")
        return job

    @router.post(
        "/jobs/{job_id}/cancel",
        responses={**not_found, 409: {"model": Detail, "description": "the job is done or failed"}},
    )
    async def cancel_job(job_id: str) -> HintJob:
        """Cancel a running job: its search stops, its state becomes "cancelled" and it is
        never resumed; problems it finished keep their results. A cancelled job is answered
        as it is; a done or failed one is a 409."""
        return await jobs.cancel(job_id)

    @router.delete("/jobs/{job_id}", status_code=204, response_class=Response, responses=not_found)
    async def delete_job(job_id: str) -> Response:
        """Cancel the job if it runs (as POST .../cancel), then forget it (GET is a 404 after)."""
        await jobs.delete(job_id)
        return Response(status_code=204)

    return router
