"""Scored groups -> padded training tensors, with the loss mask on completion tokens only.

A sample's sequence is prompt_ids + completion_ids. The prompt (for a hinted group it
includes the hint, the privileged prefix) is context, never a target: the loss mask
covers exactly the positions that predict completion tokens. Logits at position t
predict token t + 1, so completion token k of a prompt of length P sits at shifted
position P - 1 + k.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch

from services.common.messages import FinishReason, ScoredGroup, Variant
from services.trainer.grpo import group_advantages


@dataclass(frozen=True)
class Row:
    """One sample ready to train on."""

    ids: list[int]  # prompt + completion
    prompt_len: int
    old_logprobs: list[float]  # one per completion token (the engine's)
    advantage: float
    temperature: float
    trainable: bool  # False: masked out of the loss (e.g. truncated, with mask_truncated)
    variant: Variant


@dataclass(frozen=True)
class Batch:
    input_ids: torch.Tensor  # [N, L] right-padded
    attention_mask: torch.Tensor  # [N, L]
    loss_mask: torch.Tensor  # [N, L-1] 1 where a completion token is predicted
    old_logprobs: torch.Tensor  # [N, L-1] aligned with loss_mask, 0 elsewhere
    advantages: torch.Tensor  # [N]
    temperature: torch.Tensor  # [N]


def zero_variance(group: ScoredGroup) -> bool:
    """All rewards equal: the group's advantages are all zero (no signal)."""
    return len(set(group.rewards)) <= 1


def rows_from_groups(
    groups: list[ScoredGroup],
    *,
    scale_by_std: bool,
    mask_truncated: bool,
    variant_weights: dict[str, float] | None = None,
) -> list[Row]:
    """One Row per sample. Each group's advantages are normalised within that group (hinted
    and unhinted groups are never merged), then scaled by the variant's loss weight."""
    rows = []
    for g in groups:
        weight = (variant_weights or {}).get(g.variant.value, 1.0)
        adv = group_advantages(torch.tensor(g.rewards, dtype=torch.float32), scale_by_std) * weight  # [G]
        for s, a in zip(g.samples, adv.tolist(), strict=True):
            truncated = s.finish_reason is FinishReason.LENGTH
            rows.append(
                Row(
                    ids=s.prompt_ids + s.completion_ids,
                    prompt_len=len(s.prompt_ids),
                    old_logprobs=s.logprobs,
                    advantage=a,
                    temperature=g.temperature,
                    trainable=bool(s.completion_ids) and not (mask_truncated and truncated),
                    variant=g.variant,
                )
            )
    return rows


def micro_batches(rows: list[Row], token_budget: int) -> Iterator[list[Row]]:
    """Consecutive rows packed so that rows x padded length stays within ``token_budget``
    (a single row longer than the budget goes alone)."""
    chunk: list[Row] = []
    width = 0
    for row in rows:
        new_width = max(width, len(row.ids))
        if chunk and new_width * (len(chunk) + 1) > token_budget:
            yield chunk
            chunk, new_width = [], len(row.ids)
        chunk.append(row)
        width = new_width
    if chunk:
        yield chunk


def collate(rows: list[Row], pad_id: int) -> Batch:
    width = max(len(r.ids) for r in rows)
    n = len(rows)
    ids = torch.full((n, width), pad_id, dtype=torch.long)
    attn = torch.zeros((n, width), dtype=torch.long)
    mask = torch.zeros((n, width - 1), dtype=torch.float32)
    old = torch.zeros((n, width - 1), dtype=torch.float32)
    for i, r in enumerate(rows):
        ids[i, : len(r.ids)] = torch.tensor(r.ids)
        attn[i, : len(r.ids)] = 1
        start, end = r.prompt_len - 1, len(r.ids) - 1  # shifted positions of completion tokens
        if r.trainable and end > start:
            mask[i, start:end] = 1.0
            old[i, start:end] = torch.tensor(r.old_logprobs)
    return Batch(
        input_ids=ids,
        attention_mask=attn,
        loss_mask=mask,
        old_logprobs=old,
        advantages=torch.tensor([r.advantage for r in rows], dtype=torch.float32),
        temperature=torch.tensor([r.temperature for r in rows], dtype=torch.float32),
    )
