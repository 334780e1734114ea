"""Our GRPO loss against TRL's own (trl is a test-only dependency), on the same batch, for
the options both have: aggregation (TRL "grpo" = our seq_mean, "bnpo" = token_mean,
"dr_grpo" = dr_grpo), asymmetric clipping, and the k3 KL to a reference.

TRL's loss lives in GRPOTrainer._compute_loss; building a whole trainer needs a dataset
and reward functions, so the test gives it the minimum state that method reads and
hands it our per-token logprobs. The arithmetic compared is TRL's, unchanged."""

from __future__ import annotations

import types
from collections import defaultdict
from typing import Any

import pytest
import torch

from services.trainer.grpo import LossConfig, normalizer, policy_loss

trl = pytest.importorskip("trl", reason="trl is installed with the test extras")

PAIRS = [("grpo", "seq_mean"), ("bnpo", "token_mean"), ("dr_grpo", "dr_grpo")]


def trl_loss(
    new_lp: torch.Tensor,
    old_lp: torch.Tensor,
    adv: torch.Tensor,
    mask: torch.Tensor,
    *,
    loss_type: str,
    eps_low: float,
    eps_high: float,
    beta: float,
    ref: torch.Tensor | None,
    max_len: int,
) -> Any:
    t: Any = trl.GRPOTrainer.__new__(trl.GRPOTrainer)
    t.model = torch.nn.Linear(1, 1).train()
    t.top_entropy_quantile, t.off_policy_mask_threshold, t.importance_sampling_level = 1.0, None, "token"
    t.beta, t.loss_type, t.epsilon_low, t.epsilon_high = beta, loss_type, eps_low, eps_high
    t.args = types.SimpleNamespace(delta=None, use_bias_correction_kl=False)
    t.use_vllm = t.vllm_importance_sampling_correction = t._entropy_bonus_enabled = t.aux_loss_enabled = False
    t.current_gradient_accumulation_steps, t.max_completion_length = 1, max_len
    t.accelerator = types.SimpleNamespace(gather=lambda x: x, reduce=lambda x, reduction="sum": x, num_processes=1)
    t._metrics = defaultdict(lambda: defaultdict(list))
    t._get_per_token_logps_and_entropies = lambda *a, **k: (new_lp, torch.zeros_like(new_lp), None)
    n, width = new_lp.shape
    inputs = {
        "prompt_ids": torch.zeros(n, 2, dtype=torch.long),
        "prompt_mask": torch.ones(n, 2, dtype=torch.long),
        "completion_ids": torch.zeros(n, width, dtype=torch.long),
        "completion_mask": mask.long(),
        "advantages": adv,
        "old_per_token_logps": old_lp,
    }
    if ref is not None:
        inputs["ref_per_token_logps"] = ref
    return t._compute_loss(None, inputs)


@pytest.mark.parametrize(("trl_type", "ours"), PAIRS)
@pytest.mark.parametrize("clip", [(0.2, 0.2), (0.2, 0.28)])
@pytest.mark.parametrize("beta", [0.0, 0.05])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_loss_and_gradient_match_trl(
    trl_type: str, ours: str, clip: tuple[float, float], beta: float, seed: int
) -> None:
    g = torch.Generator().manual_seed(seed)
    n, width = 6, 9
    old = -torch.rand(n, width, generator=g) * 3
    drift = old + torch.randn(n, width, generator=g) * 0.4
    ref = old + torch.randn(n, width, generator=g) * 0.2
    mask = torch.ones(n, width)
    for i in range(n):
        mask[i, 2 + int(torch.randint(0, width - 2, (1,), generator=g)) :] = 0  # ragged lengths, none empty
    adv = torch.randn(n, generator=g)

    theirs_new = drift.clone().requires_grad_()
    theirs = trl_loss(
        theirs_new,
        old,
        adv,
        mask,
        loss_type=trl_type,
        eps_low=clip[0],
        eps_high=clip[1],
        beta=beta,
        ref=ref if beta else None,
        max_len=width,
    )
    theirs.backward()

    mine_new = drift.clone().requires_grad_()
    cfg = LossConfig(agg=ours, clip_eps_low=clip[0], clip_eps_high=clip[1], kl_coef=beta)  # type: ignore[arg-type]
    norm = normalizer(
        ours,
        nominal_samples=n,
        max_response_tokens=width,
        step_tokens=int(mask.sum()),  # type: ignore[arg-type]
        step_sequences=n,
    )
    mine, _ = policy_loss(mine_new, old, adv, mask, cfg, norm, ref_lp=ref)
    mine.backward()

    assert float(mine.detach()) == pytest.approx(float(theirs.detach()), rel=1e-6, abs=1e-8)
    assert mine_new.grad is not None and theirs_new.grad is not None
    assert torch.allclose(mine_new.grad, theirs_new.grad, rtol=1e-5, atol=1e-8)
