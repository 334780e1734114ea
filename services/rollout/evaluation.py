"""pass@k evaluation through the same engine and verifier as training.

    report = await evaluate(problems, attempter, cfg, hinted=True)
    report.summary["unhinted"]["pass@16"], to_markdown(report)

Each problem is sampled ``k`` times per variant (unhinted; hinted too, for problems with a
hint, when asked) at the evaluation settings (DESIGN.md 1.5: temperature 0.8, top-p
0.95). pass@1 is the mean success rate over samples; pass@k for each reported k <= n uses
the unbiased estimator of Chen et al. (2021), 1 - C(n-c, k) / C(n, k), averaged over
problems. The rollout service runs it every ``evaluation.every_steps`` trainer steps;
``pope eval`` runs it once.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

from prometheus_client import Gauge
from pydantic import BaseModel
from redis.asyncio import Redis
from redis.exceptions import RedisError

from services.common.engine_client import EngineError, SamplingParams
from services.common.keys import Keys
from services.common.messages import Problem, Variant
from services.common.verifier_client import VerifierError
from services.rollout.attempts import Attempter
from services.rollout.settings import EvalSettings
from services.rollout.store import ProblemStore

log = logging.getLogger(__name__)

PASS_AT = Gauge("pope_eval_pass_at", "pass@k of the latest periodic evaluation", ["variant", "k"])
EVAL_VERSION = Gauge("pope_eval_weight_version", "Weight version of the latest periodic evaluation")


MAX_EVAL_HISTORY = 1000
"""Evaluations kept in ``history:eval`` (GET /v1/evaluations), newest first."""


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased estimate of P(at least one of k samples solves) from c successes in n samples."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"need 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    # 1 - C(n-c, k) / C(n, k) = 1 - prod_{i=n-c+1}^{n} (1 - k / i), without huge binomials.
    miss = 1.0
    for i in range(n - c + 1, n + 1):
        miss *= 1.0 - k / i
    return 1.0 - miss


class ProblemResult(BaseModel):
    problem_id: str
    variant: Variant
    n: int
    successes: int
    tokens: int
    truncated: int


class EvalReport(BaseModel):
    split: str
    k: int
    weight_versions: list[int]
    """Engine weight versions that produced the samples (one, unless weights changed mid-run)."""
    settings: EvalSettings
    summary: dict[str, dict[str, float]]
    """Per variant: problems, samples, pass@1, pass@<k>, mean response tokens, truncated share."""
    problems: list[ProblemResult]
    seconds: float


def summarize(results: list[ProblemResult], k: int) -> dict[str, dict[str, float]]:
    out: dict[str, dict[str, float]] = {}
    for variant in Variant:
        mine = [r for r in results if r.variant is variant]
        if not mine:
            continue
        samples = sum(r.n for r in mine)
        row = {
            "problems": float(len(mine)),
            "samples": float(samples),
            "pass@1": sum(r.successes / r.n for r in mine) / len(mine),
            "response_tokens_mean": sum(r.tokens for r in mine) / samples,
            "truncated_frac": sum(r.truncated for r in mine) / samples,
        }
        row[f"pass@{k}"] = sum(pass_at_k(r.n, r.successes, k) for r in mine) / len(mine)
        out[variant.value] = row
    return out


async def evaluate(problems: list[Problem], attempter: Attempter, cfg: EvalSettings) -> EvalReport:
    """Sample and score every problem (and its hinted variant, if asked); the report."""
    started = time.monotonic()
    chosen = sorted(problems, key=lambda p: p.id)[: cfg.limit]
    params = SamplingParams(temperature=cfg.temperature, top_p=cfg.top_p, max_new_tokens=cfg.max_new_tokens)
    limit = asyncio.Semaphore(cfg.concurrency)
    results: list[ProblemResult] = []
    versions: set[int] = set()

    async def one(problem: Problem, variant: Variant) -> None:
        digest = hashlib.sha256(f"{cfg.seed}:{problem.id}:{variant.value}".encode()).digest()
        hint = problem.hint if variant is Variant.HINTED else None
        async with limit:
            r = await attempter.attempt(
                problem,
                hint=hint,
                k=cfg.k,
                params=params,
                seed=int.from_bytes(digest[:4], "big") >> 1,
                rid=f"eval-{problem.id}-{variant.value}",
            )
        versions.update(r.weight_versions)
        results.append(
            ProblemResult(
                problem_id=problem.id,
                variant=variant,
                n=r.attempts,
                successes=r.successes,
                tokens=r.tokens,
                truncated=r.truncated,
            )
        )

    async with asyncio.TaskGroup() as tg:
        for p in chosen:
            tg.create_task(one(p, Variant.UNHINTED))
            if cfg.hinted and p.hint is not None:
                tg.create_task(one(p, Variant.HINTED))
    results.sort(key=lambda r: (r.problem_id, r.variant.value))
    return EvalReport(
        split=cfg.split,
        k=cfg.k,
        weight_versions=sorted(versions),
        settings=cfg,
        summary=summarize(results, cfg.k),
        problems=results,
        seconds=time.monotonic() - started,
    )


def to_markdown(report: EvalReport) -> str:
    k = report.k
    lines = [
        f"Evaluation of split `{report.split}` at weight version(s) {report.weight_versions}: "
        f"{report.settings.k} samples per problem, temperature {report.settings.temperature}, "
        f"top-p {report.settings.top_p}, up to {report.settings.max_new_tokens} tokens.",
        "",
        f"| variant | problems | pass@1 | pass@{k} | mean response tokens | truncated |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for variant, row in report.summary.items():
        lines.append(
            f"| {variant} | {int(row['problems'])} | {row['pass@1']:.3f} | {row[f'pass@{k}']:.3f} | "
            f"{row['response_tokens_mean']:.1f} | {row['truncated_frac']:.1%} |"
        )
    return "\n".join(lines) + "\n"


class PeriodicEval:
    """Evaluates the engine's weights at trainer step 0 and every ``every_steps`` steps.

    Runs inside the rollout service, which holds the problems, the prompts and the engine
    client; the trainer's version (in Redis) says when. Each evaluation goes to Redis (the
    latest in ``state:eval``, all in ``history:eval``, which /v1/status shows), to
    Prometheus, and to ``eval_dir/step-<version>.json`` and ``.md``.
    """

    def __init__(
        self,
        cfg: EvalSettings,
        eval_dir: Path,
        redis: Redis,
        keys: Keys,
        store: ProblemStore,
        attempter: Callable[[], Awaitable[Attempter]],
        engine_version: Callable[[], Awaitable[int]],
        poll_s: float = 1.0,
    ) -> None:
        self.cfg, self.eval_dir, self.redis, self.keys, self.store = cfg, eval_dir, redis, keys, store
        self.attempter, self.engine_version, self.poll_s = attempter, engine_version, poll_s
        self.waiting_for = ""

    async def run(self, stop: asyncio.Event) -> None:
        if self.cfg.every_steps == 0:
            return
        due: int | None = None  # the first version to evaluate, once Redis has said where the last one was
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), self.poll_s)
            try:
                if due is None:
                    last = await self.redis.hget(self.keys.state("eval"), "weight_version")  # type: ignore[misc]
                    due = 0 if last is None else (int(last) // self.cfg.every_steps + 1) * self.cfg.every_steps
                if await self.engine_version() < due:  # cheap; the problem store is read only when due
                    self.waiting_for = f"engine weights v{due}"
                    continue
                problems = [p for p in await self.store.all() if p.split == self.cfg.split]
                if not problems:
                    self.waiting_for = f"problems in split {self.cfg.split}"
                    continue
                report = await evaluate(problems, await self.attempter(), self.cfg)
                await self.record(report)
                due = (max(report.weight_versions) // self.cfg.every_steps + 1) * self.cfg.every_steps
            except (EngineError, VerifierError, RedisError) as exc:  # transient: try again next poll
                log.warning("periodic evaluation: %s; retrying", exc)

    async def record(self, report: EvalReport) -> None:
        version = max(report.weight_versions)
        row = {
            "weight_version": version,
            "at": time.time(),
            "seconds": report.seconds,
            **{
                f"{variant}/{name}": value for variant, stats in report.summary.items() for name, value in stats.items()
            },
        }
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.hset(self.keys.state("eval"), mapping=row)
            pipe.lpush(self.keys.history("eval"), json.dumps(row))
            pipe.ltrim(self.keys.history("eval"), 0, MAX_EVAL_HISTORY - 1)
            await pipe.execute()
        for variant, stats in report.summary.items():
            for name in ("pass@1", f"pass@{report.k}"):
                PASS_AT.labels(variant, name.split("@")[1]).set(stats[name])
        EVAL_VERSION.set(version)
        self.eval_dir.mkdir(parents=True, exist_ok=True)
        stem = self.eval_dir / f"step-{version:06d}"
        stem.with_suffix(".json").write_text(json.dumps(report.model_dump(mode="json"), indent=2) + "\n")
        stem.with_suffix(".md").write_text(to_markdown(report))
        log.info(
            "evaluation at weight version %d: %s",
            version,
            ", ".join(
                f"{v} pass@1 {s['pass@1']:.3f} pass@{report.k} {s[f'pass@{report.k}']:.3f}"
                for v, s in report.summary.items()
            ),
        )
