"""Import problems from dataset files into the problem store, and export them back out.

    pope data import data/math.jsonl --map prompt=problem --map answer=final_answer --split train
    pope data import hf-dir/ --hf-split test --split eval --source math500
    pope data export problems.jsonl --split train --label hard_hinted

Reads JSON Lines (``.jsonl``), a JSON list (``.json``), parquet, a directory written by
Hugging Face ``Dataset.save_to_disk`` (Arrow streaming IPC files; a ``DatasetDict``
directory by split name), or a directory of ``*.parquet`` / ``*.jsonl`` files. Each row
becomes a ``Problem``; a bad row is reported by line (JSONL) or row index (elsewhere) and
field, and the good rows still import. Rows are de-duplicated by content within a split,
and a train problem whose text is also an eval problem's is excluded from training
(``Problem.excluded``) unless leakage is allowed. Reading and planning are pure
(``read_rows``, ``plan_import``); only ``import_rows``/``export_problems`` touch Redis.
The rules for ids, hint searches and leakage are ``services/rollout/merge.py``'s, shared
with ``POST /v1/problems`` (where a row whose id exists replaces that problem).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import AsyncIterator, Iterable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import pyarrow as pa
import pyarrow.ipc
import pyarrow.parquet
from pydantic import BaseModel, ValidationError
from redis.asyncio import Redis

from services.common.keys import Keys
from services.common.messages import Problem, ProblemLabel, normalized_text
from services.rollout.merge import LeakedPair, exclude_leaks, keep_search, split_id
from services.rollout.store import ProblemStore

PROBLEM_FIELDS = frozenset(Problem.model_fields)
# Optional text fields where an empty string means "not given" (datasets often store "" for missing).
_BLANK_IS_NONE = ("solution", "hint", "source", "excluded")


class DatasetError(Exception):
    """The file as a whole cannot be read (missing, unknown format, not a list, no such split)."""


class RowError(BaseModel):
    """One bad row: where it is, which field (dotted path; None for the whole row), and why."""

    line: int
    """1-based line of a JSONL file; 0-based row index in any other format."""
    field: str | None
    message: str
    unit: Literal["line", "row"] = "line"
    file: str | None = None
    """The file within a directory of files; None when a single file was read."""

    @property
    def where(self) -> str:
        return f"{self.file + ' ' if self.file else ''}{self.unit} {self.line}"


class ImportReport(BaseModel):
    read: int = 0
    imported: int = 0
    """New problems (id not in the store before)."""
    replaced: int = 0
    """Problems whose id was already stored."""
    duplicates: int = 0
    """Rows dropped because an earlier row or stored problem of the same split has the same text and answer."""
    excluded: int = 0
    """Train problems newly kept out of training because an eval problem has the same text."""
    errors: list[RowError] = []
    leaked: list[LeakedPair] = []


@dataclass(frozen=True)
class ImportOptions:
    columns: Mapping[str, str] = field(default_factory=dict)
    """Problem field -> source column; unmapped fields read same-named columns."""
    split: Literal["train", "eval"] = "train"
    """Split of rows that have none."""
    source: str | None = None
    """Source of rows that have none."""
    allow_leakage: bool = False
    """Keep train problems that are also eval problems in training (still reported)."""

    def __post_init__(self) -> None:
        unknown = sorted(set(self.columns) - PROBLEM_FIELDS)
        if unknown:
            raise ValueError(f"unknown Problem field(s) {unknown}; fields: {sorted(PROBLEM_FIELDS)}")


@dataclass(frozen=True)
class SourceRow:
    """One row as read: its columns, or (a str) why it could not be read (malformed JSON, not an object)."""

    line: int
    unit: Literal["line", "row"]
    data: dict[str, Any] | str
    file: str | None = None

    def fail(self, field_: str | None, message: str) -> RowError:
        return RowError(line=self.line, field=field_, message=message, unit=self.unit, file=self.file)


def parse_map(items: Iterable[str]) -> dict[str, str]:
    """``["prompt=problem", "answer=final_answer"]`` -> ``{"prompt": "problem", ...}``."""
    columns: dict[str, str] = {}
    for item in items:
        name, sep, column = item.partition("=")
        if not sep or not name.strip() or not column.strip():
            raise ValueError(f"--map takes FIELD=COLUMN, got {item!r}")
        columns[name.strip()] = column.strip()
    return columns


# Reading ------------------------------------------------------------------------------


def read_rows(path: Path, hf_split: str = "train") -> list[SourceRow]:
    """Every row of a dataset file or directory, in file order."""
    if path.is_dir():
        return _read_dir(path, hf_split)
    if not path.is_file():
        raise DatasetError(f"{path}: no such file or directory")
    return _read_file(path, None)


def _read_file(path: Path, name: str | None) -> list[SourceRow]:
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        return _read_jsonl(path, name)
    if suffix == ".json":
        try:
            data = json.loads(path.read_text(encoding="utf-8-sig"))
        except json.JSONDecodeError as exc:
            raise DatasetError(f"{path}: invalid JSON: {exc}") from None
        if not isinstance(data, list):
            raise DatasetError(f"{path}: expected a JSON list of objects, got {type(data).__name__}")
        return _objects(data, "row", 0, name)
    if suffix == ".parquet":
        return _objects(pyarrow.parquet.read_table(path).to_pylist(), "row", 0, name)
    raise DatasetError(
        f"{path}: unknown format {suffix or '(no suffix)'!r}; use .jsonl, .json, .parquet or a directory"
    )


def _read_jsonl(path: Path, name: str | None) -> list[SourceRow]:
    rows: list[SourceRow] = []
    with path.open(encoding="utf-8-sig") as f:
        for number, text in enumerate(f, start=1):
            if not text.strip():
                continue
            try:
                rows.extend(_objects([json.loads(text)], "line", number, name))
            except json.JSONDecodeError as exc:  # exc's own "line 2" would count the line's newline
                rows.append(SourceRow(number, "line", f"invalid JSON: {exc.msg} (column {exc.colno})", name))
    return rows


def _objects(items: list[Any], unit: Literal["line", "row"], start: int, name: str | None) -> list[SourceRow]:
    not_object = "expected an object, got {}"
    return [
        SourceRow(start + i, unit, item if isinstance(item, dict) else not_object.format(type(item).__name__), name)
        for i, item in enumerate(items)
    ]


def _read_dir(path: Path, hf_split: str) -> list[SourceRow]:
    if (path / "dataset_dict.json").is_file():  # a DatasetDict: one saved Dataset per split
        splits = json.loads((path / "dataset_dict.json").read_text()).get("splits", [])
        if hf_split not in splits:
            raise DatasetError(f"{path}: no split {hf_split!r} (splits: {', '.join(splits)}); pass --hf-split")
        path = path / hf_split
    if (path / "state.json").is_file():
        return _objects(_read_arrow_dataset(path).to_pylist(), "row", 0, None)
    files = sorted(p for p in path.iterdir() if p.suffix.lower() in (".parquet", ".jsonl"))
    if not files:
        raise DatasetError(f"{path}: neither a saved Hugging Face dataset nor a directory of .parquet/.jsonl files")
    return [row for p in files for row in _read_file(p, p.name)]


def _read_arrow_dataset(path: Path) -> pa.Table:
    """The table of a ``Dataset.save_to_disk`` directory: its shards, in state.json's order."""
    state = json.loads((path / "state.json").read_text())
    names = [f["filename"] for f in state.get("_data_files", [])] or sorted(p.name for p in path.glob("data-*.arrow"))
    if not names:
        raise DatasetError(f"{path}: state.json lists no data files")
    tables = []
    for name in names:
        with pa.memory_map(str(path / name)) as source:
            tables.append(pyarrow.ipc.open_stream(source).read_all())
    return pa.concat_tables(tables)


