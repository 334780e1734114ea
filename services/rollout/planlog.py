"""The plan log: every group the scheduler plans, on disk and fsynced before any of them
is published (``<rollout.archive_dir>/plan.jsonl``).

    log = PlanLog.open(path, keys.prefix)     # refuses a log of another format
    log.unfinished                            # the last plan, if it was cut short
    log.append_plan(plan)                     # durable before the first publish
    ...publish every group of the plan...
    log.append_published(plan)                # the plan is complete

One JSON object a line: a header (the log's format and run), then per plan a ``plan``
record (its step, top-up index, lineage and groups: id, problem, variant, seed) and, once all
its groups are published, a ``published`` record. A restarted scheduler republishes a
plan that has no ``published`` record under the same ids, so every group planned is
published (a duplicate by id is skipped downstream), and never replans a step. A torn
last line (a crash mid-write) is cut off on open; it was never followed by a publish.
The chaos run's ledger reads the log to account for every planned group.

The planner's position after each plan (its shuffle and RNG, large) is not in the log:
it is kept beside it in ``planner.json``, replaced atomically after each plan record.
"""

from __future__ import annotations

import json
import os
from datetime import datetime
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, NonNegativeInt, ValidationError

from services.common.messages import RUN_FORMAT, Variant, utc_now

PLAN_LOG = "plan.jsonl"
PLANNER_STATE = "planner.json"


class PlanLogError(RuntimeError):
    """The plan log cannot be used (another format, another run, unreadable)."""


class _Record(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Header(_Record):
    kind: Literal["header"] = "header"
    run_format: int = RUN_FORMAT
    key_prefix: str
    created_at: datetime = Field(default_factory=utc_now)


class PlannedGroup(_Record):
    group_id: str
    problem_id: str
    variant: Variant
    seed: int
    salt: str = ""


class Plan(_Record):
    """The groups of one step (``top_up`` 0) or of the step's ``top_up``-th top-up."""

    kind: Literal["plan"] = "plan"
    seq: NonNegativeInt
    """Position in the log: plans are numbered 1, 2, ... in the order they were made."""
    step: NonNegativeInt
    top_up: NonNegativeInt = 0
    lineage: NonNegativeInt = 0
    """The trainer lineage it was planned under (services.common.messages.Lineage)."""
    groups: list[PlannedGroup]
    at: datetime = Field(default_factory=utc_now)


class Published(_Record):
    kind: Literal["published"] = "published"
    seq: NonNegativeInt
    skipped: dict[str, str] = Field(default_factory=dict)
    """Groups of the plan not published, by id, with why (their problem was deleted)."""
    at: datetime = Field(default_factory=utc_now)


class PlanLog:
    """An open plan log (one writer: the scheduler)."""

    def __init__(self, path: Path, header: Header, plans: list[Plan], published: dict[int, dict[str, str]]) -> None:
        self.path, self.header, self.plans, self.published = path, header, plans, published

    @classmethod
    def open(cls, path: Path, key_prefix: str) -> PlanLog:
        """Read the log at ``path``, its torn last line cut off; a new log if there is none."""
        plans, published = read(path, key_prefix)
        if path.exists():
            _cut_torn_tail(path)
        log = cls(path, Header(key_prefix=key_prefix), plans, published)
        if not path.exists() or path.stat().st_size == 0:
            path.parent.mkdir(parents=True, exist_ok=True)
            log._append(log.header)
        return log

    @property
    def last(self) -> Plan | None:
        return self.plans[-1] if self.plans else None

    @property
    def unfinished(self) -> Plan | None:
        """The last plan if not all its groups were published (only the last can be)."""
        last = self.last
        return last if last is not None and last.seq not in self.published else None

    @property
    def lineage(self) -> int:
        """The lineage the last plan was made under (0 for a new log)."""
        return self.last.lineage if self.last else 0

    @property
    def last_step(self) -> int:
        """The newest step whose own plan (not a top-up) was made, in the last plan's lineage."""
        return max((p.step for p in self.plans if p.top_up == 0 and p.lineage == self.lineage), default=0)

    @property
    def top_ups(self) -> int:
        """Top-ups planned so far (their index goes on growing over the run)."""
        return max((p.top_up for p in self.plans), default=0)

    def next_seq(self) -> int:
        return (self.last.seq if self.last else 0) + 1

    def append_plan(self, plan: Plan) -> None:
        if self.unfinished is not None:
            raise PlanLogError(f"plan {self.unfinished.seq} is not published yet; it must be finished first")
        self._append(plan)
        self.plans.append(plan)

    def append_published(self, plan: Plan, skipped: dict[str, str] | None = None) -> None:
        self._append(Published(seq=plan.seq, skipped=skipped or {}))
        self.published[plan.seq] = skipped or {}

    def _append(self, record: _Record) -> None:
        with self.path.open("ab") as f:
            f.write(record.model_dump_json().encode() + b"\n")
            f.flush()
            os.fsync(f.fileno())


def read(path: Path, key_prefix: str | None = None) -> tuple[list[Plan], dict[int, dict[str, str]]]:
    """The plans of the log at ``path`` (none if absent), and for each published plan's
    number the groups it did not send, with why; PlanLogError for a log of another format
    or another run's key prefix."""
    if not path.exists():
        return [], {}
    plans: list[Plan] = []
    published: dict[int, dict[str, str]] = {}
    lines = path.read_bytes().split(b"\n")
    for number, line in enumerate(lines[:-1], 1):  # the part after the last newline is torn
        try:
            row: dict[str, Any] = json.loads(line)
            if number == 1:
                if row.get("kind") != "header" or row.get("run_format") != RUN_FORMAT:
                    raise PlanLogError(
                        f"{path} was written by another pope-rl (run format {row.get('run_format', 1)}); "
                        f"this one reads format {RUN_FORMAT}: move it away or start afresh (pope up --fresh)"
                    )
                header = Header.model_validate(row)
                if key_prefix is not None and header.key_prefix != key_prefix:
                    raise PlanLogError(
                        f"{path} belongs to the run under key prefix {header.key_prefix!r}, not {key_prefix!r}: "
                        "give each run its own rollout.archive_dir"
                    )
            elif row.get("kind") == "plan":
                plans.append(Plan.model_validate(row))
            elif row.get("kind") == "published":
                done = Published.model_validate(row)
                published[done.seq] = done.skipped
            else:
                raise ValueError(f"unknown record kind {row.get('kind')!r}")
        except (ValueError, ValidationError) as exc:
            if isinstance(exc, PlanLogError):
                raise
            raise PlanLogError(f"{path}, line {number}: not a plan log record ({exc})") from exc
    return plans, published


def _cut_torn_tail(path: Path) -> None:
    data = path.read_bytes()
    end = data.rfind(b"\n") + 1
    if end < len(data):
        with path.open("r+b") as f:
            f.truncate(end)
            os.fsync(f.fileno())


def save_planner_state(directory: Path, seq: int, state: dict[str, Any]) -> None:
    """The planner's position after plan ``seq``, replaced atomically."""
    tmp = directory / f".{PLANNER_STATE}.tmp"
    with tmp.open("w") as f:
        json.dump({"seq": seq, "state": state}, f)
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(directory / PLANNER_STATE)


def load_planner_state(directory: Path) -> tuple[int, dict[str, Any]] | None:
    path = directory / PLANNER_STATE
    if not path.exists():
        return None
    data = json.loads(path.read_text())
    return int(data["seq"]), data["state"]
