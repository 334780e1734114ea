"""kill -9 of `pope trainer` mid-run, then a restart: a ledger of group ids shows every group
trained exactly once, none twice, none skipped, whether every step saves its resume state or
only every fourth (then the restart rewinds past versions it wrote, and a new lineage begins)."""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from redis import Redis

from services.common.keys import Keys
from services.common.messages import RawGroup, Sample, Score, ScoredGroup, encode
from services.common.streams import DATA
from services.trainer import checkpoint
from tests.conftest import running_engine, running_pope

N_GROUPS = 16


def scored(i: int, weight_version: int = 0) -> ScoredGroup:
    samples = [
        Sample(
            problem_id="p",
            variant="unhinted",
            prompt_ids=[1, 40, 41],
            completion_ids=[50 + j, 60],
            logprobs=[-3.0, -4.0],
            finish_reason="stop",
            weight_version=weight_version,
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
        weight_version=weight_version,
        step=1,
        temperature=0.8,
    )
    return ScoredGroup.from_raw(raw, [Score(reward=1.0), Score(reward=0.0)])


def ledger(ckpt: Path) -> list[str]:
    latest = checkpoint.latest(ckpt)
    return checkpoint.load_state(latest).trained_group_ids if latest else []


def _running(pid: int) -> bool:
    """``pid`` is a live process (not gone, not a zombie waiting to be reaped)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def _ranks_of(launcher: int) -> list[int]:
    """The pids of torchrun's workers (the children of ``launcher``)."""
    children = Path(f"/proc/{launcher}/task/{launcher}/children").read_text().split()
    return [int(pid) for pid in children]


@pytest.mark.parametrize(("save_every", "nproc"), [(1, 1), (4, 1), (4, 2)])
def test_kill_9_then_restart_trains_every_group_exactly_once(
    tiny_model: Path, tmp_path: Path, redis_url: str, keys: Keys, save_every: int, nproc: int
) -> None:
    """At ``nproc`` 2 (torchrun, FSDP2 on gloo) the kill -9 is of rank 1: torchrun ends rank 0
    and exits non-zero, and the restart (both ranks again) resumes and trains the rest once;
    then SIGTERM stops both ranks cleanly."""
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
        "POPE_TRAINER__SAVE_EVERY": str(save_every),
        "POPE_TRAINER__METRICS_LOG": str(tmp_path / "m.jsonl"),
        "POPE_TRAINER__TENSORBOARD_DIR": str(tmp_path / "tb"),
        "POPE_TRAINER__STREAMS": json.dumps({"block_ms": 100, "lease_ms": 2000}),
        "POPE_TRAINER__NPROC": str(nproc),
    }
    for i in range(N_GROUPS):
        r.xadd(keys.scored, {DATA: encode(scored(i))})
    with running_pope(["trainer", "--model", str(tiny_model)], "/readyz", env) as first:
        deadline = time.monotonic() + 120
        while len(ledger(ckpt)) < 4:  # at least two steps done, more in flight
            assert time.monotonic() < deadline, first.output()
            time.sleep(0.02)
        # mid-run: between steps, mid-step or mid-checkpoint
        os.kill(_ranks_of(first.pid)[-1] if nproc > 1 else first.pid, signal.SIGKILL)
        assert first.wait(30) != 0
    assert 4 <= len(ledger(ckpt)) < N_GROUPS
    resumed = checkpoint.load_state(checkpoint.latest(ckpt))  # type: ignore[arg-type]
    written = checkpoint.weights_versions(ckpt)
    rewinds = any(step > resumed.step for step, _ in written)  # it wrote versions past its resume state
    with running_pope(["trainer", "--model", str(tiny_model)], "/readyz", env) as second:
        deadline = time.monotonic() + 120
        while len(ledger(ckpt)) < N_GROUPS:
            assert time.monotonic() < deadline, second.output()
            time.sleep(0.1)
        trained = ledger(ckpt)
        assert sorted(trained) == [f"g{i:02d}" for i in range(N_GROUPS)]  # each once: none twice, none skipped
        final = checkpoint.load_state(checkpoint.latest(ckpt))  # type: ignore[arg-type]
        assert final.step == N_GROUPS // 2
        assert final.history.id == int(rewinds) and (not rewinds or final.history.forked_at == resumed.step)
        assert (final.step, final.history.id) in checkpoint.weights_versions(ckpt)  # the engine's directory
        deadline = time.monotonic() + 30
        while r.xpending(keys.scored, "trainers")["pending"]:
            assert time.monotonic() < deadline
            time.sleep(0.1)
        ranks = _ranks_of(second.pid) if nproc > 1 else []
        assert len(ranks) == nproc - int(nproc == 1)
        second.send_signal(signal.SIGTERM)
        assert second.wait(60) == -signal.SIGTERM, second.output()[-3000:]  # as uvicorn stops: re-raised
        assert "Application shutdown complete." in second.output()
        assert not [pid for pid in ranks if _running(pid)]  # no rank left behind
    r.close()


