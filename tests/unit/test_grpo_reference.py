"""The trainer's loss against a plain reference implementation, for every option combination,
and on-policy steps against the plain policy gradient (through a real model too)."""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

import pytest
import torch

from services.common.messages import Sample, Score, ScoredGroup
from services.trainer.batch import collate, rows_from_groups
from services.trainer.grpo import LossConfig, normalizer, policy_loss, token_logprobs
from tests.unit.reference_grpo import reference_loss

AGGS = ["constant", "token_mean", "seq_mean", "dr_grpo"]
KL = [(0.0, "k3"), (0.1, "k3"), (0.1, "k2")]  # (kl_coef, kl_estimator)
COMBOS = list(itertools.product(AGGS, [(0.2, 0.2), (0.2, 0.28)], [None, 2.0], KL, [0.0, 0.01]))


def random_batch(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    n, t = 5, 7
    old = -torch.rand(n, t, generator=g) * 3
    new = old + torch.randn(n, t, generator=g) * 0.4  # ratios well inside and outside the clip range
    mask = (torch.rand(n, t, generator=g) > 0.3).float()
    mask[0] = 0  # a sequence with no completion tokens
    ref = old + torch.randn(n, t, generator=g) * 0.2
    entropy = torch.rand(n, t, generator=g) * 2
    return {"old": old, "new": new, "mask": mask, "adv": torch.randn(n, generator=g), "ref": ref, "entropy": entropy}


@pytest.mark.parametrize(("agg", "clip", "tis", "kl", "ent"), COMBOS)
@pytest.mark.parametrize("seed", [0, 1])
def test_loss_and_gradients_match_the_reference(
    agg: str, clip: tuple[float, float], tis: float | None, kl: tuple[float, str], ent: float, seed: int
) -> None:
    b = random_batch(seed)
    cfg = LossConfig(
        agg=agg,
        clip_eps_low=clip[0],
        clip_eps_high=clip[1],
        tis_cap=tis,
        kl_coef=kl[0],  # type: ignore[arg-type]
        kl_estimator=kl[1],
        entropy_coef=ent,
    )
    norm = normalizer(
        agg,
        nominal_samples=8,
        max_response_tokens=16,
        step_tokens=int(b["mask"].sum()),  # type: ignore[arg-type]
        step_sequences=int((b["mask"].sum(-1) > 0).sum()),
    )
    ours_new, ref_new = b["new"].clone().requires_grad_(), b["new"].clone().requires_grad_()
    ours_ent, ref_ent = b["entropy"].clone().requires_grad_(), b["entropy"].clone().requires_grad_()
    loss, _ = policy_loss(ours_new, b["old"], b["adv"], b["mask"], cfg, norm, ref_lp=b["ref"], entropy=ours_ent)
    expected = reference_loss(
        ref_new,
        b["old"],
        b["adv"],
        b["mask"],
        agg=agg,
        eps_low=clip[0],
        eps_high=clip[1],
        tis_cap=tis,
        kl_coef=kl[0],
        ref=b["ref"],
        kl_estimator=kl[1],
        entropy_coef=ent,
        entropy=ref_ent,
        nominal_samples=8,
        max_response_tokens=16,
    )
    loss.backward()
    expected.backward()
    assert float(loss.detach()) == pytest.approx(float(expected.detach()), rel=1e-5, abs=1e-7)
    assert ours_new.grad is not None and ref_new.grad is not None
    assert torch.allclose(ours_new.grad, ref_new.grad, rtol=1e-5, atol=1e-7)
    if ent:
        assert ours_ent.grad is not None and ref_ent.grad is not None
        assert torch.allclose(ours_ent.grad, ref_ent.grad, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("agg", AGGS)
@pytest.mark.parametrize("tis", [None, 2.0])
def test_an_on_policy_step_is_the_plain_policy_gradient(agg: str, tis: float | None) -> None:
    """With ratio 1 (new == old) the gradient is -A_i / normaliser per completion token
    (per token length too, for seq_mean): REINFORCE with the group baseline."""
    b = random_batch(3)
    new = b["old"].clone().requires_grad_()
    norm = normalizer(
        agg,
        nominal_samples=8,
        max_response_tokens=16,
        step_tokens=int(b["mask"].sum()),  # type: ignore[arg-type]
        step_sequences=int((b["mask"].sum(-1) > 0).sum()),
    )
    loss, _ = policy_loss(new, b["old"], b["adv"], b["mask"], LossConfig(agg=agg, tis_cap=tis), norm)  # type: ignore[arg-type]
    loss.backward()
    per_token = b["adv"][:, None] * b["mask"] / norm
    if agg == "seq_mean":
        per_token = per_token / b["mask"].sum(-1, keepdim=True).clamp(min=1)
    assert new.grad is not None and torch.allclose(new.grad, -per_token, atol=1e-7)


@pytest.mark.parametrize("chunk", [4096, 3])
def test_through_a_real_model_the_step_gradient_is_the_policy_gradient(tiny_model: Path, chunk: int) -> None:
    """Padding, the loss mask and temperature, end to end: our batched loss's parameter
    gradient equals sum_i A_i sum_t grad log pi(y_t) / nominal, computed one plain
    sequence at a time with no padding. ``chunk``: LM-head chunks of 3 positions cut
    across rows, through the checkpointed recomputation, give the same gradient."""
    from transformers import AutoModelForCausalLM

    model: Any = AutoModelForCausalLM.from_pretrained(str(tiny_model), dtype=torch.float64)
    prompts, completions = [[1, 5, 9, 4], [1, 7]], [[11, 12, 13], [21, 22, 23, 24, 25]]
    temperature, rewards = 0.7, [1.0, 0.0]
    # On-policy: the "engine" logprobs are the model's own, so ratio = 1.
    old = []
    with torch.no_grad():
        for p, c in zip(prompts, completions, strict=True):
            logits = model(torch.tensor([p + c])).logits[0] / temperature
            lp = torch.log_softmax(logits, -1)
            old.append([float(lp[len(p) - 1 + k, tok]) for k, tok in enumerate(c)])
    samples = [
        Sample(
            problem_id="q",
            variant="hinted",
            prompt_ids=p,
            completion_ids=c,
            logprobs=o,
            finish_reason="stop",
            weight_version=0,
            text="",
        )
        for p, c, o in zip(prompts, completions, old, strict=True)
    ]
    scores = [Score(reward=r) for r in rewards]
    group = ScoredGroup(
        group_id="g",
        problem_id="q",
        variant="hinted",
        prompt="",
        answer="1",
        samples=samples,
        weight_version=0,
        step=1,
        temperature=temperature,
        scores=scores,
    )
    b = collate(rows_from_groups([group], scale_by_std=False, mask_truncated=False), pad_id=0)
    new, entropy = token_logprobs(
        model, b.input_ids, b.attention_mask, b.temperature.double(), with_entropy=True, chunk_tokens=chunk
    )
    assert entropy is not None
    with torch.no_grad():  # entropy of row 1's first completion position, computed plainly
        lp = torch.log_softmax(model(torch.tensor([prompts[1] + completions[1]])).logits[0] / temperature, -1)
        plain_entropy = -(lp[len(prompts[1]) - 1].exp() * lp[len(prompts[1]) - 1]).sum()
    # Rows are right-padded, so row 1's first completion position is its own prompt length - 1.
    # The LM head's logits are taken in float32 (as under bf16 autocast), hence 1e-6.
    assert float(entropy[1, len(prompts[1]) - 1].detach()) == pytest.approx(float(plain_entropy), rel=1e-6)
    loss, _ = policy_loss(new, b.old_logprobs.double(), b.advantages.double(), b.loss_mask, LossConfig(), 4.0)
    ours = torch.autograd.grad(loss, list(model.parameters()))

    plain = new.new_zeros(())
    for p, c, adv in zip(prompts, completions, [0.5, -0.5], strict=True):
        lp = torch.log_softmax(model(torch.tensor([p + c])).logits[0] / temperature, -1)
        for k, tok in enumerate(c):
            plain = plain - adv * lp[len(p) - 1 + k, tok] / 4.0
    expected = torch.autograd.grad(plain, list(model.parameters()))
    # Relative to each parameter's largest gradient; 1e-5 leaves room for the float32 the
    # sampling logprobs travel in (measured: 4.8e-7).
    worst = max(
        float((a - e).abs().max() / e.abs().max().clamp(min=1e-30)) for a, e in zip(ours, expected, strict=True)
    )
    assert worst < 1e-5


def test_a_micro_batch_within_one_chunk_is_the_chunked_head_without_the_recompute(tiny_model: Path) -> None:
    """Positions <= chunk_tokens: the LM head runs once, not under checkpointing; the
    logprobs, entropies and every gradient are those of the chunked, recomputed head."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(tiny_model), dtype=torch.float32)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(3, int(model.config.vocab_size), (3, 12), generator=gen)  # [N, L]
    attn = torch.ones_like(ids)
    attn[2, 9:] = 0  # a padded row
    temp = torch.tensor([0.8, 1.0, 0.7])
    weights = torch.randn(3, 11, generator=gen)  # [N, T] a loss that reaches every position

    def run(chunk: int) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
        model.zero_grad(set_to_none=True)
        lp, entropy = token_logprobs(model, ids, attn, temp, with_entropy=True, chunk_tokens=chunk)
        assert entropy is not None
        ((lp + 0.1 * entropy) * weights).sum().backward()
        return lp.detach(), entropy.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None]

    whole, chunked = run(3 * 11), run(5)  # 33 positions: one chunk; 5 a chunk: seven, recomputed
    torch.testing.assert_close(whole[0], chunked[0], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(whole[1], chunked[1], rtol=1e-6, atol=1e-6)
    assert len(whole[2]) == len(chunked[2]) > 0
    for a, b in zip(whole[2], chunked[2], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
