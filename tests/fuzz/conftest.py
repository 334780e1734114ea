"""The fuzz tier's servers: each service as a real `pope` process on a free port, with the
state a fuzz needs (a bearer token, stored problems, an engine behind the router).

Each fixture is module-scoped by service; tests/fuzz/test_fuzz.py fuzzes them over HTTP.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from services.common.keys import Keys
from services.common.redis_server import free_port
from services.common.router_client import RouterClient
from tests.conftest import running_engine, running_pope

TOKEN = "fuzz-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture
def rollout_url(redis_url: str, keys: Keys, tmp_path: Path, engine_url: str) -> Iterator[str]:
    """`pope rollout` with a token, its scheduler off, a few problems stored, and the shared
    engine (read by /v1/status: an unreachable one makes each call wait out its retries)."""
    env = {
        "POPE_ROLLOUT__ENGINE_URL": engine_url,
        "REDIS_URL": redis_url,
        "POPE_ROLLOUT__KEY_PREFIX": keys.prefix,
        "POPE_ROLLOUT__SCHEDULE": "false",
        "POPE_ROLLOUT__ARCHIVE_DIR": str(tmp_path / "archive"),
        "POPE_ROLLOUT__API_TOKEN": TOKEN,
    }
    with running_pope(["rollout"], "/readyz", env) as proc:
        rows = [{"id": f"p{i}", "prompt": f"What is {i}+{i}?", "answer": str(2 * i)} for i in range(3)]
        assert httpx.post(f"{proc.url}/v1/problems", json=rows, headers=AUTH, timeout=10).status_code == 201
        yield proc.url


@pytest.fixture
def verifier_url(redis_url: str, keys: Keys) -> Iterator[str]:
    env = {
        "REDIS_URL": redis_url,
        "POPE_VERIFIER__KEY_PREFIX": keys.prefix,
        "POPE_VERIFIER__API_TOKEN": TOKEN,
        "POPE_VERIFIER__TIMEOUT_S": "2",
    }
    with running_pope(["verifier", "--workers", "1"], "/readyz", env) as proc:
        yield proc.url


@pytest.fixture
def trainer_url(redis_url: str, keys: Keys, tiny_model: Path, tmp_path: Path) -> Iterator[str]:
    """`pope trainer` with no engine and nothing to train: its read-only API."""
    env = {
        "REDIS_URL": redis_url,
        "POPE_TRAINER__KEY_PREFIX": keys.prefix,
        "POPE_TRAINER__ENGINE_URL": "",
        "POPE_TRAINER__CHECKPOINT_DIR": str(tmp_path / "ckpt"),
        "POPE_TRAINER__METRICS_LOG": str(tmp_path / "m.jsonl"),
        "POPE_TRAINER__TENSORBOARD_DIR": str(tmp_path / "tb"),
    }
    with running_pope(["trainer", "--model", str(tiny_model)], "/readyz", env) as proc:
        yield proc.url


@pytest.fixture
def fuzz_engine_url(tiny_model: Path) -> Iterator[str]:
    """An engine of the fuzz's own: its admin routes are fuzzed too (pause, weights, abort).
    A weight-sync group's rendezvous with a trainer nobody runs fails after 0.5 s, inside the
    fuzz's request timeout (its default, 120 s, is for a real trainer's start). A request's
    tokens are held to 256 (rows x n x (prompt + max_new_tokens); over it a 400, as any
    engine answers past its budget): each case then decodes in well under a second, and the
    tier stays inside CI's time."""
    extra = ("--weight-sync-timeout-s", "0.5", "--max-request-tokens", "256")
    with running_engine(tiny_model, *extra) as url:
        yield url


@pytest.fixture
def router_url(fuzz_engine_url: str) -> Iterator[str]:
    """`pope router` with one engine as its worker."""
    with running_pope(["router", "--prometheus-port", str(free_port())], "/liveness") as proc:

        async def add() -> None:
            async with RouterClient(proc.url) as router:
                await router.add(fuzz_engine_url)

        asyncio.run(add())
        yield proc.url
