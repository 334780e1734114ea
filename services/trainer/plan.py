"""Per-GPU memory of training a model: ``pope trainer plan --config FILE [--nproc N]``.

An estimate from the architecture, before any GPU is involved: the parameter count
comes from the model built on the meta device (no weights are read), the activations
from the shape (hidden size, heads, layers, vocabulary). The assumptions, which the
printed table repeats:

- FSDP2 over N ranks with fp32 master weights and bf16 compute: the fp32 parameters,
  their fp32 gradients and AdamW's two fp32 moments are sharded, 16 bytes a parameter
  / N. The bf16 copy the forward computes with is gathered one decoder layer at a time
  (the running layer and the one prefetched), plus the root module (embeddings, final
  norm, an untied LM head), which stays gathered; one layer's bf16 gradient is
  unsharded before its reduce-scatter.
- bf16 activations (``trainer.bf16``) are those of bf16 parameters, as FSDP2's
  mixed precision computes. Today's trainer autocasts float32 weights instead: the
  residual stream and the norms stay float32 and autocast's bf16 copies are saved too,
  which on the test's small Qwen3 saves 1.6x the bf16 figure (nearly the float32 one).
- Activations do not shrink with N: each rank runs its own micro-batch of
  ``trainer.micro_batch_tokens`` tokens (a row longer than that runs alone).
- Not counted: the CUDA context and allocator fragmentation (keep ~10% spare), NCCL
  buffers, a reference model for a KL penalty.

The activation terms follow what autograd saves for backward in transformers' Qwen3
decoder (Llama-shaped models save the same, less the q/k norms); the unit test
tests/unit/test_plan.py measures them with ``saved_tensors_hooks`` and holds the
estimate to 20%.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

# Bytes of one float32 value: master weights, gradients, moments, RMSNorm internals.
F32 = 4
GIB = 1024**3

# The Qwen3-4B(-Instruct-2507) config.json values that size the plan (no download needed).
QWEN3_4B_CONFIG: dict[str, object] = {
    "architectures": ["Qwen3ForCausalLM"],
    "model_type": "qwen3",
    "hidden_size": 2560,
    "intermediate_size": 9728,
    "num_hidden_layers": 36,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "head_dim": 128,
    "vocab_size": 151936,
    "tie_word_embeddings": True,
    "max_position_embeddings": 262144,
    "rms_norm_eps": 1e-6,
    "rope_theta": 5000000,
    "torch_dtype": "bfloat16",
}
SHAPES = {"qwen3-4b": QWEN3_4B_CONFIG}


@dataclass(frozen=True)
class Shape:
    """What sizes the activations: a decoder-only transformer's config.json values."""

    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    qk_norm: bool  # Qwen3 normalises q and k per head (RMSNorm over head_dim)

    @classmethod
    def from_config(cls, cfg: dict[str, object]) -> Shape:
        def num(key: str, default: int | None = None) -> int:
            value = cfg.get(key, default)
            if not isinstance(value, int):
                raise ValueError(f"config.json has no integer {key!r}")
            return value

        heads = num("num_attention_heads")
        return cls(
            hidden=num("hidden_size"),
            intermediate=num("intermediate_size"),
            layers=num("num_hidden_layers"),
            heads=heads,
            kv_heads=num("num_key_value_heads", heads),
            head_dim=num("head_dim", num("hidden_size") // heads),
            vocab=num("vocab_size"),
            qk_norm=cfg.get("model_type") in ("qwen3", "qwen3_moe"),
        )


@dataclass(frozen=True)
class Params:
    """Parameter counts of the model as built (tied embeddings counted once)."""

    total: int
    per_layer: int  # one decoder layer
    root: int  # the rest: embeddings, final norm, an untied LM head


def rms_norm_bytes(width: int, rows: int, act: int) -> int:
    """Saved by one RMSNorm of ``rows`` vectors of ``width`` (transformers' RMSNorm):
    its float32 upcast of the input (pow and the normalising multiply need it), the
    float32 1/rms of each row, and the normalised values cast back to the activation
    dtype (the weight's gradient needs them). The output is not saved here; whoever
    reads it (a linear layer) saves it."""
    return rows * (F32 * width + F32 + act * width)


def layer_bytes_per_token(s: Shape, act: int) -> int:
    """Bytes one decoder layer saves for backward, per token, ``act`` bytes an activation.

    - input RMSNorm (``rms_norm_bytes``) and its output, the input of q/k/v_proj;
    - q and k norms per head (Qwen3), over head_dim; RoPE saves only cos/sin (shared);
    - attention (SDPA, flash or memory-efficient, GQA without repeating k/v): q, k, v,
      the output (also o_proj's input: it comes back already [T, heads, head_dim]) and
      the float32 log-sum-exp per head; never the [T, T] scores;
    - post-attention RMSNorm and its output, the input of gate/up_proj;
    - the MLP: gate_proj's output (SiLU's input), SiLU's output and up_proj's output
      (the product's inputs), and the product (down_proj's input): 4 x intermediate.
    The residual adds save nothing.
    """
    h, q, kv = s.hidden, s.heads * s.head_dim, s.kv_heads * s.head_dim
    norms = 2 * (rms_norm_bytes(h, 1, act) + act * h)
    if s.qk_norm:
        norms += rms_norm_bytes(s.head_dim, s.heads, act) + rms_norm_bytes(s.head_dim, s.kv_heads, act)
    attention = act * (2 * q + 2 * kv) + F32 * s.heads
    mlp = 4 * act * s.intermediate
    return norms + attention + mlp


def decoder_bytes_per_token(s: Shape, act: int, checkpointed: bool) -> int:
    """Bytes the decoder (embeddings to final norm) saves per token. Without
    checkpointing: every layer's ``layer_bytes_per_token``; with it, each layer keeps
    only its input (the backward reruns the layer, see ``recompute_bytes``). Both add
    the final RMSNorm, the int64 token ids (embedding) and RoPE's cos and sin."""
    layers = s.layers * (act * s.hidden if checkpointed else layer_bytes_per_token(s, act))
    return layers + rms_norm_bytes(s.hidden, 1, act) + 8 + 2 * act * s.head_dim


def head_saved_bytes_per_position(s: Shape) -> int:
    """What the LM head's forward saves for one position (services/trainer/grpo.py's
    ``_head_logprobs``): the float32 temperature-scaled logits (logsumexp, gather and the
    entropy's product read them) and the float32 softmax probabilities, [vocab] each."""
    return 2 * F32 * s.vocab


def head_bytes(s: Shape, chunk_tokens: int, act: int) -> int:
    """The LM head, run ``chunk_tokens`` positions at a time under checkpointing
    (services/trainer/grpo.py), at its peak: the chunk rebuilt in the backward holds what
    its forward saves (``head_saved_bytes_per_position``) while the backward has two
    float32 [chunk, vocab] gradients in flight (the one accumulating into the scaled
    logits and the one an op is producing), then casts it to the activation dtype for the
    head's matmul: 8 + 8 + act bytes a logit. The chunk's [chunk, hidden] input is small."""
    return chunk_tokens * (head_saved_bytes_per_position(s) + (2 * F32 + act) * s.vocab)


@dataclass(frozen=True)
class Plan:
    """The per-GPU memory of one configuration, in bytes, on ``nproc`` ranks."""

    nproc: int
    params: Params
    sharded_state: int  # fp32 params + grads + AdamW moments, this rank's shard
    gathered: int  # bf16 params gathered for compute + one layer's bf16 gradient
    act_per_token: int  # without decoder-layer checkpointing
    act_per_token_ckpt: int  # with it
    micro_batch_tokens: int
    head: int
    recompute: int  # one layer's activations rebuilt in the backward (checkpointing only)
    act: int  # bytes of one activation: 2 under bf16, 4 in float32

    @property
    def total(self) -> int:
        return self.sharded_state + self.gathered + self.micro_batch_tokens * self.act_per_token + self.head

    @property
    def total_ckpt(self) -> int:
        act = self.micro_batch_tokens * self.act_per_token_ckpt + self.recompute
        return self.sharded_state + self.gathered + act + self.head


def plan(s: Shape, p: Params, nproc: int, micro_batch_tokens: int, chunk_tokens: int, act: int = 2) -> Plan:
    """Memory of training shape ``s`` with parameters ``p`` on ``nproc`` ranks (see the
    module docstring for what FSDP2 is assumed to hold); ``act``: bytes an activation."""
    bf16 = 2
    return Plan(
        nproc=nproc,
        params=p,
        sharded_state=4 * F32 * p.total // nproc,  # master, grad, exp_avg, exp_avg_sq
        gathered=bf16 * (p.root + 2 * p.per_layer) + bf16 * p.per_layer,
        act_per_token=decoder_bytes_per_token(s, act, checkpointed=False),
        act_per_token_ckpt=decoder_bytes_per_token(s, act, checkpointed=True),
        micro_batch_tokens=micro_batch_tokens,
        head=head_bytes(s, chunk_tokens, act),
        recompute=micro_batch_tokens * layer_bytes_per_token(s, act),
        act=act,
    )


def smallest_fit(
    s: Shape,
    p: Params,
    budget: int,
    micro_batch_tokens: int,
    chunk_tokens: int,
    checkpointed: bool,
    act: int = 2,
    max_n: int = 1024,
) -> int | None:
    """The fewest ranks whose per-GPU total fits ``budget`` bytes (None: none up to max_n;
    activations do not shrink with N)."""
    for n in range(1, max_n + 1):
        pl = plan(s, p, n, micro_batch_tokens, chunk_tokens, act)
        if (pl.total_ckpt if checkpointed else pl.total) <= budget:
            return n
    return None


def model_params(model_dir: Path) -> tuple[Shape, Params]:
    """The shape and parameter counts of the HF model in ``model_dir``, built on the meta
    device (no weights are read or allocated)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = json.loads((model_dir / "config.json").read_text())
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_dir))
    total = sum(t.numel() for t in model.parameters())  # parameters() dedupes tied weights
    per_layer = sum(t.numel() for t in model.get_decoder().layers[0].parameters())
    shape = Shape.from_config(cfg)
    return shape, Params(total=total, per_layer=per_layer, root=total - shape.layers * per_layer)


def _gib(n: float) -> str:
    return f"{n / GIB:.2f} GiB"


def format_plan(pl: Plan, shape: Shape, budget_gib: float, fit: int | None, fit_ckpt: int | None) -> str:
    """The table ``pope trainer plan`` prints."""
    p, n, t = pl.params, pl.nproc, pl.micro_batch_tokens
    count = f"{p.total / 1e9:.3f} B ({p.per_layer / 1e6:.1f} M a layer x {shape.layers}, root {p.root / 1e6:.1f} M)"
    none = "none (activations alone exceed it)"
    rows = [
        ("parameters", count),
        (f"fp32 master weights / {n}", _gib(F32 * p.total / n)),
        (f"fp32 gradients / {n}", _gib(F32 * p.total / n)),
        (f"AdamW exp_avg + exp_avg_sq / {n}", _gib(2 * F32 * p.total / n)),
        ("bf16 compute copy (root + 2 layers) + 1 layer grad", _gib(pl.gathered)),
        ("activation dtype (trainer.bf16)", "bfloat16" if pl.act == 2 else "float32"),
        ("activations / token, no checkpointing", f"{pl.act_per_token / 1024:.1f} KiB"),
        ("activations / token, layer checkpointing", f"{pl.act_per_token_ckpt / 1024:.1f} KiB"),
        ("micro-batch tokens (trainer.micro_batch_tokens)", f"{t}"),
        ("activations of a micro-batch, no checkpointing", _gib(t * pl.act_per_token)),
        (
            "activations of a micro-batch, checkpointing + 1 layer recompute",
            _gib(pl.total_ckpt - pl.total + t * pl.act_per_token),
        ),
        ("LM head chunk (trainer.logits_chunk_tokens x vocab)", _gib(pl.head)),
        (f"total per GPU at N={n}, no checkpointing", _gib(pl.total)),
        (f"total per GPU at N={n}, checkpointing", _gib(pl.total_ckpt)),
        (f"smallest N within {budget_gib:g} GiB, no checkpointing", str(fit) if fit else none),
        (f"smallest N within {budget_gib:g} GiB, checkpointing", str(fit_ckpt) if fit_ckpt else none),
    ]
    width = max(len(k) for k, _ in rows)
    lines = [f"{k:<{width}}  {v}" for k, v in rows]
    notes = (
        "Assumes FSDP2: fp32 params, grads and AdamW moments sharded over N; bf16 compute, one layer gathered "
        "(+1 prefetched); each rank runs its own micro-batch. Not counted: CUDA context, fragmentation, NCCL "
        "buffers, a KL reference model (keep ~10% spare)."
    )
    return "\n".join([*lines, "", notes])
