"""The served model's forward, lean: a Llama-family decoder run straight from its weights
over the engine's own KV cache (``SlotCache``), one row per slot.

Transformers' forward is general, and at the CPU engine's sizes its generality is most of
the time: a mask built per call, a cache object that concatenates, hooks and output
dataclasses per layer. This runs the same arithmetic (``test_lean_forward`` holds its
logits to transformers' own) with nothing else: per layer RMSNorm, the q/k/v projections,
the q/k norms (Qwen3), rotary embeddings from one table built once by the model's own
rotary module, attention, the output projection, and the SwiGLU MLP.

The weights are the served model's own tensors, not copies, so a broadcast that copies
into them in place is seen at the next step; a model swapped in from disk is a new
``Decoder``. Rows live in slots of one preallocated cache and attend over their own length
only, so rows of any lengths share a decode step, a row joins by having its prompt
prefilled into a free slot, and a finished row's slot is refilled by moving the last row
into it (``SlotCache.move``).

Architectures: ``SUPPORTED`` (Qwen3, the project's; Qwen2 and Llama share the structure).
``unsupported`` says why another cannot be served.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

SUPPORTED = ("qwen3", "qwen2", "llama")
STATIC_ROPE = ("default", "linear", "llama3", "yarn")
"""Rotary types whose frequencies do not depend on the sequence's length, so one table holds."""


def unsupported(model: Any) -> str | None:
    """Why ``model`` cannot run here, or None."""
    cfg = model.config
    kind = getattr(cfg, "model_type", None)
    if kind not in SUPPORTED:
        return f"model_type {kind!r} is not one the CPU engine serves ({', '.join(SUPPORTED)})"
    if getattr(cfg, "hidden_act", "silu") != "silu":
        return f"hidden_act {cfg.hidden_act!r} (the engine's MLP is SwiGLU)"
    if any(t != "full_attention" for t in getattr(cfg, "layer_types", None) or ()) or getattr(
        cfg, "use_sliding_window", False
    ):
        return "sliding-window attention layers"
    rope = getattr(getattr(model.model, "rotary_emb", None), "rope_type", "default")
    if rope not in STATIC_ROPE:
        return f"rope type {rope!r} (its frequencies change with the length)"
    if getattr(cfg, "mlp_bias", False):
        return "MLP biases"
    return None


def buckets(rows: list[tuple[int, ...]], slack: float = 1.25) -> list[list[tuple[int, ...]]]:
    """``rows``, sorted by length, cut where a row is longer than ``slack`` times the
    shortest of its bucket: each bucket's padding is under a fifth of its work."""
    out: list[list[tuple[int, ...]]] = []
    for r in rows:
        if out and len(r) <= slack * len(out[-1][0]):
            out[-1].append(r)
        else:
            out.append([r])
    return out


SPAN_ROWS = 16
"""Rows per span of a decode step's attention (``attention_spans``)."""


def attention_spans(lengths: list[int]) -> list[tuple[int, int, int]]:
    """(first row, end row, width) of the spans a decode step's attention runs in: each span
    of ``SPAN_ROWS`` rows reads the cache only up to its own longest row, so short rows do
    not read the long ones' padding. One span when that would save under a fifth of it."""
    whole = [(0, len(lengths), max(lengths))]
    spans = [
        (a, min(a + SPAN_ROWS, len(lengths)), max(lengths[a : a + SPAN_ROWS]))
        for a in range(0, len(lengths), SPAN_ROWS)
    ]
    read = sum((b - a) * w for a, b, w in spans)
    return spans if read < 0.8 * len(lengths) * whole[0][2] else whole


class Unsupported(ValueError):
    """The model's architecture is not one ``Decoder`` runs."""


@dataclass(frozen=True)
class _Layer:
    ln1: torch.Tensor
    qkv: torch.Tensor  # [(heads + 2 kv_heads) x head_dim, hidden]
    qkv_bias: torch.Tensor | None
    o: torch.nn.Linear
    q_norm: torch.Tensor | None
    k_norm: torch.Tensor | None
    ln2: torch.Tensor
    gate_up: torch.Tensor  # [2 x intermediate, hidden]
    down: torch.Tensor


