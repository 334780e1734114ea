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


# --- Many engines: discovery, the router, who may reach whom -------------------------------


def env_of(container: dict[str, Any]) -> dict[str, str]:
    return {e["name"]: e["value"] for e in container.get("env", []) if "value" in e}


def service_port(service: dict[str, Any], name: str = "http") -> int:
    [port] = [p["port"] for p in service["spec"]["ports"] if p["name"] == name]
    return int(port)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_trainer_finds_every_engine_pod_through_a_headless_service(
    overlay: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from services.trainer.settings import TrainerSettings

    docs = rendered(overlay)
    engine = one(docs, "Deployment", "engine")
    # A rolling update never starts an extra engine: no spare GPU needed.
    assert engine["spec"]["strategy"]["rollingUpdate"] == {"maxSurge": 0, "maxUnavailable": 1}
    [trainer] = pod_spec(one(docs, "StatefulSet", "trainer"))["containers"]
    env = env_of(trainer)
    host, _, port = env["POPE_TRAINER__ENGINE_DISCOVERY"].rpartition(":")
    headless = one(docs, "Service", host)
    assert headless["spec"]["clusterIP"] == "None"
    # Starting and busy pods stay in DNS: the trainer's checks, not readiness, judge them.
    assert headless["spec"].get("publishNotReadyAddresses") is True
    assert headless["spec"]["selector"].items() <= engine["spec"]["template"]["metadata"]["labels"].items()
    assert service_port(headless) == int(port) == 30000
    # Discovery alone: a second, fixed engine_url would be one pod pushed twice.
    assert env["POPE_TRAINER__ENGINE_URL"] == ""
    with monkeypatch.context() as m:
        for var in list(os.environ):
            if var.startswith("POPE_"):
                m.delenv(var)
        for name in ("POPE_TRAINER__ENGINE_URL", "POPE_TRAINER__ENGINE_DISCOVERY", "POPE_TRAINER__ROUTER_URL"):
            m.setenv(name, env[name])
        settings = TrainerSettings()
    assert settings.engine_list() == [] and settings.engine_discovery == f"{host}:{port}"
    assert settings.router_url == f"http://router:{service_port(one(docs, 'Service', 'router'))}"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_rollout_generates_through_one_router_that_pope_router_runs(overlay: str) -> None:
    docs = rendered(overlay)
    router = one(docs, "Deployment", "router")
    assert router["spec"]["replicas"] == 1  # the trainer keeps one router's worker list
    [container] = pod_spec(router)["containers"]
    assert container["image"].split(":")[0].endswith("pope-rl") and "command" not in container  # pope
    args = container["args"]
    assert args[0] == "router" and args[args.index("--host") + 1] == "0.0.0.0"
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert int(args[args.index("--port") + 1]) == ports["http"] == service_port(one(docs, "Service", "router"))
    assert int(args[args.index("--prometheus-port") + 1]) == ports["metrics"]
    assert router["spec"]["template"]["metadata"]["annotations"]["prometheus.io/port"] == str(ports["metrics"])
    # /readiness fails while the router has no worker; the trainer adds them through the Service.
    for probe in ("livenessProbe", "readinessProbe"):
        assert container[probe]["httpGet"]["path"] == "/liveness", probe
    [rollout] = pod_spec(one(docs, "Deployment", "rollout"))["containers"]
    env = env_of(rollout)
    assert env["POPE_ROLLOUT__ENGINE_URL"] == f"http://router:{ports['http']}"
    assert env["POPE_ROLLOUT__ENGINE_ROUTER"] == "true"


def _selects(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    """A label selector (matchLabels, matchExpressions with In) against a pod's labels."""
    if not selector.get("matchLabels", {}).items() <= labels.items():
        return False
    for expression in selector.get("matchExpressions", []):
        assert expression["operator"] == "In", expression  # the only operator the policies use
        if labels.get(expression["key"]) not in expression["values"]:
            return False
    return True


def admitted(docs: list[dict[str, Any]], source: str, target: str, port: int) -> bool:
    """Whether the NetworkPolicies let a pod of component ``source`` (or "monitoring": any
    pod of that namespace) connect to a ``target`` pod on ``port``."""
    labels = {"app.kubernetes.io/name": "pope-rl", "app.kubernetes.io/component": target}
    for policy in (d for d in docs if d["kind"] == "NetworkPolicy"):
        if not _selects(policy["spec"]["podSelector"], labels):
            continue
        for rule in policy["spec"].get("ingress", []):
            if "ports" in rule and port not in [p["port"] for p in rule["ports"]]:
                continue
            if "from" not in rule:
                return True
            for peer in rule["from"]:
                if source == "monitoring":
                    names = peer.get("namespaceSelector", {}).get("matchLabels", {})
                    if names.get("kubernetes.io/metadata.name") == "monitoring":
                        return True
                elif "podSelector" in peer and "namespaceSelector" not in peer:
                    pod = {"app.kubernetes.io/name": "pope-rl", "app.kubernetes.io/component": source}
                    if _selects(peer["podSelector"], pod):
                        return True
    return False


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_network_policies_let_through_the_flows_of_many_engines_and_no_other_to_the_router(overlay: str) -> None:
    docs = rendered(overlay)
    assert one(docs, "NetworkPolicy", "default-deny-ingress")["spec"]["podSelector"] == {}
    needed = [
        ("router", "engine", 30000),  # routed generation
        ("rollout", "engine", 30000),  # aborts, to each engine of the registry
        ("trainer", "engine", 30000),  # weight pushes and checks
        ("hints-build", "engine", 30000),
        ("rollout", "router", 30000),  # generation
        ("trainer", "router", 30000),  # the worker list
        ("monitoring", "router", 29000),  # its metrics
        ("monitoring", "engine", 30000),
    ]
    for flow in needed:
        assert admitted(docs, *flow), f"{overlay}: {flow} is refused"
    refused = [("monitoring", "router", 30000), ("rollout", "router", 29000)]
    refused += [(c, "router", 30000) for c in ("verifier", "engine", "hints-build", "redis", "other")]
    refused += [("router", c, p) for c, p in (("redis", 6379), ("trainer", 8002), ("verifier", 8001))]
    for flow in refused:
        assert not admitted(docs, *flow), f"{overlay}: {flow} is let through"


def test_an_overlay_sets_the_number_of_engines_alone(tmp_path: Path) -> None:
    """`replicas:` over the gpu overlay gives N engine pods of one GPU each and changes
    nothing else (the trainer finds them by DNS), and passes the API schemas."""
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl is not installed (it renders the kustomize overlays)")
    overlay = tmp_path / "four-engines"
    overlay.mkdir()
    base = os.path.relpath(ROOT / "k8s/overlays/gpu", overlay)
    (overlay / "kustomization.yaml").write_text(
        yaml.safe_dump({"resources": [base], "replicas": [{"name": "engine", "count": 4}]})
    )
    proc = subprocess.run([kubectl, "kustomize", str(overlay)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    docs = [d for d in yaml.safe_load_all(proc.stdout) if d]
    engine = one(docs, "Deployment", "engine")
    assert engine["spec"]["replicas"] == 4
    [container] = pod_spec(engine)["containers"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    engine["spec"]["replicas"] = 1
    assert docs == rendered("gpu")
    validate = Path(sys.executable).with_name("kubernetes-validate")
    if not validate.exists():
        pytest.skip(f"{validate} is not installed (the test extras install it)")
    manifest = tmp_path / "four-engines.yaml"
    manifest.write_text(proc.stdout)
    run = subprocess.run(
        [str(validate), "--strict", "--quiet", str(manifest)], capture_output=True, text=True, timeout=300
    )
    assert run.returncode == 0, run.stdout + run.stderr
