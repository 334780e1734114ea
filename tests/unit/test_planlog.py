"""The plan log: durable plans, a torn last line cut off, other formats and runs refused."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from services.common.messages import Variant
from services.rollout.planlog import (
    Plan,
    PlanLog,
    PlanLogError,
    PlannedGroup,
    load_planner_state,
    read,
    save_planner_state,
)


def plan(seq: int, step: int, top_up: int = 0) -> Plan:
    groups = [PlannedGroup(group_id=f"{step}-p-hinted", problem_id="p", variant=Variant.HINTED, seed=seq)]
    return Plan(seq=seq, step=step, top_up=top_up, groups=groups)


def test_a_plan_cut_short_is_found_again_and_a_torn_line_cut_off(tmp_path: Path) -> None:
    path = tmp_path / "plan.jsonl"
    log = PlanLog.open(path, "run:")
    log.append_plan(one := plan(1, 1))
    log.append_published(one, {"1-q-hinted": "its problem was deleted"})
    log.append_plan(plan(2, 2))  # the crash comes before its groups are all out
    with pytest.raises(PlanLogError, match="not published yet"):
        log.append_plan(plan(3, 3))
    with path.open("ab") as f:
        f.write(b'{"kind": "published", "se')  # a write torn by the crash

    again = PlanLog.open(path, "run:")
    assert again.unfinished is not None and again.unfinished.seq == 2 and again.last_step == 2
    assert path.read_bytes().endswith(b"\n")  # the torn tail is gone
    again.append_published(again.unfinished)
    again.append_plan(plan(3, 2, top_up=1))
    plans, published = read(path)
    assert [(p.seq, p.step, p.top_up) for p in plans] == [(1, 1, 0), (2, 2, 0), (3, 2, 1)]
    assert (
        published == {1: {"1-q-hinted": "its problem was deleted"}, 2: {}} and PlanLog.open(path, "run:").top_ups == 1
    )


def test_a_log_of_another_format_or_run_is_refused(tmp_path: Path) -> None:
    PlanLog.open(tmp_path / "a.jsonl", "run:")
    with pytest.raises(PlanLogError, match="key prefix 'run:', not 'other:'"):
        PlanLog.open(tmp_path / "a.jsonl", "other:")
    (tmp_path / "old.jsonl").write_text(json.dumps({"step": 1, "groups": []}) + "\n")
    with pytest.raises(PlanLogError, match="run format 1"):
        PlanLog.open(tmp_path / "old.jsonl", "run:")


def test_the_planner_state_is_replaced_whole(tmp_path: Path) -> None:
    assert load_planner_state(tmp_path) is None
    save_planner_state(tmp_path, 4, {"pos": 3})
    save_planner_state(tmp_path, 5, {"pos": 5})
    assert load_planner_state(tmp_path) == (5, {"pos": 5})
    assert [p.name for p in tmp_path.iterdir()] == ["planner.json"]
