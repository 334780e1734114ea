"""The adversarial corpus of the verifier and the instruments that watch a real ``pope
verifier`` score it: per-answer timings over HTTP, a /healthz poller, and a watcher of
every process the service starts (memory peaks, escapes). Used by
tests/integration/test_verifier_adversarial.py and by its long form,
bench/verifier_adversarial.py (``make verifier-fuzz``).

The corpus (tests/data/verifier/adversarial.jsonl) is one case a line: ``kind``, ``gold``,
``completion``, ``expected`` (the reward: 1 only where the answer truly equals the gold)
and an optional ``why``. A completion is a string or a list of pieces, each a string or
``{"repeat": s, "times": n}``, so a megabyte case stays one short line. ``{CANARY}`` in a
completion stands for a file that code smuggled into an answer would create.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

CORPUS = Path(__file__).resolve().parent / "data" / "verifier" / "adversarial.jsonl"
MARK = "POPE_FUZZ_MARK"  # in the service's environment, so inherited by all it starts


@dataclass(frozen=True)
class Case:
    kind: str
    gold: str
    completion: str
    expected: float
    why: str = ""


def expand(pieces: str | list[Any]) -> str:
    if isinstance(pieces, str):
        return pieces
    return "".join(p if isinstance(p, str) else p["repeat"] * p["times"] for p in pieces)


def load_corpus(canary: Path, path: Path = CORPUS) -> list[Case]:
    cases = []
    for line in path.read_text().splitlines():
        row = json.loads(line)
        completion = expand(row["completion"]).replace("{CANARY}", str(canary))
        cases.append(Case(row["kind"], row["gold"], completion, float(row["expected"]), row.get("why", "")))
    return cases


@dataclass
class Result:
    case: Case
    seconds: float
    score: dict[str, Any]


def score_each(url: str, cases: list[Case], concurrency: int, timeout_s: float = 60) -> list[Result]:
    """POST every case on its own to /v1/verify, ``concurrency`` at a time; each result
    carries the wall time of its request."""

    def one(client: httpx.Client, case: Case) -> Result:
        start = time.monotonic()
        resp = client.post(f"{url}/v1/verify", json=[{"answer": case.completion, "gold": case.gold}], timeout=timeout_s)
        seconds = time.monotonic() - start
        resp.raise_for_status()
        [score] = resp.json()
        return Result(case, seconds, score)

    with httpx.Client() as client, ThreadPoolExecutor(concurrency) as ex:
        return list(ex.map(lambda c: one(client, c), cases))


@contextmanager
def _in_thread(loop: Callable[[threading.Event], None]) -> Iterator[None]:
    """Run ``loop(stop)`` in a daemon thread for the with-block; then stop and join it."""
    stop = threading.Event()
    thread = threading.Thread(target=loop, args=(stop,), daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


@dataclass
class HealthPoll:
    """Polls ``url``/healthz every ``every_s`` in a thread; ``latencies`` has one entry a
    poll (None where it failed or took over ``timeout_s``)."""

    url: str
    every_s: float = 0.2
    timeout_s: float = 2.0
    latencies: list[float | None] = field(default_factory=list)

    @contextmanager
    def running(self) -> Iterator[HealthPoll]:
        def loop(stop: threading.Event) -> None:
            with httpx.Client() as client:
                while not stop.is_set():
                    start = time.monotonic()
                    try:
                        ok = client.get(f"{self.url}/healthz", timeout=self.timeout_s).status_code == 200
                    except httpx.HTTPError:
                        ok = False
                    self.latencies.append(time.monotonic() - start if ok else None)
                    stop.wait(self.every_s)

        with _in_thread(loop):
            yield self


@dataclass
class Proc:
    pid: int
    ppid: int
    cmdline: str
    peak_rss_mb: float = 0.0  # VmHWM
    peak_vm_mb: float = 0.0  # VmPeak: what RLIMIT_AS bounds


def _status(pid: int) -> dict[str, str] | None:
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    return dict(line.split(":\t", 1) for line in text.splitlines() if ":\t" in line)


def _marked(marker: str) -> list[int]:
    """Live processes of this user whose environment carries ``MARK=marker``."""
    needle = f"{MARK}={marker}".encode()
    pids = []
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                if needle in Path(entry.path, "environ").read_bytes().split(b"\0"):
                    pids.append(int(entry.name))
            except OSError:
                continue
    return pids


@dataclass
class ProcessWatch:
    """Every process carrying the marker, found by a full /proc scan every ``scan_s`` and
    sampled every ``sample_s`` (so a worker's memory peak is read shortly before it ends)."""

    marker: str
    scan_s: float = 0.5
    sample_s: float = 0.05
    procs: dict[int, Proc] = field(default_factory=dict)

    def sample(self, pids: list[int]) -> None:
        for pid in pids:
            status = _status(pid)
            if status is None or status.get("State", "").startswith("Z"):
                continue
            proc = self.procs.get(pid)
            if proc is None:
                try:
                    cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
                except OSError:
                    continue
                proc = self.procs[pid] = Proc(pid, int(status["PPid"]), cmdline)
            proc.peak_rss_mb = max(proc.peak_rss_mb, int(status.get("VmHWM", "0 kB").split()[0]) / 1024)
            proc.peak_vm_mb = max(proc.peak_vm_mb, int(status.get("VmPeak", "0 kB").split()[0]) / 1024)

    def alive(self) -> list[int]:
        return [pid for pid in _marked(self.marker) if (s := _status(pid)) and not s["State"].startswith("Z")]

    @contextmanager
    def running(self) -> Iterator[ProcessWatch]:
        def loop(stop: threading.Event) -> None:
            pids: list[int] = []
            next_scan = 0.0
            while not stop.is_set():
                if time.monotonic() >= next_scan:
                    pids, next_scan = _marked(self.marker), time.monotonic() + self.scan_s
                self.sample(pids)
                stop.wait(self.sample_s)

        try:
            with _in_thread(loop):
                yield self
        finally:
            self.sample(_marked(self.marker))

    def workers(self, service_pid: int) -> list[Proc]:
        """Scoring workers: the children of the service's forkserver."""
        servers = {p.pid for p in self.procs.values() if p.ppid == service_pid and "forkserver" in p.cmdline}
        return [p for p in self.procs.values() if p.ppid in servers]

    def strays(self, service_pid: int) -> list[Proc]:
        """Marked processes that are neither the service, nor a child of it (the
        forkserver, the resource tracker), nor a worker."""
        known = {service_pid} | {p.pid for p in self.workers(service_pid)}
        return [p for p in self.procs.values() if p.pid not in known and p.ppid != service_pid]


def restarts(metrics: str) -> float:
    """Total worker restarts in a /metrics page."""
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in metrics.splitlines()
        if line.startswith("pope_verifier_worker_restarts_total{")
    )
