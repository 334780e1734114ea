"""The Grafana dashboard (k8s/base/grafana/pope-rl.json): a dashboard Grafana can load, whose
every query parses as PromQL and charts a metric the services export, shipped in both
overlays as the ConfigMap Grafana's dashboard sidecar picks up.

The exported names here come from the prometheus_client registry after importing every
service module (each metric is defined at import); tests/integration/test_dashboard_metrics.py
checks the engine's and the verifier's against what real processes serve at /metrics.
"""

from __future__ import annotations

import functools
import importlib
import json
import pkgutil
from typing import Any

import pytest

from tests.conftest import ROOT
from tests.deploy.test_k8s import OVERLAYS, one, rendered

DASHBOARD = ROOT / "k8s" / "base" / "grafana" / "pope-rl.json"
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}
# Entry points that run on import (torchrun's main); they define no metric.
SCRIPTS = {"services.trainer.launch"}
# Labels Prometheus adds to every scraped series.
TARGET_LABELS = {"instance", "job"}


def dashboard() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return data


def charts(dash: dict[str, Any]) -> list[dict[str, Any]]:
    """The panels that query (rows only group them)."""
    return [p for p in dash["panels"] if p["type"] != "row"]


def queried(dash: dict[str, Any]) -> dict[str, set[str]]:
    """Every metric name the dashboard's queries select, with the labels they match on."""
    import promql_parser

    out: dict[str, set[str]] = {}

    def visit(node: Any) -> bool:
        if isinstance(node, promql_parser.VectorSelector):
            labels = out.setdefault(node.name, set())
            labels.update(m.name for m in node.matchers.matchers)
        return True

    for panel in charts(dash):
        for target in panel["targets"]:
            promql_parser.walk(promql_parser.parse(target["expr"]), visit)
    return out


SUFFIXES = {"counter": ["_total"], "histogram": ["_bucket", "_sum", "_count"], "summary": ["_sum", "_count"]}


@functools.cache
def exported() -> dict[str, set[str]]:
    """Every series name the services expose (a counter's with _total, a histogram's
    _bucket/_sum/_count), with its label names: from the registry once every service module
    is imported."""
    from prometheus_client import REGISTRY
    from prometheus_client.metrics import MetricWrapperBase

    import services

    for module in pkgutil.walk_packages(services.__path__, "services."):
        if not module.name.endswith("__main__") and module.name not in SCRIPTS:
            importlib.import_module(module.name)
    out: dict[str, set[str]] = {}
    for metric in list(REGISTRY._collector_to_names):
        if isinstance(metric, MetricWrapperBase):
            for suffix in SUFFIXES.get(metric._type, [""]):
                out[metric._name + suffix] = set(metric._labelnames) | ({"le"} if suffix == "_bucket" else set())
    return out


def test_the_dashboard_has_what_grafana_needs() -> None:
    dash = dashboard()
    assert dash["title"] and dash["uid"] == "pope-rl" and isinstance(dash["schemaVersion"], int)
    [var] = [v for v in dash["templating"]["list"] if v["name"] == "datasource"]
    assert (var["type"], var["query"]) == ("datasource", "prometheus")
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    for panel in dash["panels"]:
        assert {"h", "w", "x", "y"} <= set(panel["gridPos"]) and panel["gridPos"]["x"] + panel["gridPos"]["w"] <= 24
    for panel in charts(dash):
        assert panel["datasource"] == DATASOURCE, panel["title"]
        assert panel["targets"], panel["title"]
        ref_ids = [t["refId"] for t in panel["targets"]]
        assert len(ref_ids) == len(set(ref_ids)), panel["title"]
        for target in panel["targets"]:
            assert target["expr"].strip() and target["datasource"] == DATASOURCE, panel["title"]
    # No two panels on one spot.
    cells = [
        (p["gridPos"]["y"], x)
        for p in dash["panels"]
        for x in range(p["gridPos"]["x"], p["gridPos"]["x"] + p["gridPos"]["w"])
    ]
    assert len(cells) == len(set(cells))


def test_every_query_parses_as_promql() -> None:
    import promql_parser

    for panel in charts(dashboard()):
        for target in panel["targets"]:
            try:
                promql_parser.parse(target["expr"])
            except ValueError as exc:
                pytest.fail(f"{panel['title']}: {target['expr']!r}: {exc}")


def test_every_metric_queried_is_one_a_service_exports_with_the_labels_matched() -> None:
    names = exported()
    for name, labels in queried(dashboard()).items():
        assert name in names, f"the dashboard queries {name}, which no service exports"
        assert labels <= names[name] | TARGET_LABELS, f"{name} has no label {sorted(labels - names[name])}"


def test_the_dashboard_charts_the_runs_parts() -> None:
    """The panels the issue asks for: reward and solve rate by variant, pass@k, throughput,
    staleness, step time, weight versions, queues, verifier latency and errors, engine
    tokens/s and latency (the latter under SGLang's names, so both engines chart)."""
    names = set(queried(dashboard()))
    for needed in (
        "pope_trainer_reward_mean",
        "pope_trainer_step_metric",
        "pope_eval_pass_at",
        "pope_trainer_steps_total",
        "pope_trainer_step_seconds_bucket",
        "pope_trainer_step_time_seconds",
        "pope_engine_weight_version",
        "pope_trainer_weight_version",
        "sglang:num_queue_reqs",
        "pope_verifier_answer_seconds_bucket",
        "pope_verifier_errors_total",
        "sglang:generation_tokens_total",
        "sglang:e2e_request_latency_seconds_bucket",
        "sglang:time_to_first_token_seconds_bucket",
    ):
        assert needed in names, needed


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_each_overlay_ships_the_dashboard_as_a_configmap_grafanas_sidecar_picks_up(overlay: str) -> None:
    config_map = one(rendered(overlay), "ConfigMap", "pope-grafana-dashboard")
    assert config_map["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert json.loads(config_map["data"]["pope-rl.json"]) == dashboard()