def _engine_version(url: str) -> str:
    return str(httpx.get(f"{url}/model_info", timeout=5).json()["weight_version"])


def _wait(what: str, until: Callable[[], bool], proc: Any, within: float = 60) -> None:
    deadline = time.monotonic() + within
    while not until():
        assert time.monotonic() < deadline, f"{what}: {proc.output()[-3000:]}"
        time.sleep(0.1)


def test_a_resume_behind_pushed_versions_starts_a_lineage_and_reloads_an_engine_ahead(
    tiny_model: Path, tmp_path: Path, redis_url: str, keys: Keys
) -> None:
    """Resume states every 3 steps; the trainer pushes v4 and v5 and is killed. Its restart
    resumes step 3 as lineage 1: the engine, serving v5 (ahead of 3 by its step), is reloaded
    with 3@1; a group sampled by the lost v4 is dropped and counted; one sampled by v2 (which
    lineage 1 holds) and the groups of the lost steps are trained once, on the restored
    weights, and the new versions are named apart (6@1, never a second "6")."""
    r = Redis.from_url(redis_url)
    ckpt = tmp_path / "ckpt"
    with running_engine(tiny_model) as engine_url:
        env = {
            "REDIS_URL": redis_url,
            "POPE_TRAINER__KEY_PREFIX": keys.prefix,
            "POPE_TRAINER__ENGINE_URL": engine_url,
            "POPE_TRAINER__CHECKPOINT_DIR": str(ckpt),
            "POPE_TRAINER__PROMPTS_PER_STEP": "2",
            "POPE_TRAINER__GROUP_SIZE": "2",
            "POPE_TRAINER__MAX_STALENESS": "1000",
            "POPE_TRAINER__SAVE_EVERY": "3",
            "POPE_TRAINER__KEEP_WEIGHTS": "1",
            "POPE_TRAINER__REPUSH_INTERVAL_S": "0.3",
            "POPE_TRAINER__METRICS_LOG": str(tmp_path / "m.jsonl"),
            "POPE_TRAINER__TENSORBOARD_DIR": str(tmp_path / "tb"),
            "POPE_TRAINER__STREAMS": json.dumps({"block_ms": 100, "lease_ms": 2000}),
        }
        for i in range(10):  # five steps' worth, sampled by v0
            r.xadd(keys.scored, {DATA: encode(scored(i))})
        with running_pope(["trainer", "--model", str(tiny_model)], "/readyz", env) as first:
            _wait("v5 pushed", lambda: _engine_version(engine_url) == "5", first)
            os.kill(first.pid, signal.SIGKILL)  # idle at v5; its last resume state is step 3
            first.wait(10)
        assert checkpoint.load_state(checkpoint.latest(ckpt)).step == 3  # type: ignore[arg-type]
        r.xadd(keys.scored, {DATA: encode(scored(10, weight_version=4))})  # sampled by the lost v4
        held = {"POPE_TRAINER__MAX_STEPS": "3", **env}  # trains nothing: the engine's reload alone
        with running_pope(["trainer", "--model", str(tiny_model)], "/readyz", held) as second:
            _wait("the engine reloaded with 3@1", lambda: _engine_version(engine_url) == "3@1", second)
            dropped = {row["group_id"]: row["reason"] for row in checkpoint.read_dropped(ckpt)}
            assert dropped == {"g10": "lineage"}
            assert f"engine {engine_url} serves v5, the trainer is at v3@1: loading" in second.output()
            # Pruning to one directory kept the new 3@1 and the v5 the engine served when
            # this process began (it may read it again to roll back a failed load).
            assert set(checkpoint.weights_versions(ckpt)) == {(3, 1), (5, 0)}
        # Its stop saved the lineage: the next start continues lineage 1 rather than forking again.
        r.xadd(keys.scored, {DATA: encode(scored(11, weight_version=2))})  # held by lineage 1 (2 <= 3)
        r.xadd(keys.scored, {DATA: encode(scored(12))})
        with running_pope(["trainer", "--model", str(tiny_model)], "/readyz", env) as third:
            _wait("6@1 pushed", lambda: _engine_version(engine_url) == "6@1", third)
            _wait("the resume state at 6", lambda: len(ledger(ckpt)) == 12, third)
            final = checkpoint.load_state(checkpoint.latest(ckpt))  # type: ignore[arg-type]
            assert (final.history.id, final.history.forked_at, final.history.kept) == (1, 3, {0: 3})
            trained = ledger(ckpt)
            assert sorted(trained) == sorted(f"g{i:02d}" for i in (*range(10), 11, 12))  # each once
            _wait("all acked", lambda: r.xpending(keys.scored, "trainers")["pending"] == 0, third)
        assert not (ckpt / "weights" / "step-000006").exists()  # no second "6" was ever written
        assert set(checkpoint.weights_versions(ckpt)) <= {(5, 1), (6, 1)}  # the old ones pruned
    r.close()
