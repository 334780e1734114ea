"""Datasets as they ship: nested columns and chat prompts (verl's layout), Hub snapshot
folders by split, and a dataset's own answer-format instruction taken out of prompts."""

from __future__ import annotations

import json
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet
import pytest

from services.common.messages import problem_id_for
from services.rollout.columns import ColumnPath, PathError, Select
from services.rollout.dataset import ImportOptions, format_report, plan_import, to_problem
from services.rollout.dataset_files import DatasetError, SourceRow, read_rows, split_of
from services.rollout.instructions import DAPO, instruction

# DAPO-Math-17k's wording, as its rows carry it (a public copy of a row: slime's docs,
# docs/en/get_started/quick_start.md; the same text in several preprocessing scripts).
DAPO_PREFIX = (
    "Solve the following math problem step by step. The last line of your response should be of the form "
    "Answer: $Answer (without quotes) where $Answer is the answer to the problem.\n\n"
)
DAPO_SUFFIX = '\n\nRemember to put your answer on its own line after "Answer:".'
VERL = ImportOptions({"answer": "reward_model.ground_truth"})


def verl_row(problem: str, answer: str, *, system: str | None = None) -> dict[str, Any]:
    """A row in verl's schema: chat-message prompt, answer under reward_model."""
    messages = [{"role": "system", "content": system}] if system else []
    return {
        "data_source": "math_dapo",
        "prompt": [*messages, {"role": "user", "content": problem}],
        "ability": "MATH",
        "reward_model": {"ground_truth": answer, "style": "rule"},
        "extra_info": {"index": "0"},
    }


def plan_rows(items: list[dict[str, Any]], options: ImportOptions) -> Any:
    return plan_import([SourceRow(i, "row", item) for i, item in enumerate(items)], [], options)


