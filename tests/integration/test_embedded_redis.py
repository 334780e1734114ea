"""`make test` with no Redis where it looks: it starts a private redis-server and stops it;
and that server dies with the process that started it, however that one ends."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from services.common.redis_server import answers, free_port
from tests.conftest import ROOT


def test_make_test_falls_back_to_a_private_redis(tmp_path: Path) -> None:
    nothing_here = f"redis://127.0.0.1:{free_port()}/0"
    assert not answers(nothing_here)
    report = tmp_path / "redis-url"
    env = {k: v for k, v in os.environ.items() if k not in ("REDIS_URL", "PYTEST_ADDOPTS", "MAKEFLAGS")}
    env |= {"POPE_TEST_REDIS_PROBE": nothing_here, "POPE_TEST_REDIS_REPORT": str(report)}
    inner = "tests/integration/test_streams.py::test_publish_and_consume tests/unit/test_keys.py"
    proc = subprocess.run(
        ["make", "--no-print-directory", "test", f"PYTEST_ARGS=-q -p no:cacheprovider {inner}"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    assert "5 passed" in out, out  # the streams test and test_keys.py's four
    used = report.read_text()
    assert used not in (nothing_here, "redis://127.0.0.1:6379/0")
    assert not answers(used), "the private redis-server was left running"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_a_private_redis_dies_with_a_parent_killed_outright() -> None:
    parent = (  # starts a server, says where, then dies as `kill -9` would have it
        "import os, signal; from services.common.redis_server import LocalRedis; "
        "s = LocalRedis().start(); print(s.url, flush=True); os.kill(os.getpid(), signal.SIGKILL)"
    )
    proc = subprocess.run([sys.executable, "-c", parent], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == -9, proc.stderr
    url = proc.stdout.strip()
    assert url.startswith("redis://"), proc.stdout + proc.stderr
    deadline = time.monotonic() + 5
    while answers(url) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not answers(url), "the private redis-server outlived the process that started it"
