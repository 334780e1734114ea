"""The hard-problem filter and hint search over stored problems (DESIGN.md 1.1-1.2).

For each problem: k unhinted attempts; any success -> ``easy``. Otherwise, with an oracle
solution, try its prefixes (hints.py: cut at step boundaries, at most ``max_fraction`` of
it) from the shortest up, k_hint attempts each; the shortest with a success becomes the
hint -> ``hard_hinted``; none, or no solution -> ``hard_unsolved``. Every sample goes
through the engine and the verifier service, as in training.

    builder = HintBuilder(settings.hints, attempter, tokenizer, store, template_version, model)
    summary = await builder.run(problems, on_progress=print)

Each finished problem's findings are written to the store at once (onto the problem as
stored then: one deleted or changed meanwhile is left as it is), with its search record and a
fingerprint of the settings, so a build killed at any point and restarted redoes no
finished problem and loses no result. Seeds derive from (seed, problem, stage, prefix
length), so a rebuild draws the same samples.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from services.common.engine_client import SamplingParams
from services.common.messages import HintSearch, Problem, ProblemLabel
from services.rollout.attempts import Attempter, AttemptResult
from services.rollout.hints import cut_points, shortest_working
from services.rollout.settings import HintSettings
from services.rollout.store import ProblemStore

POLICY_VERSION = 2
"""Bumped whenever the search policy (hints.py) changes what a record would be."""


def fingerprint(cfg: HintSettings, template_version: str, model_path: str | None) -> str:
    """Settings that change a record; concurrency does not (it only changes speed)."""
    fields = cfg.model_dump(exclude={"concurrency"})
    text = json.dumps(
        {**fields, "template": template_version, "model": model_path, "policy": POLICY_VERSION}, sort_keys=True
    )
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def stage_seed(seed: int, problem_id: str, stage: str) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}:{problem_id}:{stage}".encode()).digest()[:4], "big") >> 1


def token_ends(tokenizer: Any, text: str) -> list[int]:
    """Character offset where each token of ``text`` ends."""
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    return [int(end) for _, end in enc["offset_mapping"]]


@dataclass
class Progress:
    """Where a build stands; ``line()`` is what the CLI prints after each problem."""

    total: int
    skipped: int = 0
    """Problems already searched with these settings (a resumed build)."""
    done: int = 0
    tokens: int = 0
    labels: Counter[str] = field(default_factory=Counter)
    started: float = field(default_factory=time.monotonic)

    @property
    def eta_s(self) -> float | None:
        if self.done == 0:
            return None
        return (self.total - self.done) * (time.monotonic() - self.started) / self.done

    def line(self, problem: Problem) -> str:
        s = problem.search
        assert s is not None
        what = s.label.value
        if s.prefix_fraction is not None:
            what += f", prefix {s.prefix_tokens} tokens ({s.prefix_fraction:.0%} of the solution)"
        elif s.label is ProblemLabel.HARD_UNSOLVED:
            what += f", {s.prefixes_tried} of {s.candidates} prefixes tried"
        rate = self.done / max(time.monotonic() - self.started, 1e-9) * 60
        eta = "-" if self.eta_s is None else time.strftime("%H:%M:%S", time.gmtime(self.eta_s))
        return (
            f"[{self.done}/{self.total}] {problem.id}: {what}; unhinted {s.unhinted_successes}/"
            f"{s.unhinted_attempts}, {s.tokens_spent:,} tokens | {rate:.1f} problems/min, ETA {eta}"
        )

    def as_dict(self) -> dict[str, Any]:
        return {
            "total": self.total,
            "done": self.done,
            "skipped": self.skipped,
            "tokens": self.tokens,
            "labels": dict(self.labels),
            "elapsed_s": time.monotonic() - self.started,
            "eta_s": self.eta_s,
        }


class HintBuilder:
    def __init__(
        self,
        cfg: HintSettings,
        attempter: Attempter,
        tokenizer: Any,
        store: ProblemStore,
        template_version: str,
        model_path: str | None,
    ) -> None:
        self.cfg, self.attempter, self.tokenizer, self.store = cfg, attempter, tokenizer, store
        self.template_version, self.model_path = template_version, model_path
        self.config = fingerprint(cfg, template_version, model_path)
        self.params = SamplingParams(max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, top_p=cfg.top_p)

    def pending(self, problems: list[Problem], redo: bool = False) -> list[Problem]:
        """Those not yet searched with these settings (all of them with ``redo``)."""
        return [p for p in problems if redo or p.search is None or p.search.config != self.config]

    async def run(
        self,
        problems: list[Problem],
        *,
        redo: bool = False,
        on_progress: Callable[[Problem, Progress], None] | None = None,
    ) -> Progress:
        """Search every pending problem of ``problems``, ``concurrency`` at a time; store each."""
        todo = self.pending(problems, redo)
        progress = Progress(total=len(todo), skipped=len(problems) - len(todo))
        limit = asyncio.Semaphore(self.cfg.concurrency)

        async def one(problem: Problem) -> None:
            async with limit:
                result = await self.search(problem)
                await self.store.update(problem.id, lambda stored: with_search(stored, result))  # durable first
            assert result.search is not None
            progress.done += 1
            progress.tokens += result.search.tokens_spent
            progress.labels[result.search.label.value] += 1
            if on_progress is not None:
                on_progress(result, progress)

        async with asyncio.TaskGroup() as tg:
            for p in todo:
                tg.create_task(one(p))
        return progress

    async def _attempt(self, problem: Problem, hint: str | None, k: int, stage: str) -> AttemptResult:
        return await self.attempter.attempt(
            problem,
            hint=hint,
            k=k,
            params=self.params,
            seed=stage_seed(self.cfg.seed, problem.id, stage),
            rid=f"hints-{problem.id}-{stage}",
        )

    async def search(self, problem: Problem) -> Problem:
        """The problem with its label, hint (if one was found) and search record."""
        cfg = self.cfg
        plain = await self._attempt(problem, None, cfg.k, "unhinted")
        record: dict[str, Any] = {
            "unhinted_attempts": plain.attempts,
            "unhinted_successes": plain.successes,
            "method": cfg.method,
            "config": self.config,
            "template_version": self.template_version,
            "model_path": self.model_path,
        }
        spent = plain.tokens
        update: dict[str, Any] = {}
        if plain.successes > 0:
            label = ProblemLabel.EASY
        elif problem.solution is None:
            label = ProblemLabel.HARD_UNSOLVED
        else:
            solution = problem.solution
            level, cuts = cut_points(
                solution,
                token_ends(self.tokenizer, solution),
                max_fraction=cfg.max_fraction,
                min_cuts=cfg.min_cuts,
                max_cuts=cfg.max_cuts,
            )
            results: dict[int, AttemptResult] = {}

            async def works(i: int) -> bool:
                results[i] = await self._attempt(
                    problem, solution[: cuts[i].chars], cfg.k_hint, f"prefix-{cuts[i].tokens}"
                )
                return results[i].successes > 0

            chosen, tried = await shortest_working(len(cuts), works, cfg.method)
            spent += sum(r.tokens for r in results.values())
            record |= {
                "candidates": len(cuts),
                "prefixes_tried": len(tried),
                "cut_level": level,
                "hinted_attempts": sum(r.attempts for r in results.values()),
            }
            if chosen is None:
                label = ProblemLabel.HARD_UNSOLVED
            else:
                label, cut = ProblemLabel.HARD_HINTED, cuts[chosen]
                record |= {
                    "prefix_chars": cut.chars,
                    "prefix_tokens": cut.tokens,
                    "prefix_fraction": cut.fraction,
                    "hinted_successes": results[chosen].successes,
                }
                update["hint"] = solution[: cut.chars]
        search = HintSearch(label=label, tokens_spent=spent, **record)
        return Problem.model_validate({**problem.model_dump(), **update, "label": label, "search": search})


def with_search(stored: Problem, result: Problem) -> Problem | None:
    """``stored`` (as it is now: excluded since, say) with the search's findings from
    ``result``; None, keeping nothing, when its text changed under its id meanwhile."""
    if (stored.prompt, stored.answer, stored.solution) != (result.prompt, result.answer, result.solution):
        return None
    return stored.model_copy(update={"hint": result.hint, "label": result.label, "search": result.search})


def summary_table(problems: list[Problem]) -> str:
    """A markdown table of searched problems by label."""
    rows = [
        "| label | problems | mean prefix (share of solution) | mean prefixes tried | tokens spent |",
        "| --- | --- | --- | --- | --- |",
    ]
    for label in ProblemLabel:
        mine = [p.search for p in problems if p.search is not None and p.search.label is label]
        if not mine:
            continue
        fractions = [s.prefix_fraction for s in mine if s.prefix_fraction is not None]
        mean_frac = f"{sum(fractions) / len(fractions):.1%}" if fractions else "-"
        tried = sum(s.prefixes_tried for s in mine) / len(mine)
        rows.append(
            f"| {label.value} | {len(mine)} | {mean_frac} | {tried:.1f} | {sum(s.tokens_spent for s in mine):,} |"
        )
    return "\n".join(rows)