def write_parquet(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pyarrow.parquet.write_table(pa.Table.from_pylist(rows), path)
    return path


# Column paths -------------------------------------------------------------------------


def test_path_syntax() -> None:
    assert ColumnPath.parse("reward_model.ground_truth").steps == ("reward_model", "ground_truth")
    assert ColumnPath.parse("prompt.0.content").steps == ("prompt", "0", "content")
    assert ColumnPath.parse("prompt[0].content").steps == ("prompt", 0, "content")
    assert ColumnPath.parse("prompt[-1].content").steps == ("prompt", -1, "content")
    assert ColumnPath.parse("prompt[role=user].content").steps == ("prompt", Select("role", "user"), "content")
    for bad in ("", ".a", "a..b", "a[]", "a[x", "a]"):
        with pytest.raises(ValueError, match="column path"):
            ColumnPath.parse(bad)
    with pytest.raises(ValueError, match="column path"):
        ImportOptions({"answer": "reward_model..ground_truth"})


def test_paths_read_nested_values_and_say_where_they_stop() -> None:
    row = verl_row("Compute 2+2.", "4", system="Be brief.")
    get = lambda text: ColumnPath.parse(text).lookup(row)  # noqa: E731
    assert get("reward_model.ground_truth") == "4"
    assert get("prompt.1.content") == get("prompt[-1].content") == get("prompt[role=user].content") == "Compute 2+2."
    assert get("prompt[role=system].content") == "Be brief."
    assert ColumnPath.parse("a.b").lookup({"a.b": "flat", "a": {"b": "nested"}}) == "flat"  # a flat column wins
    failures = {
        "answer": "no column 'answer'",
        "reward_model.truth": "reward_model has no key 'truth'; its keys: ground_truth, style",
        "prompt[2].content": "prompt has 2 elements, no index 2",
        "prompt[role=assistant]": "prompt has no element with role=assistant; roles: system, user",
        "prompt.content": "prompt is a list, not a struct with key 'content'",
        "ability.0": "ability is a str, not a list",
        "extra_info.index.x": "extra_info.index is a str, not a struct",
    }
    for text, message in failures.items():
        with pytest.raises(PathError) as exc:
            get(text)
        assert str(exc.value) == message
    with pytest.raises(PathError, match="reward_model is null"):
        ColumnPath.parse("reward_model.ground_truth").lookup({"reward_model": None})


def test_a_chat_prompt_is_its_last_user_message() -> None:
    few_shot = verl_row("Compute 3+3.", "6", system="Put the answer in a box.")
    few_shot["prompt"][1:1] = [{"role": "user", "content": "Compute 1+1."}, {"role": "assistant", "content": "2"}]
    p = to_problem(few_shot, VERL)
    assert (p.prompt, p.answer, p.id) == ("Compute 3+3.", "6", problem_id_for("Compute 3+3.", "6"))
    for path in ("prompt[role=user].content", "prompt[-1].content"):
        assert to_problem(few_shot, ImportOptions({**VERL.columns, "prompt": path})) == p
    no_user = verl_row("x", "1")
    no_user["prompt"] = [{"role": "system", "content": "Be brief."}]
    _, report = plan_rows([no_user], VERL)
    [err] = report.errors
    assert err.field == "prompt"
    assert err.message == "Field required (column 'prompt': chat messages with no user message; roles: system)"


def test_nested_parquet_columns_as_pyarrow_and_pandas_give_them(tmp_path: Path) -> None:
    rows = [verl_row(f"Compute {i}+{i}.", str(2 * i)) for i in range(3)]
    path = write_parquet(tmp_path / "verl.parquet", rows)
    batch, report = plan_import(read_rows(path), [], VERL)
    assert [p.prompt for p in batch] == [f"Compute {i}+{i}." for i in range(3)] and report.errors == []
    # Through pandas, list columns are numpy arrays and numbers numpy scalars.
    records = pd.read_parquet(path).to_dict("records")
    assert isinstance(records[0]["prompt"], np.ndarray)
    records[1]["reward_model"] = {"ground_truth": np.int64(2)}
    from_pandas, report = plan_rows(records, VERL)
    assert [(p.prompt, p.answer) for p in from_pandas] == [(p.prompt, p.answer) for p in batch] and not report.errors


def test_a_missing_nested_value_names_the_row_and_the_path_and_the_rest_imports() -> None:
    rows = [verl_row("Compute 1+1.", "2"), verl_row("Compute 2+2.", "4"), verl_row("Compute 3+3.", "6")]
    rows[1]["reward_model"] = {"style": "rule"}
    batch, report = plan_rows(rows, VERL)
    assert [p.answer for p in batch] == ["2", "6"]
    [err] = report.errors
    assert (err.where, err.field) == ("row 1", "answer")
    assert err.message == (
        "Field required (column 'reward_model.ground_truth': reward_model has no key 'ground_truth'; its keys: style)"
    )


def test_a_mapped_path_that_finds_nothing_anywhere_is_reported() -> None:
    options = ImportOptions({**VERL.columns, "solution": "extra_info.solution"})
    batch, report = plan_rows([verl_row("Compute 1+1.", "2")], options)
    assert len(batch) == 1 and report.with_solution == 0
    assert report.unmatched == {
        "solution": ("extra_info.solution", "extra_info has no key 'solution'; its keys: index")
    }
    text = format_report(report)
    assert "--map solution=extra_info.solution found nothing in any row" in text
    assert "0 of the 1 problems written have a solution" in text


# Answer-format instructions -----------------------------------------------------------


def test_dapo_instruction_is_taken_out_and_the_id_is_the_plain_problems() -> None:
    problem = "Let $x$ be the answer.\n\nFind $x$ if $2x = 8$."
    rows = [
        verl_row(DAPO_PREFIX + problem + DAPO_SUFFIX, "4"),
        # The variant some copies carry (slime's processed DAPO set).
        verl_row(
            DAPO_PREFIX.replace("$Answer (without quotes)", "\\boxed{$Answer}") + "Compute 5+5." + DAPO_SUFFIX, "10"
        ),
    ]
    batch, report = plan_rows(rows, ImportOptions(VERL.columns, instruction=DAPO))
    assert [p.prompt for p in batch] == [problem, "Compute 5+5."]
    assert batch[0].id == problem_id_for(problem, "4")  # the same problem from a plain dataset de-duplicates
    assert (report.stripped, report.warnings) == (2, [])
    assert "instruction dapo: taken out of 2 of 2 prompts\n" in format_report(report) + "\n"


def test_rows_without_the_instruction_are_counted_and_named() -> None:
    rows = [
        verl_row(DAPO_PREFIX + "Compute 1+1." + DAPO_SUFFIX, "2"),
        verl_row("Compute 2+2.", "4"),
        verl_row(DAPO_PREFIX + "Compute 3+3.", "6"),
        verl_row(DAPO_PREFIX + DAPO_SUFFIX, "0"),  # nothing left: an error, not a warning
    ]
    batch, report = plan_rows(rows, ImportOptions(VERL.columns, instruction=DAPO))
    assert [p.prompt for p in batch] == ["Compute 1+1.", "Compute 2+2.", "Compute 3+3."]
    assert report.stripped == 3
    assert [(w.where, w.field, w.message) for w in report.warnings] == [
        ("row 1", "prompt", "instruction dapo: none of it found"),
        ("row 2", "prompt", "instruction dapo: no suffix found"),
    ]
    assert [(e.where, e.field) for e in report.errors] == [("row 3", "prompt")]
    text = format_report(report)
    assert "taken out of 3 of 4 prompts; 2 rows lack all or part of it, imported less what was found:" in text
    assert "  warning at row 2: instruction dapo: no suffix found" in text


def test_an_instruction_found_in_no_row_is_an_error() -> None:
    with pytest.raises(DatasetError, match="instruction dapo was found in none of the 2 prompts; nothing imported"):
        plan_rows(
            [verl_row("Compute 1+1.", "2"), verl_row("Compute 2+2.", "4")],
            ImportOptions(VERL.columns, instruction=DAPO),
        )


def test_strip_patterns() -> None:
    options = ImportOptions(instruction=instruction(None, [r"^Question:\s*", r"\s*Answer with a number\.$"]))
    [p], report = plan_rows([{"prompt": "Question: Compute 1+1. Answer with a number.", "answer": "2"}], options)
    assert p.prompt == "Compute 1+1." and report.stripped == 1
    assert instruction(None) is None
    combined = instruction("dapo", ["x"])
    assert combined is not None and combined.name == "dapo + pattern 'x'" and len(combined.parts) == 3
    with pytest.raises(ValueError, match="not a regular expression"):
        instruction(None, ["(unclosed"])
    with pytest.raises(ValueError, match="no instruction preset 'orz'"):
        instruction("orz")


# Folders and splits -------------------------------------------------------------------


def test_split_of_reads_names_as_the_hub_does() -> None:
    cases = {
        "data/train-00000-of-00001.parquet": "train",
        "test.jsonl": "test",
        "dev.json": "validation",
        "data/my_eval_set.jsonl": "test",
        "default/train/0000.parquet": "train",
        "train/test-0.parquet": "test",  # the file's own name first
        "training2.jsonl": "train",
        "interval.parquet": None,
        "trainer.parquet": None,
        "data/dapo-math-17k.parquet": None,
    }
    assert {name: split_of(PurePosixPath(name)) for name in cases} == cases


def test_hub_snapshot_folder_reads_one_split_recursively_in_order(tmp_path: Path) -> None:
    snap = tmp_path / "snapshot"
    rows = [{"problem": f"Compute {i}+{i}.", "answer": str(2 * i)} for i in range(6)]
    write_parquet(snap / "data" / "train-00001-of-00002.parquet", rows[3:])
    write_parquet(snap / "data" / "train-00000-of-00002.parquet", rows[:3])
    write_parquet(snap / "data" / "test-00000-of-00001.parquet", [{"problem": "Compute 9+9.", "answer": "18"}])
    write_parquet(snap / ".cache" / "huggingface" / "train-00000-of-00002.parquet", rows)  # hidden: skipped
    (snap / "README.md").write_text("---\nconfigs: []\n---\n")
    (snap / "dataset_infos.json").write_text("{}")  # metadata, not rows

    train = read_rows(snap)
    assert train.what == (
        "2 files of split 'train': data/train-00000-of-00002.parquet, data/train-00001-of-00002.parquet"
    )
    read = list(train)
    assert [r.data["problem"] for r in read if isinstance(r.data, dict)] == [r["problem"] for r in rows]
    assert [(r.file, r.line) for r in read][2:4] == [
        ("data/train-00000-of-00002.parquet", 2),
        ("data/train-00001-of-00002.parquet", 0),
    ]
    [test] = read_rows(snap, hf_split="test")
    assert isinstance(test.data, dict) and test.data["answer"] == "18"
    assert len(list(read_rows(snap, hf_split="eval"))) == 1  # the Hub's word for test
    with pytest.raises(DatasetError) as exc:
        read_rows(snap, hf_split="validation")
    assert str(exc.value) == (
        f"{snap}: no data files of split 'validation' (found test: data/test-00000-of-00001.parquet; "
        "train: data/train-00000-of-00002.parquet, data/train-00001-of-00002.parquet); pick one with --hf-split"
    )


def test_a_folder_whose_files_name_no_split_is_train(tmp_path: Path) -> None:
    write_parquet(tmp_path / "data" / "dapo-math-17k.parquet", [verl_row("Compute 1+1.", "2")])
    (tmp_path / "data" / "more.json").write_text(  # JSON Lines under a .json name, as the Hub allows
        "".join(json.dumps(verl_row(f"Compute {i}+{i}.", str(2 * i))) + "\n" for i in (2, 3))
    )
    batch, report = plan_import(read_rows(tmp_path), [], VERL)
    assert [p.answer for p in batch] == ["2", "4", "6"] and report.errors == []
    with pytest.raises(DatasetError, match=r"no data files of split 'test' \(found train: data/dapo-math-17k"):
        read_rows(tmp_path, hf_split="test")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "README.md").write_text("no data")
    with pytest.raises(DatasetError, match=r"no \.parquet, \.jsonl or \.json files in it or its subfolders"):
        read_rows(tmp_path / "empty")


