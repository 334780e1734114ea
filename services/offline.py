"""Offline jobs against the engine and the verifier: ``pope hints build`` and ``pope eval``.

    pope hints build --model DIR [--config FILE] [--split train] [--k 128] [--k-hint 8] ...
    pope eval --model DIR [--split eval] [--k 16] [--hinted] [--out runs/eval]

Both use the engine and the verifier at the configured URLs; where none answers, they
start their own (``pope engine`` and ``pope verifier``, stopped at the end). The hint
build prints a line per problem with its rate and ETA and a summary table at the end;
killed and started again, it skips every problem already searched with the same settings
(``--redo`` searches them again). The evaluation writes JSON and a markdown table.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TextIO

import httpx
from pydantic import ValidationError
from redis.asyncio import Redis

from services.common.keys import Keys
from services.common.messages import Problem
from services.common.redis_server import redis_for
from services.rollout.attempts import Attempter
from services.rollout.evaluation import EvalReport, evaluate, to_markdown
from services.rollout.hint_builder import HintBuilder, Progress, summary_table
from services.rollout.settings import EvalSettings, HintSettings, RolloutSettings
from services.rollout.store import ProblemStore
from services.stack import DETERMINISTIC, engine_child, running, say, verifier_child


def _answers(url: str) -> bool:
    try:
        return httpx.get(url, timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def select(problems: list[Problem], split: str | None, ids: list[str] | None) -> list[Problem]:
    chosen = [p for p in problems if (split is None or p.split == split) and (not ids or p.id in ids)]
    missing = set(ids or []) - {p.id for p in chosen}
    if missing:
        raise SystemExit(f"pope: no such problem(s) in split {split!r}: {', '.join(sorted(missing))}")
    return chosen


async def build(
    settings: RolloutSettings, redis_url: str, *, split: str | None, ids: list[str] | None, redo: bool, out: TextIO
) -> Progress:
    from transformers import AutoTokenizer

    assert settings.model_path is not None
    tokenizer = await asyncio.to_thread(AutoTokenizer.from_pretrained, settings.model_path)
    redis = Redis.from_url(redis_url)
    store = ProblemStore(redis, Keys(settings.key_prefix))
    async with settings.engine_client() as engine, settings.verifier_client() as verifier:
        version = await engine.weight_version()
        if version != 0:
            print(
                f"warning: the engine serves weight version {version}, not the base model's 0; the search "
                "labels problems for the weights it is given",
                file=out,
            )
        attempter = Attempter(engine, verifier, tokenizer, settings.prompt_template)
        builder = HintBuilder(
            settings.hints, attempter, tokenizer, store, settings.prompt_template.version, settings.model_path
        )
        # Problems kept out of training (an eval problem's twin) need no hint.
        problems = [p for p in select(await store.all(), split, ids) if not p.excluded]
        todo = builder.pending(problems, redo)
        h = settings.hints
        print(
            f"hint search over {len(problems)} problems ({len(problems) - len(todo)} already done with these "
            f"settings, {len(todo)} to go): k={h.k}, k_hint={h.k_hint}, max_new_tokens={h.max_new_tokens}, "
            f"max_fraction={h.max_fraction}, method={h.method}, config {builder.config}",
            file=out,
            flush=True,
        )
        progress = await builder.run(
            problems, redo=redo, on_progress=lambda p, pr: print(pr.line(p), file=out, flush=True)
        )
        final = select(await store.all(), split, ids)
    await redis.aclose()
    print(f"\ndone: {progress.done} searched, {progress.skipped} already done, {progress.tokens:,} tokens\n", file=out)
    print(summary_table(final), file=out, flush=True)
    return progress


def _settings(
    args: Any, section: str, model: type[HintSettings] | type[EvalSettings], flags: dict[str, Any]
) -> RolloutSettings:
    """The rollout section with ``flags`` (those given) over ``rollout.<section>``; checked like the file."""
    from services.common.config import ConfigError, load_settings

    settings = load_settings(
        RolloutSettings,
        args.config,
        redis_url=args.redis_url,
        engine_url=args.engine_url,
        model_path=args.model,
        verifier_url=args.verifier_url,
        key_prefix=args.key_prefix,
    )
    given = {k: v for k, v in flags.items() if v is not None}
    try:
        sub = model.model_validate({**getattr(settings, section).model_dump(), **given})
    except ValidationError as exc:
        raise ConfigError(f"rollout.{section}: {exc}") from None
    return settings.model_copy(update={section: sub})


@contextlib.contextmanager
def engine_and_verifier(
    settings: RolloutSettings, args: Any, label: str, out: TextIO
) -> Iterator[tuple[RolloutSettings, str]]:
    """Redis, and the engine and verifier the settings name, started here if they do not
    answer; yields the settings (URLs updated) and the Redis URL. Stops what it started."""
    from services.common.config import model_dir_problem

    if problem := model_dir_problem(settings.model_path, label):
        raise SystemExit(problem + " (its tokenizer builds the prompts)")
    assert settings.model_path is not None
    children = []
    if not _answers(f"{settings.engine_url}/health"):
        child, engine_url = engine_child(settings.model_path, args=DETERMINISTIC)
        children.append(child)
        settings = settings.model_copy(update={"engine_url": engine_url})
    with redis_for(args.redis_url or os.environ.get("REDIS_URL")) as url:
        if not _answers(f"{settings.verifier_url}/readyz"):
            child, verifier_url = verifier_child(url)
            children.append(child)
            settings = settings.model_copy(update={"verifier_url": verifier_url})
        if children:
            names, which = " or ".join(c.name for c in children), "them" if len(children) > 1 else "one"
            say(
                label,
                f"no {names} answered at the configured URL: starting {which} (logs in {Path(args.run_dir) / 'logs'})",
                out,
            )
        with running(children, Path(args.run_dir) / "logs", out, label):
            yield settings, url


def hints_build(args: Any, out: TextIO = sys.stdout) -> int:
    flags = {
        "k": args.k,
        "k_hint": args.k_hint,
        "max_new_tokens": args.max_new_tokens,
        "method": args.method,
        "max_fraction": args.max_fraction,
        "concurrency": args.concurrency,
        "seed": args.seed,
    }
    settings = _settings(args, "hints", HintSettings, flags)
    try:
        with engine_and_verifier(settings, args, "pope hints build", out) as (settings, url):
            asyncio.run(build(settings, url, split=args.split, ids=args.problem_id, redo=args.redo, out=out))
    except KeyboardInterrupt:
        print("interrupted: finished problems are stored; run the same command to resume", file=out)
        return 130
    return 0


async def run_eval(settings: RolloutSettings, redis_url: str, ids: list[str] | None) -> EvalReport:
    redis = Redis.from_url(redis_url)
    try:
        problems = select(await ProblemStore(redis, Keys(settings.key_prefix)).all(), settings.evaluation.split, ids)
    finally:
        await redis.aclose()
    if not problems:
        raise SystemExit(f"pope eval: no problems in split {settings.evaluation.split!r} (pope data import ...)")
    return await evaluate_problems(settings, problems)


async def evaluate_problems(settings: RolloutSettings, problems: list[Problem]) -> EvalReport:
    """``settings.evaluation`` of ``problems`` on the engine and verifier the settings name."""
    from transformers import AutoTokenizer

    tokenizer = await asyncio.to_thread(AutoTokenizer.from_pretrained, settings.model_path)
    async with settings.engine_client() as engine, settings.verifier_client() as verifier:
        return await evaluate(
            problems, Attempter(engine, verifier, tokenizer, settings.prompt_template), settings.evaluation
        )


def write_report(report: EvalReport, out_dir: Path, name: str) -> tuple[Path, Path]:
    """``<name>.json`` and ``<name>.md`` in ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out_dir / f"{name}.json", out_dir / f"{name}.md"
    json_path.write_text(json.dumps(report.model_dump(mode="json"), indent=2) + "\n")
    md_path.write_text(to_markdown(report))
    return json_path, md_path


def eval_command(args: Any, out: TextIO = sys.stdout) -> int:
    flags = {
        "split": args.split,
        "k": args.k,
        "hinted": args.hinted or None,
        "max_new_tokens": args.max_new_tokens,
        "temperature": args.temperature,
        "top_p": args.top_p,
        "limit": args.limit,
        "concurrency": args.concurrency,
        "seed": args.seed,
    }
    settings = _settings(args, "evaluation", EvalSettings, flags)
    e = settings.evaluation
    with engine_and_verifier(settings, args, "pope eval", out) as (settings, url):
        print(
            f"evaluating split {e.split!r}: k={e.k}{' (and hinted)' if e.hinted else ''}, temperature "
            f"{e.temperature}, top-p {e.top_p}, max_new_tokens {e.max_new_tokens}",
            file=out,
            flush=True,
        )
        report = asyncio.run(run_eval(settings, url, args.problem_id))
    json_path, md_path = write_report(report, Path(args.out), args.name or f"eval-{e.split}")
    print(to_markdown(report), file=out)
    print(f"wrote {json_path} and {md_path} ({report.seconds:.1f}s)", file=out, flush=True)
    return 0
