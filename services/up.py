"""``pope up``: the whole stack on one machine, as separate processes, from one config.

    pope up --model DIR [--config FILE] [--problems FILE] [--steps N] [--engines N]

Starts Redis if none answers (a private redis-server), then the engine, verifier,
trainer and rollout service, each its own process reading its own section of the one
config file, on the configured ports (defaults: engine 30000, rollout 8000, verifier
8001, trainer 8002). With ``--engines N`` (N > 1) it starts N engines on free ports and
SGLang's router on the engine port; generation goes through the router, and the trainer
keeps every engine on its weights and the router's workers to those that serve them
(services/trainer/fleet.py). Waits for each to be healthy, optionally submits problems, then
prints progress (trainer step, reward by variant, throughput) until Ctrl-C / SIGTERM,
or until the trainer reaches ``--steps``; then stops everything cleanly, within
``stack.STOP_WITHIN_S``. Each process logs to ``<run_dir>/logs/<name>.log``.

A service that dies is restarted after a backoff (``stack.RestartPolicy``); one that dies
``--crash-loop`` times within ``--crash-window`` seconds stops the stack with the end of
its log (``--no-restart``: the first death does). A Redis outage is waited out.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TextIO

import httpx

from services.common import threads
from services.common.config import load_settings, model_dir_problem
from services.common.keys import delete_prefix
from services.common.redis_server import answers, redis_for
from services.engine.settings import EngineSettings
from services.restarts import RestartPolicy
from services.rollout.settings import RolloutSettings
from services.router import RouterMissing
from services.router import check_installed as check_router_installed
from services.stack import Child, Stack, engine_child, router_child, running, say, verifier_child
from services.trainer.settings import TrainerSettings
from services.verifier.settings import VerifierSettings

LABEL = "pope up"
DEFAULT_RESTART = RestartPolicy()


def read_problems(path: Path) -> list[dict[str, Any]]:
    """A JSON list, or JSON Lines (one problem per line)."""
    text = path.read_text()
    if text.lstrip().startswith("["):
        rows: list[dict[str, Any]] = json.loads(text)
        return rows
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def _fmt(value: object) -> str:
    return f"{value:.3f}" if isinstance(value, float) else "-"


def progress_line(status: dict[str, Any], started: float) -> str:
    t, r, s = status.get("trainer", {}), status.get("rollout", {}), status.get("streams", {})
    m = t.get("last_step") or {}
    waiting = f" (waiting for {r['waiting_for']})" if r.get("waiting_for") else ""
    pending = (s.get("rollouts", {}).get("verifiers") or {}).get("pending", "-")
    return (
        f"[{time.monotonic() - started:7.1f}s] trainer step {int(t.get('version', 0))} | "
        f"loss {_fmt(m.get('loss'))} | reward hinted {_fmt(m.get('reward_hinted'))} "
        f"unhinted {_fmt(m.get('reward_unhinted'))} | groups solved hinted {_fmt(m.get('hinted/solve_rate'))} "
        f"unhinted {_fmt(m.get('unhinted/solve_rate'))} | rollout step {r.get('step') or 0}{waiting} | "
        f"{r.get('groups_per_min') or 0:.0f} groups/min | unscored groups {pending} | "
        f"{_engines(status.get('engine', {}))}"
    )


def _engines(engine: dict[str, Any]) -> str:
    """``engine v3``; with several: ``engines v3, 2/3 serving`` (the oldest routed version)."""
    records = engine.get("engines") or []
    if len(records) <= 1:
        return f"engine v{engine.get('weight_version')}"
    serving = sum(r.get("state") in ("serving", "updating") for r in records)
    return f"engines v{engine.get('weight_version')}, {serving}/{len(records)} serving"


def wipe(url: str, rollout: RolloutSettings, trainer: TrainerSettings, out: TextIO) -> None:
    """Start a new run: delete the run's Redis keys, checkpoints, rollout archive and metrics."""
    import redis

    client = redis.Redis.from_url(url)
    try:
        for prefix in {rollout.key_prefix, trainer.key_prefix}:
            deleted = delete_prefix(client, prefix)
            say(LABEL, f"--fresh: deleted {deleted} Redis keys under {prefix!r}", out)
    finally:
        client.close()
    for path in (trainer.checkpoint_dir, rollout.archive_dir, trainer.tensorboard_dir, trainer.metrics_log):
        if path is None or not path.exists():
            continue
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink()
        say(LABEL, f"--fresh: deleted {path}", out)


