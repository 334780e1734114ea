"""A checkpoint of another run format is refused with the format it has, never half-read."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

import pytest
import torch

from services.common.messages import Lineage, parse_version, version_name
from services.trainer import checkpoint
from services.trainer.operations import Ranks
from services.trainer.policy import Logprobs, Policy
from services.trainer.settings import TrainerSettings
from services.trainer.world import World


def test_a_checkpoint_from_before_run_format_2_is_refused_naming_its_format(tmp_path: Path) -> None:
    old = tmp_path / "step-000007"
    old.mkdir()
    # What an older pope-rl wrote: no format, and the rollout position it kept then.
    (old / checkpoint.STATE_FILE).write_text(json.dumps({"step": 7, "trained_group_ids": [], "rollout": {}}))
    with pytest.raises(checkpoint.CheckpointError, match=r"run format 1; this one reads 4"):
        checkpoint.load_state(old)
    new = tmp_path / "step-000008"
    new.mkdir()
    (new / checkpoint.STATE_FILE).write_text(json.dumps(asdict(checkpoint.TrainerState(step=8))))
    assert checkpoint.load_state(new).step == 8 and checkpoint.latest(tmp_path) == new


def test_the_drop_log_survives_a_line_torn_by_a_crash(tmp_path: Path) -> None:
    checkpoint.append_dropped(tmp_path, [{"group_id": "a", "reason": "stale"}])
    with (tmp_path / checkpoint.DROPPED_LOG).open("ab") as f:
        f.write(b'{"group_id": "b", "rea')  # the crash; "b" was never acked, so it comes back
    checkpoint.append_dropped(tmp_path, [{"group_id": "b", "reason": "stale"}])
    assert [r["group_id"] for r in checkpoint.read_dropped(tmp_path)] == ["a", "b"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from services.engine.tiny_model import build_tiny_model

    model_dir = build_tiny_model(tmp_path_factory.mktemp("m") / "m")
    return AutoModelForCausalLM.from_pretrained(str(model_dir)), AutoTokenizer.from_pretrained(str(model_dir))


def test_the_engine_directory_is_a_model_only_sharded_hf_directory(tmp_path: Path, tiny: tuple[Any, Any]) -> None:
    from transformers import AutoModelForCausalLM

    model, tok = tiny
    path = checkpoint.save_weights(tmp_path, model, tok, 12, 3, torch.bfloat16, shard_bytes=64 << 10)
    assert path == tmp_path / "weights" / "step-000012@3"
    names = sorted(p.name for p in path.iterdir())
    shards = [n for n in names if n.endswith(".safetensors")]
    assert len(shards) > 1 and all(n.startswith("model-") for n in shards)  # never an optimizer or RNG file
    assert not any(n.startswith(("optimizer", "rng", "trainer_state", "run_record")) for n in names)
    index = json.loads((path / checkpoint.INDEX).read_text())
    assert set(index["weight_map"].values()) == set(shards)
    assert json.loads((path / "config.json").read_text())["dtype"] == "bfloat16"
    loaded = AutoModelForCausalLM.from_pretrained(str(path))  # transformers reads it as written
    assert loaded.dtype == torch.bfloat16
    ids = torch.tensor([[1, 5, 9, 3]])
    with torch.no_grad():
        want, got = model(ids).logits, loaded.float()(ids).logits
    assert torch.allclose(want, got, atol=0.1) and not torch.equal(want, got)  # bf16: close, not equal
    if model.config.tie_word_embeddings:  # a tied tensor is written once
        assert "lm_head.weight" not in index["weight_map"]
    # float32 (the CPU engine's dtype): bit for bit, one shard behind the index all the same
    exact = checkpoint.save_weights(tmp_path, model, tok, 1, 0, torch.float32, shard_bytes=4 << 30)
    assert exact.name == "step-000001" and len(list(exact.glob("*.safetensors"))) == 1
    with torch.no_grad():
        assert torch.equal(AutoModelForCausalLM.from_pretrained(str(exact))(ids).logits, want)


def test_pruning_keeps_the_newest_and_never_one_in_use(tmp_path: Path, tiny: tuple[Any, Any]) -> None:
    model, tok = tiny
    made = {
        v: checkpoint.save_weights(tmp_path, model, tok, *v, torch.float32, 1 << 30)
        for v in [(1, 0), (2, 0), (3, 0), (2, 1)]
    }
    served = made[(1, 0)]
    gone = checkpoint.prune_weights(tmp_path, keep=2, protect={served})
    assert sorted(gone) == [made[(2, 0)]]  # (3, 0) and (2, 1) are newest; (1, 0) is being served
    assert set(checkpoint.weights_versions(tmp_path)) == {(1, 0), (3, 0), (2, 1)}


def _ranks(model: Any, tok: Any) -> Ranks:
    """One process's handle on ``model`` with a fresh AdamW, as the trainer holds it."""
    opt = torch.optim.AdamW(model.parameters())
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: 1.0)
    return Ranks(Policy(Logprobs(model), None, opt, sched, tok, TrainerSettings(), World()))


