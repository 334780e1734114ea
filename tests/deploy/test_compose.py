"""docker-compose.yml: valid against the compose specification, and the stack it describes."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

from tests.conftest import ROOT

COMPOSE = ROOT / "docker-compose.yml"
ENGINES = ROOT / "docker-compose.engines.yml"  # the override: several engines behind the router


def compose() -> dict[str, Any]:
    """The file as compose reads it (YAML anchors and merge keys resolved)."""
    data: dict[str, Any] = yaml.safe_load(COMPOSE.read_text())
    return data


def with_engines() -> dict[str, Any]:
    """docker-compose.yml with docker-compose.engines.yml over it, merged as compose merges
    what the override holds: new services whole; of a service of the base file only
    ``environment``, ``depends_on`` and ``labels``, mappings merged key by key (the override
    may hold nothing else there: a sequence would be appended, not replaced)."""
    base, override = compose(), yaml.safe_load(ENGINES.read_text())
    services = base["services"]
    for name, service in override["services"].items():
        if name not in services:
            services[name] = service
            continue
        assert set(service) <= {"environment", "depends_on", "labels"}, (
            f"{ENGINES.name}: {name} overrides {sorted(service)}"
        )
        for key, value in service.items():
            services[name][key] = {**(services[name].get(key) or {}), **value}
    return base


def profile_services(profile: str, data: dict[str, Any] | None = None) -> dict[str, dict[str, Any]]:
    """The services `COMPOSE_PROFILES=<profile> docker compose up` starts (of ``data``,
    default docker-compose.yml alone)."""
    services = (data or compose())["services"]
    return {n: s for n, s in services.items() if not s.get("profiles") or profile in s["profiles"]}


def sglang_script() -> str:
    """The shell line that starts SGLang, as the container's shell sees it ($$ is compose's $)."""
    command = compose()["services"]["engine"]["command"]
    assert command[:2] == ["sh", "-c"] and len(command) == 3, command
    script: str = command[2].replace("$$", "$")
    return script


def test_compose_files_are_valid_against_the_compose_specification() -> None:
    tool = Path(sys.executable).parent / "check-jsonschema"
    run = subprocess.run(
        [str(tool), "--builtin-schema", "vendor.compose-spec", str(COMPOSE), str(ENGINES)],
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
    for data in (compose(), with_engines()):
        for name, service in data["services"].items():
            assert "healthcheck" in service, f"{name} has no healthcheck"
            for dep, cond in (service.get("depends_on") or {}).items():
                assert cond["condition"] == "service_healthy", (name, dep)
                assert dep in data["services"]
    services = compose()["services"]
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
    documented = set(re.findall(r"^#?\s*([A-Z_][A-Z0-9_]*)=", (ROOT / ".env.example").read_text(), re.M))
    for path in (COMPOSE, ENGINES):
        uses = re.findall(r"(?<!\$)\$\{([A-Z_][A-Z0-9_]*)(:?[-?])?", path.read_text())  # $${...}: the shell's
        assert uses
        for name, mode in uses:
            assert mode in (":?", ":-"), f"{path.name}: ${{{name}}} is neither required (:?) nor defaulted (:-)"
            assert name in documented, f"{name} is used in {path.name} but not in .env.example"
        required = {n for n, m in uses if m == ":?"}
        secrets_and_model = {"REDIS_PASSWORD", "POPE_API_TOKEN", "ENGINE_API_KEY", "MODEL_DIR"}
        if path == COMPOSE:
            assert required == secrets_and_model
        else:  # with several engines the trainer's GPUs (their default is engine-1's) and the router's key
            assert {"TRAINER_GPUS", "ROUTER_ADMIN_KEY"} <= required, path.name
            assert required <= {*secrets_and_model, "TRAINER_GPUS", "ROUTER_ADMIN_KEY"}, path.name


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


# --- Several engines behind the router (docker-compose.engines.yml) -------------------------


def engine_services(data: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The GPU stack's SGLang services: `engine` and its siblings engine-1, engine-2, ..."""
    return {n: s for n, s in profile_services("gpu", data).items() if re.fullmatch(r"engine(-[0-9]+)?", n)}


