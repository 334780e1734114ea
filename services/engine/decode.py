"""Batched, KV-cached autoregressive decoding of one batch of sequences.

One call runs a batch to completion: a left-padded prefill of every prompt, then one
decode step per token for all unfinished rows, with each row's KV cache kept between
steps. Rows that finish (a stop token, their length limit, or an abort) are dropped
from the batch, cache included, so long rows do not drag short ones' compute along.
Each row samples with its own parameters and generator (sampling.sample_next).

Weights that change while a batch runs (an update during an in-place or retracting pause,
``current``) are taken up at the next step: the tokens so far are noted as the old
version's (``Sequence.spans``: SGLang's ``weight_versions``), and the rows go on with the
KV cache they have (``in_place``) or with it computed again under the new weights
(``retract``, ``recompute``).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from services.engine.sampling import SamplingSpec, sample_next


@dataclass
class Sequence:
    """One sequence to decode; ``abort`` may be set from another thread at any time."""

    prompt_ids: list[int]
    spec: SamplingSpec
    generator: torch.Generator | None = None
    abort: threading.Event = field(default_factory=threading.Event)
    # Filled in by decode():
    output_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    finish: tuple[str, int | str | None] = ("", None)  # ("stop", matched) | ("length", n) | ("abort", msg)
    changes: list[tuple[str, int]] = field(default_factory=list)  # (old version, its tokens) at each swap
    version: str = "0"  # of the weights that made the last token
    first_token_at: float | None = None  # time.monotonic() when its first token was sampled

    def spans(self) -> list[tuple[str, int, int]]:
        """(version, start, end) of the output tokens each weights made, oldest first; one
        span unless the weights changed while it ran. A change at which this sequence had
        no new token leaves no span."""
        n = len(self.output_ids)
        out: list[tuple[str, int, int]] = []
        for version, upto in [*self.changes, (self.version, n)]:
            end, start = min(upto, n), out[-1][2] if out else 0
            if out and end <= start:
                continue
            if out and out[-1][0] == version:
                out[-1] = (version, out[-1][1], end)
            else:
                out.append((version, start, end))
        return out


def _left_pad(rows: list[list[int]], pad_id: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """ids [B, L] left-padded, attention mask [B, L] (1 for real tokens), on ``device``."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, width - len(r) :] = torch.tensor(r, dtype=torch.long)
        mask[i, width - len(r) :] = 1
    return ids.to(device), mask.to(device)


@torch.inference_mode()
def decode(
    model: torch.nn.Module,
    seqs: list[Sequence],
    *,
    eos_ids: frozenset[int],
    pad_id: int,
    wait_if_paused: Callable[[], None] = lambda: None,
    version: str = "0",
    current: Callable[[], tuple[torch.nn.Module, str]] | None = None,
    recompute: Callable[[], bool] = lambda: False,
) -> None:
    """Decode every sequence in ``seqs`` to completion, filling its outputs in place.
    ``model`` is weights ``version``; ``current()``, asked between steps, gives the weights
    to go on with (see the module docstring), ``recompute()`` whether the KV cache is then
    computed again."""
    from transformers import DynamicCache

    for s in seqs:
        s.version = version
    active = [s for s in seqs if not _finished_before_start(s)]
    if not active:
        return
    device = next(model.parameters()).device

    def prefill(rows: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, DynamicCache]:
        """Logits after ``rows`` [B, V], their mask [B, L], next positions [B], the cache."""
        ids, mask = _left_pad(rows, pad_id, device)  # [B, L], [B, L]
        positions = (mask.cumsum(-1) - 1).clamp(min=0)  # [B, L]
        cache = DynamicCache()
        out = model(input_ids=ids, attention_mask=mask, position_ids=positions, cache=cache, use_cache=True)
        return out.logits[:, -1, :].float(), mask, positions[:, -1] + 1, cache

    logits, mask, next_pos, cache = prefill([s.prompt_ids for s in active])
    while True:
        tokens, logps = sample_next(logits, [s.spec for s in active], [s.generator for s in active])  # [B], [B]
        sampled_at = time.monotonic()
        keep: list[int] = []
        # One device-to-host copy per step, not one per row.
        for i, (s, tok, lp) in enumerate(zip(active, tokens.tolist(), logps.tolist(), strict=True)):
            s.output_ids.append(tok)
            s.logprobs.append(lp)
            if s.first_token_at is None:
                s.first_token_at = sampled_at
            if _check_finished(s, tok, eos_ids):
                continue
            keep.append(i)
        if not keep:
            return
        wait_if_paused()
        if len(keep) < len(active):  # drop finished rows, cache included
            index = torch.tensor(keep, dtype=torch.long, device=device)
            active = [active[i] for i in keep]
            tokens, mask, next_pos = tokens[index], mask[index], next_pos[index]
            cache.batch_select_indices(index)
        if current is not None and (now := current())[1] != version:
            model, version = now
            for s in active:
                s.changes.append((s.version, len(s.output_ids)))
                s.version = version
            if recompute():  # retract: the rows so far under the new weights
                logits, mask, next_pos, cache = prefill([s.prompt_ids + s.output_ids for s in active])
                continue
        mask = torch.cat([mask, torch.ones((len(active), 1), dtype=mask.dtype, device=device)], dim=1)  # [B, L+t]
        out = model(
            input_ids=tokens[:, None],
            attention_mask=mask,
            position_ids=next_pos[:, None],
            cache=cache,
            use_cache=True,
        )
        logits = out.logits[:, -1, :].float()  # [B, V]
        next_pos = next_pos + 1


def _finished_before_start(s: Sequence) -> bool:
    if s.abort.is_set():
        s.finish = ("abort", "aborted before it started")
        return True
    if s.spec.max_new_tokens == 0:
        s.finish = ("length", 0)
        return True
    return False


def _check_finished(s: Sequence, tok: int, eos_ids: frozenset[int]) -> bool:
    if s.abort.is_set():
        s.finish = ("abort", "request aborted")
    elif tok in s.spec.stop_token_ids or (tok in eos_ids and not s.spec.ignore_eos):
        s.finish = ("stop", tok)
    elif len(s.output_ids) >= s.spec.max_new_tokens:
        s.finish = ("length", s.spec.max_new_tokens)
    else:
        return False
    return True