def engines_and_router(model: str, n: int, port: int, cfg: list[str]) -> tuple[list[Child], list[str]]:
    """The engine children and their URLs. One engine: on ``port``. More: each on a free
    port, and SGLang's router on ``port`` (what generation calls), started with no workers:
    the trainer adds each engine once it serves its weights (services/trainer/fleet.py).
    Listed engines first, so the router and the engines stop last."""
    if n == 1:
        child, url = engine_child(model, port, cfg)
        return [child], [url]
    pairs = [engine_child(model, None, cfg, name=f"engine-{i}") for i in range(n)]
    router, _ = router_child(port)
    return [*(c for c, _ in pairs), router], [u for _, u in pairs]


def assign_threads(children: list[Child], engine: EngineSettings, trainer: TrainerSettings, cores: int) -> str:
    """Give each child its thread budget (services/common/threads.py) through its
    environment, and say what was assigned. The engines' and trainer's torch counts go in
    as their settings' variables only where the user set none (config or environment), so a
    set count wins; the router, the rollout and the verifier get one thread per pool."""
    engines = [c for c in children if c.name == "engine" or c.name.startswith("engine-")]
    budget = threads.split(cores, len(engines), engine.torch_threads, trainer.torch_threads, trainer.nproc)
    for c in children:
        if c in engines:
            c.env.update(threads.thread_env(budget.engine))
            if engine.torch_threads is None:
                c.env["POPE_ENGINE__TORCH_THREADS"] = str(budget.engine)
        elif c.name == "trainer":
            c.env.update(threads.thread_env(budget.trainer))
            if trainer.torch_threads is None:
                c.env["POPE_TRAINER__TORCH_THREADS"] = str(budget.trainer)
        else:
            c.env.update(threads.thread_env(1))
    chosen = {
        "engine": (budget.engine, engine.torch_threads is not None),
        "trainer": (budget.trainer, trainer.torch_threads is not None),
    }
    parts = [
        f"{name} {n}" + (" (set)" if set_ else "") + (f" x {k}" if k > 1 else "")
        for (name, (n, set_)), k in zip(chosen.items(), (len(engines), trainer.nproc), strict=True)
    ]
    return (
        f"threads on {cores} cores: {', '.join(parts)}; rollout, verifier 1 "
        "(engine.torch_threads, trainer.torch_threads choose)"
    )


def engine_key_problem(engine: EngineSettings, **clients: RolloutSettings | TrainerSettings) -> str | None:
    """What is wrong when the engine has an API key or an admin key its clients (by
    section) do not send: their every call, or every control call, would be refused (401).
    Both services need the admin key: the trainer's weight updates and the rollout's aborts
    are control calls."""
    for engine_key, client_key, shared in (
        (engine.api_key, "engine_api_key", "shared.engine_api_key"),
        (engine.admin_api_key, "engine_admin_key", "shared.engine_admin_key"),
    ):
        if engine_key is None or not engine_key.get_secret_value():
            continue
        name = "api_key" if client_key == "engine_api_key" else "admin_api_key"
        for section, settings in clients.items():
            if getattr(settings, client_key) != engine_key:
                return (
                    f"pope up: engine.{name} is set but {section}.{client_key} is not the same key; "
                    f"set {shared} (rollout and trainer read it) to the engine's key"
                )
    return None


