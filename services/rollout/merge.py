"""How new problems join the stored ones, for ``pope data import`` (dataset.py) and
``POST /v1/problems`` (api.py): the same problem in both splits gets two ids, a re-sent
problem keeps its hint search, and a train problem that is also an eval problem is kept out
of training. Pure functions over ``Problem``s; the callers read and write the store.
"""

from __future__ import annotations

from collections.abc import Mapping

from pydantic import BaseModel

from services.common.messages import Problem, normalized_text, problem_id_for


class LeakedPair(BaseModel):
    """A train problem whose text (normalized) is also an eval problem's."""

    train_id: str
    eval_id: str


def split_id(new: Problem, same_id: Problem | None) -> Problem:
    """The same prompt and answer in both splits derive one id; the later copy's id names its split,
    so neither replaces the other and the leakage check sees both."""
    if same_id is None or same_id.split == new.split or new.id != problem_id_for(new.prompt, new.answer):
        return new
    return new.model_copy(update={"id": f"{new.id}-{new.split}"})


def keep_search(new: Problem, old: Problem | None) -> Problem:
    """Re-sending a problem must not wipe what the hard-problem filter and hint search found for
    it (a problem whose prompt or answer changed under its id is a new problem: nothing is kept)."""
    if old is None or old.search is None or new.search is not None or new.label is not None:
        return new
    if (old.prompt, old.answer) != (new.prompt, new.answer):
        return new
    kept = {name: getattr(old, name) for name in ("label", "search", "hint") if getattr(new, name) is None}
    return Problem.model_validate({**new.model_dump(), **kept})


def exclude_leaks(
    batch: dict[str, Problem], before: Mapping[str, Problem], allow_leakage: bool
) -> tuple[list[LeakedPair], int]:
    """Leakage: every train problem (stored or in ``batch``) whose text is an eval problem's,
    where at least one of the two is in ``batch``. Unless leakage is allowed, each such train
    problem not yet excluded is put in ``batch`` marked excluded from training. Returns the
    pairs and how many were newly excluded (not counting those stored excluded)."""
    everything = {**before, **batch}
    evals: dict[str, list[str]] = {}
    for p in sorted(everything.values(), key=lambda p: p.id):
        if p.split == "eval":
            evals.setdefault(normalized_text(p.prompt), []).append(p.id)
    leaked: list[LeakedPair] = []
    newly = 0
    for p in sorted(everything.values(), key=lambda p: p.id):
        matches = evals.get(normalized_text(p.prompt), []) if p.split == "train" else []
        if not matches or not (p.id in batch or any(e in batch for e in matches)):
            continue
        leaked.append(LeakedPair(train_id=p.id, eval_id=matches[0]))
        if not allow_leakage and p.excluded is None:
            batch[p.id] = p.model_copy(update={"excluded": f"same problem as eval problem {matches[0]}"})
            newly += before.get(p.id, p).excluded is None
    return leaked, newly
