"""kill -9 of `pope trainer` mid-run, then a restart: a ledger of group ids shows every group
trained exactly once, none twice, none skipped."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

from redis import Redis

from services.common.keys import Keys
from services.common.messages import RawGroup, Sample, Score, ScoredGroup, encode
from services.common.streams import DATA
from services.trainer import checkpoint
from tests.conftest import running_pope

N_GROUPS = 16


def scored(i: int) -> ScoredGroup:
    samples = [
        Sample(
            problem_id="p",
            variant="unhinted",
            prompt_ids=[1, 40, 41],
            completion_ids=[50 + j, 60],
            logprobs=[-3.0, -4.0],
            finish_reason="stop",
            weight_version=0,
            text="",
        )
        for j in range(2)
    ]
    raw = RawGroup(
        group_id=f"g{i:02d}",
        problem_id="p",
        variant="unhinted",
        prompt="q",
        answer="1",
        samples=samples,
        weight_version=0,
        step=1,
        temperature=0.8,
    )
    return ScoredGroup.from_raw(raw, [Score(reward=1.0), Score(reward=0.0)])


def ledger(ckpt: Path) -> list[str]:
    latest = checkpoint.latest(ckpt)
    return checkpoint.load_state(latest).trained_group_ids if latest else []


def test_kill_9_then_restart_trains_every_group_exactly_once(
    tiny_model: Path, tmp_path: Path, redis_url: str, keys: Keys
) -> None:
    r = Redis.from_url(redis_url)
    ckpt = tmp_path / "ckpt"
    env = {
        "REDIS_URL": redis_url,
        "POPE_TRAINER__KEY_PREFIX": keys.prefix,
        "POPE_TRAINER__ENGINE_URL": "",
        "POPE_TRAINER__CHECKPOINT_DIR": str(ckpt),
        "POPE_TRAINER__PROMPTS_PER_STEP": "2",
        "POPE_TRAINER__GROUP_SIZE": "2",
        "POPE_TRAINER__MAX_STALENESS": "1000",
        "POPE_TRAINER__METRICS_LOG": str(tmp_path / "m.jsonl"),
        "POPE_TRAINER__TENSORBOARD_DIR": str(tmp_path / "tb"),
        "POPE_TRAINER__STREAMS": json.dumps({"block_ms": 100, "lease_ms": 2000}),
    }
    for i in range(N_GROUPS):
        r.xadd(keys.scored, {DATA: encode(scored(i))})
    with running_pope(["trainer", "--model", str(tiny_model)], "/readyz", env) as first:
        deadline = time.monotonic() + 120
        while len(ledger(ckpt)) < 4:  # at least two steps done, more in flight
            assert time.monotonic() < deadline, first.output()
            time.sleep(0.02)
        os.kill(first.pid, signal.SIGKILL)  # mid-run: between steps, mid-step or mid-checkpoint
        first.wait(10)
    assert 4 <= len(ledger(ckpt)) < N_GROUPS
    with running_pope(["trainer", "--model", str(tiny_model)], "/readyz", env) as second:
        deadline = time.monotonic() + 120
        while len(ledger(ckpt)) < N_GROUPS:
            assert time.monotonic() < deadline, second.output()
            time.sleep(0.1)
        trained = ledger(ckpt)
        assert sorted(trained) == [f"g{i:02d}" for i in range(N_GROUPS)]  # each once: none twice, none skipped
        assert checkpoint.load_state(checkpoint.latest(ckpt)).step == N_GROUPS // 2  # type: ignore[arg-type]
        deadline = time.monotonic() + 30
        while r.xpending(keys.scored, "trainers")["pending"]:
            assert time.monotonic() < deadline
            time.sleep(0.1)
    r.close()
