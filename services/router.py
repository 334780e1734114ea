"""``pope router``: SGLang's own router (``sglang-router``, ``ROUTER_VERSION``) in front of
the engines, started the way this project runs it.

    POPE_ROUTER_ADMIN_KEY=<key> pope router --port 30000 [--host 127.0.0.1] [--prometheus-port 29000]

It starts with no workers: the trainer's fleet adds each engine once it serves the
trainer's weights and takes out one that dies or lags (services/trainer/fleet.py), so the
router's own health check is off (``--disable-health-check``), which would otherwise evict
an engine that is slow to answer while it loads new weights. Requests to an engine that
died before the fleet noticed are retried on another one by the router itself. Round robin,
since every engine serves the same weights and a group's samples are requests of their own.

With ``POPE_ROUTER_ADMIN_KEY`` set, the router's worker list (``/workers``, read or
changed) needs ``Authorization: Bearer <key>`` (the router's control-plane keys, one of
role admin): the trainer sends it (``trainer.router_admin_key``). Generation through the
router is open to whoever reaches it (it forwards with the engine key each worker was added
with; sglang-router 0.3.2 has no client key for its data plane): the network policy (or
compose's unpublished port) is what keeps the router to the rollout service and the trainer.
"""

from __future__ import annotations

import importlib.util
import os
import sys

from services.common.router_client import ROUTER_VERSION


class RouterMissing(RuntimeError):
    """sglang-router is not installed."""


ADMIN_KEY_ENV = "POPE_ROUTER_ADMIN_KEY"


def router_command(
    host: str, port: int, prometheus_port: int, log_level: str = "warn", admin_key: str | None = None
) -> list[str]:
    """The router's command line (``python -m sglang_router.launch_router ...``)."""
    if admin_key is not None and (not admin_key or any(c in admin_key for c in ": \t\n")):
        raise ValueError(f"{ADMIN_KEY_ENV} must be non-empty, without ':' or whitespace (the router's key format)")
    control = ["--control-plane-api-keys", f"pope-trainer:POPE-RL trainer:admin:{admin_key}"] if admin_key else []
    return [
        sys.executable,
        "-m",
        "sglang_router.launch_router",
        "--host",
        host,
        "--port",
        str(port),
        "--policy",
        "round_robin",
        "--disable-health-check",
        # Its circuit breaker counts an engine's 400s as failures: ten bad requests from
        # anyone and every worker's circuit opens, all generation refused (503) for about a
        # minute (found by the fuzz). The fleet takes a dead engine out, and the router's
        # retries move a request off an engine that died before it did.
        "--disable-circuit-breaker",
        # Its Prometheus exporter binds 29000 by default: two routers on a host would collide.
        "--prometheus-host",
        host,
        "--prometheus-port",
        str(prometheus_port),
        "--log-level",
        log_level,
        *control,
    ]


def check_installed() -> None:
    if importlib.util.find_spec("sglang_router") is None:
        raise RouterMissing(
            f"SGLang's router is not installed: pip install 'sglang-router=={ROUTER_VERSION}' "
            "(or the project's extra: pip install 'pope-rl[router]')"
        )


def run(host: str, port: int, prometheus_port: int, log_level: str) -> None:
    """Become the router (exec: signals reach it directly)."""
    check_installed()
    command = router_command(host, port, prometheus_port, log_level, os.environ.get(ADMIN_KEY_ENV) or None)
    os.execv(command[0], command)
