"""The trainer's trackers without wandb running: the samples table's rows under a cap, and a
wandb that is asked for but not installed (tests/integration/test_wandb.py runs it offline)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from services.common.messages import Score, ScoredGroup, Variant
from services.trainer import service
from services.trainer.settings import TrainerSettings, WandbSettings
from services.trainer.tracking import SAMPLE_COLUMNS, sample_rows
from tests.factories import group


def test_a_capped_samples_table_shows_every_group_before_a_second_sample_of_any() -> None:
    groups = []
    for n, size in enumerate((3, 1, 2)):
        raw = group(f"g{n}", f"p{n}", Variant.UNHINTED, size=size, step=5)
        groups.append(ScoredGroup.from_raw(raw, [Score(reward=n / 2, extracted=str(j)) for j in range(size)]))
    rows = [dict(zip(SAMPLE_COLUMNS, row, strict=True)) for row in sample_rows(groups, 5)]
    # Round robin: g0 s0, g1 s0, g2 s0, g0 s1, g2 s1 (g0's third left out); listed group by group.
    assert [(r["problem_id"], r["extracted"]) for r in rows] == [
        ("p0", "0"),
        ("p0", "1"),
        ("p1", "0"),
        ("p2", "0"),
        ("p2", "1"),
    ]
    assert rows[2] == {
        "step": 5,
        "weight_version": 0,
        "problem_id": "p1",
        "variant": "unhinted",
        "prompt": "What is 2+2?",
        "hint": None,
        "completion": "the answer is \\boxed{4}",
        "extracted": "0",
        "reward": 0.5,
    }
    assert len(sample_rows(groups, 100)) == 6


def test_wandb_asked_for_but_not_installed_stops_the_trainer_at_start(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "config.json").write_text("{}")  # a model directory, as far as the start-up check looks
    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb raises ImportError
    cfg = TrainerSettings(model_path=str(tmp_path), checkpoint_dir=tmp_path / "ckpt", wandb=WandbSettings(project="p"))
    with pytest.raises(SystemExit, match=r"wandb is not installed: pip install 'pope-rl\[wandb\]'"):
        service.serve(cfg)


def test_a_steps_metrics_reach_prometheus_and_a_count_gone_from_a_step_reads_zero() -> None:
    from prometheus_client import REGISTRY

    from services.trainer.loop import export_step

    def value(metric: str, **labels: str) -> float | None:
        return REGISTRY.get_sample_value(metric, labels)

    first = {"hinted/reward_mean": 0.5, "staleness/0": 3.0, "staleness/1": 1.0, "time_push_s": 0.25, "loss": 0.1}
    seen = export_step(first, set())
    assert value("pope_trainer_step_metric", name="1", variant="staleness") == 1.0
    assert value("pope_trainer_step_time_seconds", part="push") == 0.25
    second = {"hinted/reward_mean": float("nan"), "staleness/0": 4.0, "time_push_s": 0.5}
    assert export_step(second, seen) == {("0", "staleness")}
    assert value("pope_trainer_step_metric", name="1", variant="staleness") == 0.0  # no group 1 behind now
    assert value("pope_trainer_step_metric", name="0", variant="staleness") == 4.0
    assert value("pope_trainer_step_metric", name="reward_mean", variant="hinted") == 0.5  # NaN: none, left
    assert value("pope_trainer_step_time_seconds", part="push") == 0.5
