"""Client of the verifier service's ad-hoc scoring endpoint, ``POST /v1/verify`` (DESIGN.md 4a).

    async with VerifierClient("http://127.0.0.1:8001") as verifier:
        scores = await verifier.verify([("... \\boxed{4}", "4")])    # [Score(reward=1.0, ...)]

Used by the hint search and evaluation, which score samples outside the stream pipeline.
The verifier answers each request within its deadline (``verify_deadline_s``), the rows it
had no time for marked ``NOT_SCORED``; those are sent again, so every row is scored.
Transport errors and 503 (the verifier starting, or full: ``verify_queue``) are retried
with backoff, waiting at least the 503's Retry-After; anything else raises ``VerifierError``.
"""

from __future__ import annotations

from services.common import retry
from services.common.messages import Score

MAX_ROWS = 512
"""Rows per request: large evaluations go in slices, so no request runs for minutes. The
verifier takes no more (422)."""
SENT_ANSWER_CHARS = 32_768
"""A completion is sent as its last ``SENT_ANSWER_CHARS`` characters, which loses nothing
(the verifier reads only a completion's last 16,000, guard.TAIL_CHARS) and keeps a request
of 512 rows far under the verifier's 64 MiB body limit whatever the completions' length."""
NOT_SCORED = "not scored before the request's deadline"
"""The error of a row the verifier had no time for within the request's deadline; sent again."""
MAX_STALLS = 3
"""Requests in a row that score none of the rows sent again before the client gives up on
them (they stay 0 with ``timed_out``): a verifier with no worker free for that long."""


class VerifierError(RuntimeError):
    """The verifier refused a request or could not be reached."""


class VerifierClient(retry.RetryingClient):
    def __init__(
        self,
        base_url: str,
        *,
        timeout: float = 300.0,
        retries: int = 5,
        api_token: str | None = None,
        backoff: float = 0.5,
    ) -> None:
        super().__init__(base_url, timeout=timeout, retries=retries, backoff=backoff, token=api_token)

    async def verify(self, pairs: list[tuple[str, str]]) -> list[Score]:
        """Score each (completion, gold answer) pair; results in order."""
        out: list[Score] = []
        for i in range(0, len(pairs), MAX_ROWS):
            rows = [{"answer": a[-SENT_ANSWER_CHARS:], "gold": g} for a, g in pairs[i : i + MAX_ROWS]]
            out += await self._score_all(rows)
        return out

    async def _score_all(self, rows: list[dict[str, str]]) -> list[Score]:
        scores = [Score.model_validate(s) for s in await self._post(rows)]
        stalls = 0
        while (late := [i for i, s in enumerate(scores) if s.error == NOT_SCORED]) and stalls < MAX_STALLS:
            again = [Score.model_validate(s) for s in await self._post([rows[i] for i in late])]
            stalls = stalls + 1 if all(s.error == NOT_SCORED for s in again) else 0
            for i, score in zip(late, again, strict=True):
                scores[i] = score
        if late:  # never a placeholder as a verdict: the hint search would count it a failure
            raise VerifierError(
                f"{len(late)} of {len(rows)} rows still unscored after {MAX_STALLS} requests in a row "
                "scored none of them (the verifier's verify pool is saturated)"
            )
        return scores

    async def _post(self, rows: list[dict[str, str]]) -> list[object]:
        resp = await retry.request(
            self._http,
            "POST",
            "/v1/verify",
            rows,
            peer=f"the verifier at {self.base_url}",
            retries=self.retries,
            backoff=self.backoff,
            fail=lambda message, status: VerifierError(message),
        )
        body = resp.json()
        if not isinstance(body, list) or len(body) != len(rows):
            raise VerifierError(f"verifier answered {str(body)[:200]!r} for {len(rows)} rows")
        return body
