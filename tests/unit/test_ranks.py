"""The pure parts of the trainer's ranks: rows shared by tokens, and the recorded-groups file
a replay reads (a step trained again after a resume supersedes what came after it)."""

from __future__ import annotations

import json
from pathlib import Path

from services.trainer import replay
from services.trainer.world import share_rows
from tests.factories import recorded_steps


def test_rows_are_shared_by_tokens_longest_first_each_to_the_least_loaded() -> None:
    lengths = [10, 300, 40, 40, 290, 5, 60]
    shares = share_rows(lengths, 2)
    assert sorted(i for s in shares for i in s) == list(range(len(lengths)))  # each row once
    loads = [sum(lengths[i] for i in s) for s in shares]
    assert loads == [380, 365]  # greedy: 300, 40, 40 | 290, 60, 10, 5
    assert all(s == sorted(s) for s in shares)  # in their original order
    assert share_rows(lengths, 1) == [list(range(len(lengths)))]
    assert share_rows([7], 3) == [[0], [], []]  # a rank may get none (it runs a masked row)


def test_a_step_begun_again_supersedes_what_followed_it(tmp_path: Path) -> None:
    path = recorded_steps(tmp_path / "g.jsonl", steps=4, groups_per_step=2, seed=1)
    first = replay.read(path)
    assert [n for n, _ in first] == [1, 2, 3, 4] and all(len(g) == 2 for _, g in first)
    # A crash after step 4, a resume at step 2: steps 3 and 4 are trained again, on other groups.
    again = recorded_steps(tmp_path / "again.jsonl", steps=4, groups_per_step=2, seed=2)
    lines = again.read_text().splitlines()
    redo = [json.loads(x) for x in lines if json.loads(x)["step"] == 3]
    with path.open("a") as f:
        f.write("".join(json.dumps(r) + "\n" for r in redo))
    read = dict(replay.read(path))
    assert sorted(read) == [1, 2, 3]  # the old step 4 went with the old step 3
    assert [g.group_id for g in read[3]] == [r["group"]["group_id"] for r in redo]
    assert read[3][0].samples[0].completion_ids == redo[0]["group"]["samples"][0]["completion_ids"]
    assert [g.group_id for g in read[2]] == [g.group_id for g in dict(first)[2]]


def test_a_step_cut_short_by_a_crash_is_left_out(tmp_path: Path) -> None:
    path = recorded_steps(tmp_path / "g.jsonl", steps=2, groups_per_step=3)
    lines = path.read_text().splitlines()
    path.write_text("\n".join(lines[:4]) + "\n" + lines[4][:50])  # step 2: one whole line, one torn
    assert [n for n, _ in replay.read(path)] == [1]


def test_a_step_recorded_after_a_torn_line_is_read_whole(tmp_path: Path) -> None:
    path = recorded_steps(tmp_path / "g.jsonl", steps=2, groups_per_step=2)
    lines = path.read_text().splitlines()
    path.write_text("\n".join(lines[:3]) + "\n" + lines[3][:40])  # killed while writing step 2
    again = recorded_steps(tmp_path / "again.jsonl", steps=2, groups_per_step=2, seed=5)
    step_two = replay.read(again)[1][1]
    replay.record(path, 2, 0, step_two)  # the restart trains step 2 again and records it
    assert [[g.group_id for g in gs] for _, gs in replay.read(path)] == [["s1g0", "s1g1"], ["s2g0", "s2g1"]]
    assert replay.read(path)[1][1][0].samples[0].completion_ids == step_two[0].samples[0].completion_ids
