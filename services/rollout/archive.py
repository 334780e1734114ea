"""The JSONL archive of scored samples (DESIGN.md 4, "Retention").

The streams are capped, so every scored sample is also appended here, one JSON object a
line, and ``GET /v1/rollouts`` pages through it newest first long after the stream has
moved on:

    archive = RolloutArchive(Path("runs/rollouts/rollouts.jsonl"))
    archive.append(RolloutRecord.from_group(scored_group))      # flushed and fsynced
    records, cursor = archive.page(50, None, variant=Variant.HINTED)
    more, cursor = archive.page(50, cursor, variant=Variant.HINTED)

Paging reads the file backwards in fixed-size blocks, so a page costs what it reads,
not the size of the file. A cursor is the byte offset where the next page's scan starts,
wrapped so clients treat it as opaque.

What must stay true: one writer at a time (the rollout service), and a line is visible
to readers only once its newline is on disk. Bytes after the last newline are a write in
progress or a write torn by a crash; readers ignore them and the next append cuts them
off, so the file never holds a half record followed by a whole one. A complete line never
changes or moves, so an offset returned by ``end`` names the same line forever: the
archiver (archiver.py) records where an append will land and, after a crash, reads there
(``samples_at``) to append only what is missing.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import os
import re
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any, BinaryIO

from pydantic import BaseModel, ConfigDict, ValidationError

from services.common.messages import FinishReason, ScoredGroup, ScoringPolicy, Variant

log = logging.getLogger(__name__)

BLOCK_SIZE = 64 * 1024
"""Bytes read per step when scanning backwards."""

_CURSOR_PREFIX = "v1:"
_CURSOR_BODY = re.compile(re.escape(_CURSOR_PREFIX) + r"(0|[1-9][0-9]{0,18})")


class RolloutRecord(BaseModel):
    """One scored sample, flattened for the archive and the API (no token ids)."""

    model_config = ConfigDict(extra="forbid")

    group_id: str
    sample_index: int
    """Position of the sample in its group."""
    problem_id: str
    variant: Variant
    prompt: str
    """The rendered prompt (for a hinted group it contains the hint)."""
    hint: str | None = None
    """The hint ``prompt`` shows (a hinted group's; None in rows archived before the field)."""
    text: str
    """The completion."""
    reward: float
    extracted: str | None
    """The final answer the verifier read, or None."""
    timed_out: bool
    error: str | None
    finish_reason: FinishReason
    weight_version: int
    """The weights that sampled this sample (may be newer than its group's oldest)."""
    step: int
    """The training step the rollout service generated the group for."""
    completion_tokens: int
    scored_at: datetime
    policy: ScoringPolicy = ScoringPolicy.LAST_BOX_V1
    """The verifier's scoring rules (rows without one were scored before the record)."""

    @classmethod
    def from_group(cls, g: ScoredGroup) -> list[RolloutRecord]:
        """One record per sample of ``g``, in sample order."""
        return [
            cls(
                group_id=g.group_id,
                sample_index=i,
                problem_id=g.problem_id,
                variant=g.variant,
                prompt=g.prompt,
                hint=g.hint,
                text=sample.text,
                reward=score.reward,
                extracted=score.extracted,
                timed_out=score.timed_out,
                error=score.error,
                finish_reason=sample.finish_reason,
                weight_version=sample.weight_version,
                step=g.step,
                completion_tokens=len(sample.completion_ids),
                scored_at=g.scored_at,
                policy=g.policy,
            )
            for i, (sample, score) in enumerate(zip(g.samples, g.scores, strict=True))
        ]


def encode_cursor(offset: int) -> str:
    return base64.urlsafe_b64encode(f"{_CURSOR_PREFIX}{offset}".encode()).decode().rstrip("=")


def decode_cursor(cursor: str) -> int:
    """The byte offset inside ``cursor``; ValueError saying why when it is not one of ours."""
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode("ascii")
    except (binascii.Error, UnicodeDecodeError, ValueError):
        raw = ""
    match = _CURSOR_BODY.fullmatch(raw)
    if match is None:
        raise ValueError(f"malformed cursor {cursor!r}: pass back the next_cursor of a previous page unchanged")
    return int(match.group(1))


class ArchiveMoved(RuntimeError):
    """The archive's end is not where the writer expected: another writer appended."""


class RolloutArchive:
    """An append-only JSONL file of RolloutRecords, paged newest first."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def end(self) -> int:
        """The offset where the next append lands: just past the last complete line."""
        try:
            with open(self.path, "rb") as f:
                return _complete_end(f, f.seek(0, os.SEEK_END))
        except FileNotFoundError:
            return 0

    def append(self, records: list[RolloutRecord], at: int | None = None) -> None:
        """Append one line per record; returns once the lines are flushed and fsynced.

        With ``at`` (an earlier ``end()``), raises ArchiveMoved without writing if the lines
        would land anywhere else: someone else wrote in between.
        """
        if not records:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        data = b"".join(r.model_dump_json().encode() + b"\n" for r in records)
        # "a+b": appends land at the end whatever the position, and the tail can be read.
        with open(self.path, "a+b") as f:
            size = f.seek(0, os.SEEK_END)
            end = _complete_end(f, size)
            if at is not None and end != at:
                raise ArchiveMoved(f"{self.path}: expected to append at byte {at}, the end is at {end}")
            if end != size:
                log.warning("%s: dropping %d bytes of a torn last line", self.path, size - end)
                f.truncate(end)
            f.write(data)
            f.flush()
            os.fsync(f.fileno())

    def samples_at(self, offsets: list[int], group_id: str) -> set[int]:
        """The sample indexes of ``group_id``'s records in the lines starting at each offset
        (each an earlier ``end()``), read up to the first line of another group."""
        found: set[int] = set()
        if not self.path.exists():
            return found
        with open(self.path, "rb") as f:
            end = _complete_end(f, f.seek(0, os.SEEK_END))
            for offset in offsets:
                for line_start, line in _lines_forward(f, offset, end):
                    record = _parse(line, line_start, self.path)
                    if record is None or record.group_id != group_id:
                        break
                    found.add(record.sample_index)
        return found

    def page(
        self,
        limit: int,
        cursor: str | None,
        problem_id: str | None = None,
        variant: Variant | None = None,
        weight_version: int | None = None,
        step: int | None = None,
        min_reward: float | None = None,
        max_reward: float | None = None,
    ) -> tuple[list[RolloutRecord], str | None]:
        """Up to ``limit`` records matching every given filter (the rewards' bounds are
        inclusive), newest first, and the cursor of the next page (None when no older record
        matches).

        Raises ValueError for a malformed cursor or a limit below 1.
        """
        if limit < 1:
            raise ValueError(f"limit must be at least 1, got {limit}")
        start = decode_cursor(cursor) if cursor is not None else None
        if not self.path.exists():  # nothing archived yet
            if start:
                raise ValueError(f"cursor {cursor!r} points past the end of the archive")
            return [], None
        with open(self.path, "rb") as f:
            end = _complete_end(f, f.seek(0, os.SEEK_END))
            if start is not None:
                _check_boundary(f, start, end, cursor or "")
                end = start
            out: list[RolloutRecord] = []
            want = {
                k: v
                for k, v in (
                    ("problem_id", problem_id),
                    ("variant", variant.value if variant is not None else None),
                    ("weight_version", weight_version),
                    ("step", step),
                )
                if v is not None
            }

            def matches(row: dict[str, Any]) -> bool:  # on the raw JSON: only a match is validated
                reward = row.get("reward")
                if not isinstance(reward, int | float):
                    return False
                return (
                    all(row.get(k) == v for k, v in want.items())
                    and (min_reward is None or reward >= min_reward)
                    and (max_reward is None or reward <= max_reward)
                )

            for line_start, line in _lines_backwards(f, end):
                row = _json(line, line_start, self.path)
                if row is None or not matches(row):
                    continue
                record = _record(row, line_start, self.path)
                if record is None:
                    continue
                if len(out) == limit:
                    # One more match exists: the next page starts just after it.
                    return out, encode_cursor(line_start + len(line) + 1)
                out.append(record)
            return out, None


def _complete_end(f: BinaryIO, size: int) -> int:
    """The offset just past the last newline in the first ``size`` bytes (0 if none)."""
    pos = size
    while pos > 0:
        step = min(BLOCK_SIZE, pos)
        f.seek(pos - step)
        block = f.read(step)
        nl = block.rfind(b"\n")
        if nl >= 0:
            return pos - step + nl + 1
        pos -= step
    return 0


def _check_boundary(f: BinaryIO, start: int, end: int, cursor: str) -> None:
    """A cursor must point at the start of a line within the complete part of the file."""
    if start > end:
        raise ValueError(f"cursor {cursor!r} points past the end of the archive")
    if start > 0:
        f.seek(start - 1)
        if f.read(1) != b"\n":
            raise ValueError(f"cursor {cursor!r} does not point at a record boundary")


def _lines_backwards(f: BinaryIO, end: int) -> Iterator[tuple[int, bytes]]:
    """(offset, line without its newline) for every line ending before ``end``, last first.

    ``end`` is 0 or just past a newline. Reads BLOCK_SIZE bytes at a time; only the line
    in progress is carried between blocks.
    """
    pos = end  # file offset of buf[0]
    buf = b""  # bytes [pos, pos + len(buf)): whole lines, the first maybe cut at its start
    while True:
        # stop: index in buf just past the newline ending the next line to yield.
        stop = len(buf)
        while stop > 0:
            nl = buf.rfind(b"\n", 0, stop - 1)
            if nl < 0 and pos > 0:
                break  # the line starts in an earlier block
            line_start = nl + 1
            if stop - 1 > line_start:  # skip blank lines
                yield pos + line_start, buf[line_start : stop - 1]
            stop = line_start
        if pos == 0:
            return
        step = min(BLOCK_SIZE, pos)
        pos -= step
        f.seek(pos)
        buf = f.read(step) + buf[:stop]


def _lines_forward(f: BinaryIO, start: int, end: int) -> Iterator[tuple[int, bytes]]:
    """(offset, line without its newline) for every line from ``start`` to ``end``, first
    first; nothing if ``start`` is past ``end`` or not just after a newline."""
    if start > end:
        return
    if start > 0:
        f.seek(start - 1)
        if f.read(1) != b"\n":
            return
    pos = start  # file offset of buf[0]
    buf = b""  # bytes [pos, pos + len(buf)): the lines not yet yielded
    while True:
        nl = buf.find(b"\n")
        if nl >= 0:
            yield pos, buf[:nl]
            pos, buf = pos + nl + 1, buf[nl + 1 :]
            continue
        if pos + len(buf) >= end:
            return
        f.seek(pos + len(buf))
        buf += f.read(min(BLOCK_SIZE, end - pos - len(buf)))


def _parse(line: bytes, offset: int, path: Path) -> RolloutRecord | None:
    """A line's record, or None (logged): one bad line (a hand edit, an old format) must not
    make the archive unreadable."""
    row = _json(line, offset, path)
    return None if row is None else _record(row, offset, path)


def _json(line: bytes, offset: int, path: Path) -> dict[str, Any] | None:
    """A line's JSON object, or None (logged) when it is not one."""
    try:
        row = json.loads(line)
    except ValueError as exc:
        log.warning("%s: skipping a malformed record at byte %d: %s", path, offset, exc)
        return None
    if not isinstance(row, dict):
        log.warning("%s: skipping a malformed record at byte %d: not a JSON object", path, offset)
        return None
    return row


def _record(row: dict[str, Any], offset: int, path: Path) -> RolloutRecord | None:
    try:
        return RolloutRecord.model_validate(row)
    except ValidationError as exc:
        log.warning("%s: skipping a malformed record at byte %d: %s", path, offset, exc.errors()[0]["msg"])
        return None
