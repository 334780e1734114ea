"""The chaos run's stack: a private Redis with AOF, the engine (or several behind SGLang's
router), two verifier replicas, the trainer and the rollout service, every one a ``Proc``
that can be killed and restarted.

    stack = ChaosStack.create(Layout(run_dir), form)   # config written, model built
    stack.start()                                      # all started and ready
    stack.sleep(5.0)                                   # time passes under supervision
    stack.stop_services(); ...; stack.stop_redis()

Supervision: whenever the run waits (``sleep``, ``wait_until``) it checks every process;
one that has exited although nobody killed it is a finding (recorded with the end of its
log in ``<run>/findings.jsonl``) and is started again.
"""

from __future__ import annotations

import asyncio
import functools
import json
import os
import shutil
import signal
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TextIO, TypeVar

import httpx
import yaml
from redis.asyncio import Redis
from redis.exceptions import RedisError

from chaos.procs import Proc
from chaos.schedule import VERIFIER_REPLICAS, Form
from services.common.keys import Keys
from services.common.redis_server import answers, free_port, redis_server_binary
from services.stack import Child, engine_child, router_child, say, verifier_child

T = TypeVar("T")
ROOT = Path(__file__).resolve().parent.parent
BASE_CONFIG = ROOT / "configs" / "chaos.yaml"
LABEL = "chaos"
READY_WITHIN_S = 120.0
# uvicorn's last words after a graceful stop; it then re-raises SIGTERM (exit status -15).
SHUT_DOWN = "Application shutdown complete"
RESTART_NOT_BEFORE_S = 2.0  # a service that keeps exiting is restarted at most this often

PROBLEMS = [  # as tests/e2e/test_pope_up.py's, without the eval split (no evaluation here)
    {"prompt": "Compute $2+2$.", "answer": "4", "hint": "HINT-ALPHA: we add the two numbers"},
    {"prompt": "Find $x$ if $x+1=3$.", "answer": "2", "hint": "HINT-BETA: subtract one from both sides"},
    {"prompt": "Compute $7^2$.", "answer": "49"},
    {"prompt": "Compute $5+6$.", "answer": "11"},
]


@dataclass(frozen=True)
class Layout:
    """Where everything of one run lives: all under ``root``."""

    root: Path

    @property
    def logs(self) -> Path:
        """The services' logs, one file each, appended across restarts."""
        return self.root / "logs"

    @property
    def model(self) -> Path:
        """The tiny model every service starts from."""
        return self.root / "model"

    @property
    def redis_dir(self) -> Path:
        """Redis's AOF."""
        return self.root / "redis"

    @property
    def config(self) -> Path:
        """The config every service reads."""
        return self.root / "config.yaml"

    @property
    def checkpoints(self) -> Path:
        """trainer.checkpoint_dir."""
        return self.root / "checkpoints"

    @property
    def rollouts(self) -> Path:
        """rollout.archive_dir: the archive and the plan log."""
        return self.root / "rollouts"

    @property
    def faults(self) -> Path:
        """One line per fault the injector applied (or could not)."""
        return self.root / "faults.jsonl"

    @property
    def findings(self) -> Path:
        """One line per misbehaviour of the services."""
        return self.root / "findings.jsonl"

    @property
    def summary(self) -> Path:
        """The run's result: faults, checks, ledger, wall time."""
        return self.root / "chaos.json"

    def reset(self) -> None:
        """An empty run directory: a chaos run always starts afresh. Refuses a non-empty
        directory that is not a chaos run's, so a wrong --dir deletes nothing."""
        if self.root.exists() and any(self.root.iterdir()) and not self.config.is_file():
            raise SystemExit(f"{self.root} is not empty and holds no chaos run (no config.yaml); refusing to wipe it")
        shutil.rmtree(self.root, ignore_errors=True)
        self.root.mkdir(parents=True)


@dataclass
class Finding:
    """Something the services did under faults that they should not have."""

    kind: str
    service: str
    detail: str
    at: float = field(default_factory=time.time)
    log_tail: str = ""


