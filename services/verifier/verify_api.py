"""``POST /v1/verify``: ad-hoc scoring (evaluation, the hint search), apart from training's.

Training's stream scoring must never wait on ad-hoc work, so this endpoint scores with a
pool of its own (``verify_workers`` processes; service.py builds it) and each request is
bounded three ways, all in the OpenAPI document with the body of each answer:

- its size: at most ``MAX_ROWS`` rows, each answer at most ``MAX_ANSWER_CHARS`` characters
  and each gold at most ``MAX_GOLD_CHARS`` (422, pydantic's message naming the row and the
  limit); a body over ``max_body_bytes`` is a 413 (services/common/http.py);
- its time: ``verify_deadline_s`` from when it is taken, waiting for a worker included;
  rows not scored by then score 0 with ``timed_out`` and the error ``NOT_SCORED``
  (pool.py), which VerifierClient sends again; so every request is answered within the
  deadline and a worker's replacement, whatever its answers hold;
- how many wait: ``verify_queue`` requests are taken at once; one more is answered 503
  with ``Retry-After`` (seconds until the oldest taken one's deadline), which
  VerifierClient retries, rather than a queue that grows without limit.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Annotated, Any

from fastapi import Body, FastAPI, HTTPException, Response
from prometheus_client import Counter
from pydantic import BaseModel, ConfigDict, Field

from services.common.http import DETAIL_SCHEMA
from services.common.messages import Score, ScoringPolicy
from services.common.verifier_client import MAX_ROWS
from services.verifier.pool import ScoringPool

POLICY_HEADER = "X-Pope-Scoring-Policy"

MAX_ANSWER_CHARS = 1 << 20
"""Longest completion a row may carry: a megabyte (the adversarial corpus's largest cases)
is still taken and scored, cheaply, since only its last 16,000 characters are read; 64
such rows fill the 64 MiB body limit. VerifierClient sends at most the last 32,768."""
MAX_GOLD_CHARS = 4_096
"""Longest gold answer a row may carry; the guard already refuses one of over 500
characters, row by row, as no real answer."""

REFUSED = Counter("pope_verifier_verify_refused_total", "POST /v1/verify requests answered 503 (queue full)")


class VerifyRow(BaseModel):
    """One row of POST /v1/verify."""

    model_config = ConfigDict(extra="forbid")
    answer: str = Field(
        max_length=MAX_ANSWER_CHARS,
        description="The full model completion; its final answer is read by the scoring policy "
        "(only its last 16,000 characters are read).",
    )
    gold: str = Field(min_length=1, max_length=MAX_GOLD_CHARS, description="The reference answer.")


class Admission:
    """At most ``limit`` requests taken at once, each with its deadline; single event loop,
    so no lock."""

    def __init__(self, limit: int, deadline_s: float) -> None:
        self.limit, self.deadline_s = limit, deadline_s
        self._deadlines: list[float] = []

    @contextmanager
    def take(self) -> Iterator[float]:
        """The request's deadline (``time.monotonic()``); HTTPException 503 when full."""
        now = time.monotonic()
        if len(self._deadlines) >= self.limit:
            REFUSED.inc()
            wait = max(1, math.ceil(min(self._deadlines) - now))
            raise HTTPException(
                503,
                f"{self.limit} verify requests are in hand (verify_queue); retry in {wait}s",
                headers={"Retry-After": str(wait)},
            )
        deadline = now + self.deadline_s
        self._deadlines.append(deadline)
        try:
            yield deadline
        finally:
            self._deadlines.remove(deadline)


async def verify_rows(pool: ScoringPool, rows: list[VerifyRow], deadline: float | None = None) -> list[Score]:
    """Score rows in order; rows sharing a gold answer go to one worker as one group."""
    by_gold: dict[str, list[int]] = {}
    for i, row in enumerate(rows):
        by_gold.setdefault(row.gold, []).append(i)
    results = await asyncio.gather(
        *(pool.score(g, [rows[i].answer for i in idx], deadline) for g, idx in by_gold.items())
    )
    out: list[Score | None] = [None] * len(rows)
    for idx, scores in zip(by_gold.values(), results, strict=True):
        for i, sc in zip(idx, scores, strict=True):
            out[i] = sc
    return [s for s in out if s is not None]


def _detail(description: str, headers: dict[str, Any] | None = None) -> dict[str, Any]:
    response: dict[str, Any] = {"description": description, "content": {"application/json": {"schema": DETAIL_SCHEMA}}}
    if headers:
        response["headers"] = headers
    return response


RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {
        "description": "One verdict per row, in order.",
        "headers": {
            POLICY_HEADER: {
                "description": "The scoring policy that scored the rows.",
                "required": True,
                "schema": {"type": "string", "enum": [p.value for p in ScoringPolicy]},
            }
        },
    },
    400: _detail("The body cannot be read as JSON text (it is not UTF-8, say)."),
    413: _detail("The request body is over `max_body_bytes`."),
    503: _detail(
        "`verify_queue` requests are in hand; retry after `Retry-After` seconds.",
        {"Retry-After": {"description": "Seconds to wait.", "required": True, "schema": {"type": "integer"}}},
    ),
}
"""What POST /v1/verify can answer besides 401 (services/common/http.py adds it when a token
is set) and 422 (FastAPI adds it, with its validation error's schema: the body is not a list
of at most ``MAX_ROWS`` valid rows)."""


def add_verify_route(
    app: FastAPI,
    pool: ScoringPool,
    admission: Admission,
    policy: ScoringPolicy,
    on_scored: Callable[[list[Score]], None],
) -> None:
    """``POST /v1/verify`` on ``app``, scoring with ``pool``; ``on_scored(scores)`` counts them."""

    @app.post("/v1/verify", responses=RESPONSES)
    async def verify(rows: Annotated[list[VerifyRow], Body(max_length=MAX_ROWS)], response: Response) -> list[Score]:
        """Score completions against gold answers: one verdict per row, in order; the
        ``X-Pope-Scoring-Policy`` header names the rules that scored them. At most 512 rows;
        rows not scored within ``verify_deadline_s`` score 0 with ``timed_out``."""
        with admission.take() as deadline:
            scores = await verify_rows(pool, rows, deadline)
        on_scored(scores)
        response.headers[POLICY_HEADER] = policy.value
        return scores
