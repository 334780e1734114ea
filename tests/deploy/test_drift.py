"""No drift between what the deployment files set and what the services read: every
environment variable a container of docker-compose.yml or of a Kubernetes overlay gets, and
every key of every config file they mount, is loaded by the real settings loaders of the
service the container runs (which refuse unknown fields and POPE_* names)."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from services.common.config import SHARED, ConfigError, SectionSettings, check_shared_keys, load_settings
from services.common.engine_client import SGLANG_VERSION
from services.common.router_client import ROUTER_VERSION
from services.engine.settings import EngineSettings
from services.rollout.settings import RolloutSettings
from services.trainer.settings import TrainerSettings
from services.verifier.settings import VerifierSettings
from tests.conftest import ROOT
from tests.deploy.test_compose import compose, with_engines

SECTIONS: dict[str, type[SectionSettings]] = {
    "engine": EngineSettings,
    "rollout": RolloutSettings,
    "verifier": VerifierSettings,
    "trainer": TrainerSettings,
}
# Read by something other than the settings: the Redis URL convention, Python, the HF hub
# client, the image's health check, Kubernetes' $(VAR) expansion of the Redis password.
OTHER_ENV = {"REDIS_URL", "REDIS_PASSWORD", "PYTHONUNBUFFERED", "HF_HUB_OFFLINE", "HEALTHCHECK_URL", "HOME"}


def section_of(args: list[str]) -> str | None:
    """The settings section a `pope ARGS` container reads (None: not one of ours)."""
    if not args:
        return None
    if args[0] in SECTIONS:
        return args[0]
    return "rollout" if args[0] in ("hints", "eval") else None


def placeholders(value: str) -> str:
    """A value as the container would see it, with ${VAR...} and $(VAR) filled in: a
    defaulted ${VAR:-D} as compose fills it where VAR is unset (D, so the default must
    load), any other as "x"."""
    value = re.sub(r"\$\{[A-Z_][A-Z0-9_]*:-([^}]*)\}", r"\1", str(value))
    return re.sub(r"\$\{[^}]*\}|\$\([A-Z_]+\)", "x", value)


def check_container(
    section: str, env: dict[str, str], config: Path | None, where: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in env:
        assert name in OTHER_ENV or name.startswith(f"POPE_{section.upper()}__"), (
            f"{where}: {name} is read by no setting of section {section!r}"
        )
    with monkeypatch.context() as m:
        for var in list(os.environ):
            if var.startswith("POPE_") or var == "REDIS_URL":
                m.delenv(var)
        for name, value in env.items():
            m.setenv(name, placeholders(value))
        try:
            load_settings(SECTIONS[section], config)
        except ConfigError as exc:
            pytest.fail(f"{where}: {exc}")


def check_config_file(path: Path, where: str) -> None:
    sections = yaml.safe_load(path.read_text())
    unknown = set(sections) - {SHARED, *SECTIONS}
    assert not unknown, f"{where}: sections no service reads: {sorted(unknown)}"
    check_shared_keys(path, list(SECTIONS.values()))
    for model in SECTIONS.values():
        try:
            load_settings(model, path)
        except ConfigError as exc:
            pytest.fail(f"{where}: {exc}")


@pytest.mark.parametrize("name", ["compose.yaml", "compose-cpu.yaml", "paper-qwen3-4b.yaml"])
def test_compose_config_files_hold_only_fields_the_services_read(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    for var in list(os.environ):
        if var.startswith("POPE_") or var == "REDIS_URL":
            monkeypatch.delenv(var)
    check_config_file(ROOT / "configs" / name, f"configs/{name}")


@pytest.mark.parametrize("files", ["docker-compose.yml", "docker-compose.yml:docker-compose.engines.yml"])
def test_compose_containers_get_only_variables_the_services_read(files: str, monkeypatch: pytest.MonkeyPatch) -> None:
    data = with_engines() if "engines" in files else compose()
    checked = 0
    for name, service in data["services"].items():
        section = section_of(service.get("command") or [])
        if section is None:
            continue  # redis, SGLang, the router: no settings of ours
        check_container(
            section,
            service.get("environment") or {},
            ROOT / "configs" / "compose.yaml",
            f"{files} service {name}",
            monkeypatch,
        )
        checked += 1
    assert checked == 5  # engine-cpu, verifier, rollout, trainer, trainer-cpu


@pytest.mark.parametrize("overlay", ["cpu", "gpu"])
def test_kubernetes_containers_and_config_map_hold_only_what_the_services_read(
    overlay: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tests.deploy.test_k8s import rendered

    docs = rendered(overlay)
    for var in list(os.environ):
        if var.startswith("POPE_") or var == "REDIS_URL":
            monkeypatch.delenv(var)
    [config_map] = [d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"].startswith("pope-config")]
    config = tmp_path / "pope.yaml"
    config.write_text(config_map["data"]["pope.yaml"])
    check_config_file(config, f"{overlay}: ConfigMap pope-config")
    checked = 0
    for doc in docs:
        for container in _containers(doc):
            section = section_of(container.get("args") or [])
            if section is None or container.get("command"):  # SGLang's own server, redis
                continue
            env = {e["name"]: e.get("value", "$(FROM_SECRET)") for e in container.get("env") or []}
            check_container(section, env, config, f"{overlay}: {doc['kind']} {doc['metadata']['name']}", monkeypatch)
            checked += 1
    assert checked >= 4  # rollout, verifier, trainer, the hints job (+ the CPU engine)


def _containers(doc: dict[str, Any]) -> list[dict[str, Any]]:
    spec = doc.get("spec") or {}
    pod = (spec.get("template") or spec.get("jobTemplate", {}).get("spec", {}).get("template") or {}).get("spec", {})
    return list(pod.get("containers") or []) + list(pod.get("initContainers") or [])


# --- One SGLang version everywhere ---------------------------------------------------------

IMAGE = re.compile(r"lmsysorg/sglang:(v[0-9][A-Za-z0-9._-]*)")
# How the docs and the code name an SGLang release: sglang==V, SGLang V, SGLang (V), SGLang's V.
NAMED = re.compile(r"(?i)\bsglang(?:==|\s+\(|\s+|'s\s+)(\d+\.\d+\.\d+(?:\.post\d+)?)\b")
TEXTS = ["README.md", "k8s/README.md", "docs/*.md", "services/**/*.py", "tests/**/*.py", "configs/*.yaml"]


def release_of(tag: str) -> str:
    """The SGLang release of an image tag: v0.5.23-cu130 -> 0.5.23."""
    match = re.fullmatch(r"v(\d+\.\d+\.\d+(?:\.post\d+)?)(?:-[a-z0-9-]+)?", tag)
    assert match, f"not an SGLang release tag: {tag}"
    return match.group(1)


def image_mentions() -> dict[str, str]:
    """Where the deployment files name SGLang's image -> the tag they name."""
    from tests.deploy.test_k8s import one, pod_spec, rendered

    found = {}
    for rel in (
        "docker-compose.yml",
        "docker-compose.engines.yml",
        ".env.example",
        "k8s/overlays/gpu/engine-sglang.yaml",
    ):
        for i, line in enumerate((ROOT / rel).read_text().splitlines(), 1):
            for tag in IMAGE.findall(line):
                found[f"{rel}:{i}"] = tag
    kustomization = yaml.safe_load((ROOT / "k8s/overlays/gpu/kustomization.yaml").read_text())
    [override] = [i for i in kustomization["images"] if i["name"] == "lmsysorg/sglang"]
    found["k8s/overlays/gpu/kustomization.yaml images"] = override["newTag"]
    [engine] = pod_spec(one(rendered("gpu"), "Deployment", "engine"))["containers"]
    found["kubectl kustomize k8s/overlays/gpu: the engine's image"] = IMAGE.fullmatch(engine["image"]).group(1)  # type: ignore[union-attr]
    return found


