"""Settings of the rollout service (section ``rollout``; env ``POPE_ROLLOUT__<FIELD>``).

Sampling defaults are the POPE paper's training settings (DESIGN.md 1.5).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr

from services.common.config import ServiceSettings, section_config
from services.common.engine_client import EngineClient
from services.common.verifier_client import VerifierClient
from services.rollout.prompts import PromptTemplate


class HintSettings(BaseModel):
    """The hard-problem filter and hint search (DESIGN.md 1.1-1.2; ``rollout.hints``).

    Defaults follow the paper where it says (k = 128, prefixes up to 1/4 of the solution,
    linear scan); the CPU demo overrides sizes."""

    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)

    k: int = Field(128, ge=1, le=1024)
    """Unhinted attempts per problem; a problem is hard when none succeeds (at most 1024:
    the paper's 128 already costs minutes a problem on real models)."""
    k_hint: int = Field(8, ge=1, le=256)
    """Attempts per candidate prefix; a prefix works when at least one succeeds."""
    max_new_tokens: int = Field(32768, ge=1, le=1 << 20)
    """Longest response in the search (the paper: 32k). A job runs with at most the model's
    context (config.json's max_position_embeddings): a default over it is lowered to it, a
    job asking for more is refused."""
    temperature: float = Field(0.8, gt=0.0, le=10.0)
    """Sampling temperature: training's, so 'hard' means hard for the rollouts RL will see."""
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    """Nucleus sampling in the search (1.0: the full distribution, as in training)."""
    max_fraction: float = Field(0.25, gt=0.0, le=1.0)
    """Longest prefix tried, as a share of the solution's tokens. Problems are admitted
    against the service's value (fit.py: their longest hint must fit the context), so a job
    may lower it but not raise it."""
    method: Literal["linear", "galloping"] = "linear"
    """linear: the paper's scan from the shortest prefix up. galloping: probe cuts 0, 2, 6, 14, ...
    cuts then bisect; fewer attempts, approximate (success is not monotone in length)."""
    min_cuts: int = Field(3, ge=1, le=256)
    """Natural boundaries (paragraph, then sentence, then line ends) are collected until there
    are this many cuts; token counts are added when there are fewer."""
    max_cuts: int = Field(16, ge=1, le=256)
    """Most candidate prefixes per problem (more are thinned, evenly spaced)."""
    concurrency: int = Field(4, ge=1, le=256)
    """Problems searched at once (each sends up to ``k`` samples to the engine). 1 makes
    records exactly reproducible on an engine with deterministic inference (a batch then
    holds one problem's samples only; batched decoding can differ in the last float bits)."""
    seed: int = Field(0, ge=0, le=2**31 - 1)
    """Seeds every request (per problem, stage and prefix), so a rebuild on an engine with
    deterministic inference draws the same (one without ignores seeds, as SGLang does)."""


class EvalSettings(BaseModel):
    """Evaluation (``rollout.evaluation``); sampling defaults are the paper's evaluation settings."""

    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)

    split: Literal["train", "eval"] = "eval"
    """Problems evaluated."""
    k: int = Field(16, ge=1)
    """Samples per problem and variant (n in the estimator); pass@k is reported for k = 1 and k."""
    hinted: bool = False
    """Also evaluate the hinted variant of problems that have a hint."""
    temperature: float = Field(0.8, gt=0.0)
    """Sampling temperature of the evaluation samples."""
    top_p: float = Field(0.95, gt=0.0, le=1.0)
    """Nucleus sampling of the evaluation samples."""
    max_new_tokens: int = Field(16384, ge=1)
    """Longest response; a truncated response scores 0."""
    every_steps: int = Field(0, ge=0)
    """The rollout service evaluates at trainer step 0 and every this many steps (0: never)."""
    concurrency: int = Field(4, ge=1)
    """Problems sampled at once."""
    seed: int = 0
    """Seeds every request (per problem and variant), so a rerun on an engine with
    deterministic inference draws the same samples."""
    limit: int | None = Field(None, ge=1)
    """Evaluate only the first this many problems (by id), for quick checks."""


