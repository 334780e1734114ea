"""The unit tier's rule, enforced: a test under tests/unit starts no process (no subprocess,
no `pope`, no multiprocessing child, no fork) and connects to nothing and listens on nothing
(no Redis, no engine, no server of its own). Such a test belongs in tests/integration.

Around every phase of a unit test (its fixtures' setup, the call, the teardown) the ways to
start a process, to connect a socket and to listen on one raise ``UnitTierViolation`` (a
bind alone, as free_port does to pick a port, is allowed). Each violation is also recorded
and fails the test, so code that catches the exception (a probe that falls back, an
``except Exception``) does not hide it. A test that asks, directly or through another
fixture, for the Redis or server fixtures of tests/conftest.py fails at once. These are
hooks of this directory, so the tests of the other tiers are untouched, also when `make
test` runs every tier in one session.
"""

from __future__ import annotations

import contextlib
import multiprocessing.process
import os
import socket
import subprocess
from collections.abc import Generator, Iterator
from typing import Any

import pytest

with contextlib.suppress(ImportError):
    # matplotlib builds its font cache on first use and runs fc-list to do it: a fresh
    # machine's first report test would start a process. Built here, before any test.
    import matplotlib.font_manager  # noqa: F401

MOVE = "move the test to tests/integration"

# Fixtures of tests/conftest.py that find or start Redis, start an engine, or download (the
# fixtures built on them, such as keys and aredis on redis_url, are in a test's closure too).
SERVER_FIXTURES = frozenset({"redis_url", "engine_url", "sglang_api", "sglang_source"})

PROCESS_STARTS = ("fork", "forkpty", "posix_spawn", "posix_spawnp", "system", "popen")
PROCESS_STARTS += tuple(f"exec{suffix}" for suffix in ("l", "le", "lp", "lpe", "v", "ve", "vp", "vpe"))
PROCESS_STARTS += tuple(f"spawn{suffix}" for suffix in ("l", "le", "lp", "lpe", "v", "ve", "vp", "vpe"))


class UnitTierViolation(Exception):
    """A unit test started a process or opened a socket. Not an OSError, so the code under
    test does not take it for a refused connection or a missing binary and carry on."""


def _refuse(what: str, violations: list[str]) -> Any:
    def refused(*args: Any, **kwargs: Any) -> Any:
        message = f"{what} in a unit test: tests/unit starts no process and opens no socket; {MOVE}"
        violations.append(message)
        raise UnitTierViolation(message)

    return refused


@contextlib.contextmanager
def refusing_processes_and_sockets(violations: list[str]) -> Iterator[None]:
    patch = pytest.MonkeyPatch()
    try:
        patch.setattr(subprocess.Popen, "__init__", _refuse("subprocess.Popen", violations))
        patch.setattr(multiprocessing.process.BaseProcess, "start", _refuse("a multiprocessing child", violations))
        for name in PROCESS_STARTS:
            if hasattr(os, name):
                patch.setattr(os, name, _refuse(f"os.{name}", violations))
        for name in ("connect", "connect_ex", "listen"):
            patch.setattr(socket.socket, name, _refuse(f"socket.{name}", violations))
        yield
    finally:
        patch.undo()


def _guarded(item: pytest.Item) -> Generator[None, Any, Any]:
    violations: list[str] = []
    try:
        with refusing_processes_and_sockets(violations):
            result = yield
    except BaseException as exc:
        if violations and not isinstance(exc, UnitTierViolation):
            raise UnitTierViolation(violations[0]) from exc
        raise
    if violations:
        raise UnitTierViolation(violations[0])
    return result


@pytest.hookimpl(wrapper=True)
def pytest_runtest_setup(item: pytest.Item) -> Generator[None, Any, Any]:
    servers = sorted(SERVER_FIXTURES.intersection(getattr(item, "fixturenames", ())))
    if servers:
        raise UnitTierViolation(f"a unit test asks for {', '.join(servers)} (Redis or a server); {MOVE}")
    return (yield from _guarded(item))


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item: pytest.Item) -> Generator[None, Any, Any]:
    return (yield from _guarded(item))


@pytest.hookimpl(wrapper=True)
def pytest_runtest_teardown(item: pytest.Item) -> Generator[None, Any, Any]:
    return (yield from _guarded(item))