@dataclass
class ChaosStack:
    layout: Layout
    form: Form
    ports: dict[str, int]
    procs: dict[str, Proc]
    out: TextIO = sys.stdout
    findings: list[Finding] = field(default_factory=list)
    started_at: float = field(default_factory=time.monotonic)
    _last_start: dict[str, float] = field(default_factory=dict)
    max_steps: int = 0
    """Where the trainer stops: the form's steps, raised (``extend``) when a fast machine
    would reach them with faults still to come."""

    def __post_init__(self) -> None:
        self.max_steps = self.max_steps or self.form.steps

    @classmethod
    def create(
        cls, layout: Layout, form: Form, out: TextIO, started_at: float, trainer_nproc: int = 1, engines: int = 1
    ) -> ChaosStack:
        from services.engine.tiny_model import build_tiny_model

        names = ["redis", *engine_names(engines), "trainer", "rollout"] + [
            f"verifier-{i}" for i in range(VERIFIER_REPLICAS)
        ]
        ports = {name: free_port() for name in names}
        build_tiny_model(layout.model)
        write_config(layout, form, ports, trainer_nproc)
        return cls(layout, form, ports, make_procs(layout, ports), out, started_at=started_at)

    @property
    def engines(self) -> list[str]:
        """The engines' process names: ``engine``, or ``engine-0`` ... behind the router."""
        return [n for n in self.procs if n == "engine" or n.startswith("engine-")]

    # -- facts about the run -------------------------------------------------------------

    @property
    def redis_url(self) -> str:
        return redis_url(self.ports)

    @functools.cached_property
    def key_prefix(self) -> str:
        prefix: str = yaml.safe_load(self.layout.config.read_text())["shared"]["key_prefix"]
        return prefix

    def url(self, name: str) -> str:
        return f"http://127.0.0.1:{self.ports[name]}"

    def say(self, text: str) -> None:
        say(LABEL, f"[{time.monotonic() - self.started_at:7.1f}s] {text}", self.out)

    def trainer_version(self) -> int | None:
        """The trainer's step as it last told Redis (its TrainerControl; 0 before it has;
        None: Redis does not answer)."""
        from services.common.run import read_control

        async def read(client: Redis) -> int:
            control = await read_control(client, Keys(self.key_prefix))
            return control.version if control is not None else 0

        try:
            return self.redis_call(read)
        except (RedisError, OSError):
            return None

    def redis_call(self, call: Callable[[Redis], Awaitable[T]]) -> T:
        """``call`` on a fresh asyncio client of the run's Redis (the services' helpers are
        async; the harness polls seldom enough for a client per call)."""

        async def once() -> T:
            client = Redis.from_url(self.redis_url, socket_timeout=5, socket_connect_timeout=2)
            try:
                return await call(client)
            finally:
                await client.aclose()

        return asyncio.run(once())

    def rollout_status(self) -> dict[str, Any] | None:
        """GET /v1/status on the rollout service (None when it does not answer)."""
        try:
            body: dict[str, Any] = httpx.get(f"{self.url('rollout')}/v1/status", timeout=5).json()
            return body
        except (httpx.HTTPError, ValueError):
            return None

    def engine_version(self) -> str | None:
        """The name of the weight version the engines serve ("12", "12@3"): with several,
        each one's when they differ ("12,11"); None when one does not answer."""
        names = []
        for engine in self.engines:
            try:
                name = httpx.get(f"{self.url(engine)}/model_info", timeout=5).json()["weight_version"]
            except (httpx.HTTPError, ValueError, KeyError, TypeError):
                return None
            if name is None:
                return None
            names.append(str(name))
        return names[0] if len(set(names)) == 1 else ",".join(names)

    def unready(self) -> list[str]:
        return [name for name, p in self.procs.items() if not (p.running() and not p.stopped and p.ready())]

    # -- running it ----------------------------------------------------------------------

    def start(self) -> None:
        for name, proc in self.procs.items():
            pid = proc.start("the run starts")
            self.say(f"started {name} (pid {pid}), log {proc.log}")
            if name == "redis" and not self.wait_until(proc.ready, 30, "redis to answer"):
                raise RuntimeError(f"redis did not start; its log ends:\n{proc.tail()}")
        if not self.wait_until(lambda: not self.unready(), READY_WITHIN_S, "every service to be ready"):
            raise RuntimeError(
                f"not ready after {READY_WITHIN_S:.0f}s: {', '.join(self.unready())} (logs in {self.layout.logs})"
            )
        self.say("every service is ready")
        resp = httpx.post(f"{self.url('rollout')}/v1/problems", json=PROBLEMS, timeout=60)
        if resp.status_code != 201:
            raise RuntimeError(f"submitting the problems failed: {resp.status_code} {resp.text[:500]}")
        self.say(f"submitted {len(PROBLEMS)} problems")

    def supervise(self) -> None:
        """Restart every process that exited without being killed, recording a finding."""
        for name, proc in self.procs.items():
            code = proc.exited()
            if code is None:
                continue
            tail = proc.tail()
            pid = proc.pid
            proc.forget()
            self.finding("uninjected-exit", name, f"pid {pid} exited with status {code}; nothing killed it", tail)
            while time.monotonic() - self._last_start.get(name, 0.0) < RESTART_NOT_BEFORE_S:
                time.sleep(0.1)
            self._last_start[name] = time.monotonic()
            self.say(f"restarted {name} (pid {proc.start('restart after an exit nobody caused')})")

    def finding(self, kind: str, service: str, detail: str, log_tail: str = "") -> None:
        found = Finding(kind, service, detail, log_tail=log_tail)
        self.findings.append(found)
        with self.layout.findings.open("a") as f:
            f.write(json.dumps(asdict(found)) + "\n")
        self.say(f"FINDING ({kind}, {service}): {detail}")

    def sleep(self, seconds: float) -> None:
        end = time.monotonic() + seconds
        while (left := end - time.monotonic()) > 0:
            self.supervise()
            time.sleep(min(0.25, left))
        self.supervise()

    def wait_until(self, done: Callable[[], bool], within_s: float, what: str) -> bool:
        """Poll ``done`` (supervising meanwhile) until it holds: True; False after ``within_s``."""
        deadline = time.monotonic() + within_s
        while not done():
            if time.monotonic() > deadline:
                self.say(f"gave up waiting for {what} after {within_s:.0f}s")
                return False
            self.sleep(0.5)
        return True

    def extend(self, to_steps: int, why: str) -> None:
        """Raise the trainer's max_steps to ``to_steps``: a graceful restart with it in the
        environment (SIGTERM, which saves a resume state; an unclean stop is a finding)."""
        proc = self.procs["trainer"]
        proc.resume()
        code = proc.terminate(30.0) if proc.running() else 0
        if code not in (0, -signal.SIGTERM):
            self.finding("unclean-stop", "trainer", f"exited with status {code} on SIGTERM (extending)", proc.tail())
        proc.env = {**proc.env, "POPE_TRAINER__MAX_STEPS": str(to_steps)}
        pid = proc.start(f"max_steps {self.max_steps} -> {to_steps}: {why}")
        self.say(f"extended the run to {to_steps} steps ({why}); trainer restarted as pid {pid}")
        self.max_steps = to_steps

    def stop_services(self, grace_s: float = 30.0) -> dict[str, int | None]:
        """SIGTERM each service, producers first and the engine last (Redis stays up for
        the ledger); an unclean stop is a finding. Returns the exit statuses."""
        codes: dict[str, int | None] = {}
        routers = ["router"] if "router" in self.procs else []
        for name in [
            "rollout",
            "trainer",
            *(f"verifier-{i}" for i in range(VERIFIER_REPLICAS)),
            *routers,
            *self.engines,
        ]:
            proc = self.procs[name]
            if not proc.running():
                continue
            proc.resume()  # never left frozen, but a stop must not hang on one that is
            codes[name] = code = proc.terminate(grace_s)
            if code is None:
                self.finding(
                    "unclean-stop", name, f"did not exit within {grace_s:.0f}s of SIGTERM; killed", proc.tail()
                )
            elif not (code == 0 or (code == -signal.SIGTERM and SHUT_DOWN in proc.tail())):
                self.finding("unclean-stop", name, f"exited with status {code} on SIGTERM", proc.tail())
        self.say(f"services stopped: {codes}")
        return codes

    def stop_all(self) -> None:
        """On the way out, however the run ends: nothing is left running or frozen, Redis
        stopped last (after the ledger has read it)."""
        for proc in reversed(self.procs.values()):
            proc.resume()
            if proc.running():
                proc.terminate(5.0)


