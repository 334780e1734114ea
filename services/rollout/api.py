"""The rollout service's user-facing HTTP API for problems and archived rollouts (DESIGN.md 4a).

    POST /v1/problems?allow_leakage=  a JSON list of problems; all-or-nothing; 201 {"ids": [...], "leaked": [...]}
    GET  /v1/problems?label=&split=   {"count": n, "problems": [...]}; label "none": not searched yet
    GET  /v1/problems/{id}            {"problem": {...}, "stats": {"hinted": {...}, "unhinted": {...}}}
    GET  /v1/rollouts?limit=&cursor=&problem_id=&variant=&weight_version=
                                      {"rollouts": [...newest first...], "next_cursor": str | null}

Mount it on the service's app:

    app.include_router(problems_and_rollouts_router(store, archive))

Auth is the app's (services/common/http.py, ``api_app``): POST needs the bearer token
when one is configured, and the reads too with ``require_auth_for_reads``.
"""

from __future__ import annotations

import asyncio
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Body, HTTPException, Query
from pydantic import BaseModel, ValidationError

from services.common.messages import Problem, ProblemLabel, Variant
from services.rollout.archive import RolloutArchive, RolloutRecord
from services.rollout.merge import LeakedPair, exclude_leaks, keep_search, split_id
from services.rollout.store import ProblemStore

MAX_PROBLEM_ROWS = 100_000
"""Largest POST /v1/problems batch: one transaction must stay a reasonable size."""


class RowError(BaseModel):
    """One reason a row of POST /v1/problems was refused."""

    row: int | None
    """Index of the row in the posted list, or None when the body as a whole is wrong."""
    field: str | None
    """Dotted path of the field, or None when the row as a whole is wrong."""
    message: str


class Created(BaseModel):
    ids: list[str]
    """One id per posted row, in order (a duplicated row's id appears once per row)."""
    leaked: list[LeakedPair] = []
    """Train problems (posted or stored) whose text is a posted or stored eval problem's, where
    one of the two was posted: each is excluded from training (``Problem.excluded``) unless
    ``allow_leakage`` was set."""


class ProblemList(BaseModel):
    count: int
    problems: list[Problem]


class ProblemView(BaseModel):
    problem: Problem
    stats: dict[str, dict[str, int]]
    """Per variant ("hinted", "unhinted"): {"attempts": n, "solves": n}."""


class RolloutPage(BaseModel):
    rollouts: list[RolloutRecord]
    next_cursor: str | None
    """Pass back as ``cursor`` for the next (older) page; None on the last page."""


def validate_rows(rows: list[Any]) -> tuple[list[Problem], list[RowError]]:
    """Every row as a Problem, or every error of every row (so one reply lists them all)."""
    problems: list[Problem] = []
    errors: list[RowError] = []
    for i, row in enumerate(rows):
        try:
            problems.append(Problem.model_validate(row))
        except ValidationError as exc:
            for err in exc.errors():
                field = ".".join(str(part) for part in err["loc"]) or None
                errors.append(RowError(row=i, field=field, message=err["msg"]))
    return problems, errors


def _unprocessable(errors: list[RowError]) -> HTTPException:
    return HTTPException(422, [e.model_dump() for e in errors])


def problems_and_rollouts_router(store: ProblemStore, archive: RolloutArchive) -> APIRouter:
    """The /v1/problems and /v1/rollouts routes over ``store`` and ``archive``."""
    router = APIRouter(prefix="/v1")

    @router.post("/problems", status_code=201)
    async def post_problems(body: Annotated[Any, Body()], allow_leakage: bool = False) -> Created:
        """Store a JSON list of problems: validated whole first, so either every row is
        stored or none is. A row whose id exists replaces it (keeping its hint search if its
        prompt and answer are unchanged); a row without an id gets one derived from its
        prompt and answer (its split's name appended when the same problem is stored in the
        other split); within one request the last row wins. A train problem that is also
        an eval problem is excluded from training unless ``allow_leakage``."""
        # The body is taken as Any so that a bad row is reported by its index with our
        # error shape, not as FastAPI's "body.3.answer" location.
        if not isinstance(body, list):
            raise _unprocessable([RowError(row=None, field=None, message="the body must be a JSON list of problems")])
        if not body:
            raise _unprocessable([RowError(row=None, field=None, message="the list of problems is empty")])
        if len(body) > MAX_PROBLEM_ROWS:
            raise HTTPException(413, f"at most {MAX_PROBLEM_ROWS} problems per request, got {len(body)}")
        problems, errors = validate_rows(body)
        if errors:
            raise _unprocessable(errors)
        # Planned against the stored problems, like `pope data import` (and, like it, not
        # isolated from a concurrent writer between the read and the one-transaction write).
        before = {p.id: p for p in await store.all()}
        batch: dict[str, Problem] = {}
        ids = []
        for problem in problems:
            problem = split_id(problem, batch.get(problem.id) or before.get(problem.id))
            batch[problem.id] = keep_search(problem, before.get(problem.id))
            ids.append(problem.id)
        leaked, _ = exclude_leaks(batch, before, allow_leakage)
        await store.put_many(list(batch.values()))
        return Created(ids=ids, leaked=leaked)

    @router.get("/problems")
    async def list_problems(
        label: Annotated[ProblemLabel | Literal["none"] | None, Query()] = None,
        split: Annotated[Literal["train", "eval"] | None, Query()] = None,
    ) -> ProblemList:
        """Stored problems (each with its hint-search record, if searched), filtered by
        label (``none``: not labelled yet) and split."""
        problems = [
            p
            for p in await store.all()
            if (label is None or (p.label is None if label == "none" else p.label == label))
            and (split is None or p.split == split)
        ]
        return ProblemList(count=len(problems), problems=problems)

    @router.get("/problems/{problem_id}")
    async def get_problem(problem_id: str) -> ProblemView:
        problem = await store.get(problem_id)
        if problem is None:
            raise HTTPException(404, f"no problem with id {problem_id!r}")
        return ProblemView(problem=problem, stats=await store.stats(problem_id))

    @router.get("/rollouts")
    async def get_rollouts(
        limit: Annotated[int, Query(ge=1, le=1000)] = 50,
        cursor: str | None = None,
        problem_id: str | None = None,
        variant: Variant | None = None,
        weight_version: Annotated[int | None, Query(ge=0)] = None,
    ) -> RolloutPage:
        """Scored samples from the archive, newest first, filtered by every given field."""
        try:
            # File reads block; keep them off the event loop.
            records, next_cursor = await asyncio.to_thread(
                archive.page, limit, cursor, problem_id=problem_id, variant=variant, weight_version=weight_version
            )
        except ValueError as exc:
            raise HTTPException(400, str(exc)) from None
        return RolloutPage(rollouts=records, next_cursor=next_cursor)

    return router
