"""The chaos run's ledger: every planned group accounted for, from the durable records only.

    ledger = build_ledger(redis_url, key_prefix, plan_log, checkpoint_dir, archive)
    print(ledger.report()); assert ledger.ok

Each group in the plan log ends in exactly one of these, checked in this order:

    trained            its id is in the final checkpoint's lineage once (trained_twice: more)
    dropped_stale      in the trainer's drop log, too stale to train
    dropped_aborted    in the trainer's drop log, a sample aborted by the engine
    dropped_lineage    in the trainer's drop log, sampled by weights a rewind lost
    dead_lettered      in the dead-letter stream (the verifier or the trainer gave up on it)
    skipped            the plan's ``published`` record says it was not sent (problem deleted,
                       or its lineage was lost before it was sent)
    waiting_trainer    in pope:scored, pending or not yet delivered in group trainers
    waiting_verifier   in pope:rollouts, not scored, pending or not yet delivered in verifiers
    not_yet_published  in the last plan, cut short when the run stopped, not in any stream
    lost               none of the above: planned, and nothing durable says what became of it

The final checkpoint's ``trained_group_ids`` is the lineage of the final weights: every
step's groups, in order, carried from checkpoint to checkpoint; a crash before a checkpoint
rolls the weights back with it, so an id there twice is a group the weights really hold
twice. Beside the groups: ids trained that no plan made (``unplanned_trained``) and scored
samples the archive holds twice (``archive_duplicates``); both must be 0.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import redis

from services.common.keys import TRAINERS, VERIFIERS, Keys
from services.rollout.planlog import read as read_plan_log
from services.trainer import checkpoint

OUTCOMES = (
    "trained",
    "trained_twice",
    "dropped_stale",
    "dropped_aborted",
    "dropped_lineage",
    "dead_lettered",
    "skipped",
    "waiting_trainer",
    "waiting_verifier",
    "not_yet_published",
    "lost",
)


@dataclass
class Ledger:
    outcome: dict[str, str] = field(default_factory=dict)
    """Planned group id -> its outcome (one of OUTCOMES)."""
    plans: int = 0
    final_step: int = 0
    unplanned_trained: list[str] = field(default_factory=list)
    archive_duplicates: list[tuple[str, int]] = field(default_factory=list)
    archive_rows: int = 0

    def ids(self, outcome: str) -> list[str]:
        return sorted(g for g, o in self.outcome.items() if o == outcome)

    def summary(self) -> dict[str, int]:
        counts = Counter(self.outcome.values())
        return {
            "plans": self.plans,
            "planned": len(self.outcome),
            **{o: counts.get(o, 0) for o in OUTCOMES},
            "final_step": self.final_step,
            "unplanned_trained": len(self.unplanned_trained),
            "archive_rows": self.archive_rows,
            "archive_duplicates": len(self.archive_duplicates),
        }

    @property
    def ok(self) -> bool:
        s = self.summary()
        return s["trained_twice"] == s["lost"] == s["unplanned_trained"] == s["archive_duplicates"] == 0

    def report(self) -> str:
        s = self.summary()
        lines = [f"ledger: {s['planned']} groups planned in {s['plans']} plans; final trainer step {s['final_step']}"]
        lines += [f"  {o:<18} {s[o]}" for o in OUTCOMES]
        lines.append(f"  unplanned_trained  {s['unplanned_trained']}")
        lines.append(f"  archive            {s['archive_rows']} rows, {s['archive_duplicates']} held twice")
        for outcome in ("trained_twice", "lost"):
            if ids := self.ids(outcome):
                lines.append(f"  {outcome}: {', '.join(ids[:20])}{' ...' if len(ids) > 20 else ''}")
        if self.unplanned_trained:
            lines.append(f"  unplanned_trained: {', '.join(self.unplanned_trained[:20])}")
        if self.archive_duplicates:
            lines.append(f"  archive_duplicates: {self.archive_duplicates[:20]}")
        lines.append("ledger: OK" if self.ok else "ledger: FAILED")
        return "\n".join(lines)


def _in_flight(client: redis.Redis, stream: str, group: str) -> set[str]:
    """Group ids of the entries of ``stream`` that consumer group ``group`` still owes:
    pending (delivered, not acked) or not delivered yet. An entry it acked is not here,
    whatever became of it."""
    try:
        info = {_s(g["name"]): g for g in cast(list[dict[str, Any]], client.xinfo_groups(stream))}
    except redis.ResponseError:
        return set()  # no stream
    if group not in info:
        return set()
    delivered = _id(info[group]["last-delivered-id"])
    rows = cast(list[dict[str, Any]], client.xpending_range(stream, group, "-", "+", 1_000_000))
    pending = {_s(r["message_id"]) for r in rows}
    out = set()
    for eid, fields in cast(list[tuple[bytes, dict[bytes, bytes]]], client.xrange(stream)):
        if _s(eid) in pending or _id(eid) > delivered:
            try:
                out.add(json.loads(fields[b"data"])["group_id"])
            except (KeyError, ValueError, TypeError):
                continue
    return out


def _s(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _id(value: bytes | str) -> tuple[int, int]:
    ms, _, seq = _s(value).partition("-")
    return int(ms), int(seq or 0)


def _dead_letter_ids(client: redis.Redis, stream: str) -> set[str]:
    out = set()
    for _eid, fields in cast(list[tuple[bytes, dict[bytes, bytes]]], client.xrange(stream)):
        try:
            out.add(json.loads(json.loads(fields[b"data"])["data"])["group_id"])
        except (KeyError, ValueError, TypeError):
            continue  # a letter whose payload was not a group at all
    return out


def _archive_duplicates(archive: Path) -> tuple[int, list[tuple[str, int]]]:
    seen: Counter[tuple[str, int]] = Counter()
    if archive.exists():
        for line in archive.read_bytes().split(b"\n")[:-1]:  # after the last newline: torn
            row = json.loads(line)
            seen[row["group_id"], row["sample_index"]] += 1
    return sum(seen.values()), sorted(k for k, n in seen.items() if n > 1)


def build_ledger(redis_url: str, key_prefix: str, plan_log: Path, checkpoint_dir: Path, archive: Path) -> Ledger:
    """The ledger of the run under ``key_prefix`` (see the module's docstring)."""
    keys = Keys(key_prefix)
    plans, published = read_plan_log(plan_log, key_prefix)
    latest = checkpoint.latest(checkpoint_dir)
    state = checkpoint.load_state(latest) if latest else checkpoint.TrainerState()
    trained = Counter(state.trained_group_ids)
    dropped = {row["group_id"]: row["reason"] for row in checkpoint.read_dropped(checkpoint_dir)}
    skipped = {gid for not_sent in published.values() for gid in not_sent}
    client = redis.Redis.from_url(redis_url)
    try:
        dead = _dead_letter_ids(client, keys.dead)
        scored = _in_flight(client, keys.scored, TRAINERS)
        raw = _in_flight(client, keys.rollouts, VERIFIERS)
        unscored = {g for g in raw if not client.exists(keys.done(VERIFIERS, g))}
    finally:
        client.close()
    cut = {g.group_id for g in plans[-1].groups} if plans and plans[-1].seq not in published else set()

    ledger = Ledger(plans=len(plans), final_step=state.step)
    for p in plans:
        for g in p.groups:
            gid = g.group_id
            if trained[gid] == 1:
                outcome = "trained"
            elif trained[gid] > 1:
                outcome = "trained_twice"
            elif gid in dropped:
                outcome = f"dropped_{dropped[gid]}"
            elif gid in dead:
                outcome = "dead_lettered"
            elif gid in skipped:
                outcome = "skipped"
            elif gid in scored:
                outcome = "waiting_trainer"
            elif gid in unscored:
                outcome = "waiting_verifier"
            elif gid in cut:
                outcome = "not_yet_published"
            else:
                outcome = "lost"
            ledger.outcome[gid] = outcome
    ledger.unplanned_trained = sorted(set(trained) - set(ledger.outcome))
    ledger.archive_rows, ledger.archive_duplicates = _archive_duplicates(archive)
    return ledger
