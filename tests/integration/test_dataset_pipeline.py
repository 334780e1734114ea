"""The hard-problem filter and hint search end to end: real engine (a tiny model taught which
prompts it solves: tests/planted_model.py), real verifier, real Redis; through `pope hints
build` and through the rollout service's job API."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from redis.asyncio import Redis

from services.common.keys import Keys
from services.common.messages import Problem, ProblemLabel, Variant
from services.rollout.hint_builder import token_ends
from services.rollout.hints import cut_points
from services.rollout.prompts import PromptTemplate, user_message
from services.rollout.store import ProblemStore
from tests.conftest import ROOT, running_engine, running_pope
from tests.planted_model import WRONG, train_planted_model

FILLER = "\n\n" + "Then we keep going with routine algebra " * 12
PLANTED = Problem(
    prompt="Find the number.",
    answer="42",
    solution="We have the sum.\n\nSo the product is given.\n\nTherefore \\boxed{42}" + FILLER,
)
PROBLEMS = [
    Problem(prompt="Compute the value. \\boxed{7}", answer="7", solution="Seven."),  # solved unhinted
    PLANTED,  # solvable from its third paragraph on
    Problem(
        prompt="Find the count.",
        answer="13",
        solution="Clearly \\boxed{13}\n\nMore words here.\n\nEven more words." + FILLER,
    ),  # from the first
    Problem(
        prompt="Find the total.",
        answer="99",
        solution="Add them.\n\nCarry the one.\n\nWrite it down." + FILLER + " \\boxed{99}",
    ),  # too late
    Problem(prompt="Find the rest.", answer="5"),  # no solution to cut
]
EXPECTED = ["easy", "hard_hinted", "hard_hinted", "hard_unsolved", "hard_unsolved"]
FIRST_WORKING_CUT = [None, 2, 0, None, None]  # the planted behaviour, per problem
TEMPLATE = PromptTemplate(version="planted-test-v1")
TOKEN = "verifier-secret"  # the verifier requires it; the search and evaluation send it
WITH_TOKEN = {**os.environ, "POPE_ROLLOUT__VERIFIER_TOKEN": TOKEN}
CONFIG = {
    "rollout": {
        "prompt_template": TEMPLATE.model_dump(),
        "max_new_tokens": 48,  # posted problems must fit the tiny model's 4096-token context with it
        "hints": {"k": 4, "k_hint": 4, "max_new_tokens": 12, "concurrency": 1},
    }
}


def planted_answers(tokenizer: Any) -> dict[str, str]:
    """User message -> completion: only problem 0 is solved unhinted; problems 1 and 2 from
    their planted cut on; the rest never."""
    answers = {}
    for problem, first in zip(PROBLEMS, FIRST_WORKING_CUT, strict=True):
        solved = f"So the answer is \\boxed{{{problem.answer}}}"
        answers[user_message(problem, Variant.UNHINTED, TEMPLATE)] = solved if problem is PROBLEMS[0] else WRONG
        if problem.solution is None:
            continue
        _, cuts = cut_points(problem.solution, token_ends(tokenizer, problem.solution))
        for i, cut in enumerate(cuts):
            guided = problem.model_copy(update={"hint": problem.solution[: cut.chars]})
            works = first is not None and i >= first
            answers[user_message(guided, Variant.HINTED, TEMPLATE)] = solved if works else WRONG
    return answers


@pytest.fixture(scope="module")
def planted_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return train_planted_model(tmp_path_factory.mktemp("planted-model"), planted_answers)


@pytest.fixture(scope="module")
def services(planted_model: Path, redis_url: str) -> Iterator[dict[str, str]]:
    env = {"REDIS_URL": redis_url, "POPE_VERIFIER__KEY_PREFIX": "hints-test-unused:", "POPE_VERIFIER__API_TOKEN": TOKEN}
    with running_engine(planted_model) as engine, running_pope(["verifier", "--workers", "2"], "/readyz", env) as v:
        yield {"engine": engine, "verifier": v.url}


def config_file(tmp_path: Path) -> Path:
    path = tmp_path / "pope.yaml"
    path.write_text(json.dumps(CONFIG))
    return path


def stored(redis_url: str, keys: Keys) -> dict[str, Problem]:
    async def read() -> dict[str, Problem]:
        client = Redis.from_url(redis_url)
        try:
            return {p.id: p for p in await ProblemStore(client, keys).all()}
        finally:
            await client.aclose()

    return asyncio.run(read())


def put(redis_url: str, keys: Keys, problems: list[Problem]) -> None:
    async def write() -> None:
        client = Redis.from_url(redis_url)
        try:
            await ProblemStore(client, keys).put_many(problems)
        finally:
            await client.aclose()

    asyncio.run(write())


def build_cmd(
    planted_model: Path, tmp_path: Path, redis_url: str, keys: Keys, services: dict[str, str], *extra: str
) -> list[str]:
    return [
        sys.executable,
        "-m",
        "services.cli",
        "hints",
        "build",
        "--model",
        str(planted_model),
        "--config",
        str(config_file(tmp_path)),
        "--redis-url",
        redis_url,
        "--key-prefix",
        keys.prefix,
        "--engine-url",
        services["engine"],
        "--verifier-url",
        services["verifier"],
        "--run-dir",
        str(tmp_path),
        *extra,
    ]


def records(problems: dict[str, Problem]) -> dict[str, Any]:
    return {pid: (p.label, p.hint, p.search) for pid, p in problems.items()}


def test_the_search_finds_the_planted_prefix(
    planted_model: Path, tmp_path: Path, redis_url: str, keys: Keys, services: dict[str, str]
) -> None:
    def build() -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            build_cmd(planted_model, tmp_path, redis_url, keys, services),
            cwd=ROOT,
            env=WITH_TOKEN,
            capture_output=True,
            text=True,
            timeout=300,
        )

    put(redis_url, keys, PROBLEMS)
    run = build()
    assert run.returncode == 0, run.stdout + run.stderr
    out = stored(redis_url, keys)
    assert [out[p.id].label for p in PROBLEMS] == [ProblemLabel(x) for x in EXPECTED], run.stdout
    planted = out[PLANTED.id]
    assert planted.hint == "We have the sum.\n\nSo the product is given.\n\nTherefore \\boxed{42}"
    s = planted.search
    assert s is not None and s.cut_level == "paragraph" and s.prefixes_tried == 3 and s.candidates == 3
    assert s.unhinted_successes == 0 and s.unhinted_attempts == 4 and s.hinted_successes >= 1
    assert s.prefix_chars == len(planted.hint) and 0 < s.prefix_fraction <= 0.25  # type: ignore[operator]
    assert s.template_version == "planted-test-v1" and s.tokens_spent > 0
    assert out[PROBLEMS[2].id].hint == "Clearly \\boxed{13}" and out[PROBLEMS[2].id].search.prefixes_tried == 1  # type: ignore[union-attr]
    unsolved = out[PROBLEMS[3].id].search
    assert (
        unsolved is not None
        and unsolved.prefixes_tried == unsolved.candidates == 3
        and out[PROBLEMS[3].id].hint is None
    )
    assert out[PROBLEMS[4].id].search.prefixes_tried == 0  # type: ignore[union-attr]
    assert out[PROBLEMS[0].id].search.unhinted_successes >= 1  # type: ignore[union-attr]
    # Progress with an ETA per problem, and the summary table.
    assert "[5/5]" in run.stdout and "ETA" in run.stdout and "| hard_hinted | 2 |" in run.stdout, run.stdout

    # Run again: nothing to do, nothing changed.
    again = build()
    assert again.returncode == 0 and "5 already done" in again.stdout, again.stdout + again.stderr
    assert records(stored(redis_url, keys)) == records(out)


def test_kill_9_mid_build_then_resume_gives_identical_records(
    planted_model: Path, tmp_path: Path, redis_url: str, keys: Keys, services: dict[str, str]
) -> None:
    # More problems, so the kill lands mid-build: variants of the five with other answers.
    many = [p.model_copy(update={"id": f"{p.id}-{i}"}) for i in range(4) for p in PROBLEMS]
    reference = Keys(keys.prefix + "ref:")
    put(redis_url, reference, many)
    run = subprocess.run(
        build_cmd(planted_model, tmp_path, redis_url, reference, services),
        cwd=ROOT,
        env=WITH_TOKEN,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    expected = stored(redis_url, reference)

    put(redis_url, keys, many)
    proc = subprocess.Popen(
        build_cmd(planted_model, tmp_path, redis_url, keys, services),
        cwd=ROOT,
        env=WITH_TOKEN,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    assert proc.stdout is not None
    for line in proc.stdout:  # kill it as soon as the third problem is stored
        if line.startswith("[3/"):
            os.kill(proc.pid, signal.SIGKILL)
            break
    proc.wait(30)
    assert proc.returncode == -signal.SIGKILL
    partial = stored(redis_url, keys)
    finished = sum(p.search is not None for p in partial.values())
    assert 3 <= finished < len(many)

    resumed = subprocess.run(
        build_cmd(planted_model, tmp_path, redis_url, keys, services),
        cwd=ROOT,
        env=WITH_TOKEN,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert f"{finished} already done" in resumed.stdout
    assert records(stored(redis_url, keys)) == records(expected)


def test_hint_jobs_over_http_and_problems_by_label(
    planted_model: Path, tmp_path: Path, redis_url: str, keys: Keys, services: dict[str, str]
) -> None:
    env = {
        "REDIS_URL": redis_url,
        "POPE_ROLLOUT__KEY_PREFIX": keys.prefix,
        "POPE_ROLLOUT__SCHEDULE": "false",
        "POPE_ROLLOUT__ENGINE_URL": services["engine"],
        "POPE_ROLLOUT__VERIFIER_URL": services["verifier"],
        "POPE_ROLLOUT__ARCHIVE_DIR": str(tmp_path / "archive"),
        "POPE_ROLLOUT__VERIFIER_TOKEN": TOKEN,
    }
    args = ["rollout", "--model", str(planted_model), "--config", str(config_file(tmp_path))]
    with running_pope(args, "/readyz", env) as api:
        resp = httpx.post(f"{api.url}/v1/problems", json=[p.model_dump(mode="json") for p in PROBLEMS])
        assert resp.status_code == 201, resp.text
        bad = httpx.post(f"{api.url}/v1/hints/jobs", json={"hints": {"k": 0}})
        assert bad.status_code == 422 and "k" in bad.text
        resp = httpx.post(f"{api.url}/v1/hints/jobs", json={"split": "train", "hints": {"k_hint": 2}})
        assert resp.status_code == 202, resp.text
        job = resp.json()
        assert job["state"] == "running" and job["settings"]["k_hint"] == 2 and job["settings"]["k"] == 4
        deadline = time.monotonic() + 120
        while job["state"] == "running":
            assert time.monotonic() < deadline, job
            time.sleep(0.2)
            job = httpx.get(f"{api.url}/v1/hints/jobs/{job['id']}").json()
        assert job["state"] == "done", job
        assert job["progress"]["done"] == 5 and job["progress"]["labels"] == {
            "easy": 1,
            "hard_hinted": 2,
            "hard_unsolved": 2,
        }
        hinted = httpx.get(f"{api.url}/v1/problems", params={"label": "hard_hinted"}).json()
        assert hinted["count"] == 2
        assert {p["id"] for p in hinted["problems"]} == {PROBLEMS[1].id, PROBLEMS[2].id}
        assert all(p["search"]["template_version"] == "planted-test-v1" for p in hinted["problems"])
        assert httpx.get(f"{api.url}/v1/problems", params={"label": "easy"}).json()["count"] == 1
        assert httpx.get(f"{api.url}/v1/problems", params={"label": "bogus"}).status_code == 422
        assert httpx.get(f"{api.url}/v1/hints/jobs/nope").status_code == 404


def test_pope_eval_reports_pass_at_k_unhinted_and_hinted(
    planted_model: Path, tmp_path: Path, redis_url: str, keys: Keys, services: dict[str, str]
) -> None:
    # The eval split: problem 0 is solved unhinted; with its planted prefix as the hint,
    # problem 1 is solved hinted; problem 3's first cut as its hint solves nothing.
    hint_1 = "We have the sum.\n\nSo the product is given.\n\nTherefore \\boxed{42}"
    hint_3 = "Add them."
    evals = [
        PROBLEMS[0],
        PROBLEMS[1].model_copy(update={"hint": hint_1}),
        PROBLEMS[2],
        PROBLEMS[3].model_copy(update={"hint": hint_3}),
        PROBLEMS[4],
    ]
    put(redis_url, keys, [p.model_copy(update={"split": "eval"}) for p in evals])
    cmd = build_cmd(planted_model, tmp_path, redis_url, keys, services)
    cmd[cmd.index("hints") : cmd.index("build") + 1] = ["eval"]
    cmd += ["--k", "4", "--hinted", "--max-new-tokens", "12", "--out", str(tmp_path / "eval"), "--name", "base"]
    run = subprocess.run(cmd, cwd=ROOT, env=WITH_TOKEN, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    report = json.loads((tmp_path / "eval" / "base.json").read_text())
    assert report["weight_versions"] == [0] and report["k"] == 4
    unhinted, hinted = report["summary"]["unhinted"], report["summary"]["hinted"]
    assert unhinted["problems"] == 5 and unhinted["pass@1"] == pytest.approx(1 / 5) and unhinted["pass@4"] == 0.2
    assert hinted["problems"] == 2 and hinted["pass@1"] == pytest.approx(0.5) and hinted["pass@4"] == 0.5
    by_id = {(r["problem_id"], r["variant"]): r["successes"] for r in report["problems"]}
    assert by_id[(PROBLEMS[0].id, "unhinted")] == 4 and by_id[(PROBLEMS[1].id, "hinted")] == 4
    table = (tmp_path / "eval" / "base.md").read_text()
    assert "| unhinted | 5 | 0.200 | 0.200 |" in table and "| hinted | 2 | 0.500 | 0.500 |" in table
    assert table in run.stdout