def up(
    model: str | None,
    config: str | None,
    redis_url: str | None,
    problems: Path | None,
    steps: int | None,
    run_dir: Path,
    fresh: bool = False,
    out: TextIO = sys.stdout,
    restart: RestartPolicy | None = DEFAULT_RESTART,
    engines: int = 1,
) -> int:
    """Run the stack until ``steps`` (or Ctrl-C / SIGTERM); 0 when it stopped cleanly.
    ``restart``: how dead services are started again (None: the first death stops all).
    ``engines`` > 1: that many engines behind SGLang's router (``engines_and_router``)."""
    with stop_on_signals() as stopping:
        engine_s, rollout_s = load_settings(EngineSettings, config), load_settings(RolloutSettings, config)
        verifier_s, trainer_s = load_settings(VerifierSettings, config), load_settings(TrainerSettings, config)
        sections = {"engine": engine_s, "rollout": rollout_s, "verifier": verifier_s, "trainer": trainer_s}
        model = model or engine_s.model_path
        problem = model_dir_problem(model, "up") or engine_key_problem(engine_s, rollout=rollout_s, trainer=trainer_s)
        if engines > 1 and problem is None:
            try:
                check_router_installed()
            except RouterMissing as exc:
                problem = f"pope up --engines {engines}: {exc}"
        if model is None or problem:
            print(problem, file=sys.stderr)
            return 2
        ports = {name: s.port for name, s in sections.items()}
        engine_url = f"http://127.0.0.1:{ports['engine']}"
        cfg = ["--config", config] if config else []

        def tell(text: str) -> None:
            say(LABEL, text, out)

        with redis_for(redis_url or os.environ.get("REDIS_URL")) as url:
            if fresh:
                wipe(url, rollout_s, trainer_s, out)
            engine_children, engine_urls = engines_and_router(model, engines, ports["engine"], cfg)
            router = ["--router-url", engine_url, "--engine-urls", json.dumps(engine_urls[1:])] if engines > 1 else []
            verifier, verifier_url = verifier_child(url, ports["verifier"], cfg)
            children = [
                *engine_children,
                verifier,
                Child(
                    "trainer",
                    [
                        "trainer",
                        "--port",
                        str(ports["trainer"]),
                        "--redis-url",
                        url,
                        "--engine-url",
                        engine_urls[0],
                        *router,
                        "--model",
                        model,
                        *cfg,
                    ],
                    f"http://127.0.0.1:{ports['trainer']}/readyz",
                ),
                Child(
                    "rollout",
                    [
                        "rollout",
                        "--port",
                        str(ports["rollout"]),
                        "--redis-url",
                        url,
                        "--engine-url",
                        engine_url,
                        *(["--engine-router", "true"] if engines > 1 else []),
                        "--model",
                        model,
                        *cfg,
                    ],
                    f"http://127.0.0.1:{ports['rollout']}/readyz",
                ),
            ]
            tell(assign_threads(children, engine_s, trainer_s, threads.cores()))
            # The rollout service scores evaluations on this stack's verifier.
            env = {"REDIS_URL": url, "POPE_ROLLOUT__VERIFIER_URL": verifier_url}
            if steps is not None:  # the trainer stops at N itself, not one step late while all stop
                env["POPE_TRAINER__MAX_STEPS"] = str(steps)
            tell(f"redis at {url}; logs in {run_dir / 'logs'}")
            rollout_url = f"http://127.0.0.1:{ports['rollout']}"
            code = 0
            try:
                with running(
                    children, run_dir / "logs", out, LABEL, env=env, stopping=stopping, restart=restart
                ) as stack:
                    stack.say(
                        f"all services ready. dashboard: {rollout_url}/  API: {rollout_url}/docs  "
                        f"status: {rollout_url}/v1/status"
                    )
                    if problems is not None:
                        submit(problems, rollout_url, rollout_s, stack)
                    code = watch(stack, rollout_url, url, steps, stopping)
            except KeyboardInterrupt:
                tell("interrupted")
            except RuntimeError as exc:
                tell(f"error: {exc}")
                code = 1
        if code != 0:
            return code
        tell(
            f"rollouts:    {rollout_s.archive_dir / 'rollouts.jsonl'} (one JSON line per scored sample; "
            "GET /v1/rollouts pages it)"
        )
        tell(
            f"checkpoints: {trainer_s.checkpoint_dir} (step-N: resume states, every {trainer_s.save_every} steps; "
            "weights/: the model directories the engine loads)"
        )
        tensorboard = f"; TensorBoard: {trainer_s.tensorboard_dir}" if trainer_s.tensorboard_dir else ""
        wandb = f"; wandb: project {trainer_s.wandb.project}" if trainer_s.wandb.project else ""
        tell(f"metrics:     {trainer_s.metrics_log} (per step, by variant){tensorboard}{wandb}")
        tell(f"logs:        {run_dir / 'logs'}")
        return code