def test_resume_states_keep_the_newest(tmp_path: Path, tiny: tuple[Any, Any]) -> None:
    ranks = _ranks(*tiny)
    for step in (1, 2, 3):
        ranks.save_resume(tmp_path, checkpoint.TrainerState(step=step), {}, keep=2)
    assert sorted(p.name for p in tmp_path.glob("step-*")) == ["step-000002", "step-000003"]
    assert checkpoint.load_state(checkpoint.latest(tmp_path)).step == 3  # type: ignore[arg-type]


def test_a_lineage_holds_its_own_versions_and_its_ancestors_up_to_each_fork() -> None:
    first = Lineage()
    second = first.fork(1, at=10)  # lineage 0 went on past 10 and was lost
    third = second.fork(4, at=14)
    assert second.holds(10, 0) and not second.holds(11, 0) and second.holds(11, 1)
    assert third.holds(10, 0) and not third.holds(11, 0) and third.holds(14, 1) and not third.holds(15, 1)
    assert not third.holds(3, 2) and third.holds(15, 4) and third.forked_at == 14
    with pytest.raises(ValueError):
        third.fork(4, at=20)  # ids only grow
    assert [version_name(5), version_name(5, 2)] == ["5", "5@2"]
    assert parse_version("5@2") == (5, 2) and parse_version("7") == (7, 0) and parse_version(None) == (0, 0)
    with pytest.raises(ValueError):
        parse_version("v7")


def test_a_state_replaced_under_its_name_is_never_missing_and_leftovers_go(
    tmp_path: Path, tiny: tuple[Any, Any]
) -> None:
    ranks = _ranks(*tiny)
    first = ranks.save_resume(tmp_path, checkpoint.TrainerState(step=5), {}, keep=3)
    # A crash between the two renames of a replacement: the old one is aside, none in place.
    first.rename(tmp_path / ".old-step-000005")
    assert checkpoint.latest(tmp_path) == tmp_path / ".old-step-000005"
    (tmp_path / ".tmp-step-000009-1").mkdir()  # a crashed writer's (pid 1: any container's)
    again = ranks.save_resume(tmp_path, checkpoint.TrainerState(step=5, lineage={"id": 1}), {}, 3)
    assert checkpoint.latest(tmp_path) == again and checkpoint.load_state(again).history.id == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-000005"]  # no aside, no temporary


def test_a_resume_state_before_any_step_leaves_adam_unstepped(tmp_path: Path, tiny: tuple[Any, Any]) -> None:
    """Written before the first optimizer step (a stop that saves a new lineage at step 0):
    AdamW's state is left out, not made by stepping it at rate 0, and loads as none."""
    from services.trainer import policy

    model, tok = tiny
    ranks = _ranks(model, tok)
    path = ranks.save_resume(tmp_path, checkpoint.TrainerState(step=0), {}, keep=1)
    assert not ranks.policy.optimizer.state  # the live one is untouched
    generation = json.loads((path / "generation_config.json").read_text())
    (path / "generation_config.json").write_text(json.dumps({**generation, "temperature": 0.6}))
    loaded = policy.build(TrainerSettings(), World(), path)
    assert not loaded.optimizer.state and loaded.resumed is not None and loaded.resumed.step == 0
    pairs = zip(model.state_dict().values(), loaded.lm.state_dict().values(), strict=True)
    assert all(torch.equal(a, b) for a, b in pairs)
    assert loaded.lm.generation_config.temperature == 0.6  # the directory's, not one made from config.json
