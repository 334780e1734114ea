"""The trainer's FSDP2 path on CUDA (skipped where no GPU is present): ``pope trainer
replay`` under torchrun at one rank with bf16 mixed precision, with and without CPU
offload, against one process with bf16 autocast on the same recorded groups. Mixed
precision rounds differently from autocast, so the two agree to bf16 tolerance, not
float32's; the temperatures stay exact (the root's inputs are not cast), which keeps the
first step's importance ratios of on-policy-free random groups the same in both.

    .venv/bin/python -m pytest tests/gpu/test_fsdp_cuda.py
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.factories import recorded_steps
from tests.integration.test_fsdp import engine_weights, metrics, replay_at

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

CUDA = {"device": "cuda", "bf16": True, "loss_agg": "token_mean", "pack_sequences": True, "micro_batch_tokens": 120}


@pytest.mark.parametrize("offload", [False, True])
def test_fsdp2_bf16_on_one_gpu_trains_as_autocast_does(tmp_path: Path, tiny_model: Path, offload: bool) -> None:
    groups = recorded_steps(tmp_path / "groups.jsonl", steps=2, groups_per_step=6)
    plain, sharded = tmp_path / "plain", tmp_path / "sharded"
    replay_at(1, groups, plain, tiny_model, CUDA, 2)
    # (--nproc 1 is one process; torchrun at one rank is FSDP2: replay_at(2, ...) needs two GPUs)
    replay_at(1, groups, sharded, tiny_model, {**CUDA, "cpu_offload": offload}, 2, torchrun=True)
    for step in (1, 2):
        for key in ("loss", "grad_norm", "ratio_max", "tokens"):
            assert metrics(sharded)[step][key] == pytest.approx(metrics(plain)[step][key], rel=3e-2), (step, key)
    a, b = engine_weights(plain, 2), engine_weights(sharded, 2)
    assert a.keys() == b.keys() and all(t.dtype == torch.bfloat16 for t in b.values())
    worst = max(float((a[k].float() - b[k].float()).abs().max()) for k in a)
    assert worst < 2e-2, worst
