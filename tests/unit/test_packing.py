"""Packed micro-batches (rows end to end, no pad tokens) against the padded layout: the same
loss, gradients and step metrics on the tiny model in float32, and attention that never
crosses rows."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import pytest
import torch

from services.common.messages import FinishReason, Score, ScoredGroup, Variant
from services.trainer.batch import Row, collate, collate_packed, pack_micro_batches
from services.trainer.grpo import token_logprobs
from services.trainer.settings import TrainerSettings
from tests.factories import assert_same_step, random_group, sgd_step


def _group(rng: random.Random, i: int, variant: str, temperature: float, finish: FinishReason) -> ScoredGroup:
    return random_group(rng, f"g{i}", f"p{i}", variant, temperature, finish)


def _groups() -> list[ScoredGroup]:
    """Hinted and unhinted groups at three temperatures, one of them truncated."""
    rng = random.Random(7)
    specs = [
        ("hinted", 0.7, FinishReason.STOP),
        ("unhinted", 1.0, FinishReason.STOP),
        ("hinted", 1.3, FinishReason.LENGTH),  # masked out with mask_truncated
        ("unhinted", 0.9, FinishReason.STOP),
    ]
    groups = [_group(rng, i, *spec) for i, spec in enumerate(specs)]
    groups[0].scores[:] = [Score(reward=r) for r in (1.0, 0.0, 0.0, 1.0)]  # at least one with signal
    return groups


def _model(tiny_model: Path, attn: str = "sdpa") -> Any:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(tiny_model), dtype=torch.float32, attn_implementation=attn)


@pytest.fixture(scope="module")
def base_model(tiny_model: Path) -> Any:
    return _model(tiny_model)


def _step(base: Any, cfg: TrainerSettings) -> tuple[dict[str, float], list[torch.Tensor]]:
    return sgd_step(base, cfg, _groups())


@pytest.mark.parametrize(
    ("agg", "extra"),
    [
        ("token_mean", {}),
        ("seq_mean", {}),
        ("constant", {}),
        ("constant", {"kl_coef": 0.1, "entropy_coef": 0.01, "tis_cap": 2.0}),
    ],
)
def test_packed_step_equals_the_padded_step(base_model: Any, agg: str, extra: dict[str, float]) -> None:
    common: dict[str, Any] = dict(
        loss_agg=agg,
        prompts_per_step=4,
        group_size=4,
        max_new_tokens=30,
        micro_batch_tokens=90,  # several micro-batches; the longest rows (up to 44) pair at most
        mask_truncated=True,
        filter_zero_variance=False,
        grad_clip=1e9,  # compare the raw gradients
        learning_rate=0.1,
        **extra,
    )
    padded = _step(base_model, TrainerSettings(**common, pack_sequences=False, share_prompts=False))
    assert_same_step(padded, _step(base_model, TrainerSettings(**common, pack_sequences=True)))
    assert padded[0]["hinted/truncated"] == 4.0
    assert padded[0]["clip_frac"] > 0 or "tis_cap" in extra  # (with tis_cap the ratio is 1 in value)


def _rows(lengths: list[tuple[int, int]], temps: list[float] | None = None) -> list[Row]:
    rng = random.Random(1)
    rows = []
    for i, (prompt, completion) in enumerate(lengths):
        rows.append(
            Row(
                ids=[rng.randrange(3, 500) for _ in range(prompt + completion)],
                prompt_len=prompt,
                old_logprobs=[-1.0] * completion,
                advantage=0.5,
                temperature=(temps or [1.0] * len(lengths))[i],
                trainable=True,
                variant=Variant.HINTED,
            )
        )
    return rows


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_attention_never_crosses_rows(tiny_model: Path, attn: str) -> None:
    """Each row's logprobs in the pack equal its logprobs alone, and changing one row's
    tokens leaves the others' unchanged."""
    model = _model(tiny_model, attn).eval()
    rows = _rows([(5, 9), (3, 4), (8, 12)], temps=[0.7, 1.0, 1.3])

    def packed_logprobs(rs: list[Row]) -> torch.Tensor:
        b = collate_packed(rs)
        with torch.no_grad():
            lp, _ = token_logprobs(model, b.input_ids, None, b.temperature, position_ids=b.position_ids)
        return lp[0]  # [S-1]

    packed = packed_logprobs(rows)
    at = 0
    for r in rows:
        alone = collate([r], pad_id=0)
        with torch.no_grad():
            lp, _ = token_logprobs(model, alone.input_ids, alone.attention_mask, alone.temperature)
        n = len(r.ids) - 1
        assert torch.allclose(packed[at : at + n], lp[0], atol=1e-5), float((packed[at : at + n] - lp[0]).abs().max())
        at += n + 1
    changed = [Row(**{**rows[0].__dict__, "ids": [t + 1 for t in rows[0].ids]}), *rows[1:]]
    other = packed_logprobs(changed)
    first = len(rows[0].ids)  # positions from the second row's first token on
    assert not torch.allclose(other[: first - 1], packed[: first - 1])
    assert torch.equal(other[first:], packed[first:])


def test_pack_micro_batches_fills_first_fit_within_the_budget() -> None:
    rows = _rows([(2, 3), (4, 4), (10, 15), (1, 1), (3, 2), (20, 20)])  # lengths 5, 8, 25, 2, 5, 40
    bins = pack_micro_batches(rows, token_budget=20)
    assert [[len(r.ids) for r in b] for b in bins] == [[5, 8, 2, 5], [25], [40]]  # too long: alone
    assert sorted(id(r) for b in bins for r in b) == sorted(id(r) for r in rows)
    b = collate_packed(bins[0])
    assert b.input_ids.shape == (1, 20) and b.loss_mask.shape == (1, 19)
    assert b.position_ids[0].tolist() == [*range(5), *range(8), *range(2), *range(5)]
    assert b.row_index[0].tolist() == [0] * 5 + [1] * 8 + [2] * 2 + [3] * 4
    # Completion tokens only: row 0's 3 (shifted positions 1..3), row 1's 4 (8..11), ...
    assert b.loss_mask[0].nonzero().flatten().tolist() == [1, 2, 3, 8, 9, 10, 11, 13, 17, 18]
