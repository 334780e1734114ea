"""A checkpoint of another run format is refused with the format it has, never half-read."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import pytest

from services.trainer import checkpoint


def test_a_checkpoint_from_before_run_format_2_is_refused_naming_its_format(tmp_path: Path) -> None:
    old = tmp_path / "step-000007"
    old.mkdir()
    # What an older pope-rl wrote: no format, and the rollout position it kept then.
    (old / checkpoint.STATE_FILE).write_text(json.dumps({"step": 7, "trained_group_ids": [], "rollout": {}}))
    with pytest.raises(checkpoint.CheckpointError, match=r"run format 1; this one reads 2"):
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
