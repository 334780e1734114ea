"""`make test` with no Redis where it looks: it starts a private redis-server and stops it."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

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
