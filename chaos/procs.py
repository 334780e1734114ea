"""One process of the chaos run that can be started again and again, killed and frozen.

services/stack.py starts a stack once and stops it on the first exit; here a process dies
on purpose many times, so each ``Proc`` keeps its command line and restarts it. Its log,
``<run>/logs/<name>.log``, is appended to across restarts, each start under a marker line
(``===== chaos: start 3 of trainer (after kill9 #12) =====``), so one file tells a
service's whole story. Each process runs in its own session (pid = process group), as the
stack's children do.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path


@dataclass
class Proc:
    """``argv`` run from ``cwd`` with ``env``, logging to ``log``; ready when ``ready()``."""

    name: str
    argv: list[str]
    ready: Callable[[], bool]
    log: Path
    env: dict[str, str]
    cwd: Path
    popen: subprocess.Popen[bytes] | None = None
    starts: int = 0
    stopped: bool = False
    """SIGSTOPped by the injector (and not yet resumed)."""
    exits: list[int] = field(default_factory=list)
    """Exit statuses of earlier runs, in order."""

    @property
    def pid(self) -> int | None:
        return self.popen.pid if self.popen is not None else None

    def start(self, why: str) -> int:
        self.starts += 1
        self.log.parent.mkdir(parents=True, exist_ok=True)
        with self.log.open("ab") as out:
            stamp = datetime.now(UTC).isoformat(timespec="milliseconds")
            out.write(f"===== chaos: start {self.starts} of {self.name} ({why}) at {stamp} =====\n".encode())
            out.flush()
            self.popen = subprocess.Popen(
                self.argv, stdout=out, stderr=subprocess.STDOUT, env=self.env, cwd=self.cwd, start_new_session=True
            )
        return self.popen.pid

    def running(self) -> bool:
        """Started and not exited (a SIGSTOPped process is running)."""
        return self.popen is not None and self.popen.poll() is None

    def exited(self) -> int | None:
        """The exit status if it was started and has exited on its own; None otherwise."""
        return self.popen.poll() if self.popen is not None else None

    def forget(self) -> int:
        """Take note of an exit (status returned); the process is down until ``start``."""
        assert self.popen is not None
        code = self.popen.wait()
        self.exits.append(code)
        self.popen = None
        return code

    def kill9(self) -> tuple[int, list[int]]:
        """SIGKILL the process itself (not its group: a crash kills one process); return
        its pid and the pids of its group that outlived it (reaped here too, so a restart
        starts clean; the caller reports them)."""
        assert self.popen is not None
        pid = self.popen.pid
        os.kill(pid, signal.SIGKILL)
        self.forget()
        leftovers = _group_members(pid, within_s=2.0)
        if leftovers:
            for p in leftovers:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(p, signal.SIGKILL)
        return pid, leftovers

    def pause(self) -> int:
        """SIGSTOP the whole process group and every descendant (a frozen container: workers
        included, and torchrun's ranks, which it starts in sessions of their own)."""
        assert self.popen is not None
        os.killpg(self.popen.pid, signal.SIGSTOP)
        for pid in _descendants(self.popen.pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGSTOP)
        self.stopped = True
        return self.popen.pid

    def resume(self) -> None:
        if self.popen is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.popen.pid, signal.SIGCONT)
            for pid in _descendants(self.popen.pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGCONT)
        self.stopped = False

    def terminate(self, grace_s: float) -> int | None:
        """SIGTERM, up to ``grace_s`` to exit, then SIGKILL; the exit status, or None when it
        had to be killed."""
        if not self.running():
            return None
        assert self.popen is not None
        self.popen.send_signal(signal.SIGTERM)
        try:
            self.popen.wait(grace_s)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            self.forget()
            return None
        return self.forget()

    def tail(self, chars: int = 3000) -> str:
        if not self.log.is_file():
            return ""
        with self.log.open("rb") as f:
            f.seek(max(0, self.log.stat().st_size - chars))
            return f.read().decode(errors="replace")


def _descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (children first found through /proc's children lists)."""
    found, todo = [], [pid]
    while todo:
        parent = todo.pop()
        try:
            children = [int(c) for c in Path(f"/proc/{parent}/task/{parent}/children").read_text().split()]
        except (OSError, ValueError):
            continue
        found += children
        todo += children
    return found


def _group_members(pgid: int, within_s: float) -> list[int]:
    """Pids still in process group ``pgid`` after ``within_s`` (none: an empty list)."""
    deadline = time.monotonic() + within_s
    while True:
        members = []
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit():
                try:
                    stat = (entry / "stat").read_text()
                except OSError:
                    continue
                fields = stat.rsplit(")", 1)[1].split()  # after "pid (comm)": state ppid pgrp ...
                if int(fields[2]) == pgid and fields[0] != "Z":
                    members.append(int(entry.name))
        if not members or time.monotonic() > deadline:
            return members
        time.sleep(0.1)