class SlotCache:
    """Keys and values of up to ``slots`` rows: per layer [slots, kv_heads, capacity, head_dim],
    row i in slot i with ``lens[i]`` tokens; the capacity grows (doubling) as rows need it."""

    @torch.inference_mode()
    def __init__(self, layers: int, slots: int, kv_heads: int, head_dim: int, limit: int, dtype: Any, device: Any):
        self.shape = (slots, kv_heads, 0, head_dim)
        self.limit, self.dtype, self.device = limit, dtype, device
        self.k: list[torch.Tensor] = [self._empty(0) for _ in range(layers)]
        self.v: list[torch.Tensor] = [self._empty(0) for _ in range(layers)]
        self.lens = torch.zeros(slots, dtype=torch.long, device=device)  # tokens in each slot

    def _empty(self, capacity: int) -> torch.Tensor:
        s, h, _, d = self.shape
        return torch.zeros((s, h, capacity, d), dtype=self.dtype, device=self.device)

    @property
    def capacity(self) -> int:
        return int(self.k[0].shape[2])

    @torch.inference_mode()
    def reserve(self, tokens: int) -> None:
        """Room for ``tokens`` positions in every slot (at most the context length)."""
        if tokens <= self.capacity:
            return
        grown = min(self.limit, max(tokens, 2 * self.capacity, 64))
        for store in (self.k, self.v):
            for i, old in enumerate(store):
                new = self._empty(grown)
                new[:, :, : old.shape[2]] = old
                store[i] = new

    @torch.inference_mode()
    def move(self, src: int, dst: int) -> None:
        """Slot ``src``'s row into slot ``dst`` (a finished row's place)."""
        n = int(self.lens[src])
        for store in (self.k, self.v):
            for t in store:
                t[dst, :, :n] = t[src, :, :n]
        self.lens[dst] = n


def _fused(model_part: Any, names: tuple[str, ...], attr: str) -> torch.Tensor | None:
    """One tensor whose row blocks are the ``attr`` ("weight" or "bias") of the linear layers
    ``names`` of ``model_part``, which become views into it: one matmul instead of several,
    and a copy into the model's weights (a broadcast) lands in it. Made once a model; None
    where the layers have no such tensor."""
    layers = [getattr(model_part, n) for n in names]
    parts = [getattr(layer, attr) for layer in layers]
    if any(p is None for p in parts):
        return None
    made: torch.Tensor | None = getattr(model_part, f"_lean_{attr}", None)
    at = 0
    if made is not None:  # still the model's own tensors? (a load may have replaced them)
        for p in parts:
            if p.data_ptr() != made[at : at + p.shape[0]].data_ptr():
                break
            at += p.shape[0]
        else:
            return made
    with torch.no_grad():
        made = torch.cat([p.detach() for p in parts])
        at = 0
        for layer, p in zip(layers, parts, strict=True):
            setattr(layer, attr, torch.nn.Parameter(made[at : at + p.shape[0]], requires_grad=False))
            at += p.shape[0]
    setattr(model_part, f"_lean_{attr}", made)
    return made


