"""Shared prompts (``trainer.share_prompts``: each group's prompt computed once, its
completions attending to its keys and values) against the padded layout: the same
per-token logprobs, loss, gradients and step metrics on the tiny model in float32, also
with layer checkpointing and a chunked LM head; and micro-batches that keep groups whole."""

from __future__ import annotations

import copy
import random
from pathlib import Path
from typing import Any

import pytest
import torch

from services.common.messages import FinishReason, Score, ScoredGroup, Variant
from services.trainer.batch import (
    Row,
    collate,
    collate_shared,
    rows_from_groups,
    shared_micro_batches,
    shared_tokens,
)
from services.trainer.grpo import LossConfig, policy_loss, token_logprobs
from services.trainer.settings import TrainerSettings
from tests.factories import assert_same_step, random_group, sgd_step


def _model(tiny_model: Path, attn: str = "sdpa") -> Any:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(tiny_model), dtype=torch.float32, attn_implementation=attn)


@pytest.fixture(scope="module")
def base_model(tiny_model: Path) -> Any:
    return _model(tiny_model)


def _groups() -> list[ScoredGroup]:
    """Groups of different prompt lengths (4 to 14 tokens, one of a single token), hinted and
    unhinted, at three temperatures, one truncated, with completions of 1 to 30 tokens."""
    rng = random.Random(11)
    specs = [
        ("hinted", 0.7, FinishReason.STOP),
        ("unhinted", 1.0, FinishReason.STOP),
        ("hinted", 1.3, FinishReason.LENGTH),
        ("unhinted", 0.9, FinishReason.STOP),
        ("hinted", 1.0, FinishReason.STOP),
    ]
    groups = [random_group(rng, f"g{i}", f"p{i}", *spec) for i, spec in enumerate(specs)]
    groups[0].scores[:] = [Score(reward=r) for r in (1.0, 0.0, 0.0, 1.0)]
    one = groups[1].samples[2]
    groups[1].samples[2] = one.model_copy(update={"completion_ids": one.completion_ids[:1], "logprobs": [-5.0]})
    short = groups[4]
    groups[4] = short.model_copy(
        update={"samples": [s.model_copy(update={"prompt_ids": s.prompt_ids[:1]}) for s in short.samples]}
    )
    assert len({len(g.samples[0].prompt_ids) for g in groups}) >= 4
    return groups


def _rows() -> list[Row]:
    return rows_from_groups(_groups(), scale_by_std=False, mask_truncated=True)


def _completion_logprobs(lp: torch.Tensor, rows: list[Row], shared: bool) -> list[torch.Tensor]:
    """Each row's completion-token logprobs out of a padded [N, L-1] or shared [N, C-1] batch."""
    out = []
    for i, r in enumerate(rows):
        n = len(r.ids) - r.prompt_len
        start = 0 if shared else r.prompt_len - 1
        out.append(lp[i, start : start + n])
    return out


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("checkpointing", [False, True])
def test_logprobs_loss_and_gradients_equal_the_padded_layout(tiny_model: Path, attn: str, checkpointing: bool) -> None:
    base = _model(tiny_model, attn)
    rows = _rows()
    cfg = LossConfig(agg="seq_mean", kl_coef=0.0, entropy_coef=0.01)
    results = []
    for shared in (False, True):
        model = copy.deepcopy(base).train()
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        b = collate_shared(rows, pad_id=0) if shared else collate(rows, pad_id=0)
        prompts = b.prompts if shared else None  # type: ignore[attr-defined]
        pos = b.position_ids if shared else None  # type: ignore[attr-defined]
        lp, ent = token_logprobs(model, b.input_ids, b.attention_mask, b.temperature, True, 4096, pos, prompts)
        loss, _ = policy_loss(lp, b.old_logprobs, b.advantages, b.loss_mask, cfg, 10.0, entropy=ent)
        loss.backward()
        results.append((loss.detach(), _completion_logprobs(lp.detach(), rows, shared), model))
    (loss_p, lp_p, model_p), (loss_s, lp_s, model_s) = results
    assert torch.allclose(loss_p, loss_s, atol=1e-6), (float(loss_p), float(loss_s))
    for a, b in zip(lp_p, lp_s, strict=True):
        assert torch.allclose(a, b, atol=1e-5), float((a - b).abs().max())
    for (name, p), q in zip(model_p.named_parameters(), model_s.parameters(), strict=True):
        assert p.grad is not None and q.grad is not None, name
        assert torch.allclose(p.grad, q.grad, rtol=1e-4, atol=1e-5), (name, float((p.grad - q.grad).abs().max()))


