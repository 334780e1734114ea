"""Client of the verifier service's ad-hoc scoring endpoint, ``POST /v1/verify`` (DESIGN.md 4a).

    async with VerifierClient("http://127.0.0.1:8001") as verifier:
        scores = await verifier.verify([("... \\boxed{4}", "4")])    # [Score(reward=1.0, ...)]

Used by the hint search and evaluation, which score samples outside the stream pipeline.
Transport errors and 503 (the verifier starting, or full: ``verify_queue``) are retried
with backoff, waiting at least the 503's Retry-After; anything else raises ``VerifierError``.
"""

from __future__ import annotations

from services.common import retry
from services.common.messages import Score

MAX_ROWS = 512
"""Rows per request: large evaluations go in slices, so no request runs for minutes. The
verifier takes no more (422)."""
MAX_ANSWER_CHARS = 131_072
"""Longest completion a row may carry (the verifier answers 422 past it): a 32k-token
completion at 4 characters a token; 512 such rows are the 64 MiB body limit. Longer ones
are sent as their last ``MAX_ANSWER_CHARS``, which loses nothing: the verifier reads only a
completion's last 16,000 characters (guard.TAIL_CHARS)."""
MAX_GOLD_CHARS = 4_096
"""Longest gold answer a row may carry (422 past it); the verifier's guard already refuses
one of over 500 characters, row by row, as no real answer."""


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
            rows = [{"answer": a[-MAX_ANSWER_CHARS:], "gold": g} for a, g in pairs[i : i + MAX_ROWS]]
            out += [Score.model_validate(s) for s in await self._post(rows)]
        return out

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