class Decoder:
    """Prefill and one-token decode steps of the served model over a ``SlotCache``."""

    def __init__(self, model: Any) -> None:
        reason = unsupported(model)
        if reason:
            raise Unsupported(reason)
        cfg, inner = model.config, model.model
        self.heads, self.kv_heads = int(cfg.num_attention_heads), int(cfg.num_key_value_heads)
        self.head_dim = int(getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads)
        self.context = int(getattr(cfg, "max_position_embeddings", 1 << 20))
        self.eps = float(cfg.rms_norm_eps)
        self.scale = self.head_dim**-0.5
        self.embed = inner.embed_tokens.weight
        self.norm = inner.norm.weight
        self.head: torch.nn.Linear = model.lm_head
        qkv = ("q_proj", "k_proj", "v_proj")
        self.layers = [
            _Layer(
                ln1=layer.input_layernorm.weight,
                qkv=_fused(layer.self_attn, qkv, "weight"),  # type: ignore[arg-type]
                qkv_bias=_fused(layer.self_attn, qkv, "bias"),
                o=layer.self_attn.o_proj,
                q_norm=getattr(getattr(layer.self_attn, "q_norm", None), "weight", None),
                k_norm=getattr(getattr(layer.self_attn, "k_norm", None), "weight", None),
                ln2=layer.post_attention_layernorm.weight,
                gate_up=_fused(layer.mlp, ("gate_proj", "up_proj"), "weight"),  # type: ignore[arg-type]
                down=layer.mlp.down_proj.weight,
            )
            for layer in inner.layers
        ]
        self.dtype, self.device = self.embed.dtype, self.embed.device
        with torch.inference_mode():  # the model's own rotary module, once for every position
            positions = torch.arange(self.context, device=self.device)[None, :]
            cos, sin = inner.rotary_emb(self.embed[:1][None], positions)
        self.cos, self.sin = cos[0].to(self.dtype), sin[0].to(self.dtype)  # [context, head_dim]

    def cache(self, slots: int) -> SlotCache:
        return SlotCache(len(self.layers), slots, self.kv_heads, self.head_dim, self.context, self.dtype, self.device)

    def _rms(self, x: torch.Tensor, weight: torch.Tensor | None) -> torch.Tensor:
        normed = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return normed if weight is None else weight * normed

    def _qkv(self, layer: _Layer, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """q [..., heads, D], k and v [..., kv_heads, D] of ``h`` [..., hidden], rotated by
        ``cos`` and ``sin`` [..., 1, D]: one matmul, and q and k normed and rotated as one."""
        heads = self.heads + self.kv_heads
        qkv = F.linear(h, layer.qkv, layer.qkv_bias).view(*h.shape[:-1], heads + self.kv_heads, self.head_dim)
        qk = qkv[..., :heads, :]
        if layer.q_norm is not None and layer.k_norm is not None:
            qk = self._rms(qk, None)
            qk[..., : self.heads, :].mul_(layer.q_norm)
            qk[..., self.heads :, :].mul_(layer.k_norm)
        half = self.head_dim // 2
        qk = qk * cos + torch.cat((-qk[..., half:], qk[..., :half]), dim=-1) * sin
        return qk[..., : self.heads, :], qk[..., self.heads :, :], qkv[..., heads:, :]

    def _mlp(self, layer: _Layer, x: torch.Tensor) -> torch.Tensor:
        gate, up = F.linear(self._rms(x, layer.ln2), layer.gate_up).chunk(2, dim=-1)
        return x + F.linear(F.silu(gate) * up, layer.down)

    def _logits(self, h: torch.Tensor) -> torch.Tensor:
        logits: torch.Tensor = self.head(self._rms(h, self.norm))
        return logits.float()

    @torch.inference_mode()
    def prefill(self, cache: SlotCache, slots: list[int], rows: list[list[int]], reserve: int = 0) -> torch.Tensor:
        """Run ``rows`` (token ids) into ``slots`` of ``cache``, with room for ``reserve``
        tokens a slot; the logits after each row [len(rows), V]. Rows with the same tokens (a
        group's copies of one prompt) are computed once, and rows of similar lengths together
        (``buckets``), so little of the work is padding."""
        cache.reserve(max(max(len(r) for r in rows) + 1, reserve))
        unique: dict[tuple[int, ...], list[int]] = {}
        for i, row in enumerate(rows):
            unique.setdefault(tuple(row), []).append(i)
        logits: list[torch.Tensor] = [torch.empty(0)] * len(rows)
        for bucket in buckets(sorted(unique, key=len)):
            out = self._prefill(cache, [[slots[i] for i in unique[r]] for r in bucket], bucket)
            for r, row_logits in zip(bucket, out, strict=True):
                for i in unique[r]:
                    logits[i] = row_logits
        return torch.stack(logits)

    def _prefill(self, cache: SlotCache, slots: list[list[int]], distinct: list[tuple[int, ...]]) -> torch.Tensor:
        """``distinct`` rows, each into its ``slots``; the logits after each [len(distinct), V]."""
        which = [u for u, at in enumerate(slots) for _ in at]
        width = max(len(r) for r in distinct)
        ids = torch.zeros((len(distinct), width), dtype=torch.long)
        for i, r in enumerate(distinct):
            ids[i, : len(r)] = torch.tensor(r, dtype=torch.long)
        ids = ids.to(self.device)
        lens = torch.tensor([len(r) for r in distinct], device=self.device)  # [U]
        index = torch.tensor(which, device=self.device)  # [B]: each slot's row
        at = torch.tensor([a for row in slots for a in row], device=self.device)  # [B]
        cos, sin = self.cos[:width, None], self.sin[:width, None]  # [L, 1, D]
        x = F.embedding(ids, self.embed)  # [U, L, hidden]
        for n, layer in enumerate(self.layers):
            q, k, v = (t.transpose(1, 2) for t in self._qkv(layer, self._rms(x, layer.ln1), cos, sin))  # [U, h, L, D]
            cache.k[n][:, :, :width].index_copy_(0, at, k[index])
            cache.v[n][:, :, :width].index_copy_(0, at, v[index])
            # Causal is enough: the padding is on the right, after every real token.
            a = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)  # [U, heads, L, D]
            x = self._mlp(layer, x + layer.o(a.transpose(1, 2).reshape(*x.shape[:2], -1)))
        cache.lens[at] = lens[index]
        return self._logits(x[torch.arange(len(distinct), device=self.device), lens - 1])  # [U, V]

    @torch.inference_mode()
    def step(self, cache: SlotCache, tokens: torch.Tensor) -> torch.Tensor:
        """One token for each of the first len(tokens) slots [n]; the logits after it [n, V]."""
        n = tokens.shape[0]
        pos = cache.lens[:n].clone()  # [n]: where each row's token goes
        cache.reserve(int(pos.max()) + 1)
        kv, groups, d = self.kv_heads, self.heads // self.kv_heads, self.head_dim
        # Each row's new key and value go to row (slot, kv head), position pos of the cache
        # flattened to [slots x kv x capacity, D]: one index_copy_ a layer for all of them.
        at = (
            (torch.arange(n, device=self.device)[:, None] * kv + torch.arange(kv, device=self.device)) * cache.capacity
            + pos[:, None]
        ).reshape(-1)  # [n x kv]
        spans = attention_spans([int(p) + 1 for p in pos.tolist()])
        masks = []  # each span's [rows x kv, g, its width]: -inf where a row has no token yet
        for a, b, w in spans:
            late = torch.arange(w, device=self.device)[None, :] > pos[a:b, None]  # [rows, w]
            mask = torch.zeros((b - a, w), dtype=self.dtype, device=self.device).masked_fill_(late, -torch.inf)
            masks.append(mask[:, None, None].expand(b - a, kv, groups, w).reshape((b - a) * kv, groups, w))
        cos, sin = self.cos[pos, None], self.sin[pos, None]  # [n, 1, D]
        x = F.embedding(tokens, self.embed)  # [n, hidden]
        for i, layer in enumerate(self.layers):
            q, k, v = self._qkv(layer, self._rms(x, layer.ln1), cos, sin)  # [n, heads, D], [n, kv, D]
            keys, values = cache.k[i], cache.v[i]
            keys.view(-1, d).index_copy_(0, at, k.reshape(-1, d))
            values.view(-1, d).index_copy_(0, at, v.reshape(-1, d))
            # One query token: a kv head's query heads are its "positions", so no kv copies.
            q = q.reshape(n * kv, groups, d)
            out = torch.empty_like(q)
            for (a, b, w), mask in zip(spans, masks, strict=True):
                ks = keys[a:b, :, :w].reshape((b - a) * kv, w, d)
                vs = values[a:b, :, :w].reshape((b - a) * kv, w, d)
                scores = torch.baddbmm(mask, q[a * kv : b * kv], ks.transpose(1, 2), alpha=self.scale)
                torch.bmm(torch.softmax(scores, dim=-1), vs, out=out[a * kv : b * kv])  # [rows x kv, g, D]
            x = self._mlp(layer, x + layer.o(out.reshape(n, -1)))
        cache.lens[:n] = pos + 1
        return self._logits(x)
