"""With ``log_format: json`` every line a service writes is one JSON object: its own
records, uvicorn's (start, stop, errors) and an access line per request, and for the
engine transformers' records too (its progress bars off). Real `pope` processes, stopped
with SIGTERM so the shutdown lines are read as well."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx
import pytest

from services.common.keys import Keys
from tests.conftest import Popen, running_pope


def lines_of(proc: Popen) -> list[dict[str, Any]]:
    """Every line the process wrote (stdout and stderr), each parsed as JSON, after it stopped."""
    proc.terminate()
    proc.wait(20)  # uvicorn stops gracefully, then dies of the signal it caught
    proc.log.seek(0)
    text = proc.log.read().decode()
    out = []
    for line in text.splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            pytest.fail(f"not a JSON line: {line!r}")
    return out


def access(lines: list[dict[str, Any]], method: str, path: str) -> list[dict[str, Any]]:
    return [x for x in lines if x["logger"] == "uvicorn.access" and (x["method"], x["path"]) == (method, path)]


def test_every_line_of_the_verifier_is_json_access_lines_included(redis_url: str, keys: Keys) -> None:
    env = {"REDIS_URL": redis_url, "POPE_VERIFIER__KEY_PREFIX": keys.prefix, "POPE_VERIFIER__LOG_FORMAT": "json"}
    with running_pope(["verifier", "--workers", "1"], "/readyz", env) as proc:
        resp = httpx.post(f"{proc.url}/v1/verify", json=[{"answer": "\\boxed{7}", "gold": "7"}], timeout=30)
        assert resp.status_code == 200
        lines = lines_of(proc)
    [line] = access(lines, "POST", "/v1/verify")
    assert line["status"] == 200 and line["service"] == "verifier" and line["level"] == "INFO"
    assert "POST /v1/verify HTTP/1.1" in line["msg"]
    loggers = {x["logger"] for x in lines}
    assert {"pope.config", "uvicorn.error", "uvicorn.access"} <= loggers
    assert any(x["msg"] == "Application shutdown complete." for x in lines)


def test_every_line_of_the_engine_is_json(tiny_model: Path) -> None:
    with running_pope(["engine", "--model", str(tiny_model)], "/health", {"POPE_ENGINE__LOG_FORMAT": "json"}) as proc:
        body = {"input_ids": [5, 6], "sampling_params": {"max_new_tokens": 2}}
        assert httpx.post(f"{proc.url}/generate", json=body, timeout=60).status_code == 200
        lines = lines_of(proc)
    [line] = access(lines, "POST", "/generate")
    assert line["status"] == 200 and line["service"] == "engine"
    assert {x["status"] for x in access(lines, "GET", "/health")} <= {200, 503}  # 503 while it loads