def test_large_parquet_files_stream_in_order(tmp_path: Path) -> None:
    n = 10_000  # several record batches
    path = write_parquet(
        tmp_path / "big.parquet", [{"prompt": f"Compute {i}+1.", "answer": str(i + 1)} for i in range(n)]
    )
    rows = iter(read_rows(path))
    assert next(rows).line == 0
    assert [r.line for r in rows] == list(range(1, n))


@pytest.mark.parametrize(
    ("preset", "prompt"),
    [
        ("verl-math", "Find $x$ if $x+1=3$. Let's think step by step and output the final answer within \\boxed{}."),
        (
            "verl-gsm8k",
            'Ann has 3 pens. Ben has 2. How many? Let\'s think step by step and output the final answer after "####".',
        ),
    ],
)
def test_verl_presets_take_out_the_sentence_verl_appends(preset: str, prompt: str) -> None:
    found = instruction(preset)
    assert found is not None
    text, missing = found.strip(prompt)
    assert missing == [] and text == prompt[: prompt.index(" Let's")]


def test_an_unreadable_parquet_file_is_a_dataset_error_naming_it(tmp_path: Path) -> None:
    (tmp_path / "train.parquet").write_bytes(b"not parquet at all")
    with pytest.raises(DatasetError, match=r"train\.parquet: cannot read as parquet"):
        list(read_rows(tmp_path))
