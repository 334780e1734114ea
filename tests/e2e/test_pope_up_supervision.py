"""`pope up` supervises its services over real processes: a killed service is restarted and
the run carries on; a service that cannot start stops the stack with its log's end; Ctrl-C
stops everything quickly even with long generations in flight; a `kill -9` of `pope up`
takes every child with it; `--problems` sends the configured token. Three stack launches
in all (tests/e2e/test_pope_up.py has the pipeline itself)."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from services.common.keys import Keys
from services.common.redis_server import free_port
from tests.conftest import ROOT
from tests.e2e.test_pope_up import PROBLEMS, poll

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc; PR_SET_PDEATHSIG")

TOKEN = "test-token"


def config(tmp_path: Path, keys: Keys, **rollout: Any) -> tuple[Path, dict[str, int]]:
    """A small run's config on free ports (no periodic evaluation: these tests are about the
    processes); ``rollout`` adds to that section."""
    ports = {name: free_port() for name in ("engine", "rollout", "verifier", "trainer")}
    path = tmp_path / "pope.yaml"
    shared = {
        "key_prefix": keys.prefix,
        "group_size": 2,
        "prompts_per_step": 2,
        "max_staleness": 1,
        "max_new_tokens": 8,
    }
    path.write_text(
        json.dumps(
            {
                "shared": shared,
                "engine": {"port": ports["engine"]},
                "rollout": {
                    "port": ports["rollout"],
                    "archive_dir": str(tmp_path / "rollouts"),
                    "eval_dir": str(tmp_path / "eval"),
                    "evaluation": {"every_steps": 0},
                    **rollout,
                },
                "verifier": {"port": ports["verifier"], "workers": 1},
                "trainer": {
                    "port": ports["trainer"],
                    "checkpoint_dir": str(tmp_path / "ckpt"),
                    "metrics_log": str(tmp_path / "metrics.jsonl"),
                    "tensorboard_dir": str(tmp_path / "tb"),
                },
            }
        )
    )
    return path, ports


def pope_up(tmp_path: Path, model: Path, cfg: Path, redis_url: str, *flags: str) -> subprocess.Popen[bytes]:
    args = ["up", "--model", str(model), "--config", str(cfg), "--redis-url", redis_url]
    with (tmp_path / "up.log").open("wb") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "services.cli", *args, "--run-dir", str(tmp_path / "run"), *flags],
            cwd=ROOT,
            stdout=out,
            stderr=subprocess.STDOUT,
        )


def wait_for_line(log: Path, pattern: str, within_s: float, proc: subprocess.Popen[bytes] | None = None) -> str:
    """The first match of ``pattern`` in ``log``, once it is there (group 1 if it has one)."""
    deadline = time.monotonic() + within_s
    while not (found := re.search(pattern, log.read_text(), re.M)):
        assert proc is None or proc.poll() is None, f"pope up exited early:\n{log.read_text()[-4000:]}"
        assert time.monotonic() < deadline, f"no {pattern!r} within {within_s}s:\n{log.read_text()[-4000:]}"
        time.sleep(0.2)
    return found.group(1) if found.groups() else found.group(0)


def descendants(pid: int) -> set[int]:
    """Every process below ``pid`` (children, their children, ...), from /proc."""
    parents: dict[int, int] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # gone meanwhile
            continue
        parents[int(stat.parent.name)] = int(fields[1])
    found, todo = set(), [pid]
    while todo:
        above = todo.pop()
        below = [p for p, parent in parents.items() if parent == above]
        found.update(below)
        todo.extend(below)
    return found


def alive(pids: set[int]) -> set[int]:
    """Those still running (a zombie has ended; only its parent has not reaped it yet)."""
    running = set()
    for pid in pids:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if state != "Z":
            running.add(pid)
    return running


def test_a_killed_service_is_restarted_and_ctrl_c_stops_all_with_generations_in_flight(
    tiny_model: Path, tmp_path: Path, redis_url: str, keys: Keys
) -> None:
    cfg, ports = config(tmp_path, keys, api_token=TOKEN)
    problems = tmp_path / "problems.jsonl"
    problems.write_text("".join(json.dumps(p) + "\n" for p in PROBLEMS))
    proc = pope_up(tmp_path, tiny_model, cfg, redis_url, "--problems", str(problems))
    log, api = tmp_path / "up.log", f"http://127.0.0.1:{ports['rollout']}"
    try:
        # --problems went in with the rollout's token; without it a POST is refused.
        wait_for_line(log, r"submitted 4 problems", 300, proc)
        assert httpx.get(f"{api}/v1/problems").json()["count"] == 4
        assert httpx.post(f"{api}/v1/problems", json=PROBLEMS[:1]).status_code == 401

        # kill -9 of the rollout service: restarted, and training goes on.
        status = poll(f"{api}/v1/status", lambda s: s if s["trainer"].get("version", 0) >= 1 else None, 300, proc, log)
        rollout_pid = int(wait_for_line(log, r"started rollout \(pid (\d+)\)", 1))
        os.kill(rollout_pid, signal.SIGKILL)
        wait_for_line(log, r"rollout died \(killed by SIGKILL\) after \d+s; restart 1 in \d", 30, proc)
        wait_for_line(log, r"restarted rollout \(pid \d+\), restart 1", 30, proc)
        wait_for_line(log, r"rollout is ready again after restart 1", 120, proc)
        # Groups published before the kill can make two more steps (max_staleness 1): three
        # need the restarted scheduler.
        after = status["trainer"]["version"] + 3
        poll(f"{api}/v1/status", lambda s: s["trainer"].get("version", 0) >= after, 300, proc, log)
        rollout_log = (tmp_path / "run" / "logs" / "rollout.log").read_text()
        assert re.search(
            r"^===== \[pope up\] \S+: restart 1 of rollout \(killed by SIGKILL\) =====$", rollout_log, re.M
        )
        assert rollout_log.count("Application startup complete") == 2

        # A long generation in flight (64 rows of 4,000 tokens: tens of seconds of decoding), then Ctrl-C.
        answer: dict[str, Any] = {}
        threading.Thread(target=generate_long, args=(ports["engine"], answer), daemon=True).start()
        engine_metrics = f"http://127.0.0.1:{ports['engine']}/metrics"
        while not re.search(r"^pope_engine_running_sequences [1-9]", httpx.get(engine_metrics).text, re.M):
            time.sleep(0.2)
        time.sleep(2)  # the scheduler's next requests join it
        assert not answer, f"the long generation ended before the stop: {answer}"
        family = descendants(proc.pid)
        started = time.monotonic()
        proc.send_signal(signal.SIGINT)
        code = proc.wait(60)
        took = time.monotonic() - started
    finally:
        if proc.poll() is None:
            proc.kill()
    text = log.read_text()
    assert code == 0, text[-4000:]
    assert took < 15, f"pope up took {took:.1f}s to stop:\n{text[-4000:]}"
    assert "all processes stopped" in text and "SIGKILL)" not in text.split("stopping (")[-1]  # clean
    assert not alive(family), f"still running after the stop: {alive(family)}"
    assert answer.get("finish_reason") == "abort", answer  # the engine cut it short


def generate_long(engine_port: int, answer: dict[str, Any]) -> None:
    body = {
        "input_ids": [1, 2, 3],
        "sampling_params": {"max_new_tokens": 4000, "temperature": 1.0, "ignore_eos": True, "n": 64},
    }
    try:
        rows = httpx.post(f"http://127.0.0.1:{engine_port}/generate", json=body, timeout=600).json()
        answer["finish_reason"] = rows[0]["meta_info"]["finish_reason"]["type"]
    except httpx.HTTPError as exc:
        answer["error"] = repr(exc)


def test_a_service_that_keeps_dying_stops_the_stack_with_its_log(
    tiny_model: Path, tmp_path: Path, redis_url: str, keys: Keys
) -> None:
    cfg, ports = config(tmp_path, keys)
    with socket.socket() as taken:  # bound, not listening: the engine cannot bind it, and
        taken.bind(("127.0.0.1", ports["engine"]))  # the others' calls to it fail at once
        proc = pope_up(tmp_path, tiny_model, cfg, redis_url, "--crash-loop", "3", "--crash-window", "300")
        try:
            code = proc.wait(300)
        finally:
            if proc.poll() is None:
                proc.kill()
    text = (tmp_path / "up.log").read_text()
    assert code == 1, text[-4000:]
    assert re.search(r"engine died \(exit status 3\) after \d+s; restart 1 in ", text), text  # uvicorn: startup failed
    assert "restarted engine (pid" in text and "restart 2 in" in text, text
    assert "error: engine died 3 times within 300s (the last: exit status 3" in text, text
    tail = text.split("error: engine died 3 times")[1]
    assert "address already in use" in tail, text  # the end of the engine's log
    assert "all processes stopped" in text
    engine_log = (tmp_path / "run" / "logs" / "engine.log").read_text()
    assert "restart 1 of engine" in engine_log and "restart 2 of engine" in engine_log


def test_no_child_outlives_a_pope_up_killed_outright(
    tiny_model: Path, tmp_path: Path, redis_url: str, keys: Keys
) -> None:
    cfg, _ = config(tmp_path, keys)
    proc = pope_up(tmp_path, tiny_model, cfg, redis_url)
    log = tmp_path / "up.log"
    try:
        wait_for_line(log, r"started rollout", 300, proc)  # the last one started
        wait_for_line(log, r"verifier is ready", 300, proc)  # its scoring workers too: grandchildren
        family = descendants(proc.pid)
        assert len(family) > 4, family  # four services and the verifier's workers
    finally:
        proc.kill()
        proc.wait()
    deadline = time.monotonic() + 10
    while alive(family) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not alive(family), f"outlived pope up: {alive(family)}"
