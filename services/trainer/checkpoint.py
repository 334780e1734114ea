"""Checkpoints: the model directory an engine loads, and apart from it what a resume needs.

    <checkpoint_dir>/weights/step-000012/      every step: what the engine loads, nothing else
    <checkpoint_dir>/weights/step-000012@3/    (the same in lineage 3; the name is the version's)
        config.json (dtype: the serving dtype), generation_config.json, tokenizer files,
        model-00001-of-0000N.safetensors, model.safetensors.index.json

    <checkpoint_dir>/step-000010/              every ``save_every`` steps: the resume state
        config.json, tokenizer files           the architecture
        dcp/                                   master weights (float32) and AdamW state, a
                                               torch.distributed.checkpoint written by every
                                               rank (policy.py); loads at any world size
        rng.safetensors                        torch's RNG (rank 0's)
        trainer_state.json                     step, lineage, ids of the groups trained (the
                                               ledger), LR schedule, Python's RNG, run format
        run_record.json                        resolved config, git commit, packages, seeds

    <checkpoint_dir>/dropped.jsonl             groups dropped untrained, fsynced before ack

The engine's directory is a model-only Hugging Face directory in the serving dtype, its
weights always sharded behind ``model.safetensors.index.json``: SGLang's loader reads every
``*.safetensors`` of a directory that has no index, so nothing else may be in it (the resume
state is never there). Both are written to a temporary directory and renamed into place, so
a directory with a final name is always complete. No pickle: tensors are safetensors or
DCP's own files, the rest JSON. A resume state of another run format (an older pope-rl) is refused, naming it.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import platform
import random
import re
import shutil
import subprocess
import sys
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from services.common.messages import RUN_FORMAT, Lineage
from services.common.rng import restore_rng_state, rng_state_json

log = logging.getLogger(__name__)

STATE_FILE = "trainer_state.json"
WEIGHTS = "weights"
INDEX = "model.safetensors.index.json"
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
    lineage: dict[str, Any] = field(default_factory=lambda: Lineage().model_dump(mode="json"))
    """The history these weights belong to (services.common.messages.Lineage, as JSON)."""

    @property
    def history(self) -> Lineage:
        return Lineage.model_validate(self.lineage)

    def advanced(self, group_ids: list[str], lr_scheduler: dict[str, Any]) -> TrainerState:
        """The state after one more step, which trained ``group_ids``."""
        return TrainerState(
            step=self.step + 1,
            trained_group_ids=self.trained_group_ids + group_ids,
            lr_scheduler=lr_scheduler,
            lineage=self.lineage,
        )


def step_dir(root: Path, step: int) -> Path:
    return root / f"step-{step:06d}"


def latest(root: Path) -> Path | None:
    """The newest complete resume state under ``root``, or None. A state being replaced
    under its own name (``_rename_durably``) that a crash caught between its two renames is
    found under its aside name."""
    if not root.is_dir():
        return None
    done = {p.name: p for p in root.glob("step-*") if (p / STATE_FILE).is_file()}
    for aside in root.glob(f"{_ASIDE}step-*"):
        if (aside / STATE_FILE).is_file():
            done.setdefault(aside.name.removeprefix(_ASIDE), aside)
    return done[max(done)] if done else None


def begin_resume(root: Path, step: int) -> Path:
    """An empty temporary directory for the resume state of ``step``: every rank writes its
    shard of the policy there (``policy.save_resume``), then ``finish_resume``."""
    return _fresh_tmp(root, step_dir(root, step))


def finish_resume(
    tmp: Path, root: Path, model: Any, tokenizer: Any, state: TrainerState, run_record: dict[str, Any], keep: int
) -> Path:
    """Complete the resume state in ``tmp`` (the policy's shards already there) with the
    architecture, RNG, trainer state and run record, and put it in place durably (fsynced
    before its name says complete); then delete all but the newest ``keep``."""
    final = step_dir(root, state.step)
    model.config.save_pretrained(tmp)
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    save_file({"torch": torch.get_rng_state()}, str(tmp / "rng.safetensors"))
    state.python_rng = rng_state_json(random)
    state.trained_group_ids = state.trained_group_ids[-MAX_REMEMBERED_IDS:]
    (tmp / "run_record.json").write_text(json.dumps(run_record, indent=2, default=str))
    (tmp / STATE_FILE).write_text(json.dumps(asdict(state)))  # last: marks the directory complete
    _rename_durably(tmp, final)
    for aside in root.glob(f"{_ASIDE}step-*"):  # a crash's leftover, its state in place again
        if (root / aside.name.removeprefix(_ASIDE) / STATE_FILE).is_file():
            shutil.rmtree(aside, ignore_errors=True)
    older = sorted(p for p in root.glob("step-*") if p != final)
    for old in older[: max(0, len(older) - (keep - 1))]:  # the newest ``keep``, this one included
        shutil.rmtree(old, ignore_errors=True)
    return final


def latest_weights(root: Path) -> Path | None:
    """The engine directory of the newest resume state's version (what a model trained to
    that point is served from), or None."""
    newest = latest(root)
    if newest is None:
        return None
    state = load_state(newest)
    return weights_versions(root).get((state.step, state.history.id))


def weights_dir(root: Path, step: int, lineage: int = 0) -> Path:
    """The engine-facing directory of (``step``, ``lineage``): named as the version is."""
    return root / WEIGHTS / (f"step-{step:06d}" + (f"@{lineage}" if lineage else ""))


_WEIGHTS_NAME = re.compile(r"step-(\d+)(?:@(\d+))?")


def weights_versions(root: Path) -> dict[tuple[int, int], Path]:
    """Every complete engine-facing directory under ``root``: (step, lineage) -> its path."""
    found: dict[tuple[int, int], Path] = {}
    for path in (root / WEIGHTS).glob("step-*") if (root / WEIGHTS).is_dir() else []:
        match = _WEIGHTS_NAME.fullmatch(path.name)
        if match and (path / INDEX).is_file():
            found[int(match[1]), int(match[2] or 0)] = path
    return found


def save_weights(
    root: Path,
    model: Any,
    tokenizer: Any,
    step: int,
    lineage: int,
    dtype: torch.dtype,
    shard_bytes: int,
    tensors: Iterator[tuple[str, torch.Tensor]] | None = None,
) -> Path:
    """Write the engine's model directory of (``step``, ``lineage``): config (its dtype the
    serving ``dtype``), generation config, tokenizer, and the weights cast to ``dtype`` in
    shards of at most ``shard_bytes`` behind an index. Tied weights are written once (the
    first name), as transformers and SGLang expect. ``tensors``: the weights by name in
    ``model.state_dict()``'s order, tied ones once, already full and cast (a sharded
    policy's, ``policy.engine_tensors``); by default ``model``'s own. Returns the directory."""
    final = weights_dir(root, step, lineage)
    tmp = _fresh_tmp(final.parent, final)
    state = model.state_dict()
    tied = tied_names(model)
    names = [n for n in state if n not in tied]
    shards = _shards({n: state[n] for n in names}, dtype, shard_bytes)
    stream = tensors if tensors is not None else ((n, cast(state[n], dtype)) for n in names)
    weight_map: dict[str, str] = {}
    total = 0
    for i, wanted in enumerate(shards, 1):
        file = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        shard = {}
        for name in wanted:
            got, tensor = next(stream)
            if got != name:
                raise RuntimeError(f"weights out of order: {got!r} where {name!r} was expected")
            shard[name] = tensor
        total += sum(t.numel() * t.element_size() for t in shard.values())
        save_file(shard, str(tmp / file), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(wanted, file))
        del shard
    (tmp / INDEX).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    config = copy.deepcopy(model.config)
    config.dtype = dtype
    config.save_pretrained(tmp)
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    _rename_durably(tmp, final)
    return final


def prune_weights(root: Path, keep: int, protect: Iterable[Path]) -> list[Path]:
    """Delete engine directories but the newest ``keep`` (by lineage, then step) and those
    in ``protect`` (the one being served, the one being loaded); returns what it deleted."""
    kept = set(protect)
    found = sorted(weights_versions(root).items(), key=lambda kv: (kv[0][1], kv[0][0]))
    gone = [path for _, path in found[: max(0, len(found) - keep)] if path not in kept]
    for path in gone:
        shutil.rmtree(path, ignore_errors=True)
    return gone


def tied_names(model: Any) -> set[str]:
    """Names of parameters that are another's (tied embeddings): the second name and on.
    By identity, which a sharded model keeps (its gathered copies share no storage)."""
    seen: set[int] = set()
    tied = set()
    for name, param in model.named_parameters(remove_duplicate=False):
        if id(param) in seen:
            tied.add(name)
        seen.add(id(param))
    return tied


def cast(tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A CPU copy of ``tensor`` in ``dtype`` (integer tensors keep theirs), contiguous."""
    t = tensor.detach()
    return (t.to("cpu", dtype) if t.is_floating_point() else t.to("cpu")).contiguous()