def _step(base: Any, cfg: TrainerSettings) -> tuple[dict[str, float], list[torch.Tensor]]:
    return sgd_step(base, cfg, _groups())


@pytest.mark.parametrize(
    ("agg", "extra"),
    [
        ("token_mean", {}),
        ("seq_mean", {}),
        ("constant", {"kl_coef": 0.1, "entropy_coef": 0.01, "tis_cap": 2.0}),
        ("constant", {"layer_checkpointing": True}),
        ("token_mean", {"logits_chunk_tokens": 16}),  # the LM head chunk by chunk, recomputed
    ],
)
def test_shared_step_equals_the_padded_step(base_model: Any, agg: str, extra: dict[str, Any]) -> None:
    common: dict[str, Any] = dict(
        loss_agg=agg,
        prompts_per_step=5,
        group_size=4,
        max_new_tokens=30,
        micro_batch_tokens=200,  # several micro-batches
        mask_truncated=True,
        filter_zero_variance=False,
        grad_clip=1e9,  # compare the raw gradients
        learning_rate=0.1,
        **extra,
    )
    padded = _step(base_model, TrainerSettings(**common, share_prompts=False))
    assert_same_step(padded, _step(base_model, TrainerSettings(**common, share_prompts=True)))
    assert padded[0]["hinted/truncated"] == 4.0


def test_micro_batches_keep_groups_whole_within_the_budget() -> None:
    rows = _rows()
    groups = [rows[i : i + 4] for i in range(0, len(rows), 4)]
    for budget in (60, 120, 200, 10_000):
        chunks = list(shared_micro_batches(rows, budget))
        assert [r for c in chunks for r in c] == rows  # every row once, in order
        for c in chunks:
            assert shared_tokens(c) <= budget or len({tuple(r.ids[: r.prompt_len]) for r in c}) == 1
            for g in groups:  # a group is in one micro-batch, or split only when it alone is over
                inside = [r for r in g if any(r is x for x in c)]
                assert not inside or len(inside) == 4 or shared_tokens(g) > budget
    # A group over the budget is split into runs of rows that fit, each computing the prompt.
    big = groups[0]
    budget = shared_tokens(big) - 1
    runs = list(shared_micro_batches(big, budget))
    assert len(runs) > 1 and [r for c in runs for r in c] == big
    assert all(shared_tokens(c) <= budget or len(c) == 1 for c in runs)


def test_collate_shared_lays_out_each_prompt_once() -> None:
    def row(prompt: list[int], completion: list[int]) -> Row:
        return Row(prompt + completion, len(prompt), [-1.0] * len(completion), 1.0, 1.0, True, Variant.HINTED)

    rows = [row([5, 6, 7], [8, 9]), row([5, 6, 7], [10]), row([3, 4], [11, 12, 13])]
    b = collate_shared(rows, pad_id=0)
    assert b.prompts.ids.tolist() == [[5, 6], [3, 0]]
    assert b.prompts.mask.tolist() == [[1, 1], [1, 0]]
    assert b.prompts.index.tolist() == [0, 0, 1]
    assert b.input_ids.tolist() == [[7, 8, 9, 0], [7, 10, 0, 0], [4, 11, 12, 13]]
    assert b.position_ids.tolist() == [[2, 3, 4, 5], [2, 3, 4, 5], [1, 2, 3, 4]]
    assert b.attention_mask.tolist() == [[1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 0, 0], [1, 0, 1, 1, 1, 1]]
    assert b.loss_mask.tolist() == [[1, 1, 0], [1, 0, 0], [1, 1, 1]]
    assert shared_tokens(rows) == 2 * 2 + 3 * 4
