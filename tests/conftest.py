"""Shared fixtures: one Redis for the session, a fresh key prefix per test.

Redis is found the way ``make test`` promises (services/common/redis_server.py):
REDIS_URL if set, else the probe URL (POPE_TEST_REDIS_PROBE, default 127.0.0.1:6379) if
it answers, else a private redis-server on a free port, stopped when the session ends.
The Redis may be shared with other runs, so tests only touch keys under their own prefix
and delete them afterwards (never FLUSHALL).
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import subprocess
import sys
import tempfile
import time
import uuid
import zipfile
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
from redis.asyncio import Redis

from services.common.engine_client import SGLANG_VERSION
from services.common.keys import Keys, delete_prefix
from services.common.redis_server import DEFAULT_PROBE_URL, redis_for

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    probe = os.environ.get("POPE_TEST_REDIS_PROBE", DEFAULT_PROBE_URL)
    with redis_for(os.environ.get("REDIS_URL"), probe_url=probe) as url:
        report = os.environ.get("POPE_TEST_REDIS_REPORT")
        if report:  # lets a test see which Redis an inner `make test` used
            Path(report).write_text(url)
        yield url


@pytest.fixture
def keys(redis_url: str) -> Iterator[Keys]:
    k = Keys(f"test:{uuid.uuid4().hex[:12]}:")
    yield k
    client = redis.Redis.from_url(redis_url)
    try:
        delete_prefix(client, k.prefix)
    finally:
        client.close()


@pytest.fixture
async def aredis(redis_url: str) -> AsyncIterator[Redis]:
    client = Redis.from_url(redis_url)
    yield client
    await client.aclose()


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Qwen3 model directory built locally, as `pope model init` builds it."""
    from services.engine.tiny_model import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny-model"))


@contextlib.contextmanager
def running_pope(args: list[str], health_path: str, env: dict[str, str] | None = None) -> Iterator[Popen]:
    """`pope ARGS --port P` as a real subprocess; yields it (with .url set) once
    ``health_path`` answers 200. Stopped with SIGTERM (then SIGKILL) at the end."""
    from services.common.redis_server import free_port

    port = free_port()
    pope = str(Path(sys.executable).parent / "pope")
    with tempfile.TemporaryFile() as log:
        proc = Popen(
            [pope, *args, "--port", str(port)], stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})}
        )
        proc.url = f"http://127.0.0.1:{port}"
        proc.log = log
        try:
            _wait_healthy(proc, proc.url + health_path, log)
            yield proc
        finally:
            proc.terminate()
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()


class Popen(subprocess.Popen[bytes]):
    url: str
    log: Any

    def output(self) -> str:
        return _read(self.log)


@contextlib.contextmanager
def running_engine(model: Path, *extra: str, deterministic: bool = True) -> Iterator[str]:
    """`pope engine` as a real subprocess on a free port; yields its URL once healthy.
    With deterministic inference (SGLang's flag; off is SGLang's default) unless told
    otherwise: the tests that compare runs need seeds to count."""
    flag = ["--enable-deterministic-inference"] if deterministic else []
    with running_pope(["engine", "--model", str(model), *flag, *extra], "/health") as proc:
        yield proc.url


