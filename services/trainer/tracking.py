"""Where each step's metrics go besides Prometheus and the JSONL log: TensorBoard and
Weights & Biases, each optional, behind one small interface the loop calls.

    tracker = tracking.for_settings(settings, redis, keys, config)  # what the settings turn on
    await tracker.on_step(step, stats, groups)   # after each step is saved
    await tracker.close()                        # when the loop ends

Only the trainer's rank 0 makes a Trainer (the other ranks follow it: world.py), so a run
is logged from one process whatever ``nproc`` is.

wandb (``trainer.wandb.project`` set; the ``wandb`` extra) gets:

- every step's metrics under the names TensorBoard and the JSONL log use (``loss``,
  ``hinted/reward_mean``, ``unhinted/solve_rate``, ``staleness/<lag>``, ...), charted
  against ``trainer/step``;
- each periodic evaluation the rollout service pushed to ``history:eval`` since the last
  step (``eval/<variant>/pass@1``, ``eval/<variant>/pass@<k>``, ...), charted against
  ``eval/weight_version``; what is still new when the loop ends is logged then;
- every ``samples_every_steps`` steps, a ``samples`` table of the step's groups (prompt,
  hint, completion, reward, variant, problem id, extracted answer, step, weight version).

The run's id, and the time of the newest evaluation logged, are kept in
``<checkpoint_dir>/wandb.json``: a restarted trainer goes on with the same run
(``resume="allow"``) and logs no evaluation twice.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import os
from pathlib import Path
from typing import Any, Protocol

from redis.asyncio import Redis
from redis.exceptions import RedisError

from services.common.keys import Keys
from services.common.messages import ScoredGroup
from services.trainer.settings import TrainerSettings, WandbSettings

log = logging.getLogger(__name__)

STATE_FILE = "wandb.json"
"""In the checkpoint directory: the wandb run's id and the newest evaluation logged (its ``at``)."""
SAMPLE_COLUMNS = [
    "step",
    "weight_version",
    "problem_id",
    "variant",
    "prompt",
    "hint",
    "completion",
    "extracted",
    "reward",
]
_EVAL_PAGE = 32  # evaluation rows read at a time, newest first, until one already logged


class Tracker(Protocol):
    async def on_step(self, step: int, stats: dict[str, float], groups: list[ScoredGroup]) -> None:
        """Step ``step`` is saved: ``stats`` are its metrics (NaN: not measured), ``groups`` what it trained on."""
        ...

    async def close(self) -> None: ...


class Trackers:
    """Several trackers as one, called in order."""

    def __init__(self, trackers: list[Tracker]) -> None:
        self.trackers = trackers

    async def on_step(self, step: int, stats: dict[str, float], groups: list[ScoredGroup]) -> None:
        for tracker in self.trackers:
            await tracker.on_step(step, stats, groups)

    async def close(self) -> None:
        for tracker in self.trackers:
            await tracker.close()


def for_settings(settings: TrainerSettings, redis: Redis, keys: Keys, config: dict[str, Any]) -> Trackers:
    """TensorBoard if ``tensorboard_dir`` is set, wandb if ``wandb.project`` is (the run's
    ``config`` is ``config``, opened or resumed here: WandbMissing without the package);
    with neither, the calls do nothing."""
    trackers: list[Tracker] = []
    if settings.tensorboard_dir is not None:
        trackers.append(TensorBoard(settings.tensorboard_dir))
    if settings.wandb.project is not None:
        state = settings.checkpoint_dir.resolve() / STATE_FILE
        trackers.append(Wandb(settings.wandb, config, state, redis, keys))
    return Trackers(trackers)


class TensorBoard:
    """Every step's metrics as TensorBoard scalars; the writer is made on the first step."""

    def __init__(self, logdir: Path) -> None:
        self.logdir = logdir
        self._writer: Any = None

    async def on_step(self, step: int, stats: dict[str, float], groups: list[ScoredGroup]) -> None:
        if self._writer is None:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(str(self.logdir))
        for key, value in stats.items():
            if not math.isnan(value):
                self._writer.add_scalar(key, value, step)
        self._writer.flush()

    async def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None


class WandbMissing(RuntimeError):
    """``trainer.wandb.project`` is set but the wandb package is not installed."""


def require_wandb() -> Any:
    """The wandb module; WandbMissing, saying how to install it, if it is not there."""
    try:
        import wandb
    except ImportError as exc:
        raise WandbMissing(
            "trainer.wandb.project is set but wandb is not installed: pip install 'pope-rl[wandb]' "
            "(or unset trainer.wandb.project)"
        ) from exc
    return wandb


