"""The whole pipeline through `pope up`: problems in over HTTP, hinted and unhinted groups
out of the CPU engine, scored by the verifier, trained on, new weights back in the engine."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx

from services.common.keys import Keys
from services.common.redis_server import free_port
from tests.conftest import ROOT
from tests.wandb_log import history

PROBLEMS = [
    {"prompt": "Compute $2+2$.", "answer": "4", "hint": "HINT-ALPHA: we add the two numbers"},
    {"prompt": "Find $x$ if $x+1=3$.", "answer": "2", "hint": "HINT-BETA: subtract one from both sides"},
    {"prompt": "Compute $7^2$.", "answer": "49"},
    {"prompt": "Compute $3+3$.", "answer": "6", "split": "eval"},  # evaluated, never trained on
]


def poll(url: str, check: Any, within_s: float, proc: subprocess.Popen[bytes], log: Path) -> Any:
    deadline = time.monotonic() + within_s
    while True:
        assert proc.poll() is None, f"pope up exited early:\n{log.read_text()[-4000:]}"
        try:
            resp = httpx.get(url, timeout=5)
            if resp.status_code == 200 and (found := check(resp.json())):
                return found
        except httpx.HTTPError:
            pass
        assert time.monotonic() < deadline, f"timed out polling {url}:\n{log.read_text()[-4000:]}"
        time.sleep(0.5)


def test_pope_up_trains_on_hinted_and_unhinted_groups(
    tiny_model: Path, tmp_path: Path, redis_url: str, keys: Keys
) -> None:
    wandb = {"project": "pope-e2e", "mode": "offline", "dir": str(tmp_path / "wandb")}
    metrics = run_pope_up(tiny_model, tmp_path, redis_url, keys, trainer={"wandb": wandb})
    assert [m["step"] for m in metrics][:2] == [1, 2]
    # The trainer process logged to wandb (offline): every step, and the evaluations from step 0 on, each once.
    (run,) = (tmp_path / "wandb" / "wandb").glob("offline-run-*")
    rows = history(run)
    assert [r["trainer/step"] for r in rows if "loss" in r] == [m["step"] for m in metrics]
    evaluated = [r["eval/weight_version"] for r in rows if "eval/weight_version" in r]
    # Which versions get evaluated depends on how fast the trainer steps meanwhile (each
    # evaluation takes the engine's weights when it starts): v0 first, then each once, in
    # order, every one the rollout service wrote (it may write one after the trainer stopped).
    written = {int(p.stem.removeprefix("step-")) for p in (tmp_path / "eval").glob("step-*.json")}
    assert evaluated[0] == 0 and len(evaluated) >= 2 and evaluated == sorted(set(evaluated))
    assert set(evaluated) <= written


def run_pope_up(
    tiny_model: Path,
    tmp_path: Path,
    redis_url: str,
    keys: Keys,
    *,
    engine: dict[str, Any] | None = None,
    trainer: dict[str, Any] | None = None,
    up_args: tuple[str, ...] = (),
    while_running: Any = None,
) -> list[dict[str, Any]]:
    """Run `pope up` for two training steps and check the pipeline end to end; return the
    trainer's metrics log. ``engine`` and ``trainer`` add to those config sections,
    ``up_args`` to its command line; ``while_running(status)`` checks more before the stop."""
    ports = {name: free_port() for name in ("engine", "rollout", "verifier", "trainer")}
    config = tmp_path / "pope.yaml"
    config.write_text(
        json.dumps(
            {  # JSON is YAML
                "shared": {
                    "key_prefix": keys.prefix,
                    "group_size": 4,
                    "prompts_per_step": 4,
                    "max_staleness": 1,
                    "max_new_tokens": 16,
                },
                "engine": {"port": ports["engine"], **(engine or {})},
                "rollout": {
                    "port": ports["rollout"],
                    "archive_dir": str(tmp_path / "rollouts"),
                    "eval_dir": str(tmp_path / "eval"),
                    "evaluation": {"every_steps": 1, "k": 2, "max_new_tokens": 8},
                },
                "verifier": {"port": ports["verifier"], "workers": 1},
                "trainer": {
                    "port": ports["trainer"],
                    "checkpoint_dir": str(tmp_path / "ckpt"),
                    "metrics_log": str(tmp_path / "metrics.jsonl"),
                    "tensorboard_dir": str(tmp_path / "tb"),
                    **(trainer or {}),
                },
            }
        )
    )
    log = tmp_path / "up.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "services.cli",
                "up",
                "--model",
                str(tiny_model),
                "--config",
                str(config),
                "--redis-url",
                redis_url,
                "--run-dir",
                str(tmp_path / "run"),
                *up_args,
            ],
            cwd=ROOT,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    api = f"http://127.0.0.1:{ports['rollout']}"
    try:
        poll(f"{api}/readyz", lambda body: body.get("status") == "ready", 300, proc, log)
        resp = httpx.post(f"{api}/v1/problems", json=PROBLEMS, timeout=30)
        assert resp.status_code == 201, resp.text
        ids = resp.json()["ids"]

        # Two training steps, and the engine serving the trainer's new weights.
        status = poll(
            f"{api}/v1/status?history=5",
            lambda s: s if s["trainer"].get("version", 0) >= 2 and len(s["history"]) >= 2 else None,
            600,
            proc,
            log,
        )
        assert status["engine"]["weight_version"] >= 1
        assert [h["step"] for h in status["history"]][-2:] == [2, 1]  # newest first
        assert "hinted/reward_mean" in status["history"][0]
        # Evaluated at step 0 and after each step, through the same engine and verifier.
        evaluated = poll(
            f"{api}/v1/status",
            lambda s: s["evaluation"] if s["evaluation"].get("weight_version", 0) >= 1 else None,
            120,
            proc,
            log,
        )
        assert evaluated["unhinted/problems"] == 1 and 0 <= evaluated["unhinted/pass@2"] <= 1
        assert (tmp_path / "eval" / "step-000000.json").is_file() and (tmp_path / "eval" / "step-000000.md").is_file()

        # Hinted rollouts carry their hint in the prompt; unhinted ones never do.
        hinted = poll(f"{api}/v1/rollouts?variant=hinted&limit=100", lambda b: b["rollouts"], 60, proc, log)
        hints = {p["hint"] for p in PROBLEMS if "hint" in p}
        assert all(any(h in r["prompt"] for h in hints) for r in hinted)
        unhinted = httpx.get(f"{api}/v1/rollouts?variant=unhinted&limit=100").json()["rollouts"]
        assert unhinted and not any(h in r["prompt"] for r in unhinted for h in hints)
        assert {r["problem_id"] for r in hinted} <= set(ids[:2])  # only problems with a hint
        assert ids[3] not in {r["problem_id"] for r in unhinted}  # the eval problem is not trained on
        stats = httpx.get(f"{api}/v1/problems/{ids[0]}").json()["stats"]
        assert stats["hinted"]["attempts"] > 0 and stats["unhinted"]["attempts"] > 0
        if while_running is not None:
            while_running(api, proc, log)
    finally:
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(120)
    text = log.read_text()
    assert code == 0, text[-4000:]
    assert "all processes stopped" in text
    for port in ports.values():  # every child is gone
        try:
            httpx.get(f"http://127.0.0.1:{port}/", timeout=1)
            raise AssertionError(f"something still listens on {port}")
        except httpx.ConnectError:
            pass
    checkpoints = sorted((tmp_path / "ckpt").glob("step-*"))
    assert checkpoints and (checkpoints[-1] / "run_record.json").is_file()
    assert os.path.getsize(tmp_path / "rollouts" / "rollouts.jsonl") > 0
    return [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]


def test_pope_up_with_two_engines_behind_the_router(
    tiny_model: Path, tmp_path: Path, redis_url: str, keys: Keys
) -> None:
    """``--engines 2``: both engines generate (through SGLang's router), both end on the
    trainer's weights, and the registry shows each."""

    def both_engines(api: str, proc: subprocess.Popen[bytes], log: Path) -> None:
        def settled(s: dict[str, Any]) -> Any:
            records, version = s["engine"]["engines"], s["trainer"].get("version")
            current = all(r["weight_version"] == str(version) and r["state"] == "serving" for r in records)
            return s if len(records) == 2 and current and all(r["routed"] for r in records) else None

        status = poll(f"{api}/v1/status", settled, 120, proc, log)
        assert status["engine"]["router"] is True

        def generated(url: str) -> float:
            ok = 'pope_engine_requests_total{outcome="ok"}'
            lines = [line for line in httpx.get(f"{url}/metrics", timeout=10).text.splitlines() if line.startswith(ok)]
            return float(lines[0].split()[-1]) if lines else 0.0

        deadline = time.monotonic() + 60
        for record in status["engine"]["engines"]:  # the router sends each some of the samples
            while generated(record["url"]) == 0:
                assert time.monotonic() < deadline, f"{record['url']} generated nothing:\n{log.read_text()[-4000:]}"
                time.sleep(0.5)

    run_pope_up(tiny_model, tmp_path, redis_url, keys, up_args=("--engines", "2"), while_running=both_engines)