# Planning (pure) ------------------------------------------------------------------------


def to_problem(data: Mapping[str, Any], options: ImportOptions) -> Problem:
    """A row as a Problem: mapped columns, then same-named ones, then the defaults."""
    values: dict[str, Any] = {}
    for name in PROBLEM_FIELDS:
        column = options.columns.get(name, name)
        value = data.get(column)
        if isinstance(value, float) and math.isnan(value):
            value = None  # pandas writes missing values as NaN
        if name in ("answer", "id") and isinstance(value, int | float) and not isinstance(value, bool):
            value = str(int(value)) if isinstance(value, int) or value.is_integer() else repr(value)
        if name in _BLANK_IS_NONE and isinstance(value, str) and not value.strip():
            value = None
        if value is not None:
            values[name] = value
    values.setdefault("split", options.split)
    if options.source is not None:
        values.setdefault("source", options.source)
    return Problem.model_validate(values)


def _content_key(p: Problem) -> tuple[str, str, str]:
    return p.split, normalized_text(p.prompt), p.answer.strip()


def plan_import(
    rows: Iterable[SourceRow], stored: Iterable[Problem], options: ImportOptions
) -> tuple[list[Problem], ImportReport]:
    """What to write (new, replaced and newly excluded problems) and the report of it."""
    report = ImportReport()
    before = {p.id: p for p in stored}
    seen = {_content_key(p): p.id for p in before.values()}
    batch: dict[str, Problem] = {}
    for row in rows:
        report.read += 1
        if isinstance(row.data, str):
            report.errors.append(row.fail(None, row.data))
            continue
        try:
            problem = to_problem(row.data, options)
        except ValidationError as exc:
            for err in exc.errors():
                name = ".".join(str(part) for part in err["loc"]) or None
                column = options.columns.get(name or "")
                suffix = f" (column {column!r})" if column and column != name else ""
                report.errors.append(row.fail(name, err["msg"] + suffix))
            continue
        problem = split_id(problem, batch.get(problem.id) or before.get(problem.id))
        key = _content_key(problem)
        if problem.id in batch or seen.get(key, problem.id) != problem.id:
            report.duplicates += 1
            continue
        seen[key] = problem.id
        batch[problem.id] = keep_search(problem, before.get(problem.id))
        report.replaced += problem.id in before
        report.imported += problem.id not in before

    report.leaked, report.excluded = exclude_leaks(batch, before, options.allow_leakage)
    return list(batch.values()), report


