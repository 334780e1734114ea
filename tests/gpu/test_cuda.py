"""The CUDA paths of the engine and the trainer (skipped where no GPU is present).

CI has no GPU, so these run only on a GPU machine: ``.venv/bin/python -m pytest tests/gpu``.
They check that the same code runs on CUDA and agrees with the CPU: a trainer step on CUDA
in float32 equals the CPU step; with bf16 autocast it stays close and keeps float32
weights; the engine serves on CUDA with logprobs the trainer reproduces (ratio 1); and the
whole pipeline (`pope up`) trains with engine and trainer both on the GPU; pretraining
runs on CUDA; the engine's model directory a CUDA trainer writes loads in bf16 on the GPU.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import torch

from services.common.engine_client import EngineClient
from services.common.keys import Keys
from services.trainer.batch import collate, rows_from_groups
from services.trainer.grpo import token_logprobs
from services.trainer.policy import Logprobs
from services.trainer.settings import TrainerSettings
from services.trainer.step import lr_lambda, train_step
from tests.conftest import running_engine, running_pope
from tests.e2e.test_pope_up import run_pope_up
from tests.integration.test_trainer import sample_groups

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _load(path: Path, device: str) -> Any:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).to(device)


def _step(model: Any, groups: Any, device: str, bf16: bool) -> dict[str, float]:
    """One train_step with plain SGD at rate 1, so each weight moves by exactly its clipped
    gradient (AdamW's first step is ~lr * sign(grad), which amplifies float noise in
    near-zero gradients and would hide what is compared)."""
    cfg = TrainerSettings(
        device=device,
        bf16=bf16,
        prompts_per_step=2,
        group_size=4,
        learning_rate=1.0,
        micro_batch_tokens=24,
        max_new_tokens=12,
    )
    opt = torch.optim.SGD(model.parameters(), lr=cfg.learning_rate)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg))
    return train_step(Logprobs(model), None, opt, sched, groups, cfg, pad_id=0, version=0)


async def test_the_engine_serves_on_cuda_and_the_trainer_reproduces_its_logprobs(tiny_model: Path) -> None:
    cuda_env = {"POPE_ENGINE__DEVICE": "cuda"}
    with running_pope(["engine", "--model", str(tiny_model)], "/health", env=cuda_env) as engine_proc:
        async with EngineClient(engine_proc.url) as engine:
            assert await engine.weight_version() == 0
            groups = await sample_groups(engine, 1, [[1, 0, 0, 1], [0, 0, 1, 0]])
            await engine.update_weights_from_disk(str(tiny_model), 7)
            assert await engine.weight_version() == 7
            assert all(s.weight_version == 0 for g in groups for s in g.samples)
    rows = rows_from_groups(groups, scale_by_std=False, mask_truncated=False, variant_weights={})
    b = collate(rows, pad_id=0)
    mask = b.loss_mask > 0
    assert mask.sum() > 0
    # The trainer's logprobs of the CUDA engine's samples, on CUDA and on the CPU: ratio 1.
    for device in ("cuda", "cpu"):
        model = _load(tiny_model, device).eval()
        with torch.no_grad():
            new, _ = token_logprobs(
                model, b.input_ids.to(device), b.attention_mask.to(device), b.temperature.to(device)
            )
        gap = float((new.cpu() - b.old_logprobs)[mask].abs().max())  # max |log ratio| over tokens
        assert gap < 1e-3, (device, gap)


async def test_a_cuda_train_step_equals_the_cpu_step_and_bf16_stays_close(tiny_model: Path) -> None:
    with running_engine(tiny_model) as url:
        async with EngineClient(url) as engine:
            groups = await sample_groups(engine, 3, [[1, 0, 0, 1], [0, 1, 1, 0]])
    base = _load(tiny_model, "cpu")
    cpu, gpu, half = copy.deepcopy(base), copy.deepcopy(base).cuda(), copy.deepcopy(base).cuda()
    s_cpu = _step(cpu, groups, "cpu", bf16=False)
    s_gpu = _step(gpu, groups, "cuda", bf16=False)
    s_half = _step(half, groups, "cuda", bf16=True)
    assert s_gpu["loss"] == pytest.approx(s_cpu["loss"], rel=1e-4, abs=1e-6)
    assert s_gpu["grad_norm"] == pytest.approx(s_cpu["grad_norm"], rel=1e-3)
    with torch.no_grad():  # the update (= clipped gradient) of every weight, CUDA against CPU
        for p_cpu, p_gpu, p0 in zip(cpu.parameters(), gpu.parameters(), base.parameters(), strict=True):
            d_cpu, d_gpu = p_cpu - p0, p_gpu.cpu() - p0
            assert torch.allclose(d_gpu, d_cpu, rtol=1e-3, atol=1e-3 * float(d_cpu.abs().max()) + 1e-7)
    # bf16 autocast: close, not equal; the weights and optimizer stay float32.
    assert s_half["loss"] == pytest.approx(s_cpu["loss"], rel=5e-2, abs=1e-3)
    assert s_half["grad_norm"] == pytest.approx(s_cpu["grad_norm"], rel=5e-2)
    assert all(p.dtype is torch.float32 for p in half.parameters())
    moved = max(
        float((a.detach() - b.detach().cuda()).abs().max())
        for a, b in zip(half.parameters(), base.parameters(), strict=True)
    )
    assert moved > 0


def test_pope_up_trains_with_engine_and_trainer_on_cuda(
    tiny_model: Path, tmp_path: Path, redis_url: str, keys: Keys
) -> None:
    metrics = run_pope_up(
        tiny_model,
        tmp_path,
        redis_url,
        keys,
        engine={"device": "cuda", "dtype": "bfloat16"},
        trainer={"device": "cuda", "bf16": True},
    )
    first = metrics[0]
    # bf16 engine against a bf16-autocast trainer: near ratio 1, not exactly.
    assert abs(first["ratio_mean"] - 1.0) < 0.05, first
    assert first["tokens"] > 0


def test_pretraining_runs_on_cuda(tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    from experiments.pretrain import pretrain

    result = pretrain(tmp_path / "base", steps=3, batch=4, report_problems=4, device="cuda")
    assert result["device"] == "cuda" and set(result["accuracy"]) >= {"easy_unhinted", "hard_unhinted"}
    model = AutoModelForCausalLM.from_pretrained(str(tmp_path / "base"))  # saved from the CPU: loads anywhere
    assert next(model.parameters()).device.type == "cpu"


def test_the_engine_directory_loads_in_bf16_on_cuda(tiny_model: Path, tmp_path: Path) -> None:
    """What a trainer on CUDA writes for the engine (serving dtype "auto": bf16) is a model
    directory transformers loads in bf16 on the GPU, with logits close to the float32
    master weights'."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from services.trainer import checkpoint

    master = _load(tiny_model, "cuda")
    tokenizer = AutoTokenizer.from_pretrained(str(tiny_model))
    path = checkpoint.save_weights(tmp_path, master, tokenizer, 1, 0, torch.bfloat16, 64 << 10)
    served = AutoModelForCausalLM.from_pretrained(str(path), dtype="auto").to("cuda")
    assert served.dtype == torch.bfloat16 and (path / checkpoint.INDEX).is_file()
    ids = torch.tensor([[1, 5, 9, 3, 7]], device="cuda")
    with torch.no_grad():
        want, got = master(ids).logits, served(ids).logits.float()
    assert torch.allclose(want, got, atol=0.15), (want - got).abs().max()
