"""Import problems from dataset files into the problem store, and export them back out.

    pope data import data/math.jsonl --map prompt=problem --map answer=final_answer --split train
    pope data import DAPO-Math-17k/ --map answer=reward_model.ground_truth --strip-instruction dapo
    pope data export problems.jsonl --split train --label hard_hinted

Reading (files, folders, Hub snapshots, splits) is dataset_files.py's; where a field sits
in a row (``--map`` column paths, chat-message prompts) is columns.py's; a dataset's own
answer-format instruction, taken out of prompts, is instructions.py's. Each row becomes a
``Problem``; a bad row is reported by line (JSONL) or row index (elsewhere) and field, and
the good rows still import. Rows are de-duplicated by content within a split, and a train
problem whose text is also an eval problem's is excluded from training
(``Problem.excluded``) unless leakage is allowed. Planning is pure (``plan_import``); only
``import_rows``/``export_problems`` touch Redis. The rules for ids, hint searches and
leakage are ``services/rollout/merge.py``'s, shared with ``POST /v1/problems`` (where a
row whose id exists replaces that problem).
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

from pydantic import BaseModel, ValidationError
from redis.asyncio import Redis

from services.common.keys import Keys
from services.common.messages import Problem, ProblemLabel, normalized_text
from services.rollout.columns import ColumnPath, PathError, is_chat, user_content
from services.rollout.dataset_files import DatasetError, RowError, SourceRow
from services.rollout.instructions import Instruction
from services.rollout.merge import LeakedPair, exclude_leaks, keep_search, split_id
from services.rollout.store import ProblemStore

PROBLEM_FIELDS = frozenset(Problem.model_fields)
# Optional text fields where an empty string means "not given" (datasets often store "" for missing).
_BLANK_IS_NONE = ("solution", "hint", "source", "excluded")


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
    with_solution: int = 0
    """Written problems that have a solution, so the hint search can cut hints from them."""
    instruction: str | None = None
    """The name of the instruction taken out of prompts, if one was."""
    searched: int = 0
    """Prompts searched for the instruction."""
    stripped: int = 0
    """Prompts the instruction was found in, wholly or in part, and taken out of."""
    errors: list[RowError] = []
    warnings: list[RowError] = []
    """Rows imported whose prompt lacks all or part of the instruction."""
    unmatched: dict[str, tuple[str, str]] = {}
    """Mapped field -> (its column path, why it found nothing in the first row), if it found nothing in any."""
    leaked: list[LeakedPair] = []


@dataclass(frozen=True)
class ImportOptions:
    columns: Mapping[str, str] = field(default_factory=dict)
    """Problem field -> column path (columns.py); unmapped fields read same-named columns."""
    split: Literal["train", "eval"] = "train"
    """Split of rows that have none."""
    source: str | None = None
    """Source of rows that have none."""
    allow_leakage: bool = False
    """Keep train problems that are also eval problems in training (still reported)."""
    instruction: Instruction | None = None
    """A dataset's own answer-format instruction, taken out of every prompt."""
    paths: Mapping[str, ColumnPath] = field(init=False, repr=False, compare=False)
    """Every Problem field's column path, parsed from ``columns``."""

    def __post_init__(self) -> None:
        unknown = sorted(set(self.columns) - PROBLEM_FIELDS)
        if unknown:
            raise ValueError(f"unknown Problem field(s) {unknown}; fields: {sorted(PROBLEM_FIELDS)}")
        paths = {name: ColumnPath.parse(self.columns.get(name, name)) for name in PROBLEM_FIELDS}
        object.__setattr__(self, "paths", paths)  # derived once; the dataclass stays frozen


def parse_map(items: Iterable[str]) -> dict[str, str]:
    """``["prompt=problem", "answer=reward_model.ground_truth"]`` -> ``{"prompt": "problem", ...}``."""
    columns: dict[str, str] = {}
    for item in items:
        name, sep, column = item.partition("=")
        if not sep or not name.strip() or not column.strip():
            raise ValueError(f"--map takes FIELD=COLUMN, got {item!r}")
        columns[name.strip()] = column.strip()
    return columns


# Planning (pure) ------------------------------------------------------------------------


@dataclass
class RowFields:
    """What a row holds for each Problem field, before validation."""

    values: dict[str, Any] = field(default_factory=dict)
    absent: dict[str, str] = field(default_factory=dict)
    """Field -> why its column path found nothing."""
    instruction_missing: list[str] | None = None
    """The instruction's parts not found in the prompt (None: nothing was looked for)."""


def row_fields(data: Mapping[str, Any], options: ImportOptions) -> RowFields:
    """A row's values by column path (a chat ``prompt`` as its user message), cleaned, the
    instruction taken out of the prompt, and the defaults."""
    out = RowFields()
    for name, path in options.paths.items():
        try:
            value = path.lookup(data)
            if name == "prompt" and is_chat(value):
                value = user_content(value)
        except PathError as exc:
            out.absent[name] = str(exc)
            continue
        if isinstance(value, float) and math.isnan(value):
            value = None  # pandas writes missing values as NaN
        if name in ("answer", "id") and isinstance(value, int | float) and not isinstance(value, bool):
            value = str(int(value)) if isinstance(value, int) or value.is_integer() else repr(value)
        if name == "prompt" and options.instruction is not None and isinstance(value, str):
            value, out.instruction_missing = options.instruction.strip(value)
        if name in _BLANK_IS_NONE and isinstance(value, str) and not value.strip():
            value = None
        if value is not None:
            out.values[name] = value
    out.values.setdefault("split", options.split)
    if options.source is not None:
        out.values.setdefault("source", options.source)
    return out


