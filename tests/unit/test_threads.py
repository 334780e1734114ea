"""The thread budget of ``pope up``'s processes: never more compute threads than cores."""

from __future__ import annotations

import pytest

from services.common.threads import Budget, split, thread_env
from services.engine.settings import EngineSettings
from services.stack import Child
from services.trainer.settings import TrainerSettings
from services.up import assign_threads


@pytest.mark.parametrize(
    ("cores", "engines", "ranks", "engine", "trainer"),
    [(1, 1, 1, 1, 1), (2, 1, 1, 1, 1), (3, 1, 1, 2, 1), (8, 1, 1, 4, 4), (16, 2, 1, 4, 8), (16, 1, 4, 8, 2)],
)
def test_unset_counts_split_the_cores(cores: int, engines: int, ranks: int, engine: int, trainer: int) -> None:
    budget = split(cores, engines=engines, trainer_ranks=ranks)
    assert budget == Budget(cores, engine, trainer)
    if cores >= 2:
        assert budget.engine * engines + budget.trainer * ranks <= cores


def test_a_set_count_is_kept_and_the_other_side_gets_the_rest() -> None:
    assert split(8, engine_threads=6) == Budget(8, 6, 2)
    assert split(8, trainer_threads=5) == Budget(8, 3, 5)
    assert split(8, engine_threads=7, trainer_threads=7) == Budget(8, 7, 7)  # the user's choice
    assert split(2, engine_threads=4) == Budget(2, 4, 1)  # one at least


def _children() -> list[Child]:
    return [Child(name, [name], "http://x/health") for name in ("engine", "verifier", "trainer", "rollout")]


def test_pope_up_assigns_the_budget_through_each_childs_environment() -> None:
    children = _children()
    said = assign_threads(children, EngineSettings(), TrainerSettings(), 2)
    env = {c.name: c.env for c in children}
    assert env["engine"]["POPE_ENGINE__TORCH_THREADS"] == "1"
    assert env["trainer"]["POPE_TRAINER__TORCH_THREADS"] == "1"
    for name in ("verifier", "rollout"):
        assert env[name] == thread_env(1)
        assert not any(k.endswith("TORCH_THREADS") for k in env[name])
    assert "engine 1" in said and "trainer 1" in said and "2 cores" in said


def test_a_count_the_user_set_is_not_overridden() -> None:
    children = _children()
    said = assign_threads(children, EngineSettings(torch_threads=3), TrainerSettings(), 4)
    env = {c.name: c.env for c in children}
    assert "POPE_ENGINE__TORCH_THREADS" not in env["engine"]  # the config's own count stays
    assert env["engine"]["OMP_NUM_THREADS"] == "3"
    assert env["trainer"]["POPE_TRAINER__TORCH_THREADS"] == "1"
    assert "engine 3 (set)" in said
