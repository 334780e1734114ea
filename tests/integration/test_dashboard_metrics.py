"""The Grafana dashboard's engine and verifier queries against what real processes serve:
every pope_engine_* and sglang:* name it queries is in a CPU engine's /metrics after a
/generate, and every pope_verifier_* name in a `pope verifier`'s /metrics after a
/v1/verify (tests/deploy/test_grafana.py checks all names against the registry)."""

from __future__ import annotations

import httpx
from prometheus_client.parser import text_string_to_metric_families

from services.common.keys import Keys
from tests.conftest import running_pope
from tests.deploy.test_grafana import dashboard, queried


def scraped(url: str) -> set[str]:
    """The series names a /metrics serves, with those of families that have no series yet
    (a labelled metric before its first label set) named as prometheus_client would."""
    names = set()
    for family in text_string_to_metric_families(httpx.get(f"{url}/metrics").text):
        names.update(s.name for s in family.samples)
        suffixes = {"counter": ["_total"], "histogram": ["_bucket", "_sum", "_count"]}.get(family.type, [""])
        names.update(family.name + suffix for suffix in suffixes)
    return names


def queried_with(*prefixes: str) -> set[str]:
    names = {n for n in queried(dashboard()) if n.startswith(prefixes)}
    assert names
    return names


def test_the_engine_serves_every_engine_metric_the_dashboard_queries(engine_url: str) -> None:
    body = {"input_ids": [5, 6, 7], "sampling_params": {"max_new_tokens": 2}}
    assert httpx.post(f"{engine_url}/generate", json=body, timeout=60).status_code == 200
    missing = queried_with("pope_engine_", "sglang:") - scraped(engine_url)
    assert not missing, f"the engine's /metrics has none of {sorted(missing)}"


def test_the_verifier_serves_every_verifier_metric_the_dashboard_queries(redis_url: str, keys: Keys) -> None:
    env = {"REDIS_URL": redis_url, "POPE_VERIFIER__KEY_PREFIX": keys.prefix}
    with running_pope(["verifier", "--workers", "1"], "/readyz", env) as proc:
        rows = [{"answer": "\\boxed{7}", "gold": "7"}]
        assert httpx.post(f"{proc.url}/v1/verify", json=rows, timeout=30).status_code == 200
        missing = queried_with("pope_verifier_") - scraped(proc.url)
    assert not missing, f"the verifier's /metrics has none of {sorted(missing)}"