def redis_url(ports: dict[str, int]) -> str:
    return f"redis://127.0.0.1:{ports['redis']}/0"


def engine_names(engines: int) -> list[str]:
    """The engine processes of a run, and the router in front of several."""
    return ["engine"] if engines == 1 else [*(f"engine-{i}" for i in range(engines)), "router"]


def write_config(layout: Layout, form: Form, ports: dict[str, int], trainer_nproc: int = 1) -> None:
    """configs/chaos.yaml plus this run's ports, Redis, model, steps and paths; with several
    engines, the rollout's generation through the router and the trainer over every engine."""
    config = yaml.safe_load(BASE_CONFIG.read_text())
    engines = [f"http://127.0.0.1:{port}" for name, port in ports.items() if name.startswith("engine")]
    routed = "router" in ports
    engine_url = f"http://127.0.0.1:{ports['router']}" if routed else engines[0]
    many = {"engine_urls": engines[1:], "router_url": engine_url} if routed else {}
    run = {
        "shared": {"redis_url": redis_url(ports), "model_path": str(layout.model)},
        "engine": {"port": ports.get("engine", 0)},
        "rollout": {
            "port": ports["rollout"],
            "engine_url": engine_url,
            "engine_router": routed,
            "verifier_url": f"http://127.0.0.1:{ports['verifier-0']}",
            "archive_dir": str(layout.rollouts),
            "eval_dir": str(layout.root / "eval"),
        },
        "trainer": {
            "port": ports["trainer"],
            "engine_url": engines[0],
            **many,
            "checkpoint_dir": str(layout.checkpoints),
            "metrics_log": str(layout.root / "trainer_metrics.jsonl"),
            "max_steps": form.steps,
            "nproc": trainer_nproc,  # above 1: torchrun, FSDP2 on gloo (one consumer: rank 0)
        },
    }
    for section, values in run.items():
        config.setdefault(section, {}).update(values)
    layout.config.write_text(yaml.safe_dump(config, sort_keys=False))


