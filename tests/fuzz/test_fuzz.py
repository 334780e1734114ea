"""Every HTTP service fuzzed from its own OpenAPI by schemathesis, over real HTTP, with all
of schemathesis's checks: no 5xx, no response off its schema, no valid request refused, no
invalid one accepted, no request left unanswered.

    PYTHONPATH=$PWD .venv/bin/python -m pytest tests/fuzz -q         # FUZZ_CASES=1000 a service
    make fuzz                                                        # FUZZ_CASES=10000

The router (sglang-router) serves no OpenAPI: it is fuzzed from tests/fuzz/router_openapi.yaml.
Each run's report and its output (failures with a curl line each) stay in the test's
tmp_path (report/). What the fuzz found: tests/fuzz/FINDINGS.md.
"""

from __future__ import annotations

import os
from pathlib import Path

from tests.fuzz.conftest import AUTH
from tests.fuzz.harness import CASES, assert_clean, fuzz

HERE = Path(__file__).resolve().parent
# A pass without the token checks that auth is asked for; its floor is lower, since every
# mutating call is refused at the door.
UNAUTHENTICATED_CASES = max(CASES // 4, 100)
# The router in CI: valid cases only (its invalid ones reach the engine unbounded: a /generate
# without max_new_tokens is 128 tokens, ~2 s here), and no stateful phase (its POST /workers of
# unreachable urls hold the router's job queue, and a DELETE of the real worker then stays
# pending for minutes: FINDINGS.md, O2). `make fuzz` runs both (FUZZ_ROUTER_MODE=all).
ROUTER_FULL = os.environ.get("FUZZ_ROUTER_MODE", "positive") == "all"
ROUTER_MODE = "all" if ROUTER_FULL else "positive"
ROUTER_PHASES = "examples,coverage,fuzzing" + (",stateful" if ROUTER_FULL else "")


def report_dir(tmp_path: Path) -> Path:
    path = tmp_path / "report"
    path.mkdir()
    return path


def test_rollout(rollout_url: str, tmp_path: Path) -> None:
    assert_clean(fuzz(f"{rollout_url}/openapi.json", rollout_url, report_dir(tmp_path), headers=AUTH))


def test_rollout_without_a_token(rollout_url: str, tmp_path: Path) -> None:
    report = fuzz(f"{rollout_url}/openapi.json", rollout_url, report_dir(tmp_path), cases=UNAUTHENTICATED_CASES)
    assert_clean(report, UNAUTHENTICATED_CASES)


def test_verifier(verifier_url: str, tmp_path: Path) -> None:
    assert_clean(fuzz(f"{verifier_url}/openapi.json", verifier_url, report_dir(tmp_path), headers=AUTH))


def test_verifier_without_a_token(verifier_url: str, tmp_path: Path) -> None:
    report = fuzz(f"{verifier_url}/openapi.json", verifier_url, report_dir(tmp_path), cases=UNAUTHENTICATED_CASES)
    assert_clean(report, UNAUTHENTICATED_CASES)


def test_trainer(trainer_url: str, tmp_path: Path) -> None:
    assert_clean(fuzz(f"{trainer_url}/openapi.json", trainer_url, report_dir(tmp_path)))


def test_engine(fuzz_engine_url: str, tmp_path: Path) -> None:
    url = fuzz_engine_url
    assert_clean(fuzz(f"{url}/openapi.json", url, report_dir(tmp_path)))


def test_router(router_url: str, fuzz_engine_url: str, tmp_path: Path) -> None:
    env = {"FUZZ_ROUTER_WORKER": fuzz_engine_url}  # tests/fuzz/hooks.py adds it back if the fuzz removes it
    report = fuzz(
        str(HERE / "router_openapi.yaml"),
        router_url,
        report_dir(tmp_path),
        env=env,
        mode=ROUTER_MODE,
        phases=ROUTER_PHASES,
        # Valid cases only: several of its operations have few distinct ones (an id, a url),
        # so each is asked for more to reach the floor in all.
        cases=3 * CASES,
    )
    assert_clean(report)
