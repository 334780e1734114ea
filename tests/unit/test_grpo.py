"""GRPO's pure parts: advantages, the loss mask, the clipped loss and its aggregations."""

from __future__ import annotations

import pytest
import torch

from services.common.messages import FinishReason, Sample, ScoredGroup
from services.trainer.batch import collate, rows_from_groups
from services.trainer.grpo import LossConfig, group_advantages, policy_loss
from tests.factories import scored_group

CONSTANT = LossConfig()


def scored(
    prompt: list[int],
    completions: list[list[int]],
    rewards: list[float],
    variant: str = "hinted",
    finish: FinishReason = FinishReason.STOP,
) -> ScoredGroup:
    samples = [
        Sample(
            problem_id="p",
            variant=variant,
            prompt_ids=prompt,
            completion_ids=c,
            logprobs=[-0.5] * len(c),
            finish_reason=finish,
            weight_version=0,
            text="",
        )
        for c in completions
    ]
    return scored_group(samples, rewards, prompt="q + hint")


def test_advantage_is_reward_minus_group_mean() -> None:
    assert group_advantages(torch.tensor([1.0, 0.0, 0.0, 1.0])).tolist() == [0.5, -0.5, -0.5, 0.5]
    assert group_advantages(torch.tensor([0.0, 0.0, 0.0])).tolist() == [0.0, 0.0, 0.0]  # no signal
    scaled = group_advantages(torch.tensor([1.0, 0.0]), scale_by_std=True)
    assert torch.allclose(scaled, torch.tensor([1.0, -1.0]), atol=1e-4)


def test_loss_mask_covers_exactly_the_completion_tokens() -> None:
    # The prompt (problem + instruction + hint) is 5 tokens; completions of 3 and 1 tokens.
    group = scored([11, 12, 13, 14, 15], [[21, 22, 23], [31]], [1.0, 0.0])
    batch = collate(rows_from_groups([group], scale_by_std=False, mask_truncated=False), pad_id=0)
    assert batch.input_ids.tolist() == [[11, 12, 13, 14, 15, 21, 22, 23], [11, 12, 13, 14, 15, 31, 0, 0]]
    # Position t predicts token t+1: completion tokens are predicted at 4, 5, 6 (and 4).
    assert batch.loss_mask.tolist() == [[0, 0, 0, 0, 1, 1, 1], [0, 0, 0, 0, 1, 0, 0]]
    predicted = batch.input_ids[:, 1:][batch.loss_mask.bool()].tolist()
    assert predicted == [21, 22, 23, 31]  # only completion tokens, never prompt or hint
    assert batch.old_logprobs[batch.loss_mask.bool()].tolist() == [-0.5] * 4
    assert batch.advantages.tolist() == [0.5, -0.5] and batch.temperature.tolist() == pytest.approx([0.8, 0.8])


def test_truncated_samples_can_be_masked_out() -> None:
    group = scored([1, 2], [[3, 4], [5, 6]], [0.0, 1.0], finish=FinishReason.LENGTH)
    kept = collate(rows_from_groups([group], scale_by_std=False, mask_truncated=False), 0).loss_mask
    masked = collate(rows_from_groups([group], scale_by_std=False, mask_truncated=True), 0).loss_mask
    assert kept.sum() == 4 and masked.sum() == 0


def test_on_policy_loss_is_minus_advantage_and_its_gradient_is_the_policy_gradient() -> None:
    old = torch.tensor([[-1.0, -2.0, 0.0]])
    new = old.clone().requires_grad_(True)
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    loss, st = policy_loss(new, old, torch.tensor([2.0]), mask, CONSTANT, 4.0)
    assert float(loss.detach()) == pytest.approx(-2.0 * 2 / 4)  # -A per token, summed, / nominal samples
    loss.backward()
    assert new.grad is not None and new.grad.tolist() == [[-0.5, -0.5, 0.0]]
    assert st.ratio_max == pytest.approx(1.0) and float(st.clipped_high.sum()) == 0 and float(st.tokens.sum()) == 2


def test_ratio_is_clipped_in_the_direction_of_the_advantage() -> None:
    old = torch.zeros(1, 1)
    up = torch.log(torch.tensor([[1.5]]))  # ratio 1.5
    loss_pos, st = policy_loss(up, old, torch.tensor([1.0]), torch.ones(1, 1), CONSTANT, 1.0)
    assert float(loss_pos) == pytest.approx(-1.2) and float(st.clipped_high.sum()) == 1  # gain capped at 1 + eps
    loss_neg, _ = policy_loss(up, old, torch.tensor([-1.0]), torch.ones(1, 1), CONSTANT, 1.0)
    assert float(loss_neg) == pytest.approx(1.5)  # pessimistic: the unclipped, larger loss


def test_aggregations() -> None:
    new = old = torch.zeros(2, 3)
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
    adv = torch.tensor([1.0, 1.0])
    const, _ = policy_loss(new, old, adv, mask, CONSTANT, 8.0)
    tok, _ = policy_loss(new, old, adv, mask, LossConfig(agg="token_mean"), 4.0)
    seq, _ = policy_loss(new, old, adv, mask, LossConfig(agg="seq_mean"), 2.0)
    assert (
        float(const) == pytest.approx(-4 / 8)
        and float(tok) == pytest.approx(-1.0)
        and float(seq) == pytest.approx(-1.0)
    )


def test_kl_estimators_k3_and_k2_and_their_gradients() -> None:
    ref = torch.zeros(1, 3)
    new = torch.tensor([[0.0, -0.5, -12.0]], requires_grad=True)  # the last token nearly gone
    mask = torch.ones(1, 3)
    grads = {}
    for est in ("k3", "k2"):
        cfg = LossConfig(kl_coef=1.0, kl_estimator=est)  # type: ignore[arg-type]
        loss, _ = policy_loss(new, new.detach(), torch.zeros(1), mask, cfg, 1.0, ref_lp=ref)
        r = ref - new.detach()
        expected = (torch.exp(r) - r - 1).sum() if est == "k3" else (0.5 * r * r).sum()
        assert float(loss.detach()) == pytest.approx(float(expected), rel=1e-5)  # A = 0: the penalty alone
        (grad,) = torch.autograd.grad(loss, new)
        grads[est] = grad[0].tolist()
    assert grads["k3"] == pytest.approx(
        [0.0, 1 - float(torch.exp(torch.tensor(0.5))), 1 - float(torch.exp(torch.tensor(12.0)))]
    )
    assert grads["k2"] == pytest.approx([0.0, -0.5, -12.0])  # linear in the log-ratio
