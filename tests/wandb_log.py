"""What an offline wandb run wrote, read back: its transaction log (``run-<id>.wandb``) as
protobuf records, the rows it logged, the metrics it defined."""

from __future__ import annotations

import json
import struct
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any


def records(path: Path) -> Iterator[Any]:
    """The records of a ``.wandb`` transaction log, as protobuf Records. The format is
    LevelDB's log: a 7-byte file header, then 32 KiB blocks of chunks, each with a 7-byte
    header (CRC-32 of its type byte and data, length, type: full, first, middle, last)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    assert data[:7] == b":W&B\xe1\xbe\x00", data[:7]  # ident, magic 0xBEE1, version 0
    pos, pending = 7, b""
    while pos + 7 <= len(data):
        left = 32768 - pos % 32768
        crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if left < 7 or (kind == 0 and length == 0):  # the rest of the block is padding
            pos += left
            continue
        chunk = data[pos + 7 : pos + 7 + length]
        assert zlib.crc32(chunk, zlib.crc32(bytes([kind]))) == crc, f"bad chunk at {pos} of {path}"
        pos += 7 + length
        pending = chunk if kind in (1, 2) else pending + chunk
        if kind in (1, 4):  # FULL or LAST
            record = pb.Record()
            record.ParseFromString(pending)
            yield record


def history(run_dir: Path) -> list[dict[str, Any]]:
    """Every row the run logged, its keys as logged (a nested value, like a table's, as a dict)."""
    rows = []
    for record in records(next(run_dir.glob("run-*.wandb"))):
        if record.WhichOneof("record_type") == "history":
            row: dict[str, Any] = {}
            for item in record.history.item:
                *parents, last = list(item.nested_key) or [item.key]
                at = row
                for p in parents:
                    at = at.setdefault(p, {})
                at[last] = json.loads(item.value_json)
            rows.append(row)
    return rows


def step_metrics(run_dir: Path) -> dict[str, str]:
    """Each defined metric (or glob) and the metric it is charted against."""
    out = {}
    for record in records(next(run_dir.glob("run-*.wandb"))):
        if record.WhichOneof("record_type") == "metric":
            out[record.metric.name or record.metric.glob_name] = record.metric.step_metric
    return out


def run_record(run_dir: Path) -> Any:
    """The run's RunRecord: id, project, group, config, ..."""
    (run,) = [r.run for r in records(next(run_dir.glob("run-*.wandb"))) if r.WhichOneof("record_type") == "run"]
    return run