def test_one_sglang_version_everywhere() -> None:
    """The wheel the tests read (SGLANG_VERSION) is the image compose and the gpu overlay run,
    in one CUDA build; every release the docs and code name is that one too."""
    images = image_mentions()
    assert len(images) >= 6, images
    assert len(set(images.values())) == 1, f"the SGLang image differs between files: {images}"
    [tag] = set(images.values())
    assert release_of(tag) == SGLANG_VERSION, f"images run {tag}, the tests read sglang=={SGLANG_VERSION}"
    named = {}
    for pattern in TEXTS:
        for path in sorted(ROOT.glob(pattern)):
            if "experiments" in path.parts or ".venv" in path.parts:
                continue  # lab notebooks record what ran then
            text = path.read_text()
            for match in IMAGE.finditer(text):
                named[f"{path.relative_to(ROOT)}:{text.count(chr(10), 0, match.start()) + 1}"] = release_of(match[1])
            for match in NAMED.finditer(text):
                named[f"{path.relative_to(ROOT)}:{text.count(chr(10), 0, match.start()) + 1}"] = match[1]
    wrong = {where: v for where, v in named.items() if v != SGLANG_VERSION}
    assert not wrong, f"these name another SGLang release than {SGLANG_VERSION}: {wrong}"


def sglang_args() -> dict[str, list[str]]:
    """The arguments each deployment passes to sglang.launch_server."""
    from tests.deploy.test_compose import sglang_script
    from tests.deploy.test_k8s import one, pod_spec, rendered

    script = sglang_script()
    compose_args = script.split("sglang.launch_server", 1)[1]
    # ${VAR:+--flag "$VAR"} expands to the flag and its value, or to nothing.
    compose_args = re.sub(r"\$\{[A-Z_]+:\+([^}]*)\}", r"\1", compose_args)
    [engine] = pod_spec(one(rendered("gpu"), "Deployment", "engine"))["containers"]
    return {"docker-compose.yml": compose_args.split(), "k8s/overlays/gpu": list(engine["args"])}


