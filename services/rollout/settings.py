"""Settings of the rollout service (section ``rollout``; env ``POPE_ROLLOUT__<FIELD>``).

Sampling defaults are the POPE paper's training settings (DESIGN.md 1.5).
"""

from __future__ import annotations

from pathlib import Path

from pydantic import Field

from services.common.config import ServiceSettings, section_config
from services.rollout.prompts import PromptTemplate


class RolloutSettings(ServiceSettings):
    section = "rollout"
    model_config = section_config("rollout")

    port: int = Field(8000, ge=0, le=65535)
    """User-facing HTTP API."""
    engine_url: str = "http://127.0.0.1:30000"
    """Inference engine (SGLang or the CPU engine)."""
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
    """Groups of one step sampled at once (each is one /generate request with n = group_size)."""
    seed: int = 0
    """Seeds the problem order and every group's sampling_seed."""
    schedule: bool = True
    """Run the scheduler; False serves only the API (problems, rollouts, status)."""
    poll_interval_s: float = Field(0.5, gt=0.0)
    """How often a waiting scheduler re-checks the trainer, the engine and the problems."""
    prompt_template: PromptTemplate = Field(default_factory=PromptTemplate)
    """The words around each problem (plain and guided), with their version."""
