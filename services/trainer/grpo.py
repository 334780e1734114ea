"""GRPO as small pure functions: advantages, token logprobs, the policy loss and its options.

Shapes: N sequences (samples) per micro-batch, L tokens per padded sequence, T = L - 1
predicted positions (logits at position t predict token t + 1). A packed micro-batch is
the N sequences end to end as one [1, S] row (``batch.collate_packed``), with the row of
each position given to ``policy_loss`` as ``row_index``.

The loss (DESIGN.md 1.5), per completion token t of sample i with advantage A_i:

    ratio = exp(logp_new - logp_old)          logp_old: the engine's sampling logprobs
    loss  = -min(ratio * A_i, clip(ratio, 1 - eps_low, 1 + eps_high) * A_i)

Options (each a TrainerSettings field):
- ``clip_eps_low`` / ``clip_eps_high``: asymmetric clipping (DAPO's clip-higher).
- ``tis_cap``: truncated importance sampling. The PPO ratio is then taken against the
  trainer's own policy before the update (proximal), and the behaviour mismatch between
  that policy and the engine's sampling is corrected by a weight min(pi_prox / pi_engine, cap).
- ``kl_coef``: a KL(pi || pi_ref) penalty per token, with r = ref - new, by ``kl_estimator``:
  "k3" (exp(r) - r - 1: unbiased, low variance; its gradient 1 - exp(r) grows exponentially
  where the policy has made a token far less likely than the reference did) or "k2" (r^2 / 2:
  its gradient -r is linear in the log-ratio, so a few collapsed tokens cannot swamp the step).
- ``entropy_coef``: minus the policy's entropy per token (a bonus for exploration).
- Aggregation ``agg``: "constant" (sum / nominal samples per step; the POPE authors'),
  "token_mean" (sum / the step's completion tokens), "seq_mean" (mean per sequence, then
  over sequences), "dr_grpo" (sum / (nominal samples x max response tokens), Dr. GRPO).
  The caller passes the matching ``normalizer`` (see ``normalizer``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch.utils.checkpoint import checkpoint

from services.trainer.prefix import Prompts, prompt_cache

LossAgg = Literal["constant", "token_mean", "seq_mean", "dr_grpo"]
KlEstimator = Literal["k3", "k2"]


@dataclass(frozen=True)
class LossConfig:
    agg: LossAgg = "constant"
    clip_eps_low: float = 0.2
    clip_eps_high: float = 0.2
    tis_cap: float | None = None
    kl_coef: float = 0.0
    kl_estimator: KlEstimator = "k3"
    entropy_coef: float = 0.0


def group_advantages(rewards: torch.Tensor, scale_by_std: bool = False, eps: float = 1e-6) -> torch.Tensor:
    """Advantage of each sample of one group: reward - group mean (optionally / std).

    rewards: [G] -> advantages [G]. A group whose rewards are all equal gets all zeros
    (no signal), which is why hinted groups matter on problems never solved unhinted.
    """
    adv = rewards - rewards.mean()  # [G]
    if scale_by_std:
        adv = adv / (rewards.std(unbiased=False) + eps)  # [G]
    return adv


def normalizer(
    agg: LossAgg, *, nominal_samples: int, max_response_tokens: int, step_tokens: int, step_sequences: int
) -> float:
    """What the summed per-token losses of a whole step are divided by, per aggregation."""
    return float(
        {
            "constant": nominal_samples,
            "dr_grpo": nominal_samples * max_response_tokens,
            "token_mean": max(step_tokens, 1),
            "seq_mean": max(step_sequences, 1),
        }[agg]
    )


def token_logprobs(
    model: Any,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    temperature: torch.Tensor,
    with_entropy: bool = False,
    chunk_tokens: int = 4096,
    position_ids: torch.Tensor | None = None,
    prompts: Prompts | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """log_softmax(logits / T) of each next token, [N, L] ids -> [N, L-1] logprobs, and the
    entropy of each predicted distribution [N, L-1] when asked.

    temperature: [N], the temperature each sequence was sampled at, or [N, L-1], one per
    predicted position (a packed sequence holds rows sampled at different temperatures); the
    engine reports logprobs at that temperature, so the importance ratio compares the same
    quantity.

    A packed batch (``batch.collate_packed``) passes ``attention_mask=None`` and its
    ``position_ids``, which restart on each row; a padded one passes its mask and no positions.
    One with shared prompts (``batch.collate_shared``) passes its ``prompts`` too, and its
    rows, mask and positions are the completions' (prefix.py): the prompts run first, and
    [N, C] ids give [N, C-1] logprobs of the completion tokens.

    The logits are held for at most ``chunk_tokens`` positions at once (4096 x a 152k
    vocabulary in float32 is 2.5 GB): a micro-batch of more positions runs the LM head one
    chunk at a time under activation checkpointing, and the backward recomputes each chunk.
    One of at most ``chunk_tokens`` positions (any micro-batch of a small vocabulary's
    config, where a chunk is cheap) is one chunk already: its logits are computed once and
    kept for the backward, within the same bound and with the same values.
    """
    decoder, head = model.get_decoder(), model.get_output_embeddings()
    # A KV cache only for shared prompts: with one, transformers ignores position_ids when it
    # builds the mask, and a packed batch would attend across its rows.
    cache = prompt_cache(decoder, prompts) if prompts is not None else None
    out = decoder(
        input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, cache=cache, use_cache=False
    )
    hidden = out.last_hidden_state[:, :-1]  # [N, T, H]
    n, t = hidden.shape[:2]
    flat_h = hidden.reshape(n * t, -1)  # [N*T, H]
    targets = input_ids[:, 1:].reshape(n * t)  # [N*T]
    per_position = temperature if temperature.dim() == 2 else temperature[:, None]  # [N, T] or [N, 1]
    temps = per_position.expand(n, t).reshape(n * t)  # [N*T]
    if n * t <= chunk_tokens:  # one chunk: nothing to bound by recomputing it
        lp, ent = _head_logprobs(head, flat_h, targets, temps, with_entropy)  # [N*T] each
        return lp.view(n, t), (ent.view(n, t) if with_entropy else None)
    parts = []
    for i in range(0, n * t, chunk_tokens):
        part = slice(i, i + chunk_tokens)
        parts.append(
            checkpoint(
                _head_logprobs, head, flat_h[part], targets[part], temps[part], with_entropy, use_reentrant=False
            )
        )
    logp = torch.cat([lp for lp, _ in parts]).view(n, t)  # [N, T]
    entropy = torch.cat([e for _, e in parts]).view(n, t) if with_entropy else None  # [N, T]
    return logp, entropy


def _head_logprobs(
    head: Any, hidden: torch.Tensor, targets: torch.Tensor, temps: torch.Tensor, with_entropy: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Logprob of each target [C] and entropy [C] (zeros unless asked) from hidden states [C, H]."""
    logits = head(hidden).float() / temps[:, None]  # [C, V]
    lse = torch.logsumexp(logits, dim=-1)  # [C]
    logp = logits.gather(-1, targets[:, None]).squeeze(-1) - lse  # [C]
    if not with_entropy:
        return logp, torch.zeros_like(logp)
    probs = torch.softmax(logits, dim=-1)  # [C, V]
    return logp, lse - (probs * logits).sum(-1)


