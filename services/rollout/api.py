"""The rollout service's user-facing HTTP API for problems and archived rollouts (DESIGN.md 4a).

    POST   /v1/problems?allow_leakage=   a JSON list of problems (at most 10,000); all-or-nothing;
                                         201 {"ids": [...], "leaked": [...]}; 422 {"detail": [RowError]}
    GET    /v1/problems?label=&split=&limit=&offset=
                                         {"count": n, "problems": [...a page, by id...], "next_offset": int | null}
    GET    /v1/problems/{id}             {"problem": {...}, "stats": {"hinted": {...}, "unhinted": {...}}}
    PATCH  /v1/problems/{id}             {"excluded": true | "why" | false}: keep it out of training, or not
    DELETE /v1/problems/{id}             204: gone, and no longer drawn; its rollouts stay archived
    GET    /v1/transfer?label=&split=&limit=&offset=
                                         {"count": n, "rows": [TransferRow...], "next_offset": int | null}:
                                         per problem, attempts, solves and first-solve step by variant
    GET    /v1/rollouts?limit=&cursor=&problem_id=&variant=&weight_version=&step=&min_reward=&max_reward=
                                         {"rollouts": [...newest first...], "next_cursor": str | null}

Mount it on the service's app:

    app.include_router(problems_and_rollouts_router(store, archive, fit))

A posted problem must fit the model's context (``fit``: fit.py; without a model only the
character bounds of ``Problem`` apply). Errors are ``{"detail": "<why>"}`` (400, 404, 413),
FastAPI's 422 for a bad query, and POST /v1/problems's 422 is ``{"detail": [RowError, ...]}``.
Auth is the app's (services/common/http.py, ``api_app``): every mutating route needs the
bearer token when one is configured, and the reads too with ``require_auth_for_reads``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Body, HTTPException, Query, Response
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from services.common.messages import MAX_ID_CHARS, MAX_NOTE_CHARS, Problem, ProblemLabel, Variant
from services.rollout.archive import RolloutArchive, RolloutRecord
from services.rollout.fit import FitCheck
from services.rollout.merge import LeakedPair, exclude_leaks, keep_search, split_id
from services.rollout.store import ProblemStore, VariantStats

MAX_PROBLEM_ROWS = 10_000
"""Largest POST /v1/problems batch (a 422 above it). Each row is validated and tokenized
(fit.py) before the one transaction that stores the batch, so a batch is a few seconds of
work at most; 32 MiB (``max_body_bytes``) over 10,000 rows is still ~3 KB a row. A larger
dataset goes in several POSTs, or through ``pope data import``."""

MAX_PAGE = 1000
"""Largest page of GET /v1/problems and GET /v1/rollouts."""

MAX_TRANSFER_PAGE = 5000
"""Largest page of GET /v1/transfer (its rows are small: counts and a cut prompt)."""

EXCLUDED_BY_API = "excluded through the API (PATCH /v1/problems/{id})"
"""The ``excluded`` reason a PATCH with ``true`` records."""

FitSource = Callable[[], FitCheck | None]
"""Builds the context check (loading the tokenizer on first use); None: no model to count with."""


class RowError(BaseModel):
    """One reason a row of POST /v1/problems was refused."""

    row: int | None
    """Index of the row in the posted list, or None when the body as a whole is wrong."""
    field: str | None
    """Dotted path of the field, or None when the row as a whole is wrong."""
    message: str


class RowErrors(BaseModel):
    """POST /v1/problems's 422: every reason of every refused row."""

    detail: list[RowError]


class Detail(BaseModel):
    """An error's answer: ``{"detail": "<why>"}``."""

    detail: str


class Created(BaseModel):
    ids: list[str]
    """One id per posted row, in order (a duplicated row's id appears once per row)."""
    leaked: list[LeakedPair] = []
    """Train problems (posted or stored) whose text is a posted or stored eval problem's, where
    one of the two was posted: each is excluded from training (``Problem.excluded``) unless
    ``allow_leakage`` was set."""


class ProblemList(BaseModel):
    count: int
    """Problems matching the filters, over all pages."""
    problems: list[Problem]
    """This page of them, in id order."""
    next_offset: int | None = None
    """Pass back as ``offset`` for the next page; None on the last page."""


class ProblemView(BaseModel):
    problem: Problem
    stats: dict[str, dict[str, int]]
    """Per variant ("hinted", "unhinted"): {"attempts": n, "solves": n}."""


