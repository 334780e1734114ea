"""Dataset import/export, the pure parts: reading every format, mapping, validation, de-dup, leakage."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet
import pytest

from services.common.messages import Problem, ProblemLabel, problem_id_for
from services.rollout.dataset import ImportOptions, export_lines, format_report, parse_map, plan_import, to_problem
from services.rollout.dataset_files import DatasetError, SourceRow, read_rows
from tests.factories import hard_hinted_search

MATH_ROWS = [
    {"problem": "Compute $2+2$.", "solution": "Add: $\\boxed{4}$.", "final_answer": 4, "level": "1"},
    {"problem": "Compute $3 \\cdot 5$.", "solution": "Fifteen.", "final_answer": 15, "level": "2"},
]
MATH_MAP = {"prompt": "problem", "answer": "final_answer"}


def rows_of(items: list[dict[str, Any]]) -> list[SourceRow]:
    return [SourceRow(i, "row", item) for i, item in enumerate(items)]


def plan(items: list[dict[str, Any]], stored: list[Problem] | None = None, **options: Any) -> Any:
    return plan_import(rows_of(items), stored or [], ImportOptions(**options))


def write_jsonl(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n")
    return path


# Mapping ------------------------------------------------------------------------------


def test_mapping_renames_columns_ignores_others_and_stringifies_answers() -> None:
    p = to_problem(MATH_ROWS[0], ImportOptions(MATH_MAP, split="eval", source="math"))
    assert (p.prompt, p.answer, p.solution, p.split, p.source) == (
        "Compute $2+2$.",
        "4",
        "Add: $\\boxed{4}$.",
        "eval",
        "math",
    )
    assert p.id == problem_id_for("Compute $2+2$.", "4")


def test_row_values_win_over_defaults_and_numbers_become_strings() -> None:
    row = {"prompt": "x?", "answer": 2.5, "split": "eval", "source": "own", "hint": "", "id": 7}
    p = to_problem(row, ImportOptions(split="train", source="default"))
    assert (p.answer, p.split, p.source, p.hint, p.id) == ("2.5", "eval", "own", None, "7")
    assert to_problem({"prompt": "y?", "answer": 3.0}, ImportOptions()).answer == "3"


def test_parse_map_and_unknown_fields() -> None:
    assert parse_map(["prompt=problem", " answer = final_answer "]) == MATH_MAP
    with pytest.raises(ValueError, match="FIELD=COLUMN"):
        parse_map(["prompt"])
    with pytest.raises(ValueError, match="unknown Problem field"):
        ImportOptions({"question": "problem"})


# Validation ---------------------------------------------------------------------------


def test_bad_rows_name_line_and_field_and_good_rows_still_import(tmp_path: Path) -> None:
    path = write_jsonl(
        tmp_path / "d.jsonl",
        [
            '{"prompt": "Compute 1+1.", "answer": "2"}',
            "",
            '{"prompt": "Compute 1+2.", "answer": ""}',
            '{"prompt": "Compute 1+3.", "answer": "4", "split": "test"}',
            '{"prompt": "Compute 1+4.", "answer": "5",',
            "[1, 2]",
            '{"prompt": "Compute 1+5.", "answer": "6", "label": "hard_hinted"}',
            '{"prompt": "Compute 1+6.", "answer": "7"}',
        ],
    )
    batch, report = plan_import(read_rows(path), [], ImportOptions())
    assert sorted(p.prompt for p in batch) == ["Compute 1+1.", "Compute 1+6."]
    assert (report.read, report.imported, len(report.errors)) == (7, 2, 5)
    got = [(e.line, e.field) for e in report.errors]
    assert got == [(3, "answer"), (4, "split"), (5, None), (6, None), (7, None)]
    assert "at least 1 character" in report.errors[0].message
    assert report.errors[2].message.startswith("invalid JSON")
    assert "hard_hinted" in report.errors[4].message
    text = format_report(report)
    assert "error at line 3, field 'answer'" in text and "error at line 5: invalid JSON" in text


def test_a_missing_mapped_column_names_the_column() -> None:
    _, report = plan([{"problem": "Compute 2+2."}], columns=MATH_MAP)
    [err] = report.errors
    assert (err.line, err.unit, err.field) == (0, "row", "answer")
    assert err.message == "Field required (column 'final_answer')"


def test_nested_errors_have_dotted_paths() -> None:
    search = {
        "label": "easy",
        "unhinted_attempts": "many",
        "unhinted_successes": 0,
        "tokens_spent": 1,
        "method": "linear",
        "config": "c",
        "template_version": "v1",
    }
    _, report = plan([{"prompt": "q", "answer": "a", "search": search}])
    assert [e.field for e in report.errors] == ["search.unhinted_attempts"]


# De-duplication -----------------------------------------------------------------------


def test_duplicates_by_normalized_text_and_answer_within_a_split() -> None:
    items = [
        {"prompt": "Find  x if x+1=3.", "answer": "2"},
        {"prompt": "find x if x + 1 = 3 .", "answer": "2"},  # same text, other spacing and case
        {"prompt": "Find  x if x+1=3.", "answer": "2"},  # exact repeat (same id)
        {"prompt": "Find x if x+1=3.", "answer": "3"},  # other answer: a different problem
        {"prompt": "Find x if x+1=3.", "answer": "2", "split": "eval"},  # other split: kept
    ]
    batch, report = plan(items, allow_leakage=True)
    assert (report.imported, report.duplicates) == (3, 2)
    assert len({p.id for p in batch}) == 3


def test_stored_problems_count_as_replaced_or_duplicate() -> None:
    stored = [Problem(prompt="What is 6*7?", answer="42")]
    batch, report = plan(
        [{"prompt": "What is 6*7?", "answer": "42"}, {"prompt": "what is 6 * 7 ?", "answer": "42"}], stored
    )
    assert (report.imported, report.replaced, report.duplicates) == (0, 1, 1)
    assert [p.id for p in batch] == [stored[0].id]


def test_reimport_keeps_what_the_hint_search_found() -> None:
    search = hard_hinted_search()
    old = Problem(prompt="q", answer="a", solution="hello world", hint="hello", label="hard_hinted", search=search)
    [new], _ = plan([{"prompt": "q", "answer": "a", "solution": "hello world", "source": "again"}], [old])
    assert (new.label, new.search, new.hint, new.source) == (ProblemLabel.HARD_HINTED, search, "hello", "again")


def test_a_problem_changed_under_its_id_keeps_no_old_search() -> None:
    search = hard_hinted_search()
    old = Problem(
        id="q1", prompt="q", answer="a", solution="hello world", hint="hello", label="hard_hinted", search=search
    )
    [new], report = plan([{"id": "q1", "prompt": "q, but another", "answer": "b"}], [old])
    assert report.replaced == 1 and (new.label, new.search, new.hint) == (None, None, None)


# Leakage ------------------------------------------------------------------------------


def test_train_copy_of_an_eval_problem_is_excluded() -> None:
    items = [{"prompt": "Compute 2+2.", "answer": "4", "split": "eval"}, {"prompt": "compute 2 + 2 .", "answer": "4"}]
    batch, report = plan(items)
    by_split = {p.split: p for p in batch}
    eval_id, train_id = by_split["eval"].id, by_split["train"].id
    assert by_split["train"].excluded == f"same problem as eval problem {eval_id}"
    assert by_split["eval"].excluded is None
    assert [(pair.train_id, pair.eval_id) for pair in report.leaked] == [(train_id, eval_id)]
    assert report.excluded == 1 and "1 train problems are also eval problems" in format_report(report)


def test_leakage_against_the_store_both_ways() -> None:
    stored_train = Problem(prompt="Compute 2+2.", answer="4")
    stored_eval = Problem(prompt="Compute 3+3.", answer="6", split="eval")
    batch, report = plan(
        [{"prompt": "Compute 2+2.", "answer": "4", "split": "eval"}, {"prompt": "Compute 3+3.", "answer": "6"}],
        [stored_train, stored_eval],
    )
    excluded = {p.id: p.excluded for p in batch if p.split == "train"}
    # The train row has the stored eval problem's content, so its id is made to name its split.
    assert set(excluded) == {stored_train.id, problem_id_for("Compute 3+3.", "6") + "-train"}
    assert all(reason and reason.startswith("same problem as eval problem p-") for reason in excluded.values())
    assert report.excluded == 2 and len(report.leaked) == 2 and report.imported == 2


def test_the_very_same_problem_in_both_splits_keeps_both_copies() -> None:
    items = [{"prompt": "Compute 2+2.", "answer": "4", "split": "eval"}, {"prompt": "Compute 2+2.", "answer": "4"}]
    eval_id = problem_id_for("Compute 2+2.", "4")
    batch, report = plan(items)
    assert [(p.id, p.split, p.excluded) for p in batch] == [
        (eval_id, "eval", None),
        (eval_id + "-train", "train", f"same problem as eval problem {eval_id}"),
    ]
    assert report.excluded == 1 and [(x.train_id, x.eval_id) for x in report.leaked] == [(eval_id + "-train", eval_id)]
    # Importing the train copy again (now against the store) finds that copy, not a new one.
    again, report2 = plan(items[1:], batch)
    assert [p.id for p in again] == [eval_id + "-train"] and report2.replaced == 1 and report2.excluded == 0


def test_allow_leakage_reports_but_does_not_exclude() -> None:
    items = [{"prompt": "Compute 2+2.", "answer": "4", "split": "eval"}, {"prompt": "Compute 2+2.", "answer": "4"}]
    batch, report = plan(items, allow_leakage=True)
    assert len(batch) == 2 and all(p.excluded is None for p in batch)
    assert len(report.leaked) == 1 and report.excluded == 0


# Formats ------------------------------------------------------------------------------


def test_json_list_and_parquet(tmp_path: Path) -> None:
    (tmp_path / "d.json").write_text(json.dumps(MATH_ROWS))
    pyarrow.parquet.write_table(pa.Table.from_pylist(MATH_ROWS), tmp_path / "d.parquet")
    for name in ("d.json", "d.parquet"):
        batch, report = plan_import(read_rows(tmp_path / name), [], ImportOptions(MATH_MAP))
        assert [p.answer for p in batch] == ["4", "15"] and report.errors == []
    (tmp_path / "bad.json").write_text('{"prompt": "q"}')
    with pytest.raises(DatasetError, match="expected a JSON list"):
        list(read_rows(tmp_path / "bad.json"))
    (tmp_path / "d.csv").write_text("prompt,answer\n")
    with pytest.raises(DatasetError, match="unknown format"):
        read_rows(tmp_path / "d.csv")


def test_hugging_face_save_to_disk_dataset_and_dataset_dict(tmp_path: Path) -> None:
    datasets = pytest.importorskip("datasets")
    many = [{"problem": f"Compute {i}+{i}.", "final_answer": 2 * i, "solution": None} for i in range(50)]
    ds = datasets.Dataset.from_list(many)
    ds.save_to_disk(str(tmp_path / "one"), num_shards=3)  # several data-*.arrow files
    saved = read_rows(tmp_path / "one")
    assert saved.what == f"{tmp_path / 'one'}: a saved Hugging Face dataset, 3 shards"
    rows = list(saved)
    assert [r.data["final_answer"] for r in rows if isinstance(r.data, dict)] == [2 * i for i in range(50)]
    batch, report = plan_import(rows, [], ImportOptions(MATH_MAP))
    assert report.imported == 50 and batch[7].answer == "14" and batch[7].solution is None

    test_rows = [{"problem": "Compute 9+9.", "final_answer": "18"}]
    datasets.DatasetDict({"train": ds, "test": datasets.Dataset.from_list(test_rows)}).save_to_disk(
        str(tmp_path / "dict")
    )
    [row] = read_rows(tmp_path / "dict", hf_split="test")
    assert isinstance(row.data, dict) and row.data["problem"] == "Compute 9+9."
    assert len(list(read_rows(tmp_path / "dict"))) == 50  # default split: train
    with pytest.raises(DatasetError, match="no split 'validation'"):
        read_rows(tmp_path / "dict", hf_split="validation")


def test_directory_of_files_names_the_file_in_errors(tmp_path: Path) -> None:
    pyarrow.parquet.write_table(pa.Table.from_pylist(MATH_ROWS), tmp_path / "a.parquet")
    write_jsonl(tmp_path / "b.jsonl", ['{"problem": "Compute 5+5."}'])
    batch, report = plan_import(read_rows(tmp_path), [], ImportOptions(MATH_MAP))
    assert len(batch) == 2 and [e.where for e in report.errors] == ["b.jsonl line 1"]


# Export -------------------------------------------------------------------------------


def test_export_lines_filter_and_round_trip() -> None:
    problems = [
        Problem(prompt="q1", answer="a", label="easy", excluded="same problem as eval problem p-1"),
        Problem(prompt="q2", answer="b", split="eval"),
        Problem(prompt="q3", answer="c"),
    ]
    lines = export_lines(problems)
    assert [Problem.model_validate(json.loads(line)) for line in lines] == problems
    assert len(export_lines(problems, split="train")) == 2
    assert [json.loads(x)["prompt"] for x in export_lines(problems, split="train", label="none")] == ["q3"]
    assert [json.loads(x)["excluded"] for x in export_lines(problems, label="easy")] == [problems[0].excluded]
    # What export writes imports again unchanged.
    batch, report = plan_import(rows_of([json.loads(line) for line in lines]), problems, ImportOptions())
    assert batch == problems and report.replaced == 3
