"""``pope hints build``: the hard-problem filter and hint search over the stored problems.

    pope hints build --model DIR [--config FILE] [--split train] [--k 128] [--k-hint 8] ...

Uses the engine and the verifier at the configured URLs; where none answers and a model
is given, starts its own (``pope engine`` and ``pope verifier``, stopped at the end).
Prints a line per problem with the build's rate and ETA, and a summary table at the end.
Killed and started again, it skips every problem already searched with the same settings
(``--redo`` searches them again).
"""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path
from typing import Any, TextIO

import httpx
from pydantic import ValidationError
from redis.asyncio import Redis

from services.common.engine_client import EngineClient
from services.common.keys import Keys
from services.common.messages import Problem
from services.common.redis_server import free_port, redis_for
from services.common.verifier_client import VerifierClient
from services.rollout.attempts import Attempter
from services.rollout.hint_builder import HintBuilder, Progress, summary_table
from services.rollout.settings import HintSettings, RolloutSettings
from services.rollout.store import ProblemStore
from services.up import Child, Stack


def _answers(url: str) -> bool:
    try:
        return httpx.get(url, timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def select(problems: list[Problem], split: str | None, ids: list[str] | None) -> list[Problem]:
    chosen = [p for p in problems if (split is None or p.split == split) and (not ids or p.id in ids)]
    missing = set(ids or []) - {p.id for p in chosen}
    if missing:
        raise SystemExit(f"pope hints build: no such problem(s) in split {split!r}: {', '.join(sorted(missing))}")
    return chosen


async def build(settings: RolloutSettings, redis_url: str, *, split: str | None, ids: list[str] | None,
                redo: bool, out: TextIO) -> Progress:  # fmt: skip
    from transformers import AutoTokenizer

    assert settings.model_path is not None
    tokenizer = await asyncio.to_thread(AutoTokenizer.from_pretrained, settings.model_path)
    redis = Redis.from_url(redis_url)
    store = ProblemStore(redis, Keys(settings.key_prefix))
    async with EngineClient(settings.engine_url) as engine, VerifierClient(settings.verifier_url) as verifier:
        version = await engine.weight_version()
        if version != 0:
            print(f"warning: the engine serves weight version {version}, not the base model's 0; the search "
                  "labels problems for the weights it is given", file=out)  # fmt: skip
        attempter = Attempter(engine, verifier, tokenizer, settings.prompt_template)
        builder = HintBuilder(settings.hints, attempter, tokenizer, store, settings.prompt_template.version,
                              settings.model_path)  # fmt: skip
        problems = select(await store.all(), split, ids)
        todo = builder.pending(problems, redo)
        h = settings.hints
        print(f"hint search over {len(problems)} problems ({len(problems) - len(todo)} already done with these "
              f"settings, {len(todo)} to go): k={h.k}, k_hint={h.k_hint}, max_new_tokens={h.max_new_tokens}, "
              f"max_fraction={h.max_fraction}, method={h.method}, config {builder.config}",
              file=out, flush=True)  # fmt: skip
        progress = await builder.run(problems, redo=redo,
                                     on_progress=lambda p, pr: print(pr.line(p), file=out, flush=True))  # fmt: skip
        final = select(await store.all(), split, ids)
    await redis.aclose()
    print(f"\ndone: {progress.done} searched, {progress.skipped} already done, {progress.tokens:,} tokens\n",
          file=out)  # fmt: skip
    print(summary_table(final), file=out, flush=True)
    return progress


def hints_build(args: Any, out: TextIO = sys.stdout) -> int:
    from services.common.config import load_settings, model_dir_problem

    flags = {"k": args.k, "k_hint": args.k_hint, "max_new_tokens": args.max_new_tokens, "method": args.method,
             "max_fraction": args.max_fraction, "concurrency": args.concurrency, "seed": args.seed}  # fmt: skip
    overrides = {k: v for k, v in flags.items() if v is not None}
    settings = load_settings(RolloutSettings, args.config, redis_url=args.redis_url, engine_url=args.engine_url,
                             model_path=args.model, verifier_url=args.verifier_url,
                             key_prefix=args.key_prefix)  # fmt: skip
    try:  # flags are checked like the file
        hints = HintSettings.model_validate({**settings.hints.model_dump(), **overrides})
    except ValidationError as exc:
        print(f"pope hints build: {exc}", file=sys.stderr)
        return 2
    settings = settings.model_copy(update={"hints": hints})
    if problem := model_dir_problem(settings.model_path, "hints build"):
        print(problem + " (the search builds prompts with its tokenizer)", file=sys.stderr)
        return 2
    assert settings.model_path is not None
    children = []
    if not _answers(f"{settings.engine_url}/health"):
        port = free_port()
        children.append(Child("engine", ["engine", "--model", settings.model_path, "--port", str(port)],
                              f"http://127.0.0.1:{port}/health"))  # fmt: skip
        settings = settings.model_copy(update={"engine_url": f"http://127.0.0.1:{port}"})
    with redis_for(args.redis_url or os.environ.get("REDIS_URL")) as url:
        if not _answers(f"{settings.verifier_url}/readyz"):
            port = free_port()
            children.append(Child("verifier", ["verifier", "--port", str(port), "--redis-url", url, "--workers", "2"],
                                  f"http://127.0.0.1:{port}/readyz"))  # fmt: skip
            settings = settings.model_copy(update={"verifier_url": f"http://127.0.0.1:{port}"})
        stack = Stack(children, Path(args.run_dir) / "logs", {**os.environ, "PYTHONUNBUFFERED": "1"}, out,
                      label="pope hints build")  # fmt: skip
        try:
            if children:
                stack.say(f"no {' or '.join(c.name for c in children)} answered at the configured URL: starting "
                          f"{'them' if len(children) > 1 else 'one'} (logs in {stack.log_dir})")  # fmt: skip
                stack.start()
                stack.wait_healthy(600, [False])
            asyncio.run(build(settings, url, split=args.split, ids=args.problem_id, redo=args.redo, out=out))
        except KeyboardInterrupt:
            print("interrupted: finished problems are stored; run the same command to resume", file=out)
            return 130
        finally:
            if children:
                stack.stop()
    return 0
