"""The POPE training mix and the guided prompt (pure)."""

from __future__ import annotations

from collections import Counter

import pytest

from services.common.messages import Problem, ProblemLabel, Variant
from services.rollout.planner import Planner
from services.rollout.prompts import PromptTemplate, user_message

HINTED = [Problem(id=f"h{i}", prompt=f"hard {i}", answer="1", hint=f"First, note {i}") for i in range(4)]
PLAIN = [Problem(id=f"u{i}", prompt=f"plain {i}", answer="1") for i in range(2)]


def test_hinted_problems_come_hinted_and_unhinted_one_to_one_as_separate_groups() -> None:
    planner = Planner(hinted_fraction=0.5, seed=0)
    groups = [g for _ in range(10) for g in planner.plan(HINTED + PLAIN, 8)]
    per = Counter((p.id, v) for p, v in groups)
    for p in HINTED:
        assert per[(p.id, Variant.HINTED)] == per[(p.id, Variant.UNHINTED)] > 0
    for p in PLAIN:
        assert per[(p.id, Variant.HINTED)] == 0 and per[(p.id, Variant.UNHINTED)] > 0
    assert all(len(planner.plan(HINTED, 8)) == 8 for _ in range(5))  # every step is full


@pytest.mark.parametrize("fraction", [0.0, 0.25, 1.0])
def test_the_hinted_share_follows_the_configured_fraction(fraction: float) -> None:
    planner = Planner(hinted_fraction=fraction)
    groups = [v for _ in range(20) for _p, v in planner.plan(HINTED, 8)]
    assert groups.count(Variant.HINTED) / len(groups) == pytest.approx(fraction, abs=0.02)


def test_only_train_problems_and_easy_ones_only_if_asked() -> None:
    easy = Problem(id="e", prompt="easy", answer="1", label=ProblemLabel.EASY)
    held_out = Problem(id="x", prompt="eval", answer="1", split="eval")
    assert {p.id for p, _ in Planner(include_easy=False).plan([easy, held_out, *PLAIN], 6)} == {"u0", "u1"}
    assert "e" in {p.id for p, _ in Planner(include_easy=True).plan([easy, *PLAIN], 6)}
    assert Planner().plan([held_out], 4) == []


def test_the_hint_is_in_the_hinted_prompt_only() -> None:
    t = PromptTemplate()
    hinted, plain = user_message(HINTED[0], Variant.HINTED, t), user_message(HINTED[0], Variant.UNHINTED, t)
    assert hinted.startswith("hard 0") and hinted.endswith("First, note 0") and t.hint_instruction in hinted
    assert "First, note 0" not in plain and t.plain_instruction in plain
    with pytest.raises(ValueError, match="no hint"):
        user_message(PLAIN[0], Variant.HINTED, t)


def test_a_restored_planner_continues_exactly_where_it_left_off() -> None:
    import json

    a = Planner(hinted_fraction=0.5, seed=3)
    a.plan(HINTED + PLAIN, 5)  # cuts a pair
    b = Planner(hinted_fraction=0.5, seed=99)
    b.restore(json.loads(json.dumps(a.state())))  # through JSON, as it is kept in Redis
    for _ in range(4):
        assert [(p.id, v) for p, v in a.plan(HINTED + PLAIN, 5)] == [(p.id, v) for p, v in b.plan(HINTED + PLAIN, 5)]


def test_a_repeated_group_in_a_step_gets_its_own_seed_and_pope_pairs_keep_theirs() -> None:
    """At hinted_fraction 1.0 a visit plans a problem's pair as two hinted groups: the
    second is salted so its samples are drawn anew, not a copy of the first (the hinted-only
    arm of tasks v10-v11 trained on such copies). A POPE step repeats nothing: no salts."""
    from services.rollout.scheduler import repeat_salts

    hinted_only = Planner(hinted_fraction=1.0).plan(HINTED, 8)
    assert Counter((p.id, v) for p, v in hinted_only) == {(p.id, Variant.HINTED): 2 for p in HINTED}
    salts = repeat_salts(hinted_only)
    assert sorted(salts) == ["", "", "", "", "#1", "#1", "#1", "#1"]
    assert len({(p.id, s) for (p, _v), s in zip(hinted_only, salts, strict=True)}) == 8
    assert repeat_salts(Planner(hinted_fraction=0.5).plan(HINTED, 8)) == [""] * 8