@dataclass(frozen=True)
class SeqStats:
    """Per-sequence sums over completion tokens ([N] each), for metrics split by variant."""

    tokens: torch.Tensor
    ratio: torch.Tensor
    clipped_low: torch.Tensor
    clipped_high: torch.Tensor
    approx_kl: torch.Tensor  # k3 of the engine's policy against the new one
    kl_ref: torch.Tensor  # k3 of the reference model against the new one (0 without one)
    entropy: torch.Tensor
    ratio_max: float


def policy_loss(
    new_lp: torch.Tensor,
    old_lp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    cfg: LossConfig,
    normalizer: float,
    ref_lp: torch.Tensor | None = None,
    entropy: torch.Tensor | None = None,
    row_index: torch.Tensor | None = None,
) -> tuple[torch.Tensor, SeqStats]:
    """The loss of one micro-batch, already divided for its share of the step.

    Padded: new_lp, old_lp, mask, ref_lp, entropy: [N, T]; advantages: [N].
    Packed: those are [1, S-1], and ``row_index`` [1, S-1] names each position's row, so
    advantages [N] and the per-sequence sums (seq_mean, SeqStats) are taken per row.
    Summing the losses of a step's micro-batches gives the step's loss.
    """
    mask = mask.float()
    n_rows = advantages.shape[0]
    if row_index is None:
        adv = advantages[:, None]  # [N, 1]

        def per_row(x: torch.Tensor) -> torch.Tensor:
            return x.sum(-1)  # [N, T] -> [N]

    else:
        adv = advantages[row_index]  # [1, S-1]
        flat_rows = row_index.reshape(-1)

        def per_row(x: torch.Tensor) -> torch.Tensor:
            return x.new_zeros(n_rows).index_add(0, flat_rows, x.reshape(-1))  # [1, S-1] -> [N]

    if cfg.tis_cap is None:
        ratio = torch.exp(new_lp - old_lp)  # [N, T] against the engine's sampling policy
        weight = torch.ones_like(ratio)
    else:
        prox = new_lp.detach()
        ratio = torch.exp(new_lp - prox)  # [N, T], 1 in value, the policy gradient in grad
        weight = torch.clamp(torch.exp(prox - old_lp), max=cfg.tis_cap)  # [N, T] behaviour correction
    low, high = 1.0 - cfg.clip_eps_low, 1.0 + cfg.clip_eps_high
    unclipped = ratio * adv  # [N, T]
    clipped = torch.clamp(ratio, low, high) * adv  # [N, T]
    per_token = -weight * torch.minimum(unclipped, clipped)  # [N, T]
    if cfg.kl_coef > 0:
        if ref_lp is None:
            raise ValueError("kl_coef > 0 needs the reference model's logprobs")
        r = ref_lp - new_lp  # [N, T]
        kl = torch.exp(r) - r - 1.0 if cfg.kl_estimator == "k3" else 0.5 * r * r  # [N, T]
        per_token = per_token + cfg.kl_coef * kl
    if cfg.entropy_coef > 0:
        if entropy is None:
            raise ValueError("entropy_coef > 0 needs the entropy")
        per_token = per_token - cfg.entropy_coef * entropy
    per_token = per_token * mask  # [N, T]
    if cfg.agg == "seq_mean":
        loss = (per_row(per_token) / per_row(mask).clamp(min=1.0)).sum() / normalizer
    else:
        loss = per_token.sum() / normalizer
    with torch.no_grad():
        live = mask > 0
        d = old_lp - new_lp  # [N, T]
        stats = SeqStats(
            tokens=per_row(mask),
            ratio=per_row(torch.exp(new_lp - old_lp) * mask),  # against the engine, in both modes
            clipped_low=per_row(((ratio < low) & (adv < 0) & live).float()),
            clipped_high=per_row(((ratio > high) & (adv > 0) & live).float()),
            approx_kl=per_row((torch.exp(d) - d - 1.0) * mask),
            kl_ref=(
                per_row((torch.exp(ref_lp - new_lp) - (ref_lp - new_lp) - 1.0) * mask)
                if ref_lp is not None
                else mask.new_zeros(n_rows)
            ),
            entropy=per_row(entropy * mask) if entropy is not None else mask.new_zeros(n_rows),
            ratio_max=float((torch.exp(new_lp - old_lp))[live].max()) if live.any() else 1.0,
        )
    return loss, stats
