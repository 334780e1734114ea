"""An engine started with an API key (``POPE_ENGINE__API_KEY``, as compose and Kubernetes
set it) refuses every call without the key but health and metrics, and the clients the
services build from their own settings (``engine_api_key``, from their environment as the
deployments give it) get through: the rollout service's (generation, the hint search,
evaluation) and the trainer's (weight pushes, the served version)."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from services.common.config import load_settings
from services.common.engine_client import EngineClient, EngineError, SamplingParams
from services.rollout.settings import RolloutSettings
from services.trainer.settings import TrainerSettings
from services.trainer.sink import sink_for
from tests.conftest import running_pope

KEY = "engine-key-for-tests"


async def test_an_engine_with_a_key_refuses_calls_without_it_and_the_services_clients_send_it(
    tiny_model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with running_pope(["engine", "--model", str(tiny_model)], "/health", env={"POPE_ENGINE__API_KEY": KEY}) as engine:
        url = engine.url
        refused = [
            ("POST", "/generate", {"input_ids": [[1, 2]], "sampling_params": {"max_new_tokens": 1}}),
            ("GET", "/model_info", None),
            ("POST", "/update_weights_from_disk", {"model_path": str(tiny_model), "weight_version": "9"}),
            ("POST", "/pause_generation", {"mode": "abort"}),
            ("POST", "/abort_request", {"rid": "x"}),
        ]
        async with httpx.AsyncClient(base_url=url, timeout=30) as http:
            for method, path, body in refused:
                assert (await http.request(method, path, json=body)).status_code == 401, path
                wrong = {"Authorization": "Bearer not-the-key"}
                assert (await http.request(method, path, json=body, headers=wrong)).status_code == 401, path
            for path in ("/health", "/health_generate", "/metrics"):  # probes and Prometheus hold no key
                assert (await http.get(path)).status_code == 200, path

        async with EngineClient(url, retries=0) as keyless:
            with pytest.raises(EngineError) as refusal:
                await keyless.weight_version()
            assert refusal.value.status == 401

        for var in ("POPE_ROLLOUT__ENGINE_API_KEY", "POPE_TRAINER__ENGINE_API_KEY"):
            monkeypatch.setenv(var, KEY)
        monkeypatch.setenv("POPE_ROLLOUT__ENGINE_URL", url)
        monkeypatch.setenv("POPE_TRAINER__ENGINE_URL", url)
        rollout = load_settings(RolloutSettings, None)
        async with rollout.engine_client(retries=0) as client:
            [out] = await client.generate([[1, 2, 3]], SamplingParams(max_new_tokens=2, sampling_seed=1))
            assert len(out.output_ids) == 2 and await client.weight_version() == 0

        sink = sink_for(load_settings(TrainerSettings, None))
        try:
            assert await sink.served_versions() == [(0, 0)]
            assert await sink.push(tiny_model, 1)  # the base weights again, served as version 1
            assert await sink.served_versions() == [(1, 0)]
        finally:
            await sink.aclose()
