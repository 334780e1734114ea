"""``pope model pretrain``: from scratch, or on from an earlier base (its tokenizer and
weights), with the start recorded in the report."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from experiments.pretrain import pretrain, weights_sha256

POPE = str(Path(sys.executable).parent / "pope")


def test_pretraining_goes_on_from_a_given_model_and_records_it(tmp_path: Path) -> None:
    first = pretrain(tmp_path / "first", steps=2, batch=4, report_problems=2)
    assert first["start"] is None and first["lr"] == 1e-3
    start = tmp_path / "first"
    second = pretrain(tmp_path / "second", steps=2, batch=4, report_problems=2, lr=5e-4, start=start)
    assert second["start"] == {"path": str(start), "weights_sha256": first["weights_sha256"]}
    assert second["lr"] == 5e-4 and second["weights_sha256"] != first["weights_sha256"]
    assert (tmp_path / "second" / "tokenizer.json").read_text() == (start / "tokenizer.json").read_text()
    assert json.loads((tmp_path / "second" / "pretrain_report.json").read_text())["start"] == second["start"]
    assert weights_sha256(start) == first["weights_sha256"]  # the start is left as it was
    assert not (tmp_path / "second" / "README.md").exists()
    with pytest.raises(ValueError, match="new directory"):
        pretrain(start, steps=1, batch=2, report_problems=1, start=start)


def test_the_cli_refuses_a_start_that_is_not_a_model(tmp_path: Path) -> None:
    out = subprocess.run(
        [POPE, "model", "pretrain", "--out", str(tmp_path / "b"), "--from", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode != 0 and "not a model directory" in out.stderr
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text("{}")
    out = subprocess.run(
        [POPE, "model", "pretrain", "--out", str(tmp_path / "m"), "--from", str(tmp_path / "m")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode != 0 and "write the new model elsewhere" in out.stderr
    out = subprocess.run(
        [POPE, "model", "pretrain", "--out", str(tmp_path / "b"), "--lr", "0"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode != 0 and "--lr must be positive" in out.stderr
    assert not (tmp_path / "b").exists()
