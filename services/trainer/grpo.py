"""GRPO as small pure functions: advantages, token logprobs, the clipped policy loss.

Shapes: N sequences (samples) per micro-batch, L tokens per padded sequence, T = L - 1
predicted positions (logits at position t predict token t + 1).

The loss (DESIGN.md 1.5), per completion token t of sample i with advantage A_i:

    ratio = exp(logp_new - logp_old)          logp_old: the engine's sampling logprobs
    loss  = -min(ratio * A_i, clip(ratio, 1 - eps, 1 + eps) * A_i)

aggregated over tokens by ``agg``: "constant" sums and divides by the nominal samples
per step (the authors' choice; a sample's weight does not depend on its length or on how
many samples the step happened to get), "token_mean" divides by the step's completion
tokens, "seq_mean" averages each sequence's tokens and then the sequences.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch

LossAgg = Literal["constant", "token_mean", "seq_mean"]


def group_advantages(rewards: torch.Tensor, scale_by_std: bool = False, eps: float = 1e-6) -> torch.Tensor:
    """Advantage of each sample of one group: reward - group mean (optionally / std).

    rewards: [G] -> advantages [G]. A group whose rewards are all equal gets all zeros
    (no signal), which is why hinted groups matter on problems never solved unhinted.
    """
    adv = rewards - rewards.mean()  # [G]
    if scale_by_std:
        adv = adv / (rewards.std(unbiased=False) + eps)  # [G]
    return adv


def token_logprobs(model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                   temperature: torch.Tensor) -> torch.Tensor:  # fmt: skip
    """log_softmax(logits / T) of each next token: [N, L] ids -> [N, L-1] logprobs.

    temperature: [N], the temperature each sequence was sampled at; the engine reports
    logprobs at that temperature, so the importance ratio compares the same quantity.
    """
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits[:, :-1, :].float()  # [N, T, V]
    logits = logits / temperature[:, None, None]  # [N, T, V]
    targets = input_ids[:, 1:]  # [N, T]
    # logsumexp-based gather avoids materialising the full [N, T, V] log_softmax twice.
    picked = logits.gather(-1, targets[..., None]).squeeze(-1)  # [N, T]
    logp: torch.Tensor = picked - torch.logsumexp(logits, dim=-1)  # [N, T]
    return logp


@dataclass(frozen=True)
class LossStats:
    """Summed over the micro-batch's completion tokens; divide by ``tokens`` for means."""

    tokens: float
    ratio_sum: float
    ratio_max: float
    clipped: float
    abs_logp_diff_sum: float


def policy_loss(
    new_lp: torch.Tensor,
    old_lp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    clip_eps: float,
    agg: LossAgg,
    normalizer: float,
) -> tuple[torch.Tensor, LossStats]:
    """Clipped surrogate loss of one micro-batch, already divided for its share of the step.

    new_lp, old_lp, mask: [N, T]; advantages: [N]. ``normalizer`` is, per ``agg``: the
    nominal samples per step ("constant"), the step's completion tokens ("token_mean"),
    or the step's sequences ("seq_mean"). Summing the returned losses over a step's
    micro-batches gives the step's loss.
    """
    mask = mask.float()
    ratio = torch.exp(new_lp - old_lp)  # [N, T]
    adv = advantages[:, None]  # [N, 1]
    unclipped = ratio * adv  # [N, T]
    clipped = torch.clamp(ratio, 1.0 - clip_eps, 1.0 + clip_eps) * adv  # [N, T]
    per_token = -torch.minimum(unclipped, clipped) * mask  # [N, T]
    if agg == "seq_mean":
        per_seq = per_token.sum(-1) / mask.sum(-1).clamp(min=1.0)  # [N]
        loss = per_seq.sum() / normalizer
    else:  # "constant" and "token_mean" differ only in the normalizer
        loss = per_token.sum() / normalizer
    with torch.no_grad():
        live = mask > 0
        stats = LossStats(
            tokens=float(mask.sum()),
            ratio_sum=float((ratio * mask).sum()),
            ratio_max=float(ratio[live].max()) if live.any() else 1.0,
            clipped=float(((unclipped != clipped) & live).sum()),
            abs_logp_diff_sum=float(((new_lp - old_lp).abs() * mask).sum()),
        )
    return loss, stats