def _wait_healthy(proc: subprocess.Popen[bytes], url: str, log: Any) -> None:
    deadline = time.monotonic() + 120
    while True:
        assert proc.poll() is None, f"process exited: {_read(log)}"
        try:
            if httpx.get(url, timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        assert time.monotonic() < deadline, f"not healthy after 120s: {_read(log)}"
        time.sleep(0.1)


def _read(f: Any) -> str:
    f.seek(0)
    return str(f.read().decode(errors="replace"))[-3000:]


@pytest.fixture(scope="session")
def engine_url(tiny_model: Path) -> Iterator[str]:
    """One engine shared by the tests that do not change its weights (deterministic inference on)."""
    with running_engine(tiny_model) as url:
        yield url


# The files of the pinned SGLang wheel the tests read: its contract module, its HTTP server,
# request structures and sampling parameters, the weight-update code, the auth rule, the
# server's flags, the metric definitions. A directory ends in "/" (every module in it).
SGLANG_FILES = (
    "sglang/api/v1/api_types.py",
    "sglang/srt/entrypoints/http_server.py",
    "sglang/srt/managers/io_struct.py",
    "sglang/srt/sampling/sampling_params.py",
    "sglang/srt/model_executor/model_runner_components/weight_updater.py",
    "sglang/srt/managers/scheduler_components/weight_updater.py",
    "sglang/srt/weight_sync/tensor_bucket.py",
    "sglang/srt/utils/auth.py",
    "sglang/srt/utils/common.py",
    "sglang/srt/server_args.py",
    "sglang/srt/arg_groups/fields/",
    "sglang/srt/observability/metrics_collector.py",
)


@pytest.fixture(scope="session")
def default_engine_url(tiny_model: Path) -> Iterator[str]:
    """An engine as SGLang runs by default: no deterministic inference, sampling_seed ignored."""
    with running_engine(tiny_model, deterministic=False) as url:
        yield url


@pytest.fixture(scope="session")
def sglang_source() -> Path:
    """The directory holding ``SGLANG_FILES`` of the sglang==SGLANG_VERSION wheel, fetched with
    ``pip download --no-deps`` on first use and cached in .venv/sglang-contract/<version>;
    never committed. SGLang itself cannot be imported here (CUDA builds): tests read these
    files as text or parse them with ``ast``."""
    root = ROOT / ".venv" / "sglang-contract" / SGLANG_VERSION
    done = root / ".complete"
    if done.exists() and done.read_text() == "\n".join(SGLANG_FILES):
        return root
    with tempfile.TemporaryDirectory() as tmp:
        proc = subprocess.run(
            [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "-d", tmp, f"sglang=={SGLANG_VERSION}"],
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert proc.returncode == 0, f"pip download sglang=={SGLANG_VERSION} failed: {proc.stderr[-2000:]}"
        [wheel] = Path(tmp).glob("sglang-*.whl")
        with zipfile.ZipFile(wheel) as zf:
            names = [
                n for n in zf.namelist() if any(n == f or (f.endswith("/") and n.startswith(f)) for f in SGLANG_FILES)
            ]
            missing = [f for f in SGLANG_FILES if not any(n == f or n.startswith(f) for n in names)]
            assert not missing, f"the sglang=={SGLANG_VERSION} wheel has none of {missing}"
            zf.extractall(root, names)
    done.write_text("\n".join(SGLANG_FILES))
    return root


@pytest.fixture(scope="session")
def sglang_api(sglang_source: Path) -> Any:
    """SGLang's own contract module (sglang/api/v1/api_types.py of the pinned wheel), imported."""
    target = sglang_source / "sglang" / "api" / "v1" / "api_types.py"
    spec = importlib.util.spec_from_file_location("sglang_api_types", target)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["sglang_api_types"] = module
    spec.loader.exec_module(module)
    return module


@contextlib.contextmanager
def app_in_thread(redis_url: str, build: Callable[[Redis], Any]) -> Iterator[str]:
    """``build(redis)``'s app served by uvicorn on a free port, in a thread with its own event
    loop; yields its URL. The Redis client is made inside that loop: a redis.asyncio client's
    connections belong to the loop that uses them, which is the server's, not the test's."""
    import asyncio
    import threading

    import uvicorn

    from services.common.redis_server import free_port

    port = free_port()
    servers: list[uvicorn.Server] = []

    async def main() -> None:
        client = Redis.from_url(redis_url)
        server = uvicorn.Server(uvicorn.Config(build(client), port=port, log_level="warning"))
        servers.append(server)
        try:
            await server.serve()
        finally:
            await client.aclose()

    thread = threading.Thread(target=asyncio.run, args=(main(),), daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 30
        while not (servers and servers[0].started):
            assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
            time.sleep(0.01)
        yield f"http://127.0.0.1:{port}"
    finally:
        if servers:
            servers[0].should_exit = True
        thread.join(30)


@pytest.fixture
def never_loaded() -> Iterator[Any]:
    """An engine's model loader that never finishes (released at the end): the server answers
    as it does while starting."""
    import threading

    gate = threading.Event()

    def load() -> Any:
        gate.wait()
        raise RuntimeError("never loaded")

    yield load
    gate.set()
