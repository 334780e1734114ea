"""The one way to run a set of services as child processes: ``pope up``, ``pope hints
build`` / ``pope eval`` (when no engine or verifier answers) and the experiment's jobs.

    engine, engine_url = engine_child(model)              # a free port unless given one
    verifier, verifier_url = verifier_child(redis_url)
    with running([engine, verifier], log_dir, out, "pope eval", env={...}) as stack:
        ...                                               # all of them healthy here
    # stopped: one at a time, the last child first

Each child is ``python -m services.cli <args>``, in its own session (a Ctrl-C in the
terminal reaches only this process, which then stops the children in order), logging to
``<log_dir>/<name>.log`` (truncated: this run's lines only). Order the children as they
depend on each other, the engine first: they are stopped in reverse, producers first and
the engine last, so no service is left retrying against one already gone.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

import httpx

from services.common.redis_server import free_port

HEALTHY_WITHIN_S = 600.0  # a cold engine start (model load) included


@dataclass
class Child:
    """A service to run: ``pope <args>``, healthy once GET ``health`` answers 200."""

    name: str
    args: list[str]
    health: str
    proc: subprocess.Popen[bytes] | None = None
    log_path: Path | None = None


class Stack:
    """Child processes started together and stopped in reverse; progress lines on ``out``."""

    def __init__(self, children: list[Child], log_dir: Path, env: dict[str, str], out: TextIO, label: str) -> None:
        self.children, self.log_dir, self.env, self.out, self.label = children, log_dir, env, out, label

    def start(self) -> None:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        for c in self.children:
            c.log_path = self.log_dir / f"{c.name}.log"
            with c.log_path.open("wb") as log:  # this run's log only: old lines would mislead
                c.proc = subprocess.Popen(
                    [sys.executable, "-m", "services.cli", *c.args],
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    env=self.env,
                    start_new_session=True,
                )
            self.say(f"started {c.name} (pid {c.proc.pid}), log {c.log_path}")

    def wait_healthy(self, within_s: float, stopping: list[bool]) -> None:
        """Until every child answers its health URL; KeyboardInterrupt once ``stopping[0]``,
        RuntimeError if one exits or ``within_s`` passes."""
        deadline = time.monotonic() + within_s
        waiting = list(self.children)
        while waiting:
            if stopping[0]:
                raise KeyboardInterrupt
            self.check_alive()
            for c in list(waiting):
                try:
                    if httpx.get(c.health, timeout=2).status_code == 200:
                        waiting.remove(c)
                        self.say(f"{c.name} is ready ({c.health})")
                except httpx.HTTPError:
                    pass
            if time.monotonic() > deadline:
                names = ", ".join(c.name for c in waiting)
                raise RuntimeError(f"not healthy after {within_s:.0f}s: {names} (see their logs in {self.log_dir})")
            time.sleep(0.3)

    def check_alive(self) -> None:
        """RuntimeError, with the end of its log, if a child has exited."""
        for c in self.children:
            if c.proc is not None and c.proc.poll() is not None:
                tail = c.log_path.read_text(errors="replace")[-2000:] if c.log_path else ""
                raise RuntimeError(f"{c.name} exited with status {c.proc.returncode}; its log ends:\n{tail}")

    def stop(self, grace_s: float = 30.0) -> None:
        """One at a time, the last child first (producers first and the engine last), so no
        service is left retrying against one already gone; each gets ``grace_s`` to finish
        its work after SIGTERM, then is killed."""
        for c in reversed(self.children):
            if c.proc is None or c.proc.poll() is not None:
                continue
            c.proc.send_signal(signal.SIGTERM)
            try:
                c.proc.wait(grace_s)
            except subprocess.TimeoutExpired:
                self.say(f"{c.name} did not stop within {grace_s:.0f}s; killing it")
                c.proc.kill()
                c.proc.wait()
        self.say("all processes stopped")

    def say(self, text: str) -> None:
        say(self.label, text, self.out)


@contextlib.contextmanager
def running(
    children: list[Child],
    log_dir: Path,
    out: TextIO,
    label: str,
    *,
    env: dict[str, str] | None = None,
    stopping: list[bool] | None = None,
) -> Iterator[Stack]:
    """``children`` started (``env`` over this process's environment) and healthy; stopped
    on leaving, however it is left. No children: nothing is started, said or stopped.

    ``stopping`` is for a caller whose SIGINT/SIGTERM handlers only set ``stopping[0]``
    (``pope up``): the health wait gives up when it is set, and since a second Ctrl-C
    cannot cut the stop short there, the stop says so first."""
    stack = Stack(children, log_dir, {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}, out, label)
    if not children:
        yield stack
        return
    try:
        stack.start()
        stack.wait_healthy(HEALTHY_WITHIN_S, stopping or [False])
        yield stack
    finally:
        if stopping is not None:
            stack.say("stopping (Ctrl-C again does not skip the clean stop)")
        stack.stop()


def engine_child(model: str, port: int | None = None, args: Sequence[str] = ()) -> tuple[Child, str]:
    """``pope engine`` serving ``model`` on ``port`` (a free one if None), and its URL."""
    port = free_port() if port is None else port
    url = f"http://127.0.0.1:{port}"
    return Child("engine", ["engine", "--model", model, "--port", str(port), *args], f"{url}/health"), url


def verifier_child(
    redis_url: str, port: int | None = None, args: Sequence[str] = ("--workers", "2")
) -> tuple[Child, str]:
    """``pope verifier`` on ``port`` (a free one if None), and its URL; two scoring
    workers unless ``args`` say otherwise (as the config's ``--config FILE`` does)."""
    port = free_port() if port is None else port
    url = f"http://127.0.0.1:{port}"
    return Child("verifier", ["verifier", "--port", str(port), "--redis-url", redis_url, *args], f"{url}/readyz"), url


def say(label: str, text: str, out: TextIO) -> None:
    """One progress line of a command that runs services: ``[label] text``."""
    print(f"[{label}] {text}", file=out, flush=True)