def submit(problems: Path, rollout_url: str, rollout: RolloutSettings, stack: Stack) -> None:
    """POST the file's problems, with the rollout's bearer token when it has one."""
    token = rollout.api_token.get_secret_value() if rollout.api_token else None
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    resp = httpx.post(f"{rollout_url}/v1/problems", json=read_problems(problems), headers=headers, timeout=60)
    if resp.status_code != 201:
        raise RuntimeError(f"submitting {problems} failed: {resp.status_code} {resp.text[:500]}")
    stack.say(f"submitted {len(resp.json()['ids'])} problems from {problems}")


@contextlib.contextmanager
def stop_on_signals() -> Iterator[list[bool]]:
    """A flag that Ctrl-C and SIGTERM set while inside: the stack then stops cleanly, and a
    second Ctrl-C does not skip that either. The previous handlers are put back on leaving,
    so a caller's own Ctrl-C works after."""
    stopping = [False]

    def on_signal(signum: int, frame: object) -> None:
        stopping[0] = True

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield stopping
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def watch(stack: Stack, rollout_url: str, redis_url: str, steps: int | None, stopping: list[bool]) -> int:
    """Supervise the children and print progress until ``stopping`` or the trainer reaches
    ``steps``. A status that does not come (Redis down, the rollout restarting) is waited
    for, with a line saying what for."""
    started, last, waiting = time.monotonic(), "", ""
    while not stopping[0]:
        stack.supervise()
        try:
            status = read_status(httpx.get(f"{rollout_url}/v1/status", timeout=10))
        except httpx.HTTPError as exc:
            status = f"no answer: {type(exc).__name__}"
        if isinstance(status, str):
            if not answers(redis_url):
                status = f"Redis at {redis_url} does not answer"
            if status != waiting:
                stack.say(f"waiting for the rollout's {rollout_url}/v1/status ({status})")
                waiting = status
            time.sleep(1.0)
            continue
        if waiting:
            stack.say("the rollout's status answers again")
            waiting = ""
        line = progress_line(status, started)
        if line.split("]", 1)[1] != last:
            print(line, file=stack.out, flush=True)
            last = line.split("]", 1)[1]
        if steps is not None and int(status.get("trainer", {}).get("version", 0)) >= steps:
            stack.say(f"trainer reached step {steps}")
            return 0
        time.sleep(1.0)
    return 0


def read_status(resp: httpx.Response) -> dict[str, Any] | str:
    """The body of a /v1/status answer, or why there is none: during a Redis outage the
    rollout answers 500, and a proxy may answer 503 or a page that is not JSON."""
    if resp.status_code != 200:
        return f"{resp.status_code} {resp.reason_phrase}".strip()
    try:
        body = resp.json()
    except ValueError:
        return f"an answer that is not JSON: {resp.text[:80]!r}"
    return body if isinstance(body, dict) else f"an answer that is not a JSON object: {resp.text[:80]!r}"
