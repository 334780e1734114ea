"""The one way to run a set of services as child processes: ``pope up``, ``pope hints
build`` / ``pope eval`` (when no engine or verifier answers) and the experiment's jobs.

    engine, engine_url = engine_child(model)              # a free port unless given one
    verifier, verifier_url = verifier_child(redis_url)
    with running([engine, verifier], log_dir, out, "pope eval", env={...}) as stack:
        ...                                               # all of them healthy here
        stack.supervise()                                 # now and then: restart the dead
    # stopped: one at a time, the last child first, all within STOP_WITHIN_S

Each child is ``python -m services.cli <args>``, in its own session (a Ctrl-C in the
terminal reaches only this process, which then stops the children in order), killed by the
kernel if this process dies (``common/children.py``), logging to ``<log_dir>/<name>.log``
(truncated at start: this run's lines only; appended after a marker line on a restart).
Order the children as they depend on each other, the engine first: they are stopped in
reverse, producers first and the engine last, so no service is left retrying against one
already gone.

With a ``RestartPolicy`` (``pope up``; ``services/restarts.py``) a child that dies is
started again after a backoff, as compose's ``restart: unless-stopped`` and Kubernetes'
CrashLoopBackOff do; too many deaths in a short window stop the stack with the end of that
child's log. Without one (the
offline jobs, the experiments: finite jobs whose caller should see the failure at once) a
dead child is an error.
"""

from __future__ import annotations

import contextlib
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import TextIO

import httpx

from services.common.children import die_with_parent
from services.common.redis_server import free_port
from services.restarts import Deaths, RestartPolicy, exit_text

HEALTHY_WITHIN_S = 600.0  # a cold engine start (model load) included
STOP_WITHIN_S = 12.0  # all children together, from the first SIGTERM; then SIGKILL
LOG_TAIL_LINES = 40  # of a dead child's log, in the error that stops the stack
DETERMINISTIC = ("--enable-deterministic-inference",)
"""``pope engine``'s flag for the engines the offline jobs and the experiments start for
themselves: seeds count there, so a hint search or an evaluation run again gives the same
records. SGLang's default (and ``pope engine``'s) is off; docs/architecture.md#reproducibility."""


@dataclass
class Child:
    """A service to run: ``pope <args>``, healthy once GET ``health`` answers 200."""

    name: str
    args: list[str]
    health: str
    env: dict[str, str] = field(default_factory=dict)  # over the stack's environment
    proc: subprocess.Popen[bytes] | None = None
    log_path: Path | None = None
    started_at: float = 0.0  # monotonic, of the current process
    ready: bool = False  # the current process has answered its health URL
    restarts: int = 0
    restart_at: float | None = None  # monotonic; set while a dead child waits out its backoff
    deaths: Deaths | None = field(default=None, repr=False)

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


class CrashLoop(RuntimeError):
    """A child died too often within the policy's window; the stack stops."""


