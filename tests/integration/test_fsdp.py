"""The trainer at two ranks (torchrun, gloo, FSDP2 on CPU) against one process, through
``pope trainer replay`` on the same recorded groups: the same loss, gradient norm, updated
weights and AdamW state within float tolerance, for every GRPO option; and resume states
that move between world sizes (saved at 2, resumed at 1 and at 2; saved at 1, resumed at 2)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from services.trainer import checkpoint, policy, replay
from services.trainer.operations import Ranks
from services.trainer.service import ARGV_VARIABLE, torchrun_command
from services.trainer.settings import TrainerSettings
from services.trainer.world import World
from tests.factories import recorded_steps

STEPS = 4
# Every GRPO option and layout of the trainer, in four runs (each run is two torchrun starts).
OPTIONS: dict[str, dict[str, Any]] = {
    "token_mean+kl+entropy+tis+packed": {
        "loss_agg": "token_mean",
        "kl_coef": 0.05,
        "kl_estimator": "k2",
        "entropy_coef": 0.01,
        "tis_cap": 2.0,
        "clip_eps_high": 0.28,
        "scale_adv_by_std": True,
        "mask_truncated": True,
        "pack_sequences": True,
        "micro_batch_tokens": 120,
    },
    "dr_grpo+filter+weights+shared+checkpointing": {
        "loss_agg": "dr_grpo",
        "share_prompts": True,
        "filter_zero_variance": True,
        "variant_weights": {"hinted": 0.5, "unhinted": 1.0},
        "layer_checkpointing": True,
        "lr_schedule": "cosine",
        "warmup_steps": 1,
        "total_steps": 4,
        "micro_batch_tokens": 90,
    },
    "seq_mean+padded": {"loss_agg": "seq_mean", "share_prompts": False, "micro_batch_tokens": 90},
    "seq_mean+shared": {"loss_agg": "seq_mean", "share_prompts": True, "micro_batch_tokens": 90},
}
COMMON: dict[str, Any] = {"prompts_per_step": 6, "group_size": 4, "max_new_tokens": 30, "learning_rate": 1e-3}


def _flags(options: dict[str, Any]) -> list[str]:
    out = []
    for key, value in options.items():
        text = json.dumps(value) if isinstance(value, dict | bool) else str(value)
        out += [f"--{key.replace('_', '-')}", text.lower() if isinstance(value, bool) else text]
    return out


def replay_at(
    nproc: int, groups: Path, run: Path, model: Path, options: dict[str, Any], max_steps: int, torchrun: bool = False
) -> None:
    """``pope trainer replay`` at ``nproc`` ranks into ``run`` (checkpoints and metrics);
    ``torchrun``: under torchrun even at one rank (FSDP2 at world size 1)."""
    pope = str(Path(sys.executable).parent / "pope")
    args = ["trainer", "replay", "--groups", str(groups), "--model", str(model)]
    args += ["--checkpoint-dir", str(run / "ck"), "--metrics-log", str(run / "metrics.jsonl")]
    args += ["--max-steps", str(max_steps), "--save-every", "2"]
    args += _flags({**COMMON, **options})
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if torchrun:
        command = torchrun_command(nproc, 3.0)
        env[ARGV_VARIABLE] = json.dumps(args)
    else:
        command = [pope, *args, "--nproc", str(nproc)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]
    sharded = nproc > 1 or torchrun
    assert (f"FSDP2 over {nproc} ranks" if sharded else "(one process)") in done.stderr


def metrics(run: Path) -> dict[int, dict[str, Any]]:
    return {row["step"]: row for row in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())}


def engine_weights(run: Path, step: int) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for shard in (run / "ck" / "weights" / f"step-{step:06d}").glob("*.safetensors"):
        tensors.update(load_file(str(shard)))
    return tensors


def resume_state(run: Path, step: int, model: Path) -> dict[str, torch.Tensor]:
    """The resume state of ``step`` loaded in one process: master weights and AdamW moments by name."""
    settings = TrainerSettings(model_path=str(model), checkpoint_dir=run / "ck")
    p = policy.build(settings, World(), checkpoint.step_dir(run / "ck", step))
    out = {f"w.{n}": t.detach().clone() for n, t in p.lm.state_dict().items()}
    names = {id(param): n for n, param in p.lm.named_parameters()}
    for param, moments in p.optimizer.state.items():
        for key, value in moments.items():
            out[f"{key}.{names[id(param)]}"] = value.detach().clone()
    return out


def assert_close(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], atol: float) -> None:
    assert a.keys() == b.keys()
    worst = max(float((a[k].double() - b[k].double()).abs().max()) for k in a)
    assert worst <= atol, worst


def assert_same_steps(one: Path, two: Path, steps: range) -> None:
    m1, m2 = metrics(one), metrics(two)
    for step in steps:
        for key in ("loss", "grad_norm", "lr", "tokens", "clip_frac", "kl_ref_mean", "entropy_mean", "ratio_max"):
            assert m2[step][key] == pytest.approx(m1[step][key], rel=1e-4, abs=1e-6), (step, key)
        assert m2[step]["groups_filtered_zero_variance"] == m1[step]["groups_filtered_zero_variance"]


@pytest.fixture(scope="module")
def groups(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return recorded_steps(tmp_path_factory.mktemp("groups") / "groups.jsonl", STEPS, COMMON["prompts_per_step"])


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path, groups: Path) -> dict[tuple[str, int], Path]:
    """Every option set replayed at 1 and at 2 ranks, all STEPS steps (resume states at 2 and 4)."""
    root = tmp_path_factory.mktemp("runs")
    out = {}
    for i, (name, options) in enumerate(OPTIONS.items()):
        for nproc in (1, 2):
            out[name, nproc] = root / f"{i}-{nproc}"
            replay_at(nproc, groups, out[name, nproc], tiny_model, options, STEPS)
    return out


@pytest.mark.parametrize("name", list(OPTIONS))
def test_two_ranks_train_as_one_process(runs: dict[tuple[str, int], Path], tiny_model: Path, name: str) -> None:
    one, two = runs[name, 1], runs[name, 2]
    assert sorted(metrics(one)) == list(range(1, STEPS + 1))
    assert all(metrics(one)[s]["grad_norm"] > 0.01 for s in metrics(one))  # the steps move the weights
    assert_same_steps(one, two, range(1, STEPS + 1))
    # The engine directories: the same names, shards and index, the same weights.
    w1, w2 = engine_weights(one, STEPS), engine_weights(two, STEPS)
    assert_close(w1, w2, atol=2e-5)
    assert max(float((w1[k] - engine_weights(one, STEPS - 1)[k]).abs().max()) for k in w1) > 1e-4  # moved
    index = "model.safetensors.index.json"
    assert json.loads((one / "ck/weights/step-000004" / index).read_text()) == json.loads(
        (two / "ck/weights/step-000004" / index).read_text()
    )
    assert_close(resume_state(one, STEPS, tiny_model), resume_state(two, STEPS, tiny_model), atol=2e-5)


def test_resume_states_move_between_world_sizes(
    runs: dict[tuple[str, int], Path], tmp_path: Path, tiny_model: Path, groups: Path
) -> None:
    name = "token_mean+kl+entropy+tis+packed"
    options, straight, two = OPTIONS[name], runs[name, 1], runs[name, 2]
    # Step 2's resume state, saved at 2 ranks, read at 1: the state saved at 1.
    assert_close(resume_state(two, 2, tiny_model), resume_state(straight, 2, tiny_model), atol=1e-5)
    # Saved at 2, resumed at 1 and at 2; saved at 1, resumed at 2: all reach step 4 as the straight run.
    two_then_one, two_then_two, one_then_two = tmp_path / "2-1", tmp_path / "2-2", tmp_path / "1-2"
    for source, run in ((two, two_then_one), (two, two_then_two), (straight, one_then_two)):
        shutil.copytree(source, run)
        shutil.rmtree(run / "ck" / "step-000004")  # as if the run had stopped at step 2
        (run / "metrics.jsonl").write_text("\n".join((run / "metrics.jsonl").read_text().splitlines()[:2]) + "\n")
    _replay_in_process(groups, two_then_one, tiny_model, options)
    replay_at(2, groups, two_then_two, tiny_model, options, STEPS)
    replay_at(2, groups, one_then_two, tiny_model, options, STEPS)
    final = resume_state(straight, STEPS, tiny_model)
    for run in (two_then_one, two_then_two, one_then_two):
        assert_same_steps(straight, run, range(3, STEPS + 1))
        assert_close(resume_state(run, STEPS, tiny_model), final, atol=2e-5)
        assert_close(engine_weights(run, STEPS), engine_weights(straight, STEPS), atol=2e-5)


def _replay_in_process(groups: Path, run: Path, model: Path, options: dict[str, Any]) -> None:
    """What ``pope trainer replay`` does at one rank, here (no interpreter start)."""
    settings = TrainerSettings(
        model_path=str(model),
        checkpoint_dir=run / "ck",
        metrics_log=run / "metrics.jsonl",
        save_every=2,
        max_steps=STEPS,
        **COMMON,
        **options,
    )
    ranks = Ranks(policy.build(settings, World(), checkpoint.latest(run / "ck")))
    assert replay.replay(ranks, groups) == STEPS - 2
