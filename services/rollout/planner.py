"""Which groups to sample next: the POPE training mix (DESIGN.md 1.4), as a pure planner.

Every visit of a problem that has a hint yields two groups, hinted and unhinted in the
ratio ``hinted_fraction`` (0.5: one of each, POPE's 1:1); a problem without a hint
yields one unhinted group. Hinted and unhinted versions are separate groups, each
normalised on its own by GRPO. Problems are visited in a shuffled order, reshuffled
each pass; a pair cut by the end of a step is finished at the start of the next, so the
mix holds over steps. Only ``train`` problems are used, none ``excluded`` (an eval problem's
twin, say); ``easy`` ones only if asked.
"""

from __future__ import annotations

import random
from typing import Any

from services.common.messages import Problem, ProblemLabel, Variant
from services.common.rng import restore_rng_state, rng_state_json


class Planner:
    def __init__(self, hinted_fraction: float = 0.5, include_easy: bool = True, seed: int = 0) -> None:
        self.hinted_fraction, self.include_easy = hinted_fraction, include_easy
        self._rng = random.Random(seed)
        self._order: list[str] = []
        self._pos = 0
        self._credit = 0.0  # error diffusion: the hinted share so far tracks hinted_fraction
        self._carry: list[tuple[str, Variant]] = []  # (problem id, variant) of a pair cut by a step

    def plan(self, problems: list[Problem], n_groups: int) -> list[tuple[Problem, Variant]]:
        """The next ``n_groups`` (problem, variant) groups to sample."""
        eligible = {
            p.id: p
            for p in problems
            if p.split == "train" and not p.excluded and (self.include_easy or p.label != ProblemLabel.EASY)
        }
        out = [(eligible[pid], v) for pid, v in self._carry if pid in eligible]  # finish a cut pair
        self._carry = []
        if not eligible:
            return []
        while len(out) < n_groups:
            if self._pos >= len(self._order):
                self._order = sorted(eligible)
                self._rng.shuffle(self._order)
                self._pos = 0
            problem = eligible.get(self._order[self._pos])
            self._pos += 1
            if problem is None:  # removed since the shuffle
                continue
            if problem.hint is None:
                out.append((problem, Variant.UNHINTED))
                continue
            for _ in range(2):
                self._credit += self.hinted_fraction
                hinted = self._credit >= 1.0 - 1e-9
                self._credit -= 1.0 if hinted else 0.0
                out.append((problem, Variant.HINTED if hinted else Variant.UNHINTED))
        self._carry = [(p.id, v) for p, v in out[n_groups:]]
        return out[:n_groups]

    def state(self) -> dict[str, Any]:
        """Where the planner is (JSON-able), so a restarted scheduler keeps the mix exact."""
        return {
            "order": self._order,
            "pos": self._pos,
            "credit": self._credit,
            "carry": [[pid, v.value] for pid, v in self._carry],
            "rng": rng_state_json(self._rng),
        }

    def restore(self, state: dict[str, Any]) -> None:
        self._order, self._pos, self._credit = list(state["order"]), int(state["pos"]), float(state["credit"])
        self._carry = [(pid, Variant(v)) for pid, v in state["carry"]]
        restore_rng_state(self._rng, state["rng"])
