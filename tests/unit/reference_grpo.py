"""A deliberately plain GRPO loss: Python loops over sequences and tokens, one formula per
line, no vectorisation and no shared code with services/trainer. Tests compare the
trainer's loss and gradients with this on random batches."""

from __future__ import annotations

import math

import torch


def reference_loss(
    new,
    old,
    adv,
    mask,
    *,
    agg,
    eps_low,
    eps_high,
    tis_cap,
    kl_coef,
    ref,
    kl_estimator="k3",
    entropy_coef,
    entropy,
    nominal_samples,
    max_response_tokens,
):  # type: ignore[no-untyped-def]
    n_seq, n_tok = new.shape
    seq_losses = []
    seq_lengths = []
    for i in range(n_seq):
        total = new.new_zeros(())
        length = 0
        for t in range(n_tok):
            if mask[i, t] == 0:
                continue
            length += 1
            if tis_cap is None:
                ratio = torch.exp(new[i, t] - old[i, t])
                weight = 1.0
            else:
                ratio = torch.exp(new[i, t] - new[i, t].detach())
                weight = min(math.exp(float(new[i, t].detach()) - float(old[i, t])), tis_cap)
            a = float(adv[i])
            clipped_ratio = torch.clamp(ratio, 1 - eps_low, 1 + eps_high)
            objective = torch.minimum(ratio * a, clipped_ratio * a) * weight
            token_loss = -objective
            if kl_coef:
                log_r = ref[i, t] - new[i, t]
                if kl_estimator == "k3":
                    token_loss = token_loss + kl_coef * (torch.exp(log_r) - log_r - 1)
                else:
                    token_loss = token_loss + kl_coef * log_r * log_r / 2
            if entropy_coef:
                token_loss = token_loss - entropy_coef * entropy[i, t]
            total = total + token_loss
        seq_losses.append(total)
        seq_lengths.append(length)
    if agg == "seq_mean":
        per_seq = [loss / max(length, 1) for loss, length in zip(seq_losses, seq_lengths, strict=True)]
        return sum(per_seq) / sum(1 for length in seq_lengths if length > 0)
    summed = sum(seq_losses)
    if agg == "token_mean":
        return summed / sum(seq_lengths)
    if agg == "constant":
        return summed / nominal_samples
    if agg == "dr_grpo":
        return summed / (nominal_samples * max_response_tokens)
    raise ValueError(agg)