def make_procs(layout: Layout, ports: dict[str, int]) -> dict[str, Proc]:
    """Redis first, then the services in the order they depend on each other."""
    cfg = ["--config", str(layout.config)]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "REDIS_URL": redis_url(ports)}
    url = redis_url(ports)
    engines = [n for n in ports if n == "engine" or n.startswith("engine-")]
    children = [engine_child(str(layout.model), ports[name], cfg, name=name)[0] for name in engines]
    if "router" in ports:
        children.append(router_child(ports["router"])[0])
    for i in range(VERIFIER_REPLICAS):
        child = verifier_child(url, ports[f"verifier-{i}"], cfg)[0]
        children.append(Child(f"verifier-{i}", child.args, child.health))
    for name in ("trainer", "rollout"):
        children.append(Child(name, [name, *cfg], f"http://127.0.0.1:{ports[name]}/readyz"))
    procs = {"redis": redis_proc(layout, ports["redis"], env)}
    for c in children:
        procs[c.name] = Proc(
            c.name,
            [sys.executable, "-m", "services.cli", *c.args],
            functools.partial(_answers, c.health),
            layout.logs / f"{c.name}.log",
            env,
            ROOT,
        )
    return procs


def redis_proc(layout: Layout, port: int, env: dict[str, str]) -> Proc:
    """redis-server on ``port`` with AOF (fsync on every write) in the run directory: a
    ``kill -9`` loses nothing it acknowledged, and a restart on the same port reloads it."""
    layout.redis_dir.mkdir(parents=True, exist_ok=True)
    argv = [redis_server_binary(), "--port", str(port), "--bind", "127.0.0.1", "--save", ""]
    argv += ["--dir", str(layout.redis_dir), "--appendonly", "yes", "--appendfsync", "always"]
    url = f"redis://127.0.0.1:{port}/0"
    return Proc("redis", argv, lambda: answers(url), layout.logs / "redis.log", env, ROOT)


def _answers(url: str) -> bool:
    try:
        return httpx.get(url, timeout=2).status_code == 200
    except httpx.HTTPError:
        return False