class Wandb:
    """One wandb run of the trainer: opened (or resumed) here, finished by ``close``."""

    def __init__(self, cfg: WandbSettings, config: dict[str, Any], state: Path, redis: Redis, keys: Keys) -> None:
        wandb = require_wandb()
        self.cfg, self.state_path, self.redis, self.keys = cfg, state, redis, keys
        saved = json.loads(state.read_text()) if state.is_file() else {}
        self.eval_at: float = saved.get("eval_at", 0.0)  # the newest evaluation logged
        if cfg.dir is not None:
            cfg.dir.mkdir(parents=True, exist_ok=True)
        self.run = wandb.init(
            project=cfg.project,
            entity=cfg.entity,
            name=cfg.name,
            group=cfg.group,
            tags=cfg.tags or None,
            mode=cfg.mode,  # None: wandb's own (WANDB_MODE)
            dir=str(cfg.dir) if cfg.dir is not None else None,
            id=saved.get("run_id"),  # None: a new run, whose id wandb makes up
            resume="allow",
            config=config,
        )
        self.run_id: str = self.run.id
        self._save_state()
        self.wandb = wandb
        self.run.define_metric("trainer/step")
        self.run.define_metric("samples", step_metric="trainer/step")
        self.run.define_metric("eval/weight_version")
        self.run.define_metric("eval/*", step_metric="eval/weight_version")
        self._charted: set[str] = set()  # step metrics given their x axis
        log.info("wandb: run %s of project %s (%s)", self.run_id, cfg.project, self.run.settings.mode)

    async def on_step(self, step: int, stats: dict[str, float], groups: list[ScoredGroup]) -> None:
        for key in stats.keys() - self._charted:
            self.run.define_metric(key, step_metric="trainer/step")
            self._charted.add(key)
        row: dict[str, Any] = {"trainer/step": step, **{k: v for k, v in stats.items() if not math.isnan(v)}}
        every = self.cfg.samples_every_steps
        if every and step % every == 0:
            rows = sample_rows(groups, self.cfg.samples_max_rows)
            row["samples"] = self.wandb.Table(columns=SAMPLE_COLUMNS, data=rows)
        self.run.log(row)
        await self._log_evaluations()

    async def close(self) -> None:
        await self._log_evaluations()
        await asyncio.to_thread(self.run.finish)  # online: until wandb has uploaded what it holds

    async def _log_evaluations(self) -> None:
        """Log the evaluations pushed since the newest one logged, oldest first; a Redis
        error leaves them for the next call."""
        try:
            rows = await self._new_evaluations()
        except RedisError as exc:
            log.warning("wandb: could not read the evaluations (%s); trying again at the next step", exc)
            return
        for row in rows:
            self.run.log(
                {
                    "eval/weight_version": row["weight_version"],
                    "eval/seconds": row["seconds"],
                    **{f"eval/{k}": v for k, v in row.items() if "/" in k},
                }
            )
            self.eval_at = row["at"]
        if rows:
            self._save_state()

    async def _new_evaluations(self) -> list[dict[str, Any]]:
        """The rows of ``history:eval`` (newest first, the last 1000) newer than ``eval_at``, oldest first."""
        new: list[dict[str, Any]] = []
        start = 0
        while True:
            page = await self.redis.lrange(self.keys.history("eval"), start, start + _EVAL_PAGE - 1)  # type: ignore[misc]
            for raw in page:
                row = json.loads(raw)
                if row["at"] <= self.eval_at:
                    return new[::-1]
                new.append(row)
            if len(page) < _EVAL_PAGE:
                return new[::-1]
            start += _EVAL_PAGE

    def _save_state(self) -> None:
        """The run's id and ``eval_at``, replaced atomically."""
        self.state_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.state_path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"run_id": self.run_id, "eval_at": self.eval_at}) + "\n")
        os.replace(tmp, self.state_path)


def sample_rows(groups: list[ScoredGroup], limit: int) -> list[list[Any]]:
    """The samples table's rows (``SAMPLE_COLUMNS``), at most ``limit``: every group's first
    sample, then every group's second, and so on, so a cap keeps each group in view; listed
    group by group."""
    order = sorted(((i, j) for i, g in enumerate(groups) for j in range(len(g.samples))), key=lambda ij: (ij[1], ij[0]))
    rows = []
    for i, j in sorted(order[:limit]):
        g = groups[i]
        sample, score = g.samples[j], g.scores[j]
        rows.append(
            [
                g.step,
                sample.weight_version,
                g.problem_id,
                g.variant.value,
                g.prompt,
                g.hint,
                sample.text,
                score.extracted,
                score.reward,
            ]
        )
    return rows
