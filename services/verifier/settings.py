"""Settings of the verifier service (section ``verifier``; env ``POPE_VERIFIER__<FIELD>``)."""

from __future__ import annotations

from typing import Self

from pydantic import Field, model_validator

from services.common.config import ServiceSettings, section_config
from services.common.messages import ScoringPolicy


class VerifierSettings(ServiceSettings):
    section = "verifier"
    model_config = section_config("verifier")

    port: int = Field(8001, ge=0, le=65535)
    """HTTP: /v1/verify, health and metrics."""
    max_body_bytes: int = Field(64 << 20, ge=1024)
    """Largest request body taken (413 above it): the rollout's client sends at most 512 rows
    a request, each up to a 16k-token completion (about 64 KiB)."""
    workers: int = Field(2, ge=1)
    """math-verify worker processes scoring the rollouts stream (and POST /v1/verify too when
    ``consume`` is off: then there is no training to keep them for)."""
    timeout_s: float = Field(5.0, gt=0.0)
    """Hard wall-clock limit per answer; the worker is killed past it and the answer scores 0."""
    verify_workers: int = Field(1, ge=1)
    """math-verify worker processes of their own for POST /v1/verify while ``consume`` is on,
    so ad-hoc scoring, however hard its answers, never takes a stream worker."""
    verify_queue: int = Field(16, ge=1)
    """POST /v1/verify requests taken at once (scoring or waiting for a worker); one more is
    answered 503 with Retry-After, so waiting work stays bounded. Evaluation and the hint
    search send 4 at a time each by default."""
    verify_deadline_s: float = Field(8.0, gt=0.0)
    """Longest a POST /v1/verify request runs, waiting for a worker included; above
    ``timeout_s``, so a hard answer gets its whole limit. Rows not scored by then score 0
    with ``timed_out`` and the error ``NOT_SCORED``, and VerifierClient sends them again:
    a long request becomes several short ones, none held for minutes (512 rows at the
    limit would be over 40 minutes on one worker), each answered within a fuzzer's or a
    proxy's timeout."""
    memory_limit_mb: int | None = Field(2048, ge=64)
    """Address-space limit of each worker process (None: none); an answer past it scores 0 with an error."""
    consume: bool = True
    """Consume the rollouts stream; False serves only POST /v1/verify (e.g. for the hint search)."""
    policy: ScoringPolicy = ScoringPolicy.JOINED_BOXES_V2
    """Which boxes count and how a gold answer is read (docs/verifier.md); recorded with
    every scored group. `last-box-v1` reproduces runs scored before the record."""

    @model_validator(mode="after")
    def _deadline_past_the_limit(self) -> Self:
        if self.verify_deadline_s <= self.timeout_s:
            raise ValueError(
                f"verify_deadline_s ({self.verify_deadline_s:g}) must be over timeout_s ({self.timeout_s:g}): "
                "a request must have time for at least one answer at its limit"
            )
        return self
