"""The engine's two keys, as SGLang 0.5.23 decides them (utils/auth.py): every route's level
with no key, the api key only, the admin key only and both, over real HTTP; and the
trainer's and rollout's clients, built from their settings, against an engine with both.

The table's servers never finish loading a model: every call that passes the key check
answers 503 (or 200 where no model is needed), so "not 401" is "admitted".
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import httpx
import pytest
import uvicorn
from fastapi.routing import APIRoute

from services.common.config import load_settings
from services.common.engine_client import EngineClient, EngineError, SamplingParams
from services.common.redis_server import free_port
from services.engine.server import create_app
from services.rollout.settings import RolloutSettings
from services.trainer.settings import TrainerSettings
from services.trainer.sink import sink_for
from tests.conftest import running_pope

API, ADMIN = "api-key-for-tests", "admin-key-for-tests"
# SGLang 0.5.23's levels of the routes the CPU engine serves (http_server.py's @auth_level).
ADMIN_ROUTES = {
    "/update_weights_from_disk",
    "/init_weights_update_group",
    "/destroy_weights_update_group",
    "/begin_weight_update",
    "/end_weight_update",
    "/update_weights_from_distributed",
    "/pause_generation",
    "/continue_generation",
    "/abort_request",
    "/flush_cache",
}
OPEN_PREFIXES = ("/health", "/ready", "/metrics")


def expected(path: str, header: str | None, api: str | None, admin: str | None) -> bool:
    """SGLang's rule, written out on its own here (the engine's is services/engine/guard.py)."""
    sent = header.split(" ", 1)[1] if header else None
    if path.startswith(OPEN_PREFIXES):
        return True
    if path in ADMIN_ROUTES:
        if admin:
            return sent == admin
        return sent == api if api else True
    return sent == api if api else True


@pytest.mark.parametrize(("api", "admin"), [(None, None), (API, None), (None, ADMIN), (API, ADMIN)])
def test_every_route_has_sglangs_auth_level(api: str | None, admin: str | None, never_loaded: object) -> None:
    app = create_app(never_loaded, api, on_fatal=lambda: None, admin_key=admin)  # type: ignore[arg-type]
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    try:
        while not server.started:
            time.sleep(0.01)
        routes = [(m, r.path) for r in app.routes if isinstance(r, APIRoute) for m in sorted(r.methods or ())]
        routes += [("GET", "/openapi.json"), ("GET", "/no_such_route")]
        assert {p for _, p in routes} >= ADMIN_ROUTES | {"/generate", "/model_info", "/ready", "/metrics"}
        headers = [None, f"Bearer {API}", f"Bearer {ADMIN}", "Bearer wrong"]
        with httpx.Client(base_url=url, timeout=10) as http:
            for method, path in routes:
                for header in headers:
                    sent = {"Authorization": header} if header else {}
                    resp = http.request(method, path, json={} if method != "GET" else None, headers=sent)
                    admitted = resp.status_code != 401
                    assert admitted == expected(path, header, api, admin), (method, path, header, resp.status_code)
                    if not admitted:
                        assert resp.json() == {"error": "Unauthorized"}
                assert http.request("OPTIONS", path).status_code != 401, path  # OPTIONS is always let through
            key = admin or api
            if key:  # the scheme is matched case-insensitively, as SGLang matches it
                for scheme in ("bearer", "BEARER"):
                    resp = http.post("/pause_generation", json={}, headers={"Authorization": f"{scheme} {key}"})
                    assert resp.status_code == 503, scheme
    finally:
        server.should_exit = True
        thread.join(30)


async def test_the_trainer_and_rollout_clients_work_against_an_engine_with_both_keys(
    tiny_model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    env = {"POPE_ENGINE__API_KEY": API, "POPE_ENGINE__ADMIN_API_KEY": ADMIN}
    with running_pope(["engine", "--model", str(tiny_model)], "/health", env=env) as engine:
        url = engine.url
        async with EngineClient(url, api_key=API, retries=0) as api_only:  # no admin key: no control calls
            assert await api_only.weight_version() == 0
            with pytest.raises(EngineError) as refused:
                await api_only.pause()
            assert refused.value.status == 401

        for section in ("ROLLOUT", "TRAINER"):
            monkeypatch.setenv(f"POPE_{section}__ENGINE_API_KEY", API)
            monkeypatch.setenv(f"POPE_{section}__ENGINE_ADMIN_KEY", ADMIN)
            monkeypatch.setenv(f"POPE_{section}__ENGINE_URL", url)
        rollout = load_settings(RolloutSettings, None)
        async with rollout.engine_client(retries=0) as client:
            [out] = await client.generate([[1, 2, 3]], SamplingParams(max_new_tokens=2, sampling_seed=1))
            assert len(out.output_ids) == 2
            await client.abort("no-such-rid")  # the rollout's abort of a lost request is a control call
            assert await client.ready()

        trainer = load_settings(TrainerSettings, None)
        async with trainer.engine_client() as client:
            await client.pause("in_place")
            assert await client.ready() is False and await client.healthy()
            await client.resume()
            assert await client.ready()
            await client.begin_weight_update()
            await client.end_weight_update()
        sink = sink_for(trainer)
        try:
            assert await sink.served_versions() == [(0, 0)]
            assert await sink.push(tiny_model, 1)  # /update_weights_from_disk with the admin key
            assert await sink.served_versions() == [(1, 0)]
        finally:
            await sink.aclose()
