"""Hint annealing (``rollout.hint_anneal_at``; off by default, not in the paper): every hint
is cut back by one more step of its solution each time the hinted groups have been solved
often enough, so hinted rollouts practise earlier and earlier parts of the solution.

    annealer = HintAnnealer(settings, redis, tokenizer)
    await annealer.restore()             # where a restarted service left off
    await annealer.update()              # before each step's plan
    problem = annealer.apply(problem)    # a hinted group's problem, its hint cut back

Why: a hint found once, on the base model, stops teaching when the model has learned to
finish from it (hinted groups all solved: no GRPO signal), and what it taught sits at the
end of the solution. On task v10 (README) hinted practice taught the forks after the hints
and nothing moved at the first forks, which an unguided attempt meets first.

The rule: once the mean hinted reward of the newest ``hint_anneal_window`` trainer steps
that trained on hinted groups since the last cut (GET /v1/history's records, read from
Redis) reaches ``hint_anneal_at``, the offset grows by one. A hint is then the solution
prefix ``offset`` cut points shorter than the searched one (``hints.cut_points`` with the
search's settings, ``rollout.hints``), never shorter than the first cut point; a hint that
is not a prefix of its problem's solution is left as it is. The offset and the step it was
last raised at live in the rollout state hash, so a restart keeps them.
"""

from __future__ import annotations

import json
import logging
import math
from typing import Any

from redis.asyncio import Redis

from services.common.keys import Keys
from services.common.messages import Problem
from services.rollout.hint_builder import token_ends
from services.rollout.hints import cut_points
from services.rollout.settings import HintSettings, RolloutSettings

log = logging.getLogger(__name__)


def shorter_hint(solution: str, hint: str, ends: list[int], cfg: HintSettings, by: int) -> str:
    """``hint`` cut back by ``by`` cut points of ``solution`` (at most to the first one);
    unchanged when ``by`` is 0 or the hint is not a prefix of the solution."""
    if by <= 0 or not solution.startswith(hint):
        return hint
    _, cuts = cut_points(solution, ends, max_fraction=cfg.max_fraction, min_cuts=cfg.min_cuts, max_cuts=cfg.max_cuts)
    shorter = [c for c in cuts if c.chars < len(hint)]
    if not shorter:
        return hint
    return solution[: shorter[max(len(shorter) - by, 0)].chars]


class HintAnnealer:
    def __init__(self, settings: RolloutSettings, redis: Redis, tokenizer: Any) -> None:
        self.settings, self.redis, self.tokenizer = settings, redis, tokenizer
        self.keys = Keys(settings.key_prefix)
        self.offset = 0
        self.since = 0
        """The trainer step at which the offset was last raised (its window starts after it)."""
        self._ends: dict[str, list[int]] = {}  # solution -> its token ends

    @property
    def on(self) -> bool:
        return self.settings.hint_anneal_at is not None

    async def restore(self) -> None:
        saved = await self.redis.hmget(self.keys.state("rollout"), ["hint_offset", "hint_offset_since"])  # type: ignore[misc]
        self.offset = int(saved[0]) if saved[0] else 0
        self.since = int(saved[1]) if saved[1] else 0

    async def update(self) -> None:
        """Raise the offset by one if the last window's hinted reward reaches the threshold."""
        at, window = self.settings.hint_anneal_at, self.settings.hint_anneal_window
        if at is None:
            return
        # The newest `window` steps since the last cut that trained on hinted groups.
        raw = await self.redis.lrange(self.keys.history("trainer"), 0, 4 * window + 16)  # type: ignore[misc]
        records = [json.loads(r) for r in raw]  # newest first
        hinted = [
            (int(r["step"]), float(r["reward_hinted"]))
            for r in records
            if int(r.get("step", 0)) > self.since
            and r.get("reward_hinted") is not None
            and math.isfinite(float(r["reward_hinted"]))
        ][:window]
        mean = sum(r for _, r in hinted) / window
        if len(hinted) < window or mean < at:
            return
        self.offset += 1
        self.since = hinted[0][0]
        await self.redis.hset(
            self.keys.state("rollout"),
            mapping={
                "hint_offset": self.offset,  # type: ignore[misc]
                "hint_offset_since": self.since,
            },
        )
        log.info(
            "hint annealing: hinted reward %.2f over trainer steps %d-%d reached %.2f: hints are now %d cut "
            "point(s) shorter than searched",
            mean,
            hinted[-1][0],
            self.since,
            at,
            self.offset,
        )

    def apply(self, problem: Problem) -> Problem:
        """``problem`` with its hint cut back by the current offset (as it is when annealing is off)."""
        if self.offset == 0 or problem.hint is None or not problem.solution:
            return problem
        if problem.solution not in self._ends:
            self._ends[problem.solution] = token_ends(self.tokenizer, problem.solution)
        ends = self._ends[problem.solution]
        hint = shorter_hint(problem.solution, problem.hint, ends, self.settings.hints, self.offset)
        return problem if hint == problem.hint else problem.model_copy(update={"hint": hint})
