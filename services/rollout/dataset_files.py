"""Reading dataset files and folders into rows, for ``pope data import`` (dataset.py).

A path is one of:
- a file: JSON Lines (``.jsonl``), JSON (``.json``: a list of objects, or JSON Lines, as
  the Hub's json loader reads), or parquet;
- a ``Dataset.save_to_disk`` folder (Arrow streaming IPC shards), or a ``DatasetDict`` one
  (a folder per split);
- any other folder, such as a Hub snapshot (``hf download REPO --repo-type dataset
  --local-dir DIR``): its ``.parquet``/``.jsonl``/``.json`` files, in its subfolders too
  (hidden ones skipped), of one split, in path order. A file's split is the one its name
  names, else its nearest folder's, with the Hub's words (``train``/``training``;
  ``validation``/``valid``/``val``/``dev``; ``test``/``testing``/``eval``/``evaluation``)
  between non-letters: ``data/train-00000-of-00001.parquet`` is train, ``test.jsonl``
  test. When no file names a split, every file is train (as the Hub reads such a repo).

Which files to read is settled when ``read_rows`` returns (a missing path, an unknown
format or a split that is not there is a ``DatasetError`` at once); their rows are read as
they are iterated, a parquet file by record batches, so a large file is never in memory
whole.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, Literal

import pyarrow as pa
import pyarrow.ipc
import pyarrow.parquet
from pydantic import BaseModel

SUFFIXES = (".parquet", ".jsonl", ".json")
# JSON files the Hub and `datasets` write about a dataset, not rows of it.
METADATA_FILES = frozenset({"dataset_info.json", "dataset_infos.json", "dataset_dict.json", "state.json"})
SPLIT_WORDS = {
    **dict.fromkeys(("train", "training"), "train"),
    **dict.fromkeys(("validation", "valid", "val", "dev"), "validation"),
    **dict.fromkeys(("test", "testing", "eval", "evaluation"), "test"),
}
_BATCH_ROWS = 4096


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
    """The file within a folder (its path under it); None when a single file was read."""

    @property
    def where(self) -> str:
        return f"{self.file + ' ' if self.file else ''}{self.unit} {self.line}"


@dataclass(frozen=True)
class SourceRow:
    """One row as read: its columns, or (a str) why it could not be read (malformed JSON, not an object)."""

    line: int
    unit: Literal["line", "row"]
    data: dict[str, Any] | str
    file: str | None = None

    def fail(self, field_: str | None, message: str) -> RowError:
        return RowError(line=self.line, field=field_, message=message, unit=self.unit, file=self.file)


@dataclass(frozen=True)
class DatasetRows:
    """A dataset's rows, read as they are iterated; ``what`` says what will be read."""

    what: str
    _rows: Callable[[], Iterator[SourceRow]]

    def __iter__(self) -> Iterator[SourceRow]:
        return self._rows()


def read_rows(path: Path, hf_split: str = "train") -> DatasetRows:
    """Every row of a dataset file or folder (of split ``hf_split``), in file order."""
    if path.is_dir():
        saved = _saved_dataset(path, hf_split)
        if saved is not None:
            names = _arrow_shards(saved)
            what = f"{saved}: a saved Hugging Face dataset, {len(names)} shard{'s' * (len(names) > 1)}"
            return DatasetRows(what, lambda: _arrow_rows(saved, names))
        files = split_files(path, hf_split)
        shown = [str(f) for f in files] if len(files) <= 4 else [str(files[0]), "...", str(files[-1])]
        what = f"{len(files)} file{'s' * (len(files) > 1)} of split {_split_name(hf_split)!r}: {', '.join(shown)}"
        return DatasetRows(what, lambda: (row for f in files for row in _file_rows(path / f, str(f))))
    if not path.is_file():
        raise DatasetError(f"{path}: no such file or directory")
    if path.suffix.lower() not in SUFFIXES:
        raise DatasetError(
            f"{path}: unknown format {path.suffix or '(no suffix)'!r}; use .jsonl, .json, .parquet or a directory"
        )
    return DatasetRows(path.name, lambda: _file_rows(path, None))


# Folders ------------------------------------------------------------------------------


def split_of(relative: PurePosixPath) -> str | None:
    """The split a file's name names, else its nearest folder's; None if none does."""
    for part in (relative.stem, *reversed(relative.parent.parts)):
        for word in re.split(r"[^a-z]+", part.lower()):
            if word in SPLIT_WORDS:
                return SPLIT_WORDS[word]
    return None


def _split_name(hf_split: str) -> str:
    return SPLIT_WORDS.get(hf_split.lower(), hf_split)


