"""The CPU engine's sglang: metrics (services/engine/sglang_metrics.py) against SGLang's own
definitions (sglang/srt/observability/metrics_collector.py of the pinned wheel, read with
``ast``), and on a real engine: one /generate moves them by what it did.

A dashboard made for SGLang charts these names; each must exist in SGLang with the same
type, the same label names (SGLang's default label set: no priority scheduling, no extra
labels) and, for a histogram, the same default buckets, so series from both engines add up.
"""

from __future__ import annotations

import ast
import asyncio
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.metrics import MetricWrapperBase
from prometheus_client.parser import text_string_to_metric_families

from services.engine import sglang_metrics

COLLECTOR = "sglang/srt/observability/metrics_collector.py"
KINDS = {"Counter": "counter", "Gauge": "gauge", "Histogram": "histogram", "Summary": "summary"}


def exposed(name: str, kind: str) -> str:
    """The name a scrape shows: prometheus_client ends every counter in _total."""
    return name if kind != "counter" or name.endswith("_total") else name + "_total"


def _keys(fn: ast.AST, has: str) -> tuple[str, ...]:
    """The keys of the dict literal assigned to ``labels`` in ``fn`` that has key ``has``."""
    for node in ast.walk(fn):
        if isinstance(node, ast.Assign) and isinstance(node.value, ast.Dict):
            keys = tuple(k.value for k in node.value.keys if isinstance(k, ast.Constant))
            if any(isinstance(t, ast.Name) and t.id == "labels" for t in node.targets) and has in keys:
                return keys
    raise AssertionError(f"no labels dict with {has!r}")


def _labelnames(node: ast.expr, base: tuple[str, ...]) -> tuple[str, ...]:
    """SGLang's label expressions: ``labels.keys()``, ``list(labels.keys()) + [...]``,
    ``[*labels.keys(), ...]`` or a literal list."""
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "keys":
        return base
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "list":
        return _labelnames(node.args[0], base)
    if isinstance(node, ast.BinOp):
        return _labelnames(node.left, base) + _labelnames(node.right, base)
    if isinstance(node, ast.List):
        out: tuple[str, ...] = ()
        for elt in node.elts:
            out += _labelnames(elt.value, base) if isinstance(elt, ast.Starred) else (ast.literal_eval(elt),)
        return out
    raise AssertionError(f"a label expression the test does not read: {ast.unparse(node)}")


def _list_named(fn: ast.AST, name: str) -> list[float]:
    for node in ast.walk(fn):
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == name for t in node.targets):
            return [float(x) for x in ast.literal_eval(node.value)]
    raise AssertionError(f"no list {name}")


def _buckets(node: ast.expr, fn: ast.AST) -> list[float]:
    """The default buckets: a list named in ``fn`` (``bucket_e2e_request_latency``), or the
    default of ``generate_buckets(rule, default)``, which sorts and dedupes it."""
    if isinstance(node, ast.Name):
        return _list_named(fn, node.id)
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "generate_buckets":
        assert isinstance(node.args[1], ast.Name)
        return sorted(set(_list_named(fn, node.args[1].id)))
    return [float(x) for x in ast.literal_eval(node)]


def sglang_definitions(root: Path) -> dict[str, dict[str, Any]]:
    """Every sglang: metric of SGLang's tokenizer and scheduler collectors, by exposed name:
    its kind, label names and (histograms) where its buckets are given, for ``_buckets``."""
    tree = ast.parse((root / COLLECTOR).read_text())
    fns = {n.name: n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef)}
    classes = {n.name: n for n in ast.walk(tree) if isinstance(n, ast.ClassDef)}
    bases = {
        "TokenizerMetricsCollector": _keys(fns["tokenizer_metric_labels"], "model_name"),
        "SchedulerMetricsCollector": _keys(classes["SchedulerMetricsCollector"], "tp_rank"),
    }
    out: dict[str, dict[str, Any]] = {}
    for cls, base in bases.items():
        init = next(f for f in classes[cls].body if isinstance(f, ast.FunctionDef) and f.name == "__init__")
        for node in ast.walk(init):
            if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in KINDS):
                continue
            kw = {k.arg: k.value for k in node.keywords}
            if not (isinstance(kw.get("name"), ast.Constant) and str(kw["name"].value).startswith("sglang:")):
                continue
            kind = KINDS[node.func.id]
            spec: dict[str, Any] = {"kind": kind, "labels": _labelnames(kw["labelnames"], base)}
            if "buckets" in kw:  # read when compared: some are computed (exponential_buckets)
                spec["buckets"] = (kw["buckets"], init)
            out[exposed(kw["name"].value, kind)] = spec
    return out


def ours() -> dict[str, MetricWrapperBase]:
    return {
        exposed(m._name, m._type): m
        for m in vars(sglang_metrics).values()
        if isinstance(m, MetricWrapperBase) and m._name.startswith("sglang:")
    }


def test_sglangs_definitions_are_read() -> None:
    assert len(ours()) == 10  # the table in docs/engine.md