def export_lines(problems: Iterable[Problem], split: str | None = None, label: str | None = None) -> list[str]:
    """One JSON object per problem (every field), filtered by split and by label ("none": unlabelled)."""
    if label not in (None, "none", *ProblemLabel):
        raise ValueError(f"unknown label {label!r}; labels: none, {', '.join(ProblemLabel)}")
    return [
        json.dumps(p.model_dump(mode="json"), ensure_ascii=False)
        for p in problems
        if (split is None or p.split == split) and (label is None or (p.label.value if p.label else "none") == label)
    ]


def format_report(report: ImportReport, max_errors: int = 20) -> str:
    lines = [
        f"read {report.read} rows: {report.imported} new, {report.replaced} replaced, "
        f"{report.duplicates} duplicates, {len(report.errors)} errors"
    ]
    for err in report.errors[:max_errors]:
        lines.append(f"  error at {err.where}{f', field {err.field!r}' if err.field else ''}: {err.message}")
    if len(report.errors) > max_errors:
        lines.append(f"  ... and {len(report.errors) - max_errors} more errors")
    if report.leaked:
        lines.append(f"{len(report.leaked)} train problems are also eval problems; {report.excluded} newly excluded:")
        lines.extend(f"  train {pair.train_id} = eval {pair.eval_id}" for pair in report.leaked)
    return "\n".join(lines)


# Store I/O ----------------------------------------------------------------------------


async def import_rows(store: ProblemStore, rows: list[SourceRow], options: ImportOptions) -> ImportReport:
    """Plan against the store's problems and write the batch in one transaction.

    Not isolated from concurrent writers (the API): a problem submitted between the read
    and the write is not checked for duplicates or leakage by this import.
    """
    batch, report = plan_import(rows, await store.all(), options)
    await store.put_many(batch)
    return report


async def export_problems(store: ProblemStore, out: Path, split: str | None, label: str | None) -> int:
    """Write the matching problems to ``out`` (JSONL; replaced atomically); returns how many."""
    lines = export_lines(await store.all(), split, label)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    os.replace(tmp, out)
    return len(lines)


@asynccontextmanager
async def problem_store(redis_url: str, key_prefix: str) -> AsyncIterator[ProblemStore]:
    """The problem store under ``key_prefix``; connects first so a bad URL fails before any work."""
    redis = Redis.from_url(redis_url)
    try:
        await redis.ping()  # type: ignore[misc]
        yield ProblemStore(redis, Keys(key_prefix))
    finally:
        await redis.aclose()
