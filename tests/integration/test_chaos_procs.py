"""The chaos run's process handle (chaos/procs.py) on real processes: a log appended across
restarts under marker lines, SIGKILL of the process alone (what outlives it in its group
is reported and reaped), SIGSTOP/SIGCONT of its whole group, SIGTERM then SIGKILL."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

from chaos.procs import Proc


def proc(tmp_path: Path, script: str) -> Proc:
    return Proc("p", [sys.executable, "-c", script], lambda: True, tmp_path / "p.log", dict(os.environ), tmp_path)


def state(pid: int) -> str:
    return (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0]


def test_a_restarted_process_appends_to_its_log_under_a_marker(tmp_path: Path) -> None:
    p = proc(tmp_path, "print('hello', flush=True)")
    for why in ("first", "second"):
        p.start(why)
        assert p.popen is not None
        p.popen.wait(30)
        assert p.exited() == 0
        p.forget()
    text = p.log.read_text()
    assert "start 1 of p (first)" in text and "start 2 of p (second)" in text
    assert text.count("hello") == 2 and p.exits == [0, 0] and not p.running()


def test_kill9_kills_the_process_and_reports_and_reaps_what_outlived_it(tmp_path: Path) -> None:
    sleeper = "import time; time.sleep(60)"
    script = f"import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', {sleeper!r}]); time.sleep(60)"
    p = proc(tmp_path, script)
    p.start("test")
    time.sleep(1.0)  # the grandchild is started
    pid, leftovers = p.kill9()
    assert len(leftovers) == 1 and leftovers[0] != pid
    time.sleep(0.3)
    assert not Path(f"/proc/{leftovers[0]}").exists() or state(leftovers[0]) == "Z"
    assert p.exits == [-9] and p.pid is None


def test_pause_stops_the_group_and_resume_continues_it(tmp_path: Path) -> None:
    p = proc(tmp_path, "import time; time.sleep(60)")
    pid = p.start("test")
    try:
        p.pause()
        time.sleep(0.2)
        assert state(pid) == "T" and p.stopped and p.running()
        p.resume()
        time.sleep(0.2)
        assert state(pid) == "S" and not p.stopped
    finally:
        assert p.terminate(5.0) == -15


def test_terminate_kills_a_process_that_ignores_sigterm(tmp_path: Path) -> None:
    p = proc(
        tmp_path,
        "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); print('up', flush=True); time.sleep(60)",
    )
    p.start("test")
    deadline = time.monotonic() + 30
    while "up" not in p.log.read_text() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert p.terminate(0.5) is None and not p.running()
