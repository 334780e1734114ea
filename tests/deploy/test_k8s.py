"""The Kubernetes deployment (k8s/): each overlay renders, passes the API schemas, and
holds what the services need.

`kubectl kustomize` renders an overlay (offline); `kubernetes-validate --strict`, from the
venv, checks every object against the Kubernetes API schemas it ships (offline). The
tests skip where kubectl is not installed. `rendered(overlay)` is shared with
test_drift.py, which checks every env name and config key against the services' settings.
"""

from __future__ import annotations

import functools
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.conftest import ROOT

OVERLAYS = ["cpu", "gpu"]
KINDS = {
    "StatefulSet",
    "Deployment",
    "Service",
    "Ingress",
    "HorizontalPodAutoscaler",
    "Job",
    "NetworkPolicy",
    "PodDisruptionBudget",
    "PersistentVolumeClaim",
    "ConfigMap",
    "Secret",
}
WORKLOADS = {"Deployment", "StatefulSet", "Job"}
NAMESPACE = "pope"


@functools.cache
def _render(overlay: str) -> str:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl is not installed (it renders the kustomize overlays)")
    proc = subprocess.run(
        [kubectl, "kustomize", str(ROOT / "k8s" / "overlays" / overlay)], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, f"kubectl kustomize k8s/overlays/{overlay} failed:\n{proc.stderr}"
    return proc.stdout


def rendered(overlay: str) -> list[dict[str, Any]]:
    """Every object `kubectl kustomize k8s/overlays/<overlay>` renders, parsed (fresh copies)."""
    return [doc for doc in yaml.safe_load_all(_render(overlay)) if doc]


def pod_spec(doc: dict[str, Any]) -> dict[str, Any]:
    spec: dict[str, Any] = doc["spec"]["template"]["spec"]
    return spec


def containers(doc: dict[str, Any]) -> list[dict[str, Any]]:
    spec = pod_spec(doc)
    return list(spec.get("initContainers") or []) + list(spec["containers"])


def one(docs: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    [doc] = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    return doc


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_renders_and_passes_the_api_schemas(overlay: str, tmp_path: Path) -> None:
    manifest = tmp_path / f"{overlay}.yaml"
    manifest.write_text(_render(overlay))
    validate = Path(sys.executable).with_name("kubernetes-validate")
    if not validate.exists():
        pytest.skip(f"{validate} is not installed (the test extras install it)")
    proc = subprocess.run(
        [str(validate), "--strict", "--quiet", str(manifest)], capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, f"kubernetes-validate --strict k8s/overlays/{overlay}:\n{proc.stdout}{proc.stderr}"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_has_every_kind_of_object_in_the_pope_namespace(overlay: str) -> None:
    docs = rendered(overlay)
    kinds = {d["kind"] for d in docs}
    assert kinds >= KINDS, f"missing: {sorted(KINDS - kinds)}"
    for doc in docs:
        if doc["kind"] != "Namespace":
            assert doc["metadata"].get("namespace") == NAMESPACE, f"{doc['kind']} {doc['metadata']['name']}"
    config_map = one(docs, "ConfigMap", "pope-config")
    sections = set(yaml.safe_load(config_map["data"]["pope.yaml"]))
    assert sections == {"shared", "engine", "rollout", "verifier", "trainer"}


def test_gpu_engine_is_sglang_on_a_gpu_and_the_trainer_uses_cuda() -> None:
    docs = rendered("gpu")
    engine_pod = pod_spec(one(docs, "Deployment", "engine"))
    [engine] = engine_pod["containers"]
    assert "sglang" in engine["image"]
    assert engine["command"] == ["python3", "-m", "sglang.launch_server"]
    assert engine["args"][:2] == ["--model-path", "/models/base"]
    # The key from the Secret (Kubernetes expands $(VAR) from the container's env), metrics on.
    args = engine["args"]
    assert args[args.index("--api-key") + 1] == "$(POPE_ENGINE__API_KEY)" and "--enable-metrics" in args
    assert args[args.index("--dtype") + 1] == "auto"
    assert engine["resources"]["requests"]["nvidia.com/gpu"] == engine["resources"]["limits"]["nvidia.com/gpu"] == 1
    shm = {v["name"]: v for v in engine_pod["volumes"]}
    [mount] = [m for m in engine["volumeMounts"] if m["mountPath"] == "/dev/shm"]
    assert shm[mount["name"]]["emptyDir"]["medium"] == "Memory"

    [trainer] = pod_spec(one(docs, "StatefulSet", "trainer"))["containers"]
    env = {e["name"]: e.get("value") for e in trainer["env"]}
    assert env["POPE_TRAINER__DEVICE"] == "cuda"
    assert env["POPE_TRAINER__BF16"] == "true"
    assert trainer["resources"]["limits"]["nvidia.com/gpu"] == 1  # N=1: one rank


def test_cpu_engine_is_the_project_engine_without_gpus() -> None:
    docs = rendered("cpu")
    [engine] = pod_spec(one(docs, "Deployment", "engine"))["containers"]
    assert engine["image"].split(":")[0].endswith("pope-rl")
    assert "command" not in engine  # the image's entrypoint: pope
    assert engine["args"][0] == "engine"
    for doc in docs:
        if doc["kind"] in WORKLOADS:
            for c in containers(doc):
                assert "nvidia.com/gpu" not in str(c["resources"]), f"{doc['metadata']['name']}/{c['name']}"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_container_has_requests_and_limits_and_runs_as_non_root(overlay: str) -> None:
    checked = 0
    for doc in rendered(overlay):
        if doc["kind"] not in WORKLOADS:
            continue
        pod = pod_spec(doc)
        for c in containers(doc):
            where = f"{overlay}: {doc['kind']} {doc['metadata']['name']}, container {c['name']}"
            for part in ("requests", "limits"):
                assert {"cpu", "memory"} <= set(c.get("resources", {}).get(part, {})), f"{where}: {part}"
            effective = {**pod.get("securityContext", {}), **c.get("securityContext", {})}
            assert effective.get("runAsNonRoot") is True, where
            assert effective.get("runAsUser", 0) != 0, where
            assert effective.get("allowPrivilegeEscalation") is False, where
            assert effective.get("capabilities", {}).get("drop") == ["ALL"], where
            assert effective.get("seccompProfile", {}).get("type") == "RuntimeDefault", where
            checked += 1
    assert checked >= 7  # redis, engine, rollout, verifier, trainer, the hints job and its init container


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_references_resolve(overlay: str) -> None:
    """Every Secret key, ConfigMap, claim, selector and backend points at something
    rendered, and REDIS_URL comes after the REDIS_PASSWORD it expands."""
    docs = rendered(overlay)
    secrets = {
        d["metadata"]["name"]: set(d.get("stringData") or d.get("data") or {}) for d in docs if d["kind"] == "Secret"
    }
    config_maps = {d["metadata"]["name"] for d in docs if d["kind"] == "ConfigMap"}
    claims = {d["metadata"]["name"] for d in docs if d["kind"] == "PersistentVolumeClaim"}
    pods = []
    for doc in (d for d in docs if d["kind"] in WORKLOADS):
        pod, where = pod_spec(doc), f"{overlay}: {doc['kind']} {doc['metadata']['name']}"
        templates = {t["metadata"]["name"] for t in doc["spec"].get("volumeClaimTemplates", [])}
        for volume in pod.get("volumes", []):
            if "configMap" in volume:
                assert volume["configMap"]["name"] in config_maps, where
            if "persistentVolumeClaim" in volume:
                assert volume["persistentVolumeClaim"]["claimName"] in claims, where
        mounts = {v["name"] for v in pod.get("volumes", [])} | templates
        for c in containers(doc):
            names = [e["name"] for e in c.get("env", [])]
            for e in c.get("env", []):
                ref = e.get("valueFrom", {}).get("secretKeyRef")
                if ref:
                    assert ref["key"] in secrets.get(ref["name"], set()), f"{where}: {ref}"
                if "$(REDIS_PASSWORD)" in e.get("value", ""):
                    assert names.index("REDIS_PASSWORD") < names.index(e["name"]), f"{where}: {e['name']}"
            for m in c.get("volumeMounts", []):
                assert m["name"] in mounts, f"{where}: mount {m['name']}"
        if doc["kind"] != "Job":
            selector = doc["spec"]["selector"]["matchLabels"]
            labels = doc["spec"]["template"]["metadata"]["labels"]
            assert selector.items() <= labels.items(), where
        pods.append(doc)
    for svc in (d for d in docs if d["kind"] == "Service"):
        selector = svc["spec"]["selector"].items()
        ports = [
            {p["name"] for c in containers(doc) for p in c.get("ports", [])}
            for doc in pods
            if selector <= doc["spec"]["template"]["metadata"]["labels"].items()
        ]
        assert len(ports) == 1, f"Service {svc['metadata']['name']} selects {len(ports)} workloads"
        for port in svc["spec"]["ports"]:
            assert port["targetPort"] in ports[0], f"Service {svc['metadata']['name']}: {port}"
    services = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Service"}
    for ingress in (d for d in docs if d["kind"] == "Ingress"):
        for rule in ingress["spec"]["rules"]:
            for path in rule["http"]["paths"]:
                backend = path["backend"]["service"]
                ports = [p["port"] for p in services[backend["name"]]["spec"]["ports"]]
                assert backend["port"]["number"] in ports, f"Ingress {ingress['metadata']['name']}: {backend}"
    for hpa in (d for d in docs if d["kind"] == "HorizontalPodAutoscaler"):
        target = hpa["spec"]["scaleTargetRef"]
        assert one(docs, target["kind"], target["name"]), target
    for pdb in (d for d in docs if d["kind"] == "PodDisruptionBudget"):
        selector = pdb["spec"]["selector"]["matchLabels"].items()
        assert any(selector <= p["spec"]["template"]["metadata"]["labels"].items() for p in pods), pdb["metadata"]


def engine_key_source(container: dict[str, Any], variable: str) -> dict[str, Any] | None:
    for entry in container.get("env", []):
        if entry["name"] == variable:
            ref: dict[str, Any] | None = entry.get("valueFrom", {}).get("secretKeyRef")
            return ref
    return None


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_engine_is_scraped_and_every_client_of_it_sends_its_key(overlay: str) -> None:
    docs = rendered(overlay)
    engine = one(docs, "Deployment", "engine")
    annotations = engine["spec"]["template"]["metadata"]["annotations"]
    assert annotations == {
        "prometheus.io/scrape": "true",
        "prometheus.io/port": "30000",
        "prometheus.io/path": "/metrics",
    }
    metrics = one(docs, "NetworkPolicy", "metrics")
    [components] = [e["values"] for e in metrics["spec"]["podSelector"]["matchExpressions"]]
    assert "engine" in components and 30000 in [p["port"] for p in metrics["spec"]["ingress"][0]["ports"]]
    secret = {"name": "pope-secrets", "key": "engine-api-key"}
    [server] = pod_spec(engine)["containers"]
    assert engine_key_source(server, "POPE_ENGINE__API_KEY") == secret
    clients = [("StatefulSet", "trainer", "POPE_TRAINER__ENGINE_API_KEY")]
    clients += [
        ("Deployment", "rollout", "POPE_ROLLOUT__ENGINE_API_KEY"),
        ("Job", "hints-build", "POPE_ROLLOUT__ENGINE_API_KEY"),
    ]
    for kind, name, variable in clients:
        [container] = pod_spec(one(docs, kind, name))["containers"]
        assert engine_key_source(container, variable) == secret, f"{overlay}: {kind} {name}"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_weights_volume_is_written_by_the_trainers_user_and_read_by_the_engines(overlay: str) -> None:
    """The trainer writes checkpoints as the project image's user; the engine (the CPU one,
    or SGLang run as that user) reads them: same uid and gid, fsGroup on both pods (the group
    the volume is given where the storage supports it), the engine's mount read-only."""
    [(uid, gid)] = re.findall(r"^USER (\d+):(\d+)$", (ROOT / "Dockerfile").read_text(), re.M)
    mounting = {}
    for doc in rendered(overlay):
        if doc["kind"] not in WORKLOADS:
            continue
        pod = pod_spec(doc)
        claims = {
            v["name"]: v
            for v in pod.get("volumes", [])
            if v.get("persistentVolumeClaim", {}).get("claimName") == "weights"
        }
        for c in containers(doc):
            for mount in c.get("volumeMounts", []):
                if mount["name"] in claims:
                    context = {**pod.get("securityContext", {}), **c.get("securityContext", {})}
                    ids = (context.get("runAsUser"), context.get("runAsGroup"), pod["securityContext"].get("fsGroup"))
                    assert ids == (int(uid), int(gid), int(gid)), f"{overlay}: {doc['metadata']['name']} runs as {ids}"
                    read_only = mount.get("readOnly", False) and claims[mount["name"]]["persistentVolumeClaim"].get(
                        "readOnly"
                    )
                    mounting[doc["metadata"]["name"]] = bool(read_only)
    assert mounting == {"trainer": False, "engine": True}


def trainer_ranks(docs: list[dict[str, Any]]) -> tuple[str, int, int]:
    """The gpu trainer's POPE_TRAINER__NPROC and its GPU request and limit."""
    trainer = one(docs, "StatefulSet", "trainer")
    [container] = pod_spec(trainer)["containers"]
    env = {e["name"]: e.get("value") for e in container["env"]}
    resources = container["resources"]
    return env["POPE_TRAINER__NPROC"], resources["requests"]["nvidia.com/gpu"], resources["limits"]["nvidia.com/gpu"]


def test_the_gpu_trainer_runs_one_rank_a_gpu_with_dev_shm_in_memory() -> None:
    docs = rendered("gpu")
    assert trainer_ranks(docs) == ("1", 1, 1)
    pod = pod_spec(one(docs, "StatefulSet", "trainer"))
    [trainer] = pod["containers"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    [mount] = [m for m in trainer["volumeMounts"] if m["mountPath"] == "/dev/shm"]
    assert volumes[mount["name"]]["emptyDir"]["medium"] == "Memory"


def test_the_documented_patch_gives_the_trainer_n_ranks_on_n_gpus(tmp_path: Path) -> None:
    """The patch k8s/overlays/gpu/trainer-gpu.yaml's comment gives, applied by an overlay
    of the gpu overlay, renders N=4 everywhere and passes the API schemas."""
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl is not installed (it renders the kustomize overlays)")
    comment = [
        line[1:]
        for line in (ROOT / "k8s/overlays/gpu/trainer-gpu.yaml").read_text().splitlines()
        if line.startswith("#")
    ]
    start = comment.index("   patches:")
    block = []
    for line in comment[start:]:
        if not line.startswith("   "):
            break
        block.append(line[3:])
    overlay = tmp_path / "four"
    overlay.mkdir()
    base = os.path.relpath(ROOT / "k8s/overlays/gpu", overlay)  # kustomize takes no absolute root
    kustomization = {"resources": [base], **yaml.safe_load("\n".join(block))}
    (overlay / "kustomization.yaml").write_text(yaml.safe_dump(kustomization))
    proc = subprocess.run([kubectl, "kustomize", str(overlay)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    docs = [d for d in yaml.safe_load_all(proc.stdout) if d]
    assert trainer_ranks(docs) == ("4", 4, 4)
    validate = Path(sys.executable).with_name("kubernetes-validate")
    if not validate.exists():
        pytest.skip(f"{validate} is not installed (the test extras install it)")
    manifest = tmp_path / "four.yaml"
    manifest.write_text(proc.stdout)
    run = subprocess.run(
        [str(validate), "--strict", "--quiet", str(manifest)], capture_output=True, text=True, timeout=300
    )
    assert run.returncode == 0, run.stdout + run.stderr
