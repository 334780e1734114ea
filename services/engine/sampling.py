"""Sampling parameters (SGLang's names and defaults) and the next-token sampler.

The reported logprob of a sampled token is log_softmax(logits / temperature), taken
*before* top-k / top-p truncation, as SGLang reports it (DESIGN.md 3): the trainer
recomputes exactly this quantity, so the first on-policy importance ratio is 1.
Temperature 0 means greedy; its logprob is then taken at temperature 1.

Seeds follow SGLang (``generators``): ``sampling_seed`` counts only under deterministic
inference, and then every one of a request's ``n`` copies draws with that one seed.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import torch

# SGLang's SamplingParams fields and their defaults (sglang 0.5.x). Keys outside this
# table are unknown to SGLang too and answer 400; keys in it that this engine does not
# implement answer 400 unless they carry their default (so a client that sends a full
# default-filled object still works).
SGLANG_DEFAULTS: dict[str, Any] = {
    "max_new_tokens": 128,
    "stop": None,
    "stop_token_ids": None,
    "stop_regex": None,
    "temperature": 1.0,
    "top_p": 1.0,
    "top_k": 1 << 30,
    "min_p": 0.0,
    "frequency_penalty": 0.0,
    "presence_penalty": 0.0,
    "repetition_penalty": 1.0,
    "min_new_tokens": 0,
    "n": 1,
    "json_schema": None,
    "regex": None,
    "ebnf": None,
    "structural_tag": None,
    "ignore_eos": False,
    "skip_special_tokens": True,
    "spaces_between_special_tokens": True,
    "no_stop_trim": False,
    "stream_interval": None,
    "logit_bias": None,
    "sampling_seed": None,
    "custom_params": None,
    "beam_width": None,
    "watermark": None,
    "choice": None,
}
SUPPORTED = frozenset(
    {
        "max_new_tokens",
        "stop_token_ids",
        "temperature",
        "top_p",
        "top_k",
        "min_p",
        "n",
        "ignore_eos",
        "skip_special_tokens",
        "no_stop_trim",
        "sampling_seed",
        "spaces_between_special_tokens",
    }
)


def _is_default(value: Any, default: Any) -> bool:
    """Whether an unsupported parameter carries its default (or null, [], {}), the type
    counted too: ``False`` is not a default of 0, though Python calls them equal."""
    candidates: tuple[Any, ...] = (default, None, [], {})
    return any(type(value) is type(v) and value == v for v in candidates)


SAMPLING_EPS = 1e-6
"""A temperature below this samples greedily, as SGLang's ``SamplingParams`` makes it (a
tiny positive one would overflow ``logits / temperature`` into NaN probabilities)."""

DEFAULT_SEED = 42
"""The seed SGLang gives a row without a ``sampling_seed`` under deterministic inference
(``SamplingBatchInfo.from_schedule_batch``)."""


class SamplingError(ValueError):
    """A sampling parameter is unknown, unsupported or out of range (an HTTP 400)."""


@dataclass(frozen=True)
class SamplingSpec:
    """Validated sampling parameters of one request."""

    max_new_tokens: int = 128
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1  # -1: off
    min_p: float = 0.0
    n: int = 1
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    skip_special_tokens: bool = True
    no_stop_trim: bool = False
    sampling_seed: int | None = None

    @classmethod
    def parse(cls, raw: Any, vocab_size: int, max_n: int | None = None) -> SamplingSpec:
        """Check ``raw`` (one request's ``sampling_params``) as SGLang's ``SamplingParams``
        and its ``verify`` check it, with SGLang's messages; ``max_n`` caps ``n``."""
        if raw is not None and not isinstance(raw, dict):
            raise SamplingError(f"sampling_params must be an object, got {type(raw).__name__}")
        raw = dict(raw or {})
        for key, value in raw.items():
            if key not in SGLANG_DEFAULTS:
                raise SamplingError(f"unknown sampling parameter {key!r}")
            if key not in SUPPORTED and not _is_default(value, SGLANG_DEFAULTS[key]):
                raise SamplingError(f"sampling parameter {key!r} is not supported by the CPU engine")

        def num(key: str, kind: type, default: Any) -> Any:
            value = raw.get(key)
            if value is None:
                return default
            if kind is float and isinstance(value, int) and not isinstance(value, bool):
                value = float(value)
            if kind is int and isinstance(value, float) and value.is_integer():
                value = int(value)  # JSON Schema's integer: 5.0 is one
            if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
                raise SamplingError(f"sampling parameter {key!r} must be {kind.__name__}, got {value!r}")
            return value

        stop = raw.get("stop_token_ids")
        if isinstance(stop, list):
            stop = [int(t) if isinstance(t, float) and t.is_integer() else t for t in stop]
        if stop is not None and (not isinstance(stop, list) or not all(type(t) is int for t in stop)):
            raise SamplingError("stop_token_ids must be a list of token ids")
        num("spaces_between_special_tokens", bool, True)
        top_k = num("top_k", int, -1)
        if top_k < 1 and top_k != -1:  # SGLang's verify; -1 and its default 1 << 30 mean off
            raise SamplingError(f"top_k must be -1 (disable) or at least 1, got {top_k}.")
        spec = cls(
            max_new_tokens=num("max_new_tokens", int, 128),
            temperature=num("temperature", float, 1.0),
            top_p=num("top_p", float, 1.0),
            top_k=-1 if top_k == -1 or top_k >= vocab_size else top_k,
            min_p=num("min_p", float, 0.0),
            n=num("n", int, 1),
            stop_token_ids=tuple(stop or ()),
            ignore_eos=num("ignore_eos", bool, False),
            skip_special_tokens=num("skip_special_tokens", bool, True),
            no_stop_trim=num("no_stop_trim", bool, False),
            sampling_seed=num("sampling_seed", int, None),
        )
        # SGLang's SamplingParams.verify, in its order and words (NaN fails every range).
        if not math.isfinite(spec.temperature) or spec.temperature < 0.0:
            raise SamplingError(f"temperature must be a non-negative finite number, got {spec.temperature}.")
        if not 0.0 < spec.top_p <= 1.0:
            raise SamplingError(f"top_p must be in (0, 1], got {spec.top_p}.")
        if not 0.0 <= spec.min_p <= 1.0:
            raise SamplingError(f"min_p must be in [0, 1], got {spec.min_p}.")
        if spec.max_new_tokens < 0:
            raise SamplingError(f"max_new_tokens must be at least 0, got {spec.max_new_tokens}.")
        if spec.sampling_seed is not None and not -(2**63) <= spec.sampling_seed <= 2**63 - 1:
            raise SamplingError(f"sampling_seed must be in [-2**63, 2**63 - 1], got {spec.sampling_seed}.")
        if spec.temperature < SAMPLING_EPS:  # SGLang's special case: greedy (logprobs at T = 1)
            spec = dataclasses.replace(spec, temperature=0.0)
        if spec.n < 1 or (max_n is not None and spec.n > max_n):
            raise SamplingError(f"n must be in [1, {max_n}] here (SGLang's parallel_sample_num), got {spec.n}")
        if any(not 0 <= t < vocab_size for t in spec.stop_token_ids):
            raise SamplingError(f"stop_token_ids must be token ids in [0, {vocab_size})")
        return spec

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0 or self.top_k == 1


def generators(spec: SamplingSpec, *, deterministic: bool, process_rng: torch.Generator) -> list[torch.Generator]:
    """One generator per copy of a request (``spec.n`` of them), seeded as SGLang seeds them.

    Deterministic inference (``--enable-deterministic-inference``): each copy gets its own
    generator seeded with ``sampling_seed`` (or DEFAULT_SEED), the same seed for all ``n``
    copies, so copies of one prompt are the same sample, as on SGLang, where every copy
    carries the request's sampling params and its draws are a function of seed and
    position only. Otherwise the seed is ignored, as SGLang ignores it, and every copy
    draws from the engine's one process RNG (seeded at random when the engine starts).
    """
    if not deterministic:
        return [process_rng] * spec.n
    seed = DEFAULT_SEED if spec.sampling_seed is None else spec.sampling_seed
    return [torch.Generator().manual_seed(seed) for _ in range(spec.n)]


def sample_next(
    logits: torch.Tensor, specs: list[SamplingSpec], generators: list[torch.Generator | None]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample one token per row; return (tokens [B], logprobs [B]).

    logits: [B, V] float32, the model's next-token logits.
    Vectorised over the batch: one sort, one cumulative sum, and an inverse-CDF draw with
    one uniform number per row from that row's own generator, so a row's draw does not
    depend on what else is in the batch.
    """
    dev = logits.device
    temps = torch.tensor([1.0 if s.greedy else s.temperature for s in specs], device=dev)  # [B]
    logp = torch.log_softmax(logits / temps[:, None], dim=-1)  # [B, V], what is reported
    if any(s.top_k > 0 or s.top_p < 1.0 or s.min_p > 0.0 for s in specs):
        sorted_lp, order = torch.sort(logp, dim=-1, descending=True)  # [B, V], [B, V]
        probs = sorted_lp.exp().masked_fill(truncated(sorted_lp, specs), 0.0)  # [B, V]
    else:  # the full distribution (RL's default): no sort needed
        probs, order = logp.exp(), None
    cdf = torch.cumsum(probs, dim=-1)  # [B, V]
    # Uniforms come from each row's CPU generator, so a seed draws the same on any device;
    # rows that share one (the engine's process RNG) draw theirs in one call, in row order.
    if all(g is generators[0] for g in generators):
        u = torch.rand(len(generators), generator=generators[0])
    else:
        u = torch.stack([torch.rand((), generator=g) for g in generators])
    u = u.to(dev) * cdf[:, -1]  # [B]
    pick = torch.searchsorted(cdf, u[:, None], right=True).clamp(max=cdf.shape[1] - 1)  # [B, 1]
    tokens = (order.gather(1, pick) if order is not None else pick).squeeze(1)  # [B]
    if any(s.greedy for s in specs):
        greedy = torch.tensor([s.greedy for s in specs], device=dev)  # [B]
        tokens = torch.where(greedy, logp.argmax(dim=-1), tokens)  # [B]
    return tokens, logp.gather(1, tokens[:, None]).squeeze(1)


def truncated(sorted_lp: torch.Tensor, specs: list[SamplingSpec]) -> torch.Tensor:
    """Which tokens top-k, top-p and min-p remove: [B, V] bool, over logprobs sorted
    descending per row (sorted_lp [B, V]). The most likely token always stays."""
    vocab, dev = sorted_lp.shape[1], sorted_lp.device
    top_k = torch.tensor([s.top_k if s.top_k > 0 else vocab for s in specs], device=dev)  # [B]
    top_p = torch.tensor([s.top_p for s in specs], device=dev)  # [B]
    min_p = torch.tensor([s.min_p for s in specs], device=dev)  # [B]
    remove = torch.arange(vocab, device=dev)[None, :] >= top_k[:, None]  # [B, V]
    probs = sorted_lp.exp()
    remove |= (torch.cumsum(probs, dim=-1) - probs) > top_p[:, None]  # mass strictly above > p
    remove |= sorted_lp < sorted_lp[:, :1] + torch.log(min_p)[:, None]  # log 0 = -inf: off
    remove[:, 0] = False
    return remove
