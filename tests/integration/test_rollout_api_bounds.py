"""The rollout API's bounds over real HTTP and a real Redis: problems that cannot fit the
model's context refused at the door, oversized texts and batches refused, problems
deleted and excluded (and then not drawn), pages and query values bounded."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from redis.asyncio import Redis
from transformers import AutoTokenizer

from services.common.keys import Keys
from services.common.messages import MAX_PROMPT_CHARS, Problem, ProblemLabel, Variant
from services.rollout.api import EXCLUDED_BY_API, MAX_PROBLEM_ROWS
from services.rollout.archive import RolloutArchive
from services.rollout.fit import FitCheck, model_context
from services.rollout.hint_builder import with_search
from services.rollout.planner import Planner
from services.rollout.prompts import PromptTemplate
from services.rollout.store import ProblemStore
from tests.factories import hard_hinted_search
from tests.integration.test_rollout_api import Api, serving

BUDGET = 1000  # max_new_tokens of both splits in these tests


@pytest.fixture
def fitted(redis_url: str, keys: Keys, tmp_path: Path, tiny_model: Path) -> Iterator[Api]:
    """The API with the tiny model's context check (4096 tokens, 1000 of them the response's)."""
    context = model_context(str(tiny_model))
    assert context == 4096
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    check = FitCheck(tokenizer, PromptTemplate(), context, {"train": BUDGET, "eval": BUDGET}, 0.25, "tiny")
    with serving(redis_url, keys, RolloutArchive(tmp_path / "r.jsonl"), fit=lambda: check) as api:
        yield api


@pytest.fixture
def api(redis_url: str, keys: Keys, tmp_path: Path) -> Iterator[Api]:
    with serving(redis_url, keys, RolloutArchive(tmp_path / "r.jsonl")) as a:
        yield a


def post(api: Api, rows: list[dict[str, Any]]) -> httpx.Response:
    return httpx.post(f"{api.url}/v1/problems", json=rows, timeout=60)


def test_a_problem_too_long_for_the_context_is_refused_naming_the_limit(fitted: Api) -> None:
    fits = {"prompt": "What is 2+2?", "answer": "4", "solution": "Two and two. " * 40}
    assert post(fitted, [fits]).status_code == 201
    # Its prompt alone is short, but a quarter of its solution as the hint is not: the
    # hint search could build a prompt the context cannot hold with 1000 new tokens.
    long_solution = {"prompt": "What is 3+3?", "answer": "6", "solution": "Three and three. " * 3000}
    long_prompt = {"prompt": "Count the words. " * 1500, "answer": "1"}
    resp = post(fitted, [fits, long_solution, long_prompt])
    assert resp.status_code == 422, resp.text
    errors = resp.json()["detail"]
    assert [(e["row"], e["field"]) for e in errors] == [(1, "solution"), (2, "prompt")]
    assert all("context of 4096 tokens" in e["message"] and "max_new_tokens 1000" in e["message"] for e in errors)
    assert "hinted with the longest hint" in errors[0]["message"]
    count = httpx.get(f"{fitted.url}/v1/problems").json()["count"]
    assert count == 1  # all or nothing: the fitting row of the refused batch was not stored


def test_without_a_model_only_character_bounds_apply(api: Api) -> None:
    assert post(api, [{"prompt": "Count the words. " * 1500, "answer": "1"}]).status_code == 201
    resp = post(api, [{"prompt": "x" * (1 << 20), "answer": "1"}])  # the 1 MB prompt
    assert resp.status_code == 422
    [error] = resp.json()["detail"]
    assert (error["row"], error["field"]) == (0, "prompt") and str(MAX_PROMPT_CHARS) in error["message"]
    assert post(api, [{"prompt": "p", "answer": "a" * 5000}]).json()["detail"][0]["field"] == "answer"
    assert post(api, [{"prompt": "p", "answer": "1", "solution": "s" * 70_000}]).status_code == 422


def test_a_batch_over_the_row_bound_is_refused(api: Api) -> None:
    rows = [{"prompt": f"q{i}", "answer": "1"} for i in range(MAX_PROBLEM_ROWS + 1)]
    resp = post(api, rows)
    assert resp.status_code == 422 and str(MAX_PROBLEM_ROWS) in resp.json()["detail"][0]["message"]


async def test_delete_and_exclude_and_the_planner_no_longer_draws_them(api: Api, aredis: Redis, keys: Keys) -> None:
    store = ProblemStore(aredis, keys)

    async def drawn() -> set[str]:  # the scheduler plans from the store each step
        return {p.id for p, _ in Planner(seed=1).plan(await store.all(), 20)}

    async with httpx.AsyncClient(base_url=api.url) as http:
        rows = [{"prompt": f"What is {i}?", "answer": str(i)} for i in range(4)]
        ids = (await http.post("/v1/problems", json=rows)).json()["ids"]
        gone, out, kept = ids[0], ids[1], ids[2:]
        assert (await http.delete(f"/v1/problems/{gone}")).status_code == 204
        assert (await http.delete(f"/v1/problems/{gone}")).status_code == 404
        assert (await http.get(f"/v1/problems/{gone}")).status_code == 404
        resp = await http.patch(f"/v1/problems/{out}", json={"excluded": True})
        assert resp.status_code == 200 and resp.json()["excluded"] == EXCLUDED_BY_API
        assert (await http.patch("/v1/problems/nope", json={"excluded": True})).status_code == 404
        assert (await http.patch(f"/v1/problems/{out}", json={"excluded": 3})).status_code == 422
        assert await store.count() == 3 and await drawn() == set(kept)
        # Included again, it is drawn again; with a reason, the reason is kept.
        assert (await http.patch(f"/v1/problems/{out}", json={"excluded": False})).json()["excluded"] is None
        assert await drawn() == {out, *kept}
        assert (await http.patch(f"/v1/problems/{out}", json={"excluded": "a dup"})).json()["excluded"] == "a dup"


async def test_a_hint_search_result_neither_revives_a_deleted_problem_nor_undoes_an_exclusion(
    aredis: Redis, keys: Keys
) -> None:
    store = ProblemStore(aredis, keys)
    a, b = Problem(prompt="A?", answer="1", solution="x is 1"), Problem(prompt="B?", answer="2", solution="y is 2")
    await store.put_many([a, b])
    # The search read both, then a is deleted and b excluded before its results land.
    found = {
        p.id: p.model_copy(update={"hint": "x is", "label": ProblemLabel.HARD_HINTED, "search": hard_hinted_search()})
        for p in (a, b)
    }
    await store.delete(a.id)
    await store.update(b.id, lambda p: p.model_copy(update={"excluded": "by hand"}))
    for p in (a, b):
        await store.update(p.id, lambda stored, p=p: with_search(stored, found[p.id]))
    assert await store.get(a.id) is None
    stored_b = await store.get(b.id)
    assert stored_b is not None and stored_b.excluded == "by hand" and stored_b.label is ProblemLabel.HARD_HINTED


def test_problems_come_in_bounded_pages(api: Api) -> None:
    ids = post(api, [{"prompt": f"What is {i}?", "answer": str(i)} for i in range(150)]).json()["ids"]
    first = httpx.get(f"{api.url}/v1/problems").json()
    assert first["count"] == 150 and len(first["problems"]) == 100 and first["next_offset"] == 100
    rest = httpx.get(f"{api.url}/v1/problems", params={"offset": first["next_offset"]}).json()
    assert len(rest["problems"]) == 50 and rest["next_offset"] is None
    assert {p["id"] for p in first["problems"] + rest["problems"]} == set(ids)
    for bad in ({"limit": 0}, {"limit": 10**6}, {"offset": -1}, {"offset": "x"}):
        assert httpx.get(f"{api.url}/v1/problems", params=bad).status_code == 422, bad


@pytest.mark.parametrize(
    "params",
    [{"limit": 0}, {"limit": 1001}, {"weight_version": -1}, {"weight_version": 2**70}, {"cursor": "c" * 100}],
)
def test_bad_rollout_query_values_are_422(api: Api, params: dict[str, Any]) -> None:
    assert httpx.get(f"{api.url}/v1/rollouts", params=params).status_code == 422


def test_a_cursor_that_is_not_ours_finds_no_page(api: Api) -> None:
    # "cG9wZTotMQ": base64url, but of no offset of ours.
    for cursor, status in (("nope", 404), ("cG9wZTotMQ", 404), ("!!!", 422)):
        resp = httpx.get(f"{api.url}/v1/rollouts", params={"cursor": cursor, "variant": Variant.HINTED.value})
        assert resp.status_code == status, resp.text
        assert status == 422 or isinstance(resp.json()["detail"], str)


def test_a_searched_problem_posts_with_its_search_record(api: Api) -> None:
    """The experiments post hint-searched problems (their hints with the search's record)."""
    searched = {"prompt": "p", "answer": "1", "hint": "x is", "label": "hard_hinted"}
    row = {**searched, "search": hard_hinted_search().model_dump(mode="json")}
    assert post(api, [row]).status_code == 201
    assert post(api, [{"prompt": "p", "answer": "1", "id": {}}]).status_code == 422  # {} is no id
    assert post(api, [{"prompt": "p", "answer": "1", "search": None}]).status_code == 201  # a dumped Problem