class RolloutSettings(ServiceSettings):
    section = "rollout"
    model_config = section_config("rollout")

    port: int = Field(8000, ge=0, le=65535)
    """User-facing HTTP API."""
    max_body_bytes: int = Field(32 << 20, ge=1024)
    """Largest request body taken (413 above it): a POST /v1/problems of tens of thousands
    of rows; a larger dataset goes in several POSTs, or through ``pope data``."""
    engine_url: str = "http://127.0.0.1:30000"
    """Where generation goes: an inference engine (SGLang or the CPU engine), or SGLang's
    router in front of many (then set ``engine_router``)."""
    engine_router: bool = False
    """``engine_url`` is SGLang's router: each sample is a request of its own (the router
    takes one sampling_params object and one rid per request), and a lost one is aborted on
    every engine of the registry (the router routes no control call)."""
    engine_api_key: SecretStr | None = Field(None, min_length=1)
    """The engine's API key (SGLang's --api-key, the CPU engine's ``engine.api_key``), when it has one."""
    engine_admin_key: SecretStr | None = Field(None, min_length=1)
    """The engine's admin key (SGLang's --admin-api-key, the CPU engine's ``engine.admin_api_key``),
    when it has one. The rollout needs it too: a generation whose answer was lost is stopped
    with /abort_request, a control call that such an engine opens with this key only (without
    it the abort is refused, and the lost rows decode on to their end)."""

    def engine_client(self, url: str | None = None, **kwargs: Any) -> EngineClient:
        """A client of ``url`` (default ``engine_url``, with ``engine_router``'s way of
        sending) that sends ``engine_api_key``, and ``engine_admin_key`` on the control
        calls; ``kwargs``: EngineClient's."""
        key = self.engine_api_key.get_secret_value() if self.engine_api_key else None
        admin = self.engine_admin_key.get_secret_value() if self.engine_admin_key else None
        if url is None:
            url, kwargs = self.engine_url, {"rows_apart": self.engine_router, **kwargs}
        return EngineClient(url, api_key=key, admin_key=admin, **kwargs)

    group_size: int = Field(8, ge=2)
    """Samples per group (G); GRPO needs at least two to have a baseline."""
    prompts_per_step: int = Field(32, ge=1)
    """Groups per training step (hinted and unhinted variants each count as one)."""
    hinted_fraction: float = Field(0.5, ge=0.0, le=1.0)
    """Share of a hinted problem's groups that are hinted; 0.5 is POPE's 1:1 mix."""
    max_staleness: int = Field(1, ge=0)
    """How many weight versions generation may run ahead of the trainer (0: on-policy)."""
    temperature: float = Field(0.8, gt=0.0)
    """Sampling temperature for training rollouts."""
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    """Nucleus sampling for training rollouts (the paper samples full distributions)."""
    max_new_tokens: int = Field(16384, ge=1)
    """Longest response; a truncated response scores 0."""
    archive_dir: Path = Path("runs/rollouts")
    """JSONL archive of every scored sample, paged by GET /v1/rollouts."""
    model_path: str | None = None
    """Model directory (or hub id) whose tokenizer and chat template build the prompts."""
    include_easy: bool = True
    """Train on problems labelled 'easy' too (unlabelled ones always are)."""
    max_concurrent_groups: int = Field(8, ge=1)
    """Groups of one step sampled at once (each is one /generate request of group_size rows)."""
    seed: int = 0
    """Seeds the problem order and every group's sampling_seed."""
    schedule: bool = True
    """Run the scheduler; False serves only the API (problems, rollouts, status)."""
    poll_interval_s: float = Field(0.5, gt=0.0)
    """How often a waiting scheduler re-checks the trainer, the engine and the problems."""
    prompt_template: PromptTemplate = Field(default_factory=PromptTemplate)
    """The words around each problem (plain and guided), with their version."""
    verifier_url: str = "http://127.0.0.1:8001"
    """Verifier service, for the hint search and evaluation (POST /v1/verify)."""
    verifier_token: SecretStr | None = Field(None, min_length=1)
    """The verifier's bearer token (its ``verifier.api_token``), when it has one."""

    def verifier_client(self) -> VerifierClient:
        token = self.verifier_token.get_secret_value() if self.verifier_token else None
        return VerifierClient(self.verifier_url, api_token=token)

    hints: HintSettings = Field(default_factory=HintSettings)
    """The hard-problem filter and hint search (``pope hints build``, POST /v1/hints/jobs)."""
    evaluation: EvalSettings = Field(default_factory=EvalSettings)
    """pass@k evaluation (``pope eval``; here, every ``every_steps`` trainer steps)."""
    eval_dir: Path = Path("runs/eval")
    """Where periodic evaluations are written (JSON and markdown per step)."""