def test_the_override_adds_engines_that_are_the_base_engine_on_their_own_gpu() -> None:
    data = with_engines()
    assert "x-sglang" in yaml.safe_load(ENGINES.read_text())
    engines = engine_services(data)
    assert set(engines) == {"engine", "engine-1", "engine-2", "engine-3"}
    assert set(profile_services("gpu", data)) == {*engines, "redis", "router", "verifier", "rollout", "trainer"}
    assert set(profile_services("cpu", data)) == set(profile_services("cpu"))  # the CPU stack is untouched
    base = {k: v for k, v in data["services"]["engine"].items() if k != "deploy"}
    ids = {}
    for name, engine in engines.items():
        assert {k: v for k, v in engine.items() if k != "deploy"} == base, f"{name} differs from engine"
        [device] = engine["deploy"]["resources"]["reservations"]["devices"]
        assert device["driver"] == "nvidia" and device["capabilities"] == ["gpu"] and "count" not in device, name
        [entry] = device["device_ids"]
        variable = "ENGINE_GPUS" if name == "engine" else f"ENGINE_{name.split('-')[1]}_GPUS"
        match = re.fullmatch(r"\$\{" + variable + r":-([0-9]+)\}", entry)
        assert match, f"{name}: device_ids {entry!r} is not one GPU from ${{{variable}:-<id>}}"
        ids[name] = match.group(1)
    assert len(set(ids.values())) == len(ids), f"two engines default to one GPU: {ids}"


def test_the_router_runs_pope_router_and_reports_its_liveness() -> None:
    router = with_engines()["services"]["router"]
    assert router["image"] == compose()["services"]["verifier"]["image"]  # the project's image
    assert router["build"] == compose()["services"]["verifier"]["build"]
    command = router["command"]
    assert command[0] == "router", command
    assert command[command.index("--host") + 1] == "0.0.0.0" and command[command.index("--port") + 1] == "30000"
    assert "--prometheus-port" in command
    # /readiness fails until the trainer adds an engine, and the trainer waits for this check.
    check = " ".join(router["healthcheck"]["test"])
    assert "http://127.0.0.1:30000/liveness" in check and "/readiness" not in check
    assert "ports" not in router  # reached by the trainer and the rollout only


def test_the_trainer_keeps_every_engine_and_the_rollout_generates_through_the_router() -> None:
    data = with_engines()
    trainer, rollout = data["services"]["trainer"], data["services"]["rollout"]
    urls = {f"http://{name}:30000" for name in engine_services(data)}
    env = trainer["environment"]
    listed = [env["POPE_TRAINER__ENGINE_URL"], *json.loads(env["POPE_TRAINER__ENGINE_URLS"])]
    assert sorted(listed) == sorted(urls), "the trainer does not push to every engine (once)"
    assert env["POPE_TRAINER__ROUTER_URL"] == "http://router:30000"
    assert rollout["environment"]["POPE_ROLLOUT__ENGINE_URL"] == "http://router:30000"
    assert rollout["environment"]["POPE_ROLLOUT__ENGINE_ROUTER"] == "true"
    for service in (trainer, rollout):
        assert service["depends_on"]["router"] == {"condition": "service_healthy"}
    # What the base file gives them stays: the key, the token, the engine it waits for.
    assert (
        env["POPE_TRAINER__ENGINE_API_KEY"]
        == compose()["services"]["trainer"]["environment"]["POPE_TRAINER__ENGINE_API_KEY"]
    )
    assert trainer["depends_on"]["engine"] == {"condition": "service_healthy"}


def test_the_documented_layout_gives_the_trainer_other_gpus_than_the_engines() -> None:
    """The override's header gives the 4 + 4 GPU layout: the trainer's cards, as many ranks."""
    header = {}
    for line in ENGINES.read_text().splitlines():
        if match := re.fullmatch(r"#\s+([A-Z_]+)=(\S+).*", line):
            header[match.group(1)] = match.group(2)
    assert header["COMPOSE_FILE"] == f"{COMPOSE.name}:{ENGINES.name}"
    trainer_gpus = set(header["TRAINER_GPUS"].split(","))
    assert int(header["TRAINER_NPROC"]) == len(trainer_gpus)
    engine_gpus = set()
    for engine in engine_services(with_engines()).values():
        [device] = engine["deploy"]["resources"]["reservations"]["devices"]
        engine_gpus.add(re.fullmatch(r"\$\{[A-Z_0-9]+:-([0-9]+)\}", device["device_ids"][0]).group(1))  # type: ignore[union-attr]
    assert not trainer_gpus & engine_gpus, (trainer_gpus, engine_gpus)
    # and the override will not start with the trainer's default GPU, one an engine has.
    label = with_engines()["services"]["trainer"]["labels"]["pope.trainer-gpus"]
    assert label.startswith("${TRAINER_GPUS:?"), label
    env_example = (ROOT / ".env.example").read_text()
    assert f"# COMPOSE_FILE={header['COMPOSE_FILE']}" in env_example