def test_every_flag_given_to_sglang_is_one_the_pinned_release_has(sglang_source: Path) -> None:
    from tests.sglang_source import cli_flags

    flags = cli_flags(sglang_source)
    assert flags["--enable-metrics"] == "bool" and flags["--api-key"] == "value"
    for where, args in sglang_args().items():
        for i, arg in enumerate(args):
            if not arg.startswith("--"):
                continue
            assert arg in flags, f"{where}: sglang.launch_server=={SGLANG_VERSION} has no flag {arg}"
            following = args[i + 1] if i + 1 < len(args) else "--"
            takes_value = not following.startswith("--")
            assert takes_value == (flags[arg] == "value"), (
                f"{where}: {arg} {'takes' if flags[arg] == 'value' else 'takes no'} value"
            )
        for needed in ("--api-key", "--enable-metrics", "--dtype", "--weight-version"):
            assert needed in args, f"{where}: SGLang runs without {needed}"


# --- One sglang-router version everywhere --------------------------------------------------


def test_one_router_version_in_the_extras_the_client_and_the_image() -> None:
    """The router the client is written against (ROUTER_VERSION) is the one the `router` and
    `test` extras pin, and the image installs the `router` extra (compose's and the
    manifests' router runs `pope router` from it)."""
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    for extra in ("router", "test"):
        pins = [r for r in extras[extra] if re.match(r"sglang-router\b", r)]
        assert pins == [f"sglang-router=={ROUTER_VERSION}"], f"extra {extra!r}: {pins}"
    dockerfile = (ROOT / "Dockerfile").read_text()
    extras_arg = re.search(r"^ARG EXTRAS=(\S+)$", dockerfile, re.M)  # the image's extras, router by default
    assert extras_arg and "router" in extras_arg.group(1).split(","), "the image has no router"
    assert re.search(r'^RUN pip install [^\n]*"/src\[\$\{EXTRAS\}\]"', dockerfile, re.M), "EXTRAS is not installed"
