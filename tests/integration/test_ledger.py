"""The chaos run's ledger on hand-made durable records: each outcome is found, and a group
trained twice, a group lost, a group acked but neither trained nor dropped, and an archive
row held twice each make it fail."""

from __future__ import annotations

import json
from pathlib import Path

from redis.asyncio import Redis

from chaos.ledger import build_ledger
from services.common.keys import TRAINERS, Keys
from services.common.messages import DeadLetter, Variant, encode
from services.common.streams import DATA
from services.rollout.planlog import Plan, PlanLog, PlannedGroup
from services.trainer import checkpoint


def planned(gid: str) -> PlannedGroup:
    return PlannedGroup(group_id=gid, problem_id="p", variant=Variant.HINTED, seed=0)


async def test_the_ledger_accounts_for_each_group_and_fails_on_twice_lost_and_duplicates(
    tmp_path: Path, redis_url: str, aredis: Redis, keys: Keys
) -> None:
    log = PlanLog.open(tmp_path / "plan.jsonl", keys.prefix)
    first = Plan(seq=1, step=1, groups=[planned(g) for g in ("twice", "stale", "dead", "waits", "lost", "acked")])
    log.append_plan(first)
    log.append_published(first)
    log.append_plan(Plan(seq=2, step=2, groups=[planned("cut")]))  # the run stopped mid-plan
    ckpt = tmp_path / "ckpt"
    (ckpt / "step-000002").mkdir(parents=True)
    state = checkpoint.TrainerState(step=2, trained_group_ids=["twice", "twice", "never-planned"])
    (ckpt / "step-000002" / checkpoint.STATE_FILE).write_text(json.dumps(state.__dict__))
    checkpoint.append_dropped(ckpt, [{"group_id": "stale", "reason": "stale"}])
    letter = DeadLetter(
        stream=keys.scored, group=TRAINERS, entry_id="1-0", data='{"group_id": "dead"}', error="x", failures=3
    )
    await aredis.xadd(keys.dead, {DATA: encode(letter)})
    await aredis.xgroup_create(keys.scored, TRAINERS, id="0", mkstream=True)
    await aredis.xadd(keys.scored, {DATA: b'{"group_id": "acked"}'})
    [[_, [(acked, _f)]]] = await aredis.xreadgroup(TRAINERS, "t", {keys.scored: ">"})
    await aredis.xack(keys.scored, TRAINERS, acked)  # acked, yet neither trained nor dropped: lost
    await aredis.xadd(keys.scored, {DATA: b'{"group_id": "waits"}'})  # not delivered yet
    archive = tmp_path / "rollouts.jsonl"
    archive.write_text("".join(json.dumps({"group_id": "twice", "sample_index": 0}) + "\n" for _ in range(2)))

    ledger = build_ledger(redis_url, keys.prefix, tmp_path / "plan.jsonl", ckpt, archive)
    assert ledger.outcome == {
        "twice": "trained_twice",
        "stale": "dropped_stale",
        "dead": "dead_lettered",
        "waits": "waiting_trainer",
        "lost": "lost",
        "acked": "lost",
        "cut": "not_yet_published",
    }
    summary = ledger.summary()
    assert summary["planned"] == 7 and summary["plans"] == 2 and summary["final_step"] == 2
    assert ledger.unplanned_trained == ["never-planned"] and ledger.archive_duplicates == [("twice", 0)]
    assert not ledger.ok and "ledger: FAILED" in ledger.report() and "lost: acked, lost" in ledger.report()
