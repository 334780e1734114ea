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
from services.engine.settings import EngineSettings
from services.rollout.settings import RolloutSettings
from services.trainer.settings import TrainerSettings
from services.verifier.settings import VerifierSettings
from tests.conftest import ROOT
from tests.deploy.test_compose import compose

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
    """A value as the container would see it, with ${VAR...} and $(VAR) filled in."""
    return re.sub(r"\$\{[^}]*\}|\$\([A-Z_]+\)", "x", str(value))


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


@pytest.mark.parametrize("name", ["compose.yaml", "compose-cpu.yaml"])
def test_compose_config_files_hold_only_fields_the_services_read(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    for var in list(os.environ):
        if var.startswith("POPE_") or var == "REDIS_URL":
            monkeypatch.delenv(var)
    check_config_file(ROOT / "configs" / name, f"configs/{name}")


def test_compose_containers_get_only_variables_the_services_read(monkeypatch: pytest.MonkeyPatch) -> None:
    checked = 0
    for name, service in compose()["services"].items():
        section = section_of(service.get("command") or [])
        if section is None:
            continue  # redis, SGLang: not ours
        check_container(
            section,
            service.get("environment") or {},
            ROOT / "configs" / "compose.yaml",
            f"docker-compose.yml service {name}",
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
