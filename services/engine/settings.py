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
    """Most sequences in the running batch (the slots of its KV cache); more wait for a
    row to finish."""
    batch_wait_ms: float = Field(5.0, ge=0.0)
    """How long a request arriving at an idle engine waits for others, so that a burst is
    prefilled together; a request arriving while rows run joins them at the next step."""
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
    api_key: SecretStr | None = Field(None, min_length=1)
    """SGLang's --api-key: when set, the ordinary endpoints (generate, model_info, server_info)
    need 'Authorization: Bearer <key>', and so do the control ones unless ``admin_api_key``
    is set. /health*, /ready* and /metrics stay open (services/engine/guard.py has the rule)."""
    admin_api_key: SecretStr | None = Field(None, min_length=1)
    """SGLang's --admin-api-key: when set, the control endpoints (weight updates and sync,
    pause, continue, abort_request, flush_cache) need this key and no longer take
    ``api_key``; the ordinary ones keep taking ``api_key`` (open when only this is set)."""
    max_request_bytes: int = Field(32 * 1024 * 1024, ge=1024)
    """Largest request body, in bytes; a larger one answers 413 before it is read whole.
    The largest legitimate request is a batch of ``max_batch`` (64) prompts, each of up to
    a context of token ids as JSON: 64 x 40,960 (Qwen3's context) x 7 bytes ("151642,")
    is 18.4 MB, plus one sampling_params object per row; 32 MiB leaves headroom."""
    max_prompts_per_request: int = Field(1024, ge=1)
    """Most prompts (rows) in one /generate. The rollout sends one request of group_size rows
    (8 by default) per group; 1024 admits any batch a client builds, and bounds the
    tokenization and bookkeeping a single request can ask for."""
    max_n: int = Field(64, ge=1)
    """Largest ``sampling_params.n`` (SGLang's parallel_sample_num): the engine makes n
    sequences per prompt up front (n = 10^6 once grew it past 5 GB). This system's client
    never sends n > 1 (each copy is its own row), so 64 only serves other clients."""
    max_request_tokens: int = Field(4 * 1024 * 1024, ge=1)
    """Most tokens one /generate may ask for: the sum over its sequences (rows x n) of prompt
    plus max_new_tokens, after max_new_tokens is capped to the context as SGLang caps it.
    Larger answers 400 at once, so one request cannot hold the engine for minutes. 4 Mi
    tokens admits 64 rows that each fill a 40,960-token context (2.6 Mi)."""
