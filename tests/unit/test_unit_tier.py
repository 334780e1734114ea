"""The unit tier's guard (tests/unit/conftest.py) refuses processes and sockets."""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import socket
import subprocess
import sys

import pytest

from tests.unit.conftest import UnitTierViolation, refusing_processes_and_sockets


def test_a_unit_test_starts_no_process_and_opens_no_socket() -> None:
    violations: list[str] = []  # this guard's own, so that the test's guard sees none of them
    with refusing_processes_and_sockets(violations):
        with pytest.raises(UnitTierViolation, match=r"subprocess\.Popen"):
            subprocess.run([sys.executable, "-c", "pass"], check=True)
        with pytest.raises(UnitTierViolation, match="multiprocessing"):
            multiprocessing.get_context("spawn").Process(target=print).start()
        with pytest.raises(UnitTierViolation, match=r"os\.fork"):
            os.fork()
        with pytest.raises(UnitTierViolation, match=r"socket\.connect"):
            socket.create_connection(("127.0.0.1", 6379), timeout=1)
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))  # picking a free port is allowed; serving on it is not
            with pytest.raises(UnitTierViolation, match=r"socket\.listen"):
                s.listen()
        with contextlib.suppress(Exception):  # as a probe that falls back would: still recorded
            subprocess.run(["true"])
    assert len(violations) == 6 and "subprocess.Popen" in violations[-1]
