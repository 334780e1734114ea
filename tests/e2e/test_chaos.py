"""The chaos run's short form (`python -m chaos --short`): the whole stack on its own AOF
Redis, one fault of each kind (kill -9 of the engine, a verifier, the trainer, the rollout
service and Redis; a SIGSTOP past the lease), then the checks: the engine serves the
trainer's last step, the last checkpoint loads, and the ledger built from the durable
records accounts for every planned group, none trained twice, none lost. Also with two
engines behind SGLang's router."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from chaos.schedule import KILLED, SHORT
from tests.conftest import ROOT


@pytest.mark.timeout(360)
@pytest.mark.parametrize("engines", [1, 2])
def test_short_chaos_run_loses_nothing_and_trains_nothing_twice(tmp_path: Path, engines: int) -> None:
    """With two engines behind SGLang's router, the engine fault kills one of them."""
    run_dir, log = tmp_path / "chaos", tmp_path / "chaos.out"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "chaos", "--short", "--seed", "0", "--dir", str(run_dir), "--engines", str(engines)],
            cwd=ROOT,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        code = proc.wait(300)
    except subprocess.TimeoutExpired:  # SIGTERM: the harness stops its stack (SIGKILL would not)
        proc.terminate()
        proc.wait(60)
        pytest.fail(f"the short chaos run did not end within 300s:\n{log.read_text()[-8000:]}")
    assert code == 0, log.read_text()[-8000:]
    summary = json.loads((run_dir / "chaos.json").read_text())
    kinds = summary["faults_by_kind"]
    assert {f"kill9-{s}" for s in KILLED} <= set(kinds), kinds
    assert any(k.startswith("sigstop-") for k in kinds), kinds
    assert sum(kinds.values()) >= SHORT.faults
    assert {c["name"] for c in summary["checks"] if c["ok"]} >= {"engine-version", "checkpoint-loads", "ledger"}
    assert summary["findings"] == []
    faults = [json.loads(line) for line in (run_dir / "faults.jsonl").read_text().splitlines()]
    assert len(faults) == SHORT.faults
    if engines > 1:  # one of the two, by the seed
        assert next(f["target"] for f in faults if f["kind"] == "kill9-engine") in ("engine-0", "engine-1")
