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


def sglang_script() -> str:
    """The shell line that starts SGLang, as the container's shell sees it ($$ is compose's $)."""
    command = compose()["services"]["engine"]["command"]
    assert command[:2] == ["sh", "-c"] and len(command) == 3, command
    script: str = command[2].replace("$$", "$")
    return script


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
    assert "sglang" in engine["image"] and sglang_script().startswith("exec python3 -m sglang.launch_server ")
    assert "--weight-version 0" in sglang_script() and "--model-path /models/base" in sglang_script()
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


def test_each_gpu_service_gets_its_own_devices_from_the_env_file() -> None:
    gpu = profile_services("gpu")
    chosen = {}
    for name, variable in (("engine", "ENGINE_GPUS"), ("trainer", "TRAINER_GPUS")):
        [device] = gpu[name]["deploy"]["resources"]["reservations"]["devices"]
        assert device["driver"] == "nvidia" and device["capabilities"] == ["gpu"], name
        assert "count" not in device, f"{name}: a count gives every container the first GPUs (the same ones)"
        [ids] = device["device_ids"]
        match = re.fullmatch(r"\$\{" + variable + r":-([0-9,]+)\}", ids)
        assert match, f"{name}: device_ids {ids!r} is not ${{{variable}:-<default>}}"
        chosen[name] = set(match.group(1).split(","))
    assert not chosen["engine"] & chosen["trainer"], f"the defaults share a GPU: {chosen}"


def test_the_engine_key_reaches_the_engine_and_every_client_of_it() -> None:
    services = compose()["services"]
    required = "${ENGINE_API_KEY:?"
    assert services["engine"]["environment"]["ENGINE_API_KEY"].startswith(required)
    assert '--api-key "$ENGINE_API_KEY"' in sglang_script()
    assert services["engine-cpu"]["environment"]["POPE_ENGINE__API_KEY"].startswith(required)
    clients = {"rollout": "POPE_ROLLOUT__ENGINE_API_KEY", "trainer": "POPE_TRAINER__ENGINE_API_KEY"}
    clients["trainer-cpu"] = "POPE_TRAINER__ENGINE_API_KEY"
    for name, variable in clients.items():
        assert services[name]["environment"][variable].startswith(required), name


def test_sglang_serves_metrics_and_takes_its_dtype_and_memory_share_from_the_env_file() -> None:
    engine = compose()["services"]["engine"]
    script = sglang_script()
    assert "--enable-metrics" in script.split()
    assert '--dtype "$ENGINE_DTYPE"' in script and engine["environment"]["ENGINE_DTYPE"] == "${ENGINE_DTYPE:-auto}"
    # Unset, the flag is left out and SGLang sizes its memory from the GPU.
    assert '${ENGINE_MEM_FRACTION:+--mem-fraction-static "$ENGINE_MEM_FRACTION"}' in script
    assert engine["environment"]["ENGINE_MEM_FRACTION"] == "${ENGINE_MEM_FRACTION:-}"


def test_the_weights_volume_is_written_by_the_trainers_user_and_read_by_the_engine() -> None:
    """The named volume starts empty; the first container to mount it where its image has
    the directory gives it that directory's owner. Only the project's image has /weights
    (owned by the uid it runs as); SGLang's mounts it read-only and runs as root, which
    reads anything."""
    dockerfile = (ROOT / "Dockerfile").read_text()
    [user] = re.findall(r"^USER (\d+):(\d+)$", dockerfile, re.M)
    assert re.search(rf"chown {user[0]}:{user[1]} [^\n]*/weights\b", dockerfile), (
        "the image's /weights is not its user's"
    )
    services = compose()["services"]
    assert "user" not in services["trainer"] and "user" not in services["trainer-cpu"]  # the image's USER


def test_every_variable_is_required_or_defaulted_and_documented_in_env_example() -> None:
    text = COMPOSE.read_text()
    uses = re.findall(r"(?<!\$)\$\{([A-Z_][A-Z0-9_]*)(:?[-?])?", text)  # $${...} is the container's shell's
    assert uses
    documented = set(re.findall(r"^#?\s*([A-Z_][A-Z0-9_]*)=", (ROOT / ".env.example").read_text(), re.M))
    for name, mode in uses:
        assert mode in (":?", ":-"), f"${{{name}}} is neither required (:?) nor defaulted (:-)"
        assert name in documented, f"{name} is used in docker-compose.yml but not in .env.example"
    required = {n for n, m in uses if m == ":?"}
    assert required == {"REDIS_PASSWORD", "POPE_API_TOKEN", "ENGINE_API_KEY", "MODEL_DIR"}


def test_the_gpu_trainer_runs_trainer_nproc_ranks_with_room_in_dev_shm() -> None:
    """TRAINER_NPROC (default 1) becomes trainer.nproc, the ranks torchrun starts; NCCL's
    buffers between them live in /dev/shm, which needs more than Docker's 64 MiB."""
    trainer = profile_services("gpu")["trainer"]
    assert trainer["environment"]["POPE_TRAINER__NPROC"] == "${TRAINER_NPROC:-1}"
    assert trainer.get("ipc") == "host" or _gib(trainer["shm_size"]) >= 8, "the trainer's /dev/shm is too small"
    env_example = (ROOT / ".env.example").read_text()
    assert re.search(r"^# TRAINER_NPROC=1\b", env_example, re.M), "TRAINER_NPROC's default differs in .env.example"
    # The default is one rank on the one GPU TRAINER_GPUS defaults to.
    [device] = trainer["deploy"]["resources"]["reservations"]["devices"]
    [ids] = device["device_ids"]
    match = re.fullmatch(r"\$\{TRAINER_GPUS:-([0-9,]+)\}", ids)
    assert match and len(match.group(1).split(",")) == 1


def _gib(size: str) -> float:
    """A compose byte value (16g, 512m) in GiB."""
    match = re.fullmatch(r"(\d+)([kmg]?)b?", str(size).lower())
    assert match, size
    return int(match.group(1)) * {"": 1, "k": 2**10, "m": 2**20, "g": 2**30}[match.group(2)] / 2**30
