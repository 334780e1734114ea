"""What a POPE-vs-GRPO comparison is frozen on: the arms, the ``Spec`` of every setting,
``experiment.json`` (``freeze``), and the command-line options over them (``spec_with``).

    spec = spec_with(Spec(), base, ["kl_coef=0.05"], steps=60)   # options over the defaults
    spec = freeze(exp_dir, spec, out)       # a later sitting with other settings is refused
"""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TextIO

import yaml

from experiments.chains import TASK_VERSION
from experiments.jobs import say
from experiments.pretrain import weights_sha256
from services.rollout.settings import EvalSettings, HintSettings


@dataclass(frozen=True)
class Arm:
    hinted_fraction: float
    hints: bool
    """Whether the arm's problems keep the hints the search found."""
    easy: bool = False
    """Mix in as many easy problems as hard ones."""
    hinted_problems_only: bool = False


ARMS: dict[str, Arm] = {
    "pope": Arm(hinted_fraction=0.5, hints=True),
    "grpo": Arm(hinted_fraction=0.0, hints=False),
    "grpo_easy": Arm(hinted_fraction=0.0, hints=False, easy=True),
    "hinted_only": Arm(hinted_fraction=1.0, hints=True, hinted_problems_only=True),
}


@dataclass(frozen=True)
class Spec:
    """What a comparison is frozen on (``experiment.json``); seeds and arms may grow."""

    task: str = TASK_VERSION
    base_model_sha256: str = ""
    train_problems: int = 64
    eval_problems: int = 200
    steps: int = 30
    group_size: int = 8
    prompts_per_step: int = 8
    learning_rate: float = 1e-4
    """1e-4: on the repository's base model (data/base-model) POPE trains stably at it over
    30 steps and beats GRPO on the current task; 4e-4 collapsed every seed there with task v9
    (the rates tried, per task version: docs/experiments/). Each experiment.json records its own rate. GRPO gets
    no gradient at any rate while none of its samples earns reward."""
    temperature: float = 0.8
    top_p: float = 1.0
    max_new_tokens: int = 96
    eval_k: int = 8
    eval_temperature: float = 0.8
    eval_top_p: float = 1.0
    hint_k: int = 8
    hint_k_hint: int = 8
    extra: dict[str, Any] = field(default_factory=dict)
    """Trainer settings beyond the defaults (loss, clipping ...), as config keys."""

    def eval_settings(self) -> EvalSettings:
        return EvalSettings(
            split="eval",
            k=self.eval_k,
            hinted=True,
            temperature=self.eval_temperature,
            top_p=self.eval_top_p,
            max_new_tokens=self.max_new_tokens,
            concurrency=16,
        )

    def hint_settings(self) -> HintSettings:
        return HintSettings(
            k=self.hint_k,
            k_hint=self.hint_k_hint,
            max_new_tokens=self.max_new_tokens,
            temperature=self.temperature,
            top_p=self.top_p,
            concurrency=8,
            max_fraction=0.35,
        )


REMOVED: dict[str, Any] = {"hint_anneal_at": None}
"""Settings an experiment could be frozen with that no longer exist, with their off values
(hint annealing: docs/experiments/hint-annealing.md)."""


def freeze(exp_dir: Path, spec: Spec, out: TextIO, start_over: bool = False) -> Spec:
    """Write ``experiment.json``, or check that the one there matches ``spec``; with
    ``start_over`` a mismatch deletes what was made under the old settings instead."""
    path = exp_dir / "experiment.json"
    mine = asdict(spec)
    if path.exists():
        # A setting added after an experiment was frozen ran at its default (the old behaviour).
        frozen = {**asdict(Spec()), **json.loads(path.read_text())}
        diff = {k: (frozen.get(k), v) for k, v in mine.items() if frozen.get(k) != v}
        # A setting since removed must have been off there, or its runs differ from these.
        diff |= {k: (frozen[k], off) for k, off in REMOVED.items() if frozen.get(k, off) != off}
        if diff and start_over:
            say(f"settings or base model changed ({', '.join(diff)}): starting {exp_dir} over", out)
            shutil.rmtree(exp_dir)
            return freeze(exp_dir, spec, out)
        if diff:
            lines = "\n".join(f"  {k}: frozen {a!r}, now {b!r}" for k, (a, b) in diff.items())
            raise SystemExit(
                f"pope experiment: {path} was frozen with other settings:\n{lines}\n"
                "finish it with the same settings, or start a new one with another --dir"
            )
        say(f"resuming the experiment frozen in {path}", out)
    else:
        exp_dir.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(mine, indent=2) + "\n")
        say(f"froze the experiment's settings in {path}", out)
    return spec


def base_model_or_exit(base: Path) -> Path:
    from services.common.config import model_dir_problem

    if problem := model_dir_problem(str(base), "experiment"):
        raise SystemExit(f"{problem}\nmake the base model first: pope model pretrain --out {base} (13-30 min)")
    return base


RUN_OWNED = {
    "port",
    "engine_url",
    "model_path",
    "checkpoint_dir",
    "metrics_log",
    "tensorboard_dir",
    "group_size",
    "prompts_per_step",
    "max_new_tokens",
    "seed",
    "max_steps",
    "consumer_name",
}
"""Trainer settings each run sets itself (or the experiment's own settings set)."""


def trainer_extra(pairs: list[str], start: dict[str, Any]) -> dict[str, Any]:
    """``--trainer KEY=VALUE`` options (VALUE read as YAML) over ``start``, each checked
    against the trainer's settings: a typo or a bad value stops here, not in a run's trainer."""
    from pydantic import ValidationError

    from services.trainer.settings import TrainerSettings

    extra = dict(start)
    for pair in pairs:
        key, sep, text = pair.partition("=")
        key = key.strip()
        if not sep or not key:
            raise SystemExit(f"pope: --trainer takes KEY=VALUE, got {pair!r}")
        if key == "learning_rate":
            raise SystemExit("pope: set the learning rate with --lr")
        if key in RUN_OWNED or key not in TrainerSettings.model_fields:
            raise SystemExit(
                f"pope: --trainer {key}: not a trainer setting an experiment can change (see pope config show trainer)"
            )
        value = yaml.safe_load(text) if text.strip() else None
        try:
            TrainerSettings.model_validate({key: value})
        except ValidationError as e:
            raise SystemExit(f"pope: --trainer {pair}: {e.errors()[0]['msg']}") from None
        extra[key] = value
    return extra


def spec_with(spec: Spec, base: Path, trainer: list[str] | None = None, **overrides: Any) -> Spec:
    """``spec`` with the options given (None: not given), ``--trainer`` settings over its own
    extra ones, and the base model's hash."""
    given = {k: v for k, v in overrides.items() if v is not None}
    extra = trainer_extra(trainer or [], spec.extra)
    return Spec(**{**asdict(spec), **given, "extra": extra, "base_model_sha256": weights_sha256(base)})