class ProblemPatch(BaseModel):
    """PATCH /v1/problems/{id}: keep a problem out of training, or let it back in."""

    model_config = ConfigDict(extra="forbid", strict=True)

    excluded: bool | Annotated[str, Field(min_length=1, max_length=MAX_NOTE_CHARS)]
    """true (or a reason): excluded from training, still stored and evaluated; false:
    trained on again (a leak exclusion included: the caller takes it back)."""


class VariantCounts(BaseModel):
    attempts: int
    """Samples of this variant scored."""
    solves: int
    """Of them, those with a reward above 0."""
    first_solve_step: int | None
    """The training step of the earliest group of this variant that solved it (None: none has)."""


class TransferRow(BaseModel):
    """One problem as the dashboard's problems table shows it: POPE's transfer is a problem
    whose hinted variant solves first and whose unhinted variant then does too."""

    id: str
    label: ProblemLabel | None
    split: Literal["train", "eval"]
    excluded: str | None
    prompt: str
    """The problem's text, cut to ``PROMPT_PREVIEW_CHARS``."""
    hint_chars: int | None
    solution_chars: int | None
    hint_fraction: float | None
    """The hint's share of the solution: of its tokens when the hint search chose it (its
    ``prefix_fraction``), else of its characters when the hint is a prefix of the solution;
    None without a hint or a solution it comes from."""
    hint_fraction_of: Literal["tokens", "chars"] | None
    """What ``hint_fraction`` counts."""
    hinted: VariantCounts
    unhinted: VariantCounts


class TransferTable(BaseModel):
    count: int
    """Problems matching the filters, over all pages."""
    rows: list[TransferRow]
    """This page of them, in id order."""
    next_offset: int | None = None


PROMPT_PREVIEW_CHARS = 200
"""Characters of a problem's text a TransferRow carries."""


def transfer_row(problem: Problem, stats: dict[str, VariantStats] | None) -> TransferRow:
    """The problems-table row of ``problem`` with its counts (None: never sampled)."""
    counts = {v.value: VariantCounts(**vars((stats or {}).get(v.value) or VariantStats())) for v in Variant}
    fraction: float | None = None
    of: Literal["tokens", "chars"] | None = None
    search = problem.search
    if problem.hint is not None and problem.solution is not None:
        if search is not None and search.prefix_chars == len(problem.hint) and search.prefix_fraction is not None:
            fraction, of = search.prefix_fraction, "tokens"
        elif problem.solution.startswith(problem.hint):
            fraction, of = len(problem.hint) / len(problem.solution), "chars"
    return TransferRow(
        id=problem.id,
        label=problem.label,
        split=problem.split,
        excluded=problem.excluded,
        prompt=problem.prompt[:PROMPT_PREVIEW_CHARS],
        hint_chars=len(problem.hint) if problem.hint is not None else None,
        solution_chars=len(problem.solution) if problem.solution is not None else None,
        hint_fraction=fraction,
        hint_fraction_of=of,
        hinted=counts[Variant.HINTED.value],
        unhinted=counts[Variant.UNHINTED.value],
    )


class RolloutPage(BaseModel):
    rollouts: list[RolloutRecord]
    next_cursor: str | None
    """Pass back as ``cursor`` for the next (older) page; None on the last page."""


def _inlined(schema: dict[str, Any]) -> dict[str, Any]:
    """A pydantic JSON schema with its ``$defs`` put in place of every ``$ref`` (no cycles)."""
    defs = schema.pop("$defs", {})

    def inline(node: Any) -> Any:
        if isinstance(node, dict):
            if "$ref" in node:
                return inline(defs[node["$ref"].rsplit("/", 1)[-1]])
            return {k: inline(v) for k, v in node.items()}
        if isinstance(node, list):
            return [inline(v) for v in node]
        return node

    return dict(inline(schema))


PROBLEMS_BODY: dict[str, Any] = {
    "required": True,
    "content": {
        "application/json": {
            "schema": {
                "type": "array",
                "minItems": 1,
                "maxItems": MAX_PROBLEM_ROWS,
                "items": {
                    **_inlined(Problem.model_json_schema(mode="validation")),
                    # Problem's invariant, said in JSON Schema: a hard_hinted problem has a hint.
                    "if": {"properties": {"label": {"const": "hard_hinted"}}, "required": ["label"]},
                    "then": {"required": ["hint"], "properties": {"hint": {"type": "string"}}},
                },
            }
        }
    },
}
"""POST /v1/problems's body as the OpenAPI shows it (the route reads it as Any, to report
a bad row by its index): a list of problems."""


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


