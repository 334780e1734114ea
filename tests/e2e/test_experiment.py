"""`pope experiment pope-vs-grpo`'s machinery through the real services, on the tiny random
model (which solves nothing, so what is checked is the bookkeeping: frozen settings, the
hint search and base evaluation made once, one `pope up` per arm and seed with that arm's
problems and hinted share, finished runs skipped, an unfinished one resumed from its
checkpoint, changed settings refused, the table and the report written)."""

from __future__ import annotations

import io
import json
from collections.abc import Callable
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import pytest
import redis
import yaml

from experiments.experiment import experiment, read_jsonl, read_metrics, run_config, run_one
from experiments.spec import ARMS, Spec, spec_with
from services.common.keys import delete_prefix

SPEC = Spec(
    train_problems=4,
    eval_problems=4,
    steps=1,
    group_size=2,
    prompts_per_step=2,
    max_new_tokens=8,
    eval_k=2,
    hint_k=2,
    hint_k_hint=1,
)


def test_experiment_runs_arms_skips_finished_runs_resumes_and_refuses_changed_settings(
    tiny_model: Path, tmp_path: Path, redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("REDIS_URL", redis_url)
    exp, spec, out = tmp_path / "exp", spec_with(SPEC, tiny_model), io.StringIO()
    try:
        check_experiment(exp, spec, out, tiny_model)
    finally:
        delete_run_keys(redis_url, exp, spec, ["pope", "grpo_easy"])


def delete_run_keys(redis_url: str, exp: Path, spec: Spec, arms: list[str]) -> None:
    """The runs' Redis keys are their run directories' own (seed 0 here): delete them."""
    client = redis.Redis.from_url(redis_url)
    for arm in arms:
        prefix = run_config(spec, arm, 0, exp / "runs" / arm / "seed0")["shared"]["key_prefix"]
        delete_prefix(client, prefix)
    client.close()


def check_experiment(exp: Path, spec: Spec, out: io.StringIO, tiny_model: Path) -> None:
    html = experiment(exp, tiny_model, 1, ["pope", "grpo_easy"], spec, out)
    log = out.getvalue()

    # Prepared once: settings frozen, every hard problem searched by the base model, base evaluated.
    assert json.loads((exp / "experiment.json").read_text())["base_model_sha256"] == spec.base_model_sha256
    hard = read_jsonl(exp / "problems" / "hard_train.jsonl")
    assert len(hard) == 4 and all(p.search is not None and p.label is not None for p in hard)
    assert sum(json.loads((exp / "hints.json").read_text())["counts"].values()) == 4
    base = json.loads((exp / "base_eval.json").read_text())
    assert base["summary"]["unhinted"]["samples"] == 4 * 2 and base["summary"]["hinted"]["problems"] == 4
    # Arms differ only in problems and hinted share.
    assert len(read_jsonl(exp / "problems" / "grpo_easy.jsonl")) == 8
    assert all(p.hint is None for p in read_jsonl(exp / "problems" / "grpo_easy.jsonl"))
    for arm in ("pope", "grpo_easy"):
        run = exp / "runs" / arm / "seed0"
        config = yaml.safe_load((run / "config.yaml").read_text())
        assert config["rollout"]["hinted_fraction"] == ARMS[arm].hinted_fraction
        result = json.loads((run / "result.json").read_text())
        assert result["status"] == "done" and result["steps"] == 1
        assert result["rollouts"] >= spec.prompts_per_step * spec.group_size
        assert result["after"]["weight_versions"] == [0]  # a fresh engine on the checkpoint: one version
        assert [m["step"] for m in read_metrics(run)] == [1]
    table = (exp / "table.md").read_text()
    assert "| base |" in table and "| pope |" in table and "| grpo_easy |" in table
    assert html.exists() and (exp / "arms.png").read_bytes()[:4] == b"\x89PNG"
    assert "hint search over 4" in log

    # A second sitting with the same settings does nothing but the table.
    again = io.StringIO()
    experiment(exp, tiny_model, 1, ["pope", "grpo_easy"], spec, again)
    assert "starting" not in again.getvalue() and "evaluating" not in again.getvalue()

    # Changed settings are refused, not mixed in.
    with pytest.raises(SystemExit, match="steps: frozen 1, now 3"):
        experiment(exp, tiny_model, 1, ["pope"], replace(spec, steps=3), io.StringIO())

    # An unfinished run resumes from its newest checkpoint (here: asked for one step more).
    run = exp / "runs" / "pope" / "seed0"
    (run / "result.json").unlink()
    resumed = io.StringIO()
    result = run_one(exp, replace(spec, steps=2), tiny_model, "pope", 0, resumed)
    assert "resuming at step 1" in resumed.getvalue()
    assert result["steps"] == 2 and [m["step"] for m in read_metrics(run)] == [1, 2]
    sittings = [json.loads(line) for line in (run / "sittings.jsonl").read_text().splitlines()]
    assert [(s["from_step"], s["to_step"]) for s in sittings] == [(0, 1), (1, 2)]


def test_parallel_runs_go_on_past_a_failed_one_each_with_its_own_log(
    tiny_model: Path, tmp_path: Path, redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``parallel=2``: two runs at once in worker processes. The tiny model finds no hint,
    so hinted_only has nothing to train on and fails; pope finishes anyway, and the
    failure is reported at the end."""
    monkeypatch.setenv("REDIS_URL", redis_url)
    exp, spec, out = tmp_path / "exp", spec_with(SPEC, tiny_model), io.StringIO()
    try:
        with pytest.raises(SystemExit, match=r"hinted_only seed 0: .*no problems to train on"):
            experiment(exp, tiny_model, 1, ["pope", "hinted_only"], spec, out, parallel=2)
    finally:
        delete_run_keys(redis_url, exp, spec, ["pope"])
    log = out.getvalue()
    assert "2 runs, 2 at a time" in log and "pope seed 0 done" in log and "hinted_only seed 0 failed" in log
    run = exp / "runs" / "pope" / "seed0"
    assert json.loads((run / "result.json").read_text())["status"] == "done"
    assert [m["step"] for m in read_metrics(run)] == [1]
    # The run's own progress went to its log, not to the experiment's output.
    assert "pope seed 0: starting" in (run / "logs" / "experiment.log").read_text()
    assert "pope seed 0: starting" not in log
    assert not (exp / "runs" / "hinted_only" / "seed0" / "result.json").exists()


def test_sigterm_stops_the_experiment_cleanly(tiny_model: Path, tmp_path: Path, redis_url: str) -> None:
    """SIGTERM while the hint search runs: exit 130, the services it started are gone, and
    the search's Redis keys are deleted."""
    import os
    import subprocess
    import sys

    log = tmp_path / "exp.log"
    env = {**os.environ, "REDIS_URL": redis_url}
    with log.open("wb") as f:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "services.cli",
                "experiment",
                "pope-vs-grpo",
                "--seeds",
                "1",
                "--base-model",
                str(tiny_model),
                "--dir",
                str(tmp_path / "exp"),
                "--train-problems",
                "64",
            ],
            stdout=f,
            stderr=subprocess.STDOUT,
            env=env,
        )
    try:
        sigterm_when(proc, log, lambda: "hint search over 64 problems" in log.read_text())
    finally:
        if proc.poll() is None:
            proc.kill()
    text = log.read_text()
    assert "all processes stopped" in text and "interrupted" in text
    pids = [int(line.split("(pid ")[1].split(")")[0]) for line in text.splitlines() if "(pid " in line]
    assert pids
    for pid in pids:  # each started service has exited
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    client = redis.Redis.from_url(redis_url)
    assert not list(client.scan_iter(match=f"pope-exp-*-{proc.pid}:hints:*"))
    client.close()