def _shards(tensors: dict[str, torch.Tensor], dtype: torch.dtype, limit: int) -> list[list[str]]:
    """Names grouped, in order, into shards of at most ``limit`` bytes in ``dtype`` (a
    tensor larger than that is a shard of its own)."""
    shards: list[list[str]] = [[]]
    size = 0
    for name, tensor in tensors.items():
        nbytes = tensor.numel() * (dtype.itemsize if tensor.is_floating_point() else tensor.element_size())
        if shards[-1] and size + nbytes > limit:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    return shards


_ASIDE = ".old-"


def _fresh_tmp(parent: Path, final: Path) -> Path:
    """An empty temporary directory for ``final``. Any other ``.tmp-*`` there is a crashed
    writer's (one trainer writes a checkpoint directory, one thing at a time) and is
    removed: pids repeat across container restarts, so they cannot tell whose it was."""
    parent.mkdir(parents=True, exist_ok=True)
    for leftover in parent.glob(".tmp-*"):
        shutil.rmtree(leftover, ignore_errors=True)
    tmp = parent / f".tmp-{final.name}-{os.getpid()}"
    tmp.mkdir()
    return tmp


def _rename_durably(tmp: Path, final: Path) -> None:
    """Contents fsynced, then ``tmp`` renamed to ``final`` and the parent fsynced. A
    ``final`` that exists is renamed aside first and deleted only once ``tmp`` holds its
    name, so a crash in between leaves the old one (``latest`` finds it aside), never none."""
    for f in sorted(tmp.rglob("*"), key=lambda p: -len(p.parts)):  # files, then the directories holding them
        _fsync_dir(f) if f.is_dir() else _fsync_file(f)
    _fsync_dir(tmp)
    aside = final.parent / f"{_ASIDE}{final.name}"
    if final.exists():
        shutil.rmtree(aside, ignore_errors=True)
        final.rename(aside)
        _fsync_dir(final.parent)
    tmp.rename(final)
    _fsync_dir(final.parent)
    shutil.rmtree(aside, ignore_errors=True)


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
