"""A run's trained groups, recorded and trained again: ``pope trainer replay --groups FILE``.

    trainer.record_groups: runs/groups.jsonl     the trainer appends every step's groups
    pope trainer replay --groups runs/groups.jsonl --checkpoint-dir runs/replay [--nproc N]

One JSON line per group: ``{"step": N, "lineage": L, "index": i, "of": n, "group":
<ScoredGroup>}``, N the version that step made (its engine directory is
``weights/step-N``), i the group's place among the step's n. The rollout archive
cannot serve here: it keeps texts, not token ids and logprobs.

Replay trains those steps in order with no Redis and no engine, through the trainer's own
operations (operations.py) at any ``--nproc``, and writes the same checkpoints (the engine
directory every step, the resume state every ``save_every``) and the metrics log: for
debugging a run, reproducing a step, and checking world sizes against each other. It
starts after the newest resume state in ``checkpoint_dir``, so it resumes too. It trains in
one lineage, the resume state's: the steps of a run that forked a lineage are replayed
with the same weights under that one lineage's names.

A trainer that crashed retrains the steps after its last resume state, so a file can hold
step N twice: a step begun again (index 0 of a step already read) supersedes what was
read from that step on (``read``).
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

from services.common.config import resolved
from services.common.messages import ScoredGroup
from services.trainer import checkpoint
from services.trainer.operations import Ranks

log = logging.getLogger(__name__)


def record(path: Path, step: int, lineage: int, groups: list[ScoredGroup]) -> None:
    """Append the groups step ``step`` trained on, one line each (flushed, not fsynced: a
    debugging record, not a ledger)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("ab+") as f:  # did a crash cut the last line short?
        torn = f.tell() > 0 and f.seek(-1, 2) >= 0 and f.read(1) != b"\n"
    lines = [
        json.dumps(
            {"step": step, "lineage": lineage, "index": i, "of": len(groups), "group": g.model_dump(mode="json")}
        )
        for i, g in enumerate(groups)
    ]
    with path.open("a") as f:  # a line a crash cut short is closed off first (read skips it)
        f.write(("\n" if torn else "") + "".join(line + "\n" for line in lines))


def read(path: Path) -> list[tuple[int, list[ScoredGroup]]]:
    """The recorded steps in training order, each with its groups. A step begun again (a
    trainer resumed behind what it had trained) supersedes what was read from it on; a
    step with fewer groups than it says (the file cut by a crash) is left out."""
    steps: dict[int, list[ScoredGroup]] = {}
    sizes: dict[int, int] = {}
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            step, index, size = int(row["step"]), int(row["index"]), int(row["of"])
            group = ScoredGroup.model_validate(row["group"])
        except (ValueError, KeyError, TypeError) as exc:
            log.warning("%s:%d: skipping an unreadable line (%s)", path, number, str(exc).splitlines()[0])
            continue
        if index == 0:
            for later in [s for s in steps if s >= step]:
                del steps[later]
            steps[step], sizes[step] = [], size
        if step in steps and index == len(steps[step]):
            steps[step].append(group)
    return sorted((n, g) for n, g in steps.items() if len(g) == sizes[n])


def replay(ranks: Ranks, groups_file: Path) -> int:
    """Train the recorded steps after the newest resume state; returns the steps trained."""
    cfg = ranks.policy.settings
    root = cfg.checkpoint_dir.resolve()
    state = ranks.policy.resumed or checkpoint.TrainerState()
    record_ = checkpoint.run_record(resolved(cfg), cfg.seed)
    steps = [(n, g) for n, g in read(groups_file) if n > state.step]
    if steps and steps[0][0] != state.step + 1:
        raise SystemExit(
            f"{groups_file} has no step {state.step + 1} (the next after {root}'s resume state, step {state.step}); "
            f"its first later step is {steps[0][0]}"
        )
    if cfg.max_steps is not None:
        steps = [(n, g) for n, g in steps if n <= cfg.max_steps]
    dtype = cfg.weights_dtype()
    lineage = state.history.id
    for done, (number, groups) in enumerate(steps, 1):
        if number != state.step + 1:
            raise SystemExit(f"{groups_file} skips from step {state.step} to step {number}")
        started = time.monotonic()
        stats = ranks.train(groups, state.step)
        state = state.advanced([g.group_id for g in groups], ranks.policy.scheduler.state_dict())
        ranks.save_weights(root, state.step, lineage, dtype, cfg.weights_shard_mb << 20)
        checkpoint.prune_weights(root, cfg.keep_weights, ())
        if state.step % cfg.save_every == 0 or done == len(steps):
            ranks.save_resume(root, state, record_, cfg.keep_checkpoints)
        stats.update(version=float(state.step), step_seconds=time.monotonic() - started)
        _log_metrics(cfg.metrics_log, state.step, stats)
        log.info("replayed step %d: loss %.6f, grad norm %.6f", state.step, stats["loss"], stats["grad_norm"])
    return len(steps)


def _log_metrics(path: Path, step: int, stats: dict[str, float]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    clean = {k: (None if v != v else v) for k, v in stats.items()}  # NaN as null
    with path.open("a") as f:
        f.write(json.dumps({"step": step, "at": time.time(), **clean}) + "\n")