def test_sigterm_during_parallel_runs_stops_them_and_starts_no_queued_one(
    tiny_model: Path, tmp_path: Path, redis_url: str
) -> None:
    """Three runs, two at a time, SIGTERM while the first two train: exit 130, both stop
    cleanly (their services gone, no result), and the third, queued, never starts (a
    worker whose run stopped used to take the next one, and the experiment went on)."""
    import os
    import subprocess
    import sys

    exp, log = tmp_path / "exp", tmp_path / "exp.log"
    spec = replace(spec_with(SPEC, tiny_model), steps=400)
    script = (
        "import sys\nfrom pathlib import Path\nfrom experiments.cli import _interruptible\n"
        "from experiments.experiment import experiment\nfrom experiments.spec import Spec\n"
        f"spec = Spec(**{asdict(spec)!r})\n"
        f"sys.exit(_interruptible(lambda: experiment(Path({str(exp)!r}), Path({str(tiny_model)!r}), 1, "
        "['pope', 'grpo', 'grpo_easy'], spec, parallel=2)))\n"
    )
    env = {**os.environ, "REDIS_URL": redis_url}
    with log.open("wb") as f:
        proc = subprocess.Popen([sys.executable, "-c", script], stdout=f, stderr=subprocess.STDOUT, env=env)
    first = [exp / "runs" / arm / "seed0" for arm in ("pope", "grpo")]
    try:
        sigterm_when(proc, log, lambda: all(run.exists() and read_metrics(run) for run in first))
    finally:
        if proc.poll() is None:
            proc.kill()
        delete_run_keys(redis_url, exp, spec, ["pope", "grpo"])
    assert "interrupted" in log.read_text()
    for run in first:
        run_log = (run / "logs" / "experiment.log").read_text()
        assert "all processes stopped" in run_log and not (run / "result.json").exists()
        assert 1 <= len(read_metrics(run)) < 400
        pids = [int(line.split("(pid ")[1].split(")")[0]) for line in run_log.splitlines() if "(pid " in line]
        assert pids
        for pid in pids:  # each service the run started has exited
            with pytest.raises(ProcessLookupError):
                os.kill(pid, 0)
    queued = exp / "runs" / "grpo_easy" / "seed0"
    assert not (queued / "metrics.jsonl").exists(), (queued / "logs" / "experiment.log").read_text()


def sigterm_when(proc: Any, log: Path, ready: Callable[[], bool]) -> None:
    """Wait (up to 240 s) until ``ready()``, then SIGTERM ``proc``, which must exit 130 (interrupted)
    within 120 s; its output so far is ``log``."""
    import signal
    import time

    deadline = time.monotonic() + 240
    while not ready():
        assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
        time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(120) == 130, log.read_text()[-3000:]