def test_every_sglang_metric_the_engine_exports_is_sglangs_with_its_type_labels_and_buckets(
    sglang_source: Path,
) -> None:
    theirs = sglang_definitions(sglang_source)
    assert len(theirs) > 30 and "sglang:num_requests_total" in theirs  # the reader found them
    for name, metric in ours().items():
        assert name in theirs, f"SGLang has no metric {name}"
        assert metric._type == theirs[name]["kind"], name
        assert metric._labelnames == theirs[name]["labels"], name
        if metric._type == "histogram":
            bounds = [float(b) for b in metric._upper_bounds[:-1]]  # less +Inf
            assert bounds == _buckets(*theirs[name]["buckets"]), name


Sample = tuple[str, frozenset[tuple[str, str]]]


def samples(url: str) -> dict[Sample, float]:
    """The sglang: samples of a scrape, by name and label set."""
    text = httpx.get(f"{url}/metrics").text
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name.startswith("sglang:")
    }


def test_a_generate_moves_the_sglang_metrics_by_what_it_did(engine_url: str, tiny_model: Path) -> None:
    prompt, new = [5, 6, 7, 8, 9], 4
    body = {"input_ids": prompt, "sampling_params": {"max_new_tokens": new, "temperature": 0, "ignore_eos": True}}
    before = samples(engine_url)
    reply = httpx.post(f"{engine_url}/generate", json=body, timeout=60).json()
    after = samples(engine_url)
    assert len(reply["output_ids"]) == new
    latency = reply["meta_info"]["e2e_latency"]

    tok = {"model_name": str(tiny_model), "engine_type": "unified"}
    stream = {**tok, "is_streaming": "false"}
    sched = {**tok, "tp_rank": "0", "pp_rank": "0", "moe_ep_rank": "0"}

    def key(name: str, labels: dict[str, str]) -> Sample:
        return name, frozenset(labels.items())

    def moved(name: str, labels: dict[str, str]) -> float:
        return after[key(name, labels)] - before.get(key(name, labels), 0.0)

    assert moved("sglang:prompt_tokens_total", stream) == len(prompt)
    assert moved("sglang:generation_tokens_total", stream) == new
    assert moved("sglang:num_requests_total", stream) == 1
    assert moved("sglang:e2e_request_latency_seconds_count", stream) == 1
    assert moved("sglang:e2e_request_latency_seconds_sum", stream) == pytest.approx(latency)
    assert moved("sglang:time_to_first_token_seconds_count", stream) == 1
    assert 0 < moved("sglang:time_to_first_token_seconds_sum", stream) <= latency
    assert moved("sglang:prompt_tokens_histogram_sum", tok) == len(prompt)
    assert moved("sglang:prompt_tokens_histogram_bucket", {**tok, "le": "100.0"}) == 1
    assert moved("sglang:generation_tokens_histogram_sum", tok) == new
    assert after[key("sglang:num_running_reqs", sched)] == 0
    assert after[key("sglang:num_queue_reqs", sched)] == 0
    assert after[key("sglang:gen_throughput", sched)] > 0  # the batch just decoded, within 30 s


async def test_the_gauges_count_running_and_waiting_sequences(engine_url: str, tiny_model: Path) -> None:
    """A batch decodes one long sequence; a request of two rows arriving meanwhile joins it,
    and one arriving while generation is paused waits: SGLang counts requests by sequence
    (each row, each of n copies), and so does this."""
    labels = {
        "model_name": str(tiny_model),
        "engine_type": "unified",
        "tp_rank": "0",
        "pp_rank": "0",
        "moe_ep_rank": "0",
    }
    sched = frozenset(labels.items())
    long = {"max_new_tokens": 3000, "ignore_eos": True}

    async def until(name: str, value: float) -> None:
        deadline = asyncio.get_running_loop().time() + 30
        while samples(engine_url).get((name, sched)) != value:
            assert asyncio.get_running_loop().time() < deadline, f"{name} never read {value}"
            await asyncio.sleep(0.01)

    async with httpx.AsyncClient(timeout=60) as http:
        running = asyncio.create_task(
            http.post(f"{engine_url}/generate", json={"input_ids": [5], "sampling_params": long})
        )
        await until("sglang:num_running_reqs", 1)
        body = {"input_ids": [[5], [6]], "sampling_params": long}
        joined = asyncio.create_task(http.post(f"{engine_url}/generate", json=body))
        await until("sglang:num_running_reqs", 3)
        assert (await http.post(f"{engine_url}/pause_generation", json={"mode": "in_place"})).status_code == 200
        waiting = asyncio.create_task(http.post(f"{engine_url}/generate", json=body))
        await until("sglang:num_queue_reqs", 2)
        assert samples(engine_url)[("sglang:num_running_reqs", sched)] == 3
        await http.post(f"{engine_url}/abort_request", json={"abort_all": True})
        await http.post(f"{engine_url}/continue_generation", json={})
        await asyncio.gather(running, joined, waiting)
    await until("sglang:num_queue_reqs", 0)
    await until("sglang:num_running_reqs", 0)
