"""docker-compose.yml: valid against the compose specification, and the stack it describes."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

from tests.conftest import ROOT

COMPOSE = ROOT / "docker-compose.yml"


def compose() -> dict[str, Any]:
    """The file as compose reads it (YAML anchors and merge keys resolved)."""
    data: dict[str, Any] = yaml.safe_load(COMPOSE.read_text())
    return data


def profile_services(profile: str) -> dict[str, dict[str, Any]]:
    """The services `COMPOSE_PROFILES=<profile> docker compose up` starts."""
    return {n: s for n, s in compose()["services"].items() if not s.get("profiles") or profile in s["profiles"]}


def test_compose_file_is_valid_against_the_compose_specification() -> None:
    tool = Path(sys.executable).parent / "check-jsonschema"
    run = subprocess.run(
        [str(tool), "--builtin-schema", "vendor.compose-spec", str(COMPOSE)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stdout + run.stderr


def test_gpu_is_the_default_stack_and_cpu_the_documented_variant() -> None:
    assert "COMPOSE_PROFILES=gpu" in (ROOT / ".env.example").read_text().splitlines()
    gpu, cpu = profile_services("gpu"), profile_services("cpu")
    assert set(gpu) == {"redis", "engine", "verifier", "rollout", "trainer"}
    assert set(cpu) == {"redis", "engine-cpu", "verifier", "rollout", "trainer-cpu"}
    engine = gpu["engine"]
    assert "sglang" in engine["image"] and engine["command"][:3] == ["python3", "-m", "sglang.launch_server"]
    assert "--weight-version" in engine["command"] and "/models/base" in engine["command"]
    for name in ("engine", "trainer"):
        devices = gpu[name]["deploy"]["resources"]["reservations"]["devices"]
        assert devices[0]["driver"] == "nvidia" and "gpu" in devices[0]["capabilities"]
    assert gpu["trainer"]["environment"]["POPE_TRAINER__DEVICE"] == "cuda"
    assert "cu128" in gpu["trainer"]["build"]["args"]["TORCH_INDEX"]
    # The CPU engine answers to the same name, so nothing else changes between stacks.
    assert cpu["engine-cpu"]["networks"]["default"]["aliases"] == ["engine"]
    assert cpu["engine-cpu"]["command"][0] == "engine" and "deploy" not in cpu["engine-cpu"]
    assert "deploy" not in cpu["trainer-cpu"]


def test_redis_keeps_an_append_only_file_behind_a_password_from_the_env_file() -> None:
    redis = compose()["services"]["redis"]
    command = " ".join(redis["command"])
    assert "--appendonly yes" in command and "--requirepass ${REDIS_PASSWORD:?" in command
    assert any(v.endswith(":/data") for v in redis["volumes"])
    for name, service in compose()["services"].items():
        env = service.get("environment") or {}
        if "REDIS_URL" in env:
            assert env["REDIS_URL"].startswith("redis://:${REDIS_PASSWORD:?"), name


def test_health_gates_and_the_shared_weights_volume() -> None:
    services = compose()["services"]
    for name, service in services.items():
        assert "healthcheck" in service, f"{name} has no healthcheck"
        for dep, cond in (service.get("depends_on") or {}).items():
            assert cond["condition"] == "service_healthy", (name, dep)
            assert dep in services
    # The trainer writes weights where the engine reads them: one named volume, engine read-only.
    for trainer in ("trainer", "trainer-cpu"):
        assert "weights:/weights" in services[trainer]["volumes"]
    for engine in ("engine", "engine-cpu"):
        assert "weights:/weights:ro" in services[engine]["volumes"]
    assert "weights" in compose()["volumes"]
    assert services["verifier"]["deploy"]["replicas"] == "${VERIFIER_REPLICAS:-2}"
    assert list(services["rollout"]["ports"]) == ["${ROLLOUT_PORT:-8000}:8000"]  # only the API is published


def test_every_variable_is_required_or_defaulted_and_documented_in_env_example() -> None:
    text = COMPOSE.read_text()
    uses = re.findall(r"\$\{([A-Z_][A-Z0-9_]*)(:?[-?])?", text)
    assert uses
    documented = set(re.findall(r"^#?\s*([A-Z_][A-Z0-9_]*)=", (ROOT / ".env.example").read_text(), re.M))
    for name, mode in uses:
        assert mode in (":?", ":-"), f"${{{name}}} is neither required (:?) nor defaulted (:-)"
        assert name in documented, f"{name} is used in docker-compose.yml but not in .env.example"
    required = {n for n, m in uses if m == ":?"}
    assert required == {"REDIS_PASSWORD", "POPE_API_TOKEN", "MODEL_DIR"}