def _misfits(fit: FitSource | None, problems: list[Problem]) -> list[RowError]:
    check = fit() if fit is not None else None
    if check is None:
        return []
    return [RowError(row=row, field=field, message=why) for row, field, why in check.misfits(problems)]


def _filtered(
    problems: list[Problem], label: ProblemLabel | Literal["none"] | None, split: Literal["train", "eval"] | None
) -> list[Problem]:
    """``problems`` with ``label`` (``none``: not labelled yet) and in ``split``, each when given."""
    return [
        p
        for p in problems
        if (label is None or (p.label is None if label == "none" else p.label == label))
        and (split is None or p.split == split)
    ]


def problems_and_rollouts_router(
    store: ProblemStore, archive: RolloutArchive, fit: FitSource | None = None
) -> APIRouter:
    """The /v1/problems and /v1/rollouts routes over ``store`` and ``archive``; posted
    problems are checked against the model's context by ``fit`` (None: not at all)."""
    router = APIRouter(prefix="/v1")
    not_found: dict[int | str, dict[str, Any]] = {404: {"model": Detail, "description": "no problem with that id"}}
    unreadable: dict[int | str, dict[str, Any]] = {400: {"model": Detail, "description": "a body that is not UTF-8"}}

    @router.post(
        "/problems",
        status_code=201,
        openapi_extra={"requestBody": PROBLEMS_BODY},
        responses={
            **unreadable,
            413: {"model": Detail, "description": "a body over max_body_bytes"},
            422: {
                "model": RowErrors,
                "description": f"refused rows (each with its row, field and reason), or over {MAX_PROBLEM_ROWS} rows",
            },
        },
    )
    async def post_problems(body: Annotated[Any, Body()], allow_leakage: bool = False) -> Created:
        """Store a JSON list of problems: validated whole first, so either every row is
        stored or none is. Each row must fit the model's context: its longest prompt
        (hinted with the longest hint the search may cut) plus its split's max_new_tokens
        (without a model, only the character bounds apply). A row whose id exists replaces
        it (keeping its hint search if its prompt and answer are unchanged); a row without
        an id gets one derived from its prompt and answer (its split's name appended when
        the same problem is stored in the other split); within one request the last row
        wins. A train problem that is also an eval problem is excluded from training unless
        ``allow_leakage``."""
        # The body is taken as Any so that a bad row is reported by its index with our
        # error shape, not as FastAPI's "body.3.answer" location.
        if not isinstance(body, list):
            raise _unprocessable([RowError(row=None, field=None, message="the body must be a JSON list of problems")])
        if not body:
            raise _unprocessable([RowError(row=None, field=None, message="the list of problems is empty")])
        if len(body) > MAX_PROBLEM_ROWS:
            message = f"at most {MAX_PROBLEM_ROWS} problems per request, got {len(body)}: post them in several"
            raise _unprocessable([RowError(row=None, field=None, message=message)])
        problems, errors = validate_rows(body)
        if errors:
            raise _unprocessable(errors)
        # Planned against the stored problems, like `pope data import` (and, like it, not
        # isolated from a concurrent writer between the read and the one-transaction write).
        before = {p.id: p for p in await store.all()}
        batch: dict[str, Problem] = {}
        rows: list[Problem] = []  # each row as it would be stored (a kept search's hint included)
        for problem in problems:
            problem = split_id(problem, batch.get(problem.id) or before.get(problem.id))
            batch[problem.id] = keep_search(problem, before.get(problem.id))
            rows.append(batch[problem.id])
        # Tokenizing is CPU work (the tokenizer's own threads): off the event loop.
        errors = await asyncio.to_thread(_misfits, fit, rows)
        if errors:
            raise _unprocessable(errors)
        leaked, _ = exclude_leaks(batch, before, allow_leakage)
        await store.put_many(list(batch.values()))
        return Created(ids=[p.id for p in rows], leaked=leaked)

    @router.get("/problems")
    async def list_problems(
        label: Annotated[ProblemLabel | Literal["none"] | None, Query()] = None,
        split: Annotated[Literal["train", "eval"] | None, Query()] = None,
        limit: Annotated[int, Query(ge=1, le=MAX_PAGE)] = 100,
        offset: Annotated[int, Query(ge=0, le=10**9)] = 0,
    ) -> ProblemList:
        """Stored problems (each with its hint-search record, if searched), filtered by
        label (``none``: not labelled yet) and split, a page of ``limit`` at a time in id order."""
        problems = _filtered(await store.all(), label, split)
        page = problems[offset : offset + limit]
        more = offset + limit < len(problems)
        return ProblemList(count=len(problems), problems=page, next_offset=offset + limit if more else None)

    @router.get("/transfer")
    async def transfer(
        label: Annotated[ProblemLabel | Literal["none"] | None, Query()] = None,
        split: Annotated[Literal["train", "eval"] | None, Query()] = None,
        limit: Annotated[int, Query(ge=1, le=MAX_TRANSFER_PAGE)] = MAX_TRANSFER_PAGE,
        offset: Annotated[int, Query(ge=0, le=10**9)] = 0,
    ) -> TransferTable:
        """The problems table: each problem's hint share and, per variant, its attempts,
        solves and the step of its first solve (the unhinted one's is the transfer), filtered
        like GET /v1/problems, in id order."""
        if label is None and split is None:  # a page read by id: only its problems are read
            ids = await store.ids()
            count, page = len(ids), await store.get_many(ids[offset : offset + limit])
        else:
            problems = _filtered(await store.all(), label, split)
            count, page = len(problems), problems[offset : offset + limit]
        stats = await store.stats_many([p.id for p in page])
        more = offset + limit < count
        rows = [transfer_row(p, stats.get(p.id)) for p in page]
        return TransferTable(count=count, rows=rows, next_offset=offset + limit if more else None)

    @router.get("/problems/{problem_id}", responses=not_found)
    async def get_problem(problem_id: str) -> ProblemView:
        problem = await store.get(problem_id)
        if problem is None:
            raise HTTPException(404, f"no problem with id {problem_id!r}")
        return ProblemView(problem=problem, stats=await store.stats(problem_id))

    @router.patch("/problems/{problem_id}", responses={**not_found, **unreadable})
    async def patch_problem(problem_id: str, patch: Annotated[ProblemPatch, Body()]) -> Problem:
        """Exclude the problem from training (``true`` or a reason) or include it again
        (``false``); the scheduler draws from the store each step, so it takes effect at
        the next step. Returns the problem as stored."""
        reason = EXCLUDED_BY_API if patch.excluded is True else (patch.excluded or None)
        updated = await store.update(problem_id, lambda p: p.model_copy(update={"excluded": reason}))
        if updated is None:
            raise HTTPException(404, f"no problem with id {problem_id!r}")
        return updated

    @router.delete("/problems/{problem_id}", status_code=204, response_class=Response, responses=not_found)
    async def delete_problem(problem_id: str) -> Response:
        """Remove the problem and its solve counts: no later step draws it (a step already
        planned skips it); groups of it already sampled are still scored and trained on,
        and its rollouts stay in the archive."""
        if not await store.delete(problem_id):
            raise HTTPException(404, f"no problem with id {problem_id!r}")
        return Response(status_code=204)

    @router.get("/rollouts", responses={404: {"model": Detail, "description": "no page at that cursor"}})
    async def get_rollouts(
        limit: Annotated[int, Query(ge=1, le=MAX_PAGE)] = 50,
        cursor: Annotated[str | None, Query(max_length=64, pattern=r"^[A-Za-z0-9_-]+$")] = None,
        problem_id: Annotated[str | None, Query(max_length=MAX_ID_CHARS)] = None,
        variant: Variant | None = None,
        weight_version: Annotated[int | None, Query(ge=0, le=2**53)] = None,
        step: Annotated[int | None, Query(ge=0, le=2**53)] = None,
        min_reward: Annotated[float | None, Query(ge=0.0, le=1.0)] = None,
        max_reward: Annotated[float | None, Query(ge=0.0, le=1.0)] = None,
    ) -> RolloutPage:
        """Scored samples from the archive, newest first, filtered by every given field (a
        reward between ``min_reward`` and ``max_reward``, both included). A cursor that is
        not a ``next_cursor`` of this archive finds no page (404)."""
        if min_reward is not None and max_reward is not None and min_reward > max_reward:
            return RolloutPage(rollouts=[], next_cursor=None)  # an empty range: no need to read the archive
        try:
            # File reads block; keep them off the event loop.
            records, next_cursor = await asyncio.to_thread(
                archive.page,
                limit,
                cursor,
                problem_id=problem_id,
                variant=variant,
                weight_version=weight_version,
                step=step,
                min_reward=min_reward,
                max_reward=max_reward,
            )
        except ValueError as exc:
            raise HTTPException(404, str(exc)) from None
        return RolloutPage(rollouts=records, next_cursor=next_cursor)

    return router
