"""Scored groups -> training tensors (padded, packed end to end, or with shared prompts),
with the loss mask on completion tokens only.

A sample's sequence is prompt_ids + completion_ids. The prompt (for a hinted group it
includes the hint, the privileged prefix) is context, never a target: the loss mask
covers exactly the positions that predict completion tokens. Logits at position t
predict token t + 1, so completion token k of a prompt of length P sits at shifted
position P - 1 + k.

Two layouts of a micro-batch:
- padded (``micro_batches`` + ``collate``): [N, L] rows right-padded to the longest.
- packed (``pack_micro_batches`` + ``collate_packed``): the rows laid end to end in one
  [1, S] sequence with no pad token; ``position_ids`` restart at 0 on each row, which is
  what makes the model's attention block-causal per row (see ``collate_packed``).
- shared prompts (``shared_micro_batches`` + ``collate_shared``): each distinct prompt
  once, [M, P], and each row's completion after its prompt's last token, [N, C]; the
  completions attend to their prompt's keys and values (prefix.py).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch

from services.common.messages import FinishReason, ScoredGroup, Variant
from services.trainer.grpo import group_advantages
from services.trainer.prefix import Prompts


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


@dataclass(frozen=True)
class PackedBatch:
    """N rows end to end: S = the rows' total length, S - 1 predicted positions.

    The position predicting row i's first token belongs to row i - 1 (its last token) and is
    never in the loss mask, so no target crosses a row boundary.
    """

    input_ids: torch.Tensor  # [1, S]
    position_ids: torch.Tensor  # [1, S] 0..len-1 within each row
    loss_mask: torch.Tensor  # [1, S-1] 1 where a completion token is predicted
    old_logprobs: torch.Tensor  # [1, S-1] aligned with loss_mask, 0 elsewhere
    row_index: torch.Tensor  # [1, S-1] the row (0..N-1) each predicted position belongs to
    temperature: torch.Tensor  # [1, S-1] the temperature of that row
    advantages: torch.Tensor  # [N]


def pack_micro_batches(rows: list[Row], token_budget: int) -> list[list[Row]]:
    """Rows placed first-fit into micro-batches of at most ``token_budget`` tokens in all (no
    padding: a micro-batch costs the sum of its rows' lengths). A row longer than the budget
    goes alone. Rows keep their relative order within a micro-batch."""
    bins: list[list[Row]] = []
    room: list[int] = []
    for row in rows:
        n = len(row.ids)
        slot = next((i for i, r in enumerate(room) if n <= r), None)
        if slot is None:
            bins.append([row])
            room.append(token_budget - n)
        else:
            bins[slot].append(row)
            room[slot] -= n
    return bins


def collate_packed(rows: list[Row]) -> PackedBatch:
    """Rows end to end, [1, S]. Passed to a Hugging Face decoder with ``position_ids`` and no
    attention mask, the restarts are detected (transformers' ``find_packed_sequence_indices``)
    and each row attends only to itself, causally, whatever the attention implementation
    (a block mask for sdpa and eager, variable-length kernels for flash attention)."""
    total = sum(len(r.ids) for r in rows)
    ids = torch.empty(total, dtype=torch.long)
    pos = torch.empty(total, dtype=torch.long)
    mask = torch.zeros(total - 1, dtype=torch.float32)
    old = torch.zeros(total - 1, dtype=torch.float32)
    row_index = torch.empty(total - 1, dtype=torch.long)
    temp = torch.empty(total - 1, dtype=torch.float32)
    at = 0
    for i, r in enumerate(rows):
        n = len(r.ids)
        ids[at : at + n] = torch.tensor(r.ids)
        pos[at : at + n] = torch.arange(n)
        end = min(at + n, total - 1)  # the last row has no position past its end
        row_index[at:end] = i
        temp[at:end] = r.temperature
        start, stop = at + r.prompt_len - 1, at + n - 1  # shifted positions of completion tokens
        if r.trainable and stop > start:
            mask[start:stop] = 1.0
            old[start:stop] = torch.tensor(r.old_logprobs)
        at += n
    return PackedBatch(
        input_ids=ids[None],
        position_ids=pos[None],
        loss_mask=mask[None],
        old_logprobs=old[None],
        row_index=row_index[None],
        temperature=temp[None],
        advantages=torch.tensor([r.advantage for r in rows], dtype=torch.float32),
    )


@dataclass(frozen=True)
class SharedBatch(Batch):
    """Rows whose equal prompts are computed once (prefix.py). Here ``input_ids`` [N, C] is
    each row's prompt's last token then its completion, right-padded; ``attention_mask``
    [N, P + C] the keys each row attends to (its prompt's real tokens, then its own);
    ``loss_mask`` and ``old_logprobs`` [N, C-1], completion token k at shifted position k."""

    position_ids: torch.Tensor  # [N, C] continuing from each row's prompt
    prompts: Prompts  # [M, P], without their last token


def _prompt_key(row: Row) -> tuple[int, ...]:
    return tuple(row.ids[: row.prompt_len])


def shared_tokens(rows: list[Row]) -> int:
    """Positions a shared-prompt micro-batch of ``rows`` computes: the distinct prompts (less
    their last token) x the longest, plus the rows x the longest completion (+1, the
    prompt's last token)."""
    prompts = {_prompt_key(r) for r in rows}
    prompt_width = max(1, max(len(p) - 1 for p in prompts))
    return len(prompts) * prompt_width + len(rows) * max(len(r.ids) - r.prompt_len + 1 for r in rows)


def prompt_groups(rows: list[Row]) -> list[list[Row]]:
    """The rows by prompt (a GRPO group's, or several groups' of one prompt), in order of
    each prompt's first row."""
    by_prompt: dict[tuple[int, ...], list[Row]] = {}
    for row in rows:
        by_prompt.setdefault(_prompt_key(row), []).append(row)
    return list(by_prompt.values())


def shared_micro_batches(rows: list[Row], token_budget: int) -> Iterator[list[Row]]:
    """Rows with their prompt's other rows (``prompt_groups``), whole groups added in order
    while the micro-batch's ``shared_tokens`` stays within ``token_budget``. A group over the
    budget on its own is split into runs of rows that fit (each run computes the prompt
    again); a single row over the budget goes alone."""
    units: list[list[Row]] = []
    for group in prompt_groups(rows):
        if shared_tokens(group) <= token_budget:
            units.append(group)
            continue
        run: list[Row] = []
        for row in group:
            if run and shared_tokens([*run, row]) > token_budget:
                units.append(run)
                run = []
            run.append(row)
        units.append(run)
    chunk: list[Row] = []
    for unit in units:
        if chunk and shared_tokens(chunk + unit) > token_budget:
            yield chunk
            chunk = []
        chunk = chunk + unit
    if chunk:
        yield chunk


def collate_shared(rows: list[Row], pad_id: int) -> SharedBatch:
    """``rows`` with each distinct prompt once; row order is kept (``advantages`` [N] etc.)."""
    index: dict[tuple[int, ...], int] = {}
    row_prompt = [index.setdefault(_prompt_key(r), len(index)) for r in rows]
    prompts = list(index)
    width_p = max(1, max(len(p) - 1 for p in prompts))
    width_c = max(len(r.ids) - r.prompt_len + 1 for r in rows)
    m, n = len(prompts), len(rows)
    p_ids = torch.full((m, width_p), pad_id, dtype=torch.long)
    p_mask = torch.zeros((m, width_p), dtype=torch.long)
    for j, p in enumerate(prompts):
        p_ids[j, : len(p) - 1] = torch.tensor(p[:-1], dtype=torch.long)
        # A one-token prompt has nothing before its last token: its pad attends to itself in
        # the prompt forward (finite keys that no completion row attends to).
        p_mask[j, : max(len(p) - 1, 1)] = 1
    ids = torch.full((n, width_c), pad_id, dtype=torch.long)
    attn = torch.zeros((n, width_p + width_c), dtype=torch.long)
    pos = torch.empty((n, width_c), dtype=torch.long)
    mask = torch.zeros((n, width_c - 1), dtype=torch.float32)
    old = torch.zeros((n, width_c - 1), dtype=torch.float32)
    for i, r in enumerate(rows):
        before = r.prompt_len - 1  # the prompt's tokens in the prompt forward
        tail = r.ids[before:]  # the prompt's last token + the completion
        ids[i, : len(tail)] = torch.tensor(tail)
        attn[i, :before] = 1
        attn[i, width_p : width_p + len(tail)] = 1
        pos[i] = torch.arange(before, before + width_c)
        if r.trainable and len(tail) > 1:
            mask[i, : len(tail) - 1] = 1.0
            old[i, : len(tail) - 1] = torch.tensor(r.old_logprobs)
    return SharedBatch(
        input_ids=ids,
        attention_mask=attn,
        loss_mask=mask,
        old_logprobs=old,
        advantages=torch.tensor([r.advantage for r in rows], dtype=torch.float32),
        temperature=torch.tensor([r.temperature for r in rows], dtype=torch.float32),
        position_ids=pos,
        prompts=Prompts(p_ids, p_mask, torch.tensor(row_prompt, dtype=torch.long)),
    )
