"""The experiment's jobs against an engine and a verifier it starts itself: the held-out
evaluation of a model directory (a base model or a checkpoint, on a fresh engine, so one
weight version throughout) and the hint search over the hard train problems.

    with services(model, verifier=True, log_dir=..., out=...) as (engine_url, verifier_url, redis_url): ...
    report = evaluate_model(eval_settings, model, problems, log_dir, out)
    problems, summary = build_hints(hint_settings, base, hard, prefix, log_dir, out)
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TextIO

from experiments.pretrain import TEMPLATE
from services.common.messages import Problem
from services.common.redis_server import redis_for
from services.offline import evaluate_problems
from services.rollout.evaluation import EvalReport
from services.rollout.settings import EvalSettings, HintSettings, RolloutSettings
from services.stack import DETERMINISTIC, engine_child, running, verifier_child
from services.stack import say as say_as


def say(text: str, out: TextIO) -> None:
    say_as("pope experiment", text, out)


@contextlib.contextmanager
def services(
    model: Path, *, verifier: bool, log_dir: Path, out: TextIO, redis_url: str | None = None
) -> Iterator[tuple[str, str | None, str]]:
    """An engine serving ``model`` (and a verifier, and Redis) on free ports; yields their URLs."""
    engine, engine_url = engine_child(str(model), args=DETERMINISTIC)
    with redis_for(redis_url or os.environ.get("REDIS_URL")) as url:
        children, verifier_url = [engine], None
        if verifier:
            child, verifier_url = verifier_child(url)
            children.append(child)
        with running(children, log_dir, out, "pope experiment", env={"POPE_ENGINE__MAX_BATCH": "128"}):
            yield engine_url, verifier_url, url


def settings_for(model: Path, engine_url: str, verifier_url: str, prefix: str, **sections: Any) -> RolloutSettings:
    """The rollout settings the offline jobs read (``hints=`` or ``evaluation=`` as given)."""
    return RolloutSettings(
        model_path=str(model),
        engine_url=engine_url,
        verifier_url=verifier_url,
        key_prefix=prefix,
        prompt_template=TEMPLATE,
        **sections,
    )


def evaluate_model(cfg: EvalSettings, model: Path, problems: list[Problem], log_dir: Path, out: TextIO) -> EvalReport:
    """The held-out evaluation of ``model`` on a fresh engine (one weight version throughout)."""
    say(f"evaluating {model} on {len(problems)} held-out hard problems (k={cfg.k}, unhinted and hinted)", out)
    with services(model, verifier=True, log_dir=log_dir, out=out) as (engine_url, verifier_url, _):
        assert verifier_url is not None
        settings = settings_for(model, engine_url, verifier_url, "unused:", evaluation=cfg)
        report = asyncio.run(evaluate_problems(settings, problems))
    say(f"  {summary_line(report)} ({report.seconds:.0f}s)", out)
    return report


def summary_line(report: EvalReport) -> str:
    k = report.k
    return " | ".join(
        f"{v} pass@1 {row['pass@1']:.3f} pass@{k} {row[f'pass@{k}']:.3f}" for v, row in report.summary.items()
    )


def build_hints(
    cfg: HintSettings, base: Path, hard: list[Problem], prefix: str, log_dir: Path, out: TextIO
) -> tuple[list[Problem], dict[str, Any]]:
    """The hint search over the hard train problems with the base model (hard-problem
    filter, then the shortest working prefix), under Redis keys ``prefix`` (deleted after);
    the problems with labels and hints, and a summary."""
    from redis.asyncio import Redis

    from services.common.keys import Keys, adelete_prefix
    from services.offline import build
    from services.rollout.store import ProblemStore

    started = time.monotonic()
    with services(base, verifier=True, log_dir=log_dir, out=out) as (engine_url, verifier_url, url):
        assert verifier_url is not None
        settings = settings_for(base, engine_url, verifier_url, prefix, hints=cfg)

        async def go() -> tuple[list[Problem], int]:
            redis = Redis.from_url(url)
            store = ProblemStore(redis, Keys(prefix))
            try:
                await store.put_many(hard)
                progress = await build(settings, url, split="train", ids=None, redo=False, out=out)
                return await store.all(), progress.tokens
            finally:
                await adelete_prefix(redis, prefix)
                await redis.aclose()

        problems, tokens = asyncio.run(go())
    counts = Counter(str(p.label.value if p.label else None) for p in problems)
    fractions = [p.search.prefix_fraction for p in problems if p.hint and p.search and p.search.prefix_fraction]
    summary = {
        "counts": dict(counts),
        "tokens": tokens,
        "seconds": time.monotonic() - started,
        "hint_fraction_mean": sum(fractions) / len(fractions) if fractions else None,
    }
    return sorted(problems, key=lambda p: p.id), summary