def to_problem(data: Mapping[str, Any], options: ImportOptions) -> Problem:
    """A row as a Problem: mapped columns, then same-named ones, then the defaults."""
    return Problem.model_validate(row_fields(data, options).values)


def _explain(name: str | None, fields: RowFields, options: ImportOptions) -> str:
    """Where a failed field's value was looked for, as a suffix to pydantic's message."""
    column = options.columns.get(name or "")
    reason = fields.absent.get(name or "")
    if reason and not reason.startswith("no column"):
        return f" (column {column or name!r}: {reason})"
    return f" (column {column!r})" if column and column != name else ""


def _content_key(p: Problem) -> tuple[str, str, str]:
    return p.split, normalized_text(p.prompt), p.answer.strip()


def plan_import(
    rows: Iterable[SourceRow], stored: Iterable[Problem], options: ImportOptions
) -> tuple[list[Problem], ImportReport]:
    """What to write (new, replaced and newly excluded problems) and the report of it.

    Raises DatasetError when an instruction to strip was found in none of the prompts:
    the wrong ``--strip-instruction`` for the file, not a few odd rows."""
    report = ImportReport(instruction=options.instruction.name if options.instruction else None)
    before = {p.id: p for p in stored}
    seen = {_content_key(p): p.id for p in before.values()}
    batch: dict[str, Problem] = {}
    found = dict.fromkeys(options.columns, 0)
    first_absent: dict[str, str] = {}
    for row in rows:
        report.read += 1
        if isinstance(row.data, str):
            report.errors.append(row.fail(None, row.data))
            continue
        fields = row_fields(row.data, options)
        for name in found:
            found[name] += name not in fields.absent
            first_absent.setdefault(name, fields.absent.get(name, ""))
        missing, parts = fields.instruction_missing, options.instruction.parts if options.instruction else ()
        if missing is not None:
            report.searched += 1
            report.stripped += len(missing) < len(parts)
        try:
            problem = Problem.model_validate(fields.values)
        except ValidationError as exc:
            for err in exc.errors():
                where = ".".join(str(part) for part in err["loc"]) or None
                report.errors.append(row.fail(where, err["msg"] + _explain(where, fields, options)))
            continue
        if missing:
            what = "none of it" if len(missing) == len(parts) else f"no {', '.join(missing)}"
            report.warnings.append(row.fail("prompt", f"instruction {report.instruction}: {what} found"))
        problem = split_id(problem, batch.get(problem.id) or before.get(problem.id))
        key = _content_key(problem)
        if problem.id in batch or seen.get(key, problem.id) != problem.id:
            report.duplicates += 1
            continue
        seen[key] = problem.id
        batch[problem.id] = keep_search(problem, before.get(problem.id))
        report.replaced += problem.id in before
        report.imported += problem.id not in before

    if report.searched and not report.stripped:
        raise DatasetError(
            f"instruction {report.instruction} was found in none of the {report.searched} prompts; "
            "nothing imported (is it this dataset's instruction?)"
        )
    if first_absent:  # some row was read
        report.unmatched = {n: (options.columns[n], first_absent[n]) for n, hits in found.items() if not hits}
    report.leaked, report.excluded = exclude_leaks(batch, before, options.allow_leakage)
    report.with_solution = sum(p.solution is not None for p in batch.values())
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
    for name, (path, why) in report.unmatched.items():
        lines.append(f"--map {name}={path} found nothing in any row (first row: {why})")
    if report.instruction is not None:
        lacking = f"; {len(report.warnings)} rows lack all or part of it, imported less what was found:"
        lines.append(
            f"instruction {report.instruction}: taken out of {report.stripped} of {report.searched} prompts"
            + (lacking if report.warnings else "")
        )
        lines.extend(f"  warning at {w.where}: {w.message}" for w in report.warnings[:max_errors])
        if len(report.warnings) > max_errors:
            lines.append(f"  ... and {len(report.warnings) - max_errors} more warnings")
    if report.imported + report.replaced:
        lines.append(
            f"{report.with_solution} of the {report.imported + report.replaced} problems written have a solution "
            "(the hint search needs one to build a hint)"
        )
    if report.leaked:
        lines.append(f"{len(report.leaked)} train problems are also eval problems; {report.excluded} newly excluded:")
        lines.extend(f"  train {pair.train_id} = eval {pair.eval_id}" for pair in report.leaked)
    return "\n".join(lines)


# Store I/O ----------------------------------------------------------------------------


async def import_rows(store: ProblemStore, rows: Iterable[SourceRow], options: ImportOptions) -> ImportReport:
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