class Stack:
    """Child processes started together, kept running per ``restart``, stopped in reverse;
    progress lines on ``out``."""

    def __init__(
        self,
        children: list[Child],
        log_dir: Path,
        env: dict[str, str],
        out: TextIO,
        label: str,
        restart: RestartPolicy | None = None,
    ) -> None:
        self.children, self.log_dir, self.env, self.out, self.label = children, log_dir, env, out, label
        self.restart = restart
        self.rng = random.Random()

    def start(self) -> None:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        for c in self.children:
            c.log_path = self.log_dir / f"{c.name}.log"
            c.deaths = Deaths(self.restart) if self.restart else None
            self._launch(c, "wb")  # this run's log only: old lines would mislead
            self.say(f"started {c.name} (pid {self._pid(c)}), log {c.log_path}")

    def wait_healthy(self, within_s: float, stopping: list[bool]) -> None:
        """Until every child answers its health URL; KeyboardInterrupt once ``stopping[0]``,
        RuntimeError if one dies (beyond its restart policy) or ``within_s`` passes."""
        deadline = time.monotonic() + within_s
        while not all(c.ready for c in self.children):
            if stopping[0]:
                raise KeyboardInterrupt
            self.supervise()
            if time.monotonic() > deadline:
                names = ", ".join(c.name for c in self.children if not c.ready)
                raise RuntimeError(f"not healthy after {within_s:.0f}s: {names} (see their logs in {self.log_dir})")
            time.sleep(0.3)

    def supervise(self) -> None:
        """One round: note the children that died and start again those whose backoff is
        over (RuntimeError, with the end of its log, for a death beyond the policy), and
        say when one answers its health URL."""
        now = time.monotonic()
        for c in self.children:
            if c.restart_at is not None:
                if now >= c.restart_at:
                    c.restart_at, c.restarts = None, c.restarts + 1
                    self._launch(c, "ab")
                    self.say(f"restarted {c.name} (pid {self._pid(c)}), restart {c.restarts}")
            elif not c.alive:
                self._died(c, now)
            elif not c.ready and self._answers(c.health):
                c.ready = True
                again = f" again after restart {c.restarts}" if c.restarts else ""
                self.say(f"{c.name} is ready{again} ({c.health})")

    def _died(self, c: Child, now: float) -> None:
        assert c.proc is not None
        how, ran_s = exit_text(c.proc.returncode), now - c.started_at
        delay = None if c.deaths is None else c.deaths.record(now, ran_s, self.rng.random())
        if delay is not None:
            c.restart_at, c.ready = now + delay, False
            self.say(f"{c.name} died ({how}) after {ran_s:.0f}s; restart {c.restarts + 1} in {delay:.1f}s")
            return
        ends = f"its log ({c.log_path}) ends:\n{log_tail(c.log_path)}"
        if c.deaths is None:
            raise RuntimeError(f"{c.name} exited ({how}); {ends}")
        window = c.deaths.policy.crash_loop_window_s
        raise CrashLoop(
            f"{c.name} died {len(c.deaths.recent)} times within {window:.0f}s (the last: {how}, after "
            f"{ran_s:.0f}s) and is not restarted again; {ends}"
        )

    def _launch(self, c: Child, mode: str) -> None:
        assert c.log_path is not None
        with c.log_path.open(mode) as log:
            if mode == "ab":
                assert c.proc is not None
                at = datetime.now().isoformat(timespec="seconds")
                how = exit_text(c.proc.returncode)
                log.write(f"\n===== [{self.label}] {at}: restart {c.restarts} of {c.name} ({how}) =====\n".encode())
                log.flush()
            c.proc = subprocess.Popen(
                [sys.executable, "-m", "services.cli", *c.args],
                stdout=log,
                stderr=subprocess.STDOUT,
                env={**self.env, **c.env},
                start_new_session=True,
                preexec_fn=die_with_parent(),
            )
        c.started_at, c.ready = time.monotonic(), False

    def stop(self, within_s: float = STOP_WITHIN_S) -> None:
        """One at a time, the last child first (producers first and the engine last), so no
        service is left retrying against one already gone; SIGTERM asks each to finish
        what it holds. All of them share ``within_s``: what still runs then is killed."""
        deadline = time.monotonic() + within_s
        for c in self.children:
            c.restart_at = None  # a restart still waiting is off
        for c in reversed(self.children):
            if not c.alive:
                continue
            assert c.proc is not None
            c.proc.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                c.proc.wait(max(0.0, deadline - time.monotonic()))
            if time.monotonic() >= deadline:
                break
        if left := [c for c in self.children if c.alive]:
            names = ", ".join(c.name for c in left)
            self.say(f"{names} still running {within_s:.0f}s into the stop: killing (SIGKILL)")
            for c in left:
                assert c.proc is not None
                c.proc.kill()
                c.proc.wait()
        self.say("all processes stopped")

    def say(self, text: str) -> None:
        say(self.label, text, self.out)

    @staticmethod
    def _pid(c: Child) -> int:
        assert c.proc is not None
        return c.proc.pid

    @staticmethod
    def _answers(url: str) -> bool:
        try:
            return httpx.get(url, timeout=2).status_code == 200
        except httpx.HTTPError:
            return False


def log_tail(path: Path | None, lines: int = LOG_TAIL_LINES) -> str:
    if path is None or not path.exists():
        return ""
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


@contextlib.contextmanager
def running(
    children: list[Child],
    log_dir: Path,
    out: TextIO,
    label: str,
    *,
    env: dict[str, str] | None = None,
    stopping: list[bool] | None = None,
    restart: RestartPolicy | None = None,
) -> Iterator[Stack]:
    """``children`` started (``env`` over this process's environment) and healthy; stopped
    on leaving, however it is left. No children: nothing is started, said or stopped.

    ``stopping`` is for a caller whose SIGINT/SIGTERM handlers only set ``stopping[0]``
    (``pope up``): the health wait gives up when it is set, and since a second Ctrl-C
    cannot cut the stop short there, the stop says so first. ``restart``: see the module's
    docstring; the caller runs ``Stack.supervise`` now and then, from this thread (the
    children die with the thread that started them)."""
    stack = Stack(children, log_dir, {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}, out, label, restart)
    if not children:
        yield stack
        return
    try:
        stack.start()
        stack.wait_healthy(HEALTHY_WITHIN_S, stopping or [False])
        yield stack
    finally:
        if stopping is not None:
            stack.say(f"stopping (at most {STOP_WITHIN_S:.0f}s; Ctrl-C again does not skip the clean stop)")
        stack.stop()


def engine_child(
    model: str, port: int | None = None, args: Sequence[str] = (), name: str = "engine"
) -> tuple[Child, str]:
    """``pope engine`` serving ``model`` on ``port`` (a free one if None), and its URL."""
    port = free_port() if port is None else port
    url = f"http://127.0.0.1:{port}"
    return Child(name, ["engine", "--model", model, "--port", str(port), *args], f"{url}/health"), url


def router_child(port: int | None = None, name: str = "router") -> tuple[Child, str]:
    """``pope router`` (SGLang's router, no workers yet) on ``port`` (a free one if None),
    its metrics on a free port, and its URL."""
    port = free_port() if port is None else port
    url = f"http://127.0.0.1:{port}"
    args = ["router", "--port", str(port), "--prometheus-port", str(free_port())]
    return Child(name, args, f"{url}/liveness"), url


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
