"""Checkpoints: HF-format safetensors the engine can load, plus what a resume needs.

    <checkpoint_dir>/step-000007/
        config.json, model.safetensors, tokenizer files   the engine loads this directory
        optimizer.safetensors + optimizer.json            AdamW moments and hyperparameters
        trainer_state.json                                step, ids of the groups trained,
                                                          the run format it was written in
        run_record.json                                   resolved config, git commit,
                                                          package versions, seeds

    <checkpoint_dir>/dropped.jsonl                        groups dropped untrained (stale,
                                                          aborted samples), fsynced before ack

A checkpoint is written to a temporary directory and renamed into place, so a directory
named step-N is always complete. No pickle: tensors are safetensors, the rest JSON. A
checkpoint of another run format (an older pope-rl) is refused with the format it has.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import random
import shutil
import subprocess
import sys
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from services.common.messages import RUN_FORMAT
from services.common.rng import restore_rng_state, rng_state_json

log = logging.getLogger(__name__)

STATE_FILE = "trainer_state.json"
# Group ids remembered across checkpoints, so redelivery after a crash is never retrained.
# Far more than can be in flight (prompts_per_step x a few steps); old ids age out.
MAX_REMEMBERED_IDS = 100_000


DROPPED_LOG = "dropped.jsonl"


class CheckpointError(RuntimeError):
    """A checkpoint this pope-rl cannot resume from (another format)."""


@dataclass
class TrainerState:
    step: int = 0
    format: int = RUN_FORMAT
    """The run format it was written in (services.common.messages.RUN_FORMAT)."""
    trained_group_ids: list[str] = field(default_factory=list)
    lr_scheduler: dict[str, Any] = field(default_factory=dict)
    python_rng: list[Any] = field(default_factory=list)  # random.getstate(), as JSON


def step_dir(root: Path, step: int) -> Path:
    return root / f"step-{step:06d}"


def latest(root: Path) -> Path | None:
    """The newest complete checkpoint under ``root``, or None."""
    done = [p for p in root.glob("step-*") if (p / STATE_FILE).is_file()] if root.is_dir() else []
    return max(done, key=lambda p: p.name) if done else None


def save(
    root: Path,
    model: Any,
    tokenizer: Any,
    optimizer: torch.optim.Optimizer,
    state: TrainerState,
    run_record: dict[str, Any],
    keep: int,
    protect: frozenset[Path] = frozenset(),
) -> Path:
    """Write checkpoint ``state.step``; then delete all but the newest ``keep``, never one in
    ``protect`` (the directory the engine was last told to load stays while it may read it)."""
    final = step_dir(root, state.step)
    tmp = root / f".tmp-{final.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    _save_optimizer(tmp, optimizer)
    save_file({"torch": torch.get_rng_state()}, str(tmp / "rng.safetensors"))
    state.python_rng = rng_state_json(random)
    state.trained_group_ids = state.trained_group_ids[-MAX_REMEMBERED_IDS:]
    (tmp / "run_record.json").write_text(json.dumps(run_record, indent=2, default=str))
    (tmp / STATE_FILE).write_text(json.dumps(asdict(state)))  # last: marks the directory complete
    for f in tmp.iterdir():  # contents durable before the name says "complete"
        _fsync_file(f)
    _fsync_dir(tmp)
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)
    _fsync_dir(root)
    if keep > 0:  # keep the newest ``keep`` checkpoints, this one included
        older = sorted(p for p in root.glob("step-*") if p != final)
        for old in older[: max(0, len(older) - (keep - 1))]:
            if old not in protect:
                shutil.rmtree(old, ignore_errors=True)
    return final


def load_state(path: Path) -> TrainerState:
    data = json.loads((path / STATE_FILE).read_text())
    if data.get("format", 1) != RUN_FORMAT:
        raise CheckpointError(
            f"{path} was written by another pope-rl (run format {data.get('format', 1)}; this one reads "
            f"{RUN_FORMAT}): resume it with the pope-rl that wrote it, or start a new run (pope up --fresh, "
            "or another trainer.checkpoint_dir)"
        )
    return TrainerState(**data)


def append_dropped(root: Path, rows: list[dict[str, Any]]) -> None:
    """Record groups dropped untrained (one JSON line each), durably: the caller acks them after."""
    root.mkdir(parents=True, exist_ok=True)
    path = root / DROPPED_LOG
    torn = path.exists() and path.stat().st_size > 0 and not path.read_bytes().endswith(b"\n")
    with path.open("ab") as f:  # a line torn by a crash is closed off, and read_dropped skips it
        f.write((b"\n" if torn else b"") + b"".join(json.dumps(r).encode() + b"\n" for r in rows))
        f.flush()
        os.fsync(f.fileno())


def read_dropped(root: Path) -> list[dict[str, Any]]:
    """The dropped-group records. A line torn by a crash mid-write is skipped: its groups
    were not acked, so they came back and were dropped (and recorded) again."""
    path = root / DROPPED_LOG
    if not path.exists():
        return []
    rows = []
    for line in path.read_bytes().split(b"\n"):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except ValueError:
            log.warning("%s: skipping a line torn by a crash: %r", path, line[:80])
    return rows


def restore_rng(path: Path, state: TrainerState) -> None:
    """Put torch's and Python's RNGs back where the checkpoint left them."""
    rng = path / "rng.safetensors"
    if rng.is_file():
        torch.set_rng_state(load_file(str(rng))["torch"])
    if state.python_rng:
        restore_rng_state(random, state.python_rng)


def _save_optimizer(path: Path, optimizer: torch.optim.Optimizer) -> None:
    sd = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    for pid, pstate in sd["state"].items():
        for name, value in pstate.items():
            t = value if isinstance(value, torch.Tensor) else torch.tensor(value)
            tensors[f"{pid}.{name}"] = t.detach().cpu().contiguous()
    save_file(tensors, str(path / "optimizer.safetensors"))
    (path / "optimizer.json").write_text(json.dumps({"param_groups": sd["param_groups"]}))


def load_optimizer(path: Path, optimizer: torch.optim.Optimizer) -> None:
    tensors = load_file(str(path / "optimizer.safetensors"))
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        pid, name = key.split(".", 1)
        state.setdefault(int(pid), {})[name] = value
    groups = json.loads((path / "optimizer.json").read_text())["param_groups"]
    optimizer.load_state_dict({"state": state, "param_groups": groups})


def _fsync_file(path: Path) -> None:
    with path.open("rb") as f:
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def run_record(config: dict[str, Any], seed: int) -> dict[str, Any]:
    """What reproduces this run: config, code version, package versions, seeds."""
    try:
        commit = (
            subprocess.run(
                ["git", "rev-parse", "HEAD"],
                capture_output=True,
                text=True,
                timeout=5,
                cwd=Path(__file__).resolve().parent,
            ).stdout.strip()
            or None
        )
    except (OSError, subprocess.SubprocessError):
        commit = None
    packages: dict[str, str | None] = {}
    for name in ("pope-rl", "torch", "transformers", "safetensors", "math-verify", "redis", "pydantic"):
        try:
            packages[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            packages[name] = None
    return {
        "created_at": datetime.now(UTC).isoformat(),
        "config": config,
        "git_commit": commit,
        "packages": packages,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "seeds": {"trainer": seed},
    }
