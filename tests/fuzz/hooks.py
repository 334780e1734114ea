"""schemathesis hooks of the fuzz (SCHEMATHESIS_HOOKS=tests.fuzz.hooks), so that a fuzzed
admin call cannot spoil the state every later case runs in:

- the engine: after each call to an admin route, /continue_generation, or a fuzzed
  /pause_generation would leave it paused (and every later /generate waiting);
- the router: after a DELETE /workers/{id} that it took, the fuzz's engine
  (FUZZ_ROUTER_WORKER) is added back if it was the one removed, or every later /generate
  would be a 503 of the harness's making.
"""

from __future__ import annotations

import json
import os
import time
import urllib.parse
import urllib.request
from typing import Any

import schemathesis

ENGINE_ADMIN = {"/pause_generation", "/abort_request", "/update_weights_from_disk", "/begin_weight_update"}


def _call(url: str, method: str = "GET", body: Any = None) -> Any:
    data = json.dumps(body).encode() if body is not None else b""
    request = urllib.request.Request(url, data=data if method != "GET" else None, method=method)
    request.add_header("Content-Type", "application/json")
    with urllib.request.urlopen(request, timeout=10) as answer:
        raw = answer.read()
    return json.loads(raw) if raw.strip().startswith(b"{") else None


def _workers(base: str) -> dict[str, str]:
    """The router's workers: id -> url."""
    return {w["id"]: w["url"] for w in _call(f"{base}/workers")["workers"]}


def _restore_router_worker(base: str, removed: str, worker: str) -> None:
    """Once the router's background removal of ``removed`` (an id) is done, add ``worker``
    back if it was the one removed (it is no longer listed), and wait until it is listed.
    (The removal can be over before this first looks: the id is then already gone.)"""
    deadline = time.monotonic() + 20
    while removed in _workers(base):
        if time.monotonic() > deadline:
            return  # still pending (tests/fuzz/FINDINGS.md, O2): the later cases show it
        time.sleep(0.05)
    if worker in _workers(base).values():
        return  # some other worker was removed
    _call(f"{base}/workers", "POST", {"url": worker})
    while worker not in _workers(base).values():
        assert time.monotonic() < deadline, f"the router did not take {worker} back"
        time.sleep(0.05)


@schemathesis.hook
def after_call(context: Any, case: Any, response: Any) -> None:
    parts = urllib.parse.urlsplit(response.request.url)
    base = f"{parts.scheme}://{parts.netloc}"
    path = case.operation.path
    if path in ENGINE_ADMIN:
        _call(f"{base}/continue_generation", "POST")
    worker = os.environ.get("FUZZ_ROUTER_WORKER")
    if worker and path == "/workers/{worker_id}" and case.method.upper() == "DELETE" and response.status_code == 202:
        _restore_router_worker(base, str(case.path_parameters["worker_id"]), worker)
