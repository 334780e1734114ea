"""Settings of the CPU engine (section ``engine``; env ``POPE_ENGINE__<FIELD>``)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, SecretStr

from services.common.config import SectionSettings, section_config


class EngineSettings(SectionSettings):
    section = "engine"
    model_config = section_config("engine")

    port: int = Field(30000, ge=0, le=65535)
    """SGLang's default port."""
    model_path: str | None = None
    """HF-format model directory to serve (``pope model init`` makes a tiny one)."""
    weight_version: int = Field(0, ge=0)
    """Version reported for the start-up weights (SGLang's ``--weight-version``)."""
    device: str = "cpu"
    """Torch device ("cpu", "cuda", "cuda:1")."""
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    """Weights and activations; float32 keeps logprobs comparable with the trainer's on CPU."""
    max_batch: int = Field(64, ge=1)
    """Most sequences decoded together in one batch."""
    batch_wait_ms: float = Field(5.0, ge=0.0)
    """How long the first request of a batch waits for others to join it."""
    torch_threads: int | None = Field(None, ge=1)
    """Torch intra-op threads (default: torch's choice)."""
    enable_deterministic_inference: bool = False
    """SGLang's flag of the same name, with SGLang's meaning and default: off, a request's
    sampling_seed is ignored and every sample draws from the engine's own RNG; on, sampling_seed
    (42 when a request has none) seeds each sample, and the n copies of one request share it,
    so they are one sample n times. The client gives each copy its own row and seed, so a
    group differs in both modes (docs/architecture.md#reproducibility)."""
    weight_sync_timeout_s: float = Field(120.0, gt=0.0)
    """Longest wait of a broadcast weight sync (joining the trainer's group, receiving one
    broadcast): a trainer that dies mid-broadcast fails that call after this, and the old
    weights keep serving."""
    api_key: SecretStr | None = None
    """When set, every endpoint but health and metrics needs 'Authorization: Bearer <key>' (SGLang's --api-key)."""
