"""The dashboard's page and files, and GET /v1/evaluations, on a real rollout service
(uvicorn in a thread, a real Redis) whose reads need the token."""

from __future__ import annotations

import re
from pathlib import Path

import httpx
from fastapi import FastAPI
from pydantic import SecretStr
from redis.asyncio import Redis

from services.common.http import DASHBOARD_PATHS
from services.common.keys import Keys
from services.rollout.dashboard import ASSETS
from services.rollout.evaluation import EvalReport, PeriodicEval, ProblemResult, summarize
from services.rollout.service import create_app
from services.rollout.settings import EvalSettings, RolloutSettings
from services.rollout.store import ProblemStore
from tests.conftest import app_in_thread

TOKEN = "t0ken"


def locked_settings(redis_url: str, keys: Keys, tmp_path: Path, token: str = TOKEN) -> RolloutSettings:
    """A rollout service with no scheduler whose reads need ``token``, writing under ``tmp_path``."""
    return RolloutSettings(
        redis_url=redis_url,
        key_prefix=keys.prefix,
        api_token=SecretStr(token),
        require_auth_for_reads=True,
        schedule=False,
        archive_dir=tmp_path / "rollouts",
        eval_dir=tmp_path / "eval",
        evaluation=EvalSettings(k=4, every_steps=5),
    )


def test_the_page_is_open_and_locked_down_and_the_data_is_not(redis_url: str, keys: Keys, tmp_path: Path) -> None:
    cfg = locked_settings(redis_url, keys, tmp_path)

    def build(_: Redis) -> FastAPI:
        return create_app(cfg)

    with app_in_thread(redis_url, build) as url:
        page = httpx.get(f"{url}/")
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
        csp = page.headers["content-security-policy"]
        assert "script-src 'self'" in csp and "unsafe-inline" not in csp and "unsafe-eval" not in csp
        assert page.headers["x-content-type-options"] == "nosniff"
        assert '<script src="/dashboard/dashboard.js"' in page.text
        for name, kind in (("dashboard.js", "text/javascript"), ("dashboard.css", "text/css")):
            asset = httpx.get(f"{url}/dashboard/{name}")
            assert asset.status_code == 200 and asset.headers["content-type"].startswith(kind), name
        script = httpx.get(f"{url}/dashboard/dashboard.js").text  # text nodes only, no markup parsed
        assert not re.search(r"\.(inner|outer)HTML\s*=|insertAdjacentHTML|document\.write|\beval\(", script)
        assert httpx.get(f"{url}/dashboard/..%2Fservice.py").status_code == 404
        assert httpx.get(f"{url}/dashboard/nope.js").status_code == 404
        # The data stays behind the token; the page learns so from the open API description.
        for path in ("/v1/status", "/v1/evaluations", "/v1/transfer", "/v1/rollouts"):
            assert httpx.get(f"{url}{path}").status_code == 401, path
        spec = httpx.get(f"{url}/openapi.json").json()
        assert spec["paths"]["/v1/status"]["get"]["security"]
        assert "/" not in spec["paths"]  # the page is not part of the API
        # The open paths are the page and its files, no more.
        assert {"/", *(f"/dashboard/{name}" for name in ASSETS)} == DASHBOARD_PATHS


async def test_evaluations_lists_each_periodic_evaluation_newest_first(
    redis_url: str, keys: Keys, tmp_path: Path, aredis: Redis
) -> None:
    cfg = locked_settings(redis_url, keys, tmp_path)
    evaluator = PeriodicEval(cfg.evaluation, cfg.eval_dir, aredis, keys, ProblemStore(aredis, keys), None, None)  # type: ignore[arg-type]
    for version, solved in ((0, 0), (5, 2), (10, 4)):
        results = [ProblemResult(problem_id="p", variant="unhinted", n=4, successes=solved, tokens=40, truncated=0)]
        report = EvalReport(
            split="eval",
            k=4,
            weight_versions=[version],
            settings=cfg.evaluation,
            summary=summarize(results, 4),
            problems=results,
            seconds=1.0,
        )
        await evaluator.record(report)

    def build(_: Redis) -> FastAPI:
        return create_app(cfg)

    with app_in_thread(redis_url, build) as url:
        async with httpx.AsyncClient(base_url=url, headers={"Authorization": f"Bearer {TOKEN}"}) as http:
            body = (await http.get("/v1/evaluations")).json()
            assert body["k"] == 4 and body["every_steps"] == 5
            assert [e["weight_version"] for e in body["evaluations"]] == [10, 5, 0]
            assert [e["unhinted/pass@1"] for e in body["evaluations"]] == [1.0, 0.5, 0.0]
            assert body["evaluations"][0]["unhinted/pass@4"] == 1.0
            newest = (await http.get("/v1/evaluations?limit=1")).json()["evaluations"]
            assert [e["weight_version"] for e in newest] == [10]
            assert (await http.get("/v1/evaluations?limit=0")).status_code == 422