def split_files(root: Path, hf_split: str) -> list[PurePosixPath]:
    """The data files of split ``hf_split`` under ``root``, as paths relative to it, in order."""
    found: list[PurePosixPath] = []
    for folder, dirs, names in os.walk(root):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        base = PurePosixPath(Path(folder).relative_to(root).as_posix())
        found.extend(
            base / n
            for n in names
            if Path(n).suffix.lower() in SUFFIXES and n not in METADATA_FILES and not n.startswith(".")
        )
    if not found:
        raise DatasetError(
            f"{root}: no .parquet, .jsonl or .json files in it or its subfolders, and not a saved Hugging Face dataset"
        )
    found.sort(key=str)
    splits = {f: split_of(f) for f in found}
    if all(s is None for s in splits.values()):
        splits = dict.fromkeys(found, "train")
    wanted = _split_name(hf_split)
    chosen = [f for f in found if splits[f] == wanted]
    if not chosen:
        by_split: dict[str, list[str]] = {}
        for f, s in splits.items():
            by_split.setdefault(s or "no split", []).append(str(f))
        seen = "; ".join(f"{s}: {', '.join(fs[:3])}{' ...' if len(fs) > 3 else ''}" for s, fs in by_split.items())
        raise DatasetError(f"{root}: no data files of split {wanted!r} (found {seen}); pick one with --hf-split")
    return chosen


def _saved_dataset(path: Path, hf_split: str) -> Path | None:
    """The ``save_to_disk`` folder of the split, or None when ``path`` is not one."""
    if (path / "dataset_dict.json").is_file():  # a DatasetDict: one saved Dataset per split
        splits = json.loads((path / "dataset_dict.json").read_text()).get("splits", [])
        if hf_split not in splits:
            raise DatasetError(f"{path}: no split {hf_split!r} (splits: {', '.join(splits)}); pass --hf-split")
        path = path / hf_split
    return path if (path / "state.json").is_file() else None


def _arrow_shards(path: Path) -> list[str]:
    state = json.loads((path / "state.json").read_text())
    names = [f["filename"] for f in state.get("_data_files", [])] or sorted(p.name for p in path.glob("data-*.arrow"))
    if not names:
        raise DatasetError(f"{path}: state.json lists no data files")
    return names


def _arrow_rows(path: Path, names: list[str]) -> Iterator[SourceRow]:
    """The rows of a ``Dataset.save_to_disk`` folder: its shards in state.json's order, batch by batch."""
    index = 0
    for name in names:
        with pa.memory_map(str(path / name)) as source:
            for batch in pyarrow.ipc.open_stream(source):
                yield from _objects(batch.to_pylist(), "row", index, None)
                index += batch.num_rows


# Files --------------------------------------------------------------------------------


def _file_rows(path: Path, name: str | None) -> Iterator[SourceRow]:
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        yield from _jsonl_rows(path, name)
    elif suffix == ".json":
        yield from _json_rows(path, name)
    else:
        try:
            index = 0
            for batch in pyarrow.parquet.ParquetFile(path).iter_batches(batch_size=_BATCH_ROWS):
                yield from _objects(batch.to_pylist(), "row", index, name)
                index += batch.num_rows
        except pa.ArrowException as exc:
            raise DatasetError(f"{path}: cannot read as parquet: {exc}") from None


def _json_rows(path: Path, name: str | None) -> Iterator[SourceRow]:
    try:
        data = json.loads(path.read_text(encoding="utf-8-sig"))
    except json.JSONDecodeError as exc:
        if exc.msg == "Extra data":  # more than one value: JSON Lines under a .json name
            yield from _jsonl_rows(path, name)
            return
        raise DatasetError(f"{path}: invalid JSON: {exc}") from None
    if not isinstance(data, list):
        raise DatasetError(f"{path}: expected a JSON list of objects, got {type(data).__name__}")
    yield from _objects(data, "row", 0, name)


def _jsonl_rows(path: Path, name: str | None) -> Iterator[SourceRow]:
    with path.open(encoding="utf-8-sig") as f:
        for number, text in enumerate(f, start=1):
            if not text.strip():
                continue
            try:
                yield from _objects([json.loads(text)], "line", number, name)
            except json.JSONDecodeError as exc:  # exc's own "line 2" would count the line's newline
                yield SourceRow(number, "line", f"invalid JSON: {exc.msg} (column {exc.colno})", name)


def _objects(items: list[Any], unit: Literal["line", "row"], start: int, name: str | None) -> Iterator[SourceRow]:
    for i, item in enumerate(items):
        data = item if isinstance(item, dict) else f"expected an object, got {type(item).__name__}"
        yield SourceRow(start + i, unit, data, name)
