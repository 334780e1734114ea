"""/v1/problems and /v1/rollouts over real HTTP (uvicorn in a thread) and a real Redis."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from pydantic import SecretStr
from redis.asyncio import Redis

from services.common.http import api_app
from services.common.keys import Keys
from services.common.messages import Problem, ProblemLabel, RawGroup, Score, ScoredGroup, Variant, problem_id_for
from services.rollout.api import FitSource, problems_and_rollouts_router
from services.rollout.archive import RolloutArchive, RolloutRecord
from services.rollout.settings import RolloutSettings
from services.rollout.store import ProblemStore
from tests.conftest import app_in_thread
from tests.factories import group, hard_hinted_search


@dataclass
class Api:
    url: str
    archive: RolloutArchive


@contextlib.contextmanager
def serving(
    redis_url: str,
    keys: Keys,
    archive: RolloutArchive,
    token: str | None = None,
    reads_locked: bool = False,
    fit: FitSource | None = None,
) -> Iterator[Api]:
    """The router on an app served by uvicorn on a free port (``app_in_thread``)."""
    settings = RolloutSettings(api_token=SecretStr(token) if token else None, require_auth_for_reads=reads_locked)

    def build(client: Redis) -> FastAPI:
        app = api_app(settings)
        app.include_router(problems_and_rollouts_router(ProblemStore(client, keys), archive, fit))
        return app

    with app_in_thread(redis_url, build) as url:
        yield Api(url, archive)


@pytest.fixture
def api(redis_url: str, keys: Keys, tmp_path: Path) -> Iterator[Api]:
    with serving(redis_url, keys, RolloutArchive(tmp_path / "rollouts.jsonl")) as a:
        yield a


def rows(n: int) -> list[dict[str, Any]]:
    return [{"prompt": f"What is {i}+{i}?", "answer": str(2 * i)} for i in range(n)]


def count(api: Api) -> int:
    body = httpx.get(f"{api.url}/v1/problems").json()
    assert body["count"] == len(body["problems"])
    return int(body["count"])


def test_post_stores_problems_and_reposting_does_not_duplicate(api: Api) -> None:
    resp = httpx.post(f"{api.url}/v1/problems", json=rows(3))
    assert resp.status_code == 201, resp.text
    ids = resp.json()["ids"]
    assert ids == [problem_id_for(f"What is {i}+{i}?", str(2 * i)) for i in range(3)]
    assert count(api) == 3
    again = httpx.post(f"{api.url}/v1/problems", json=rows(3))
    assert again.status_code == 201 and again.json()["ids"] == ids
    assert count(api) == 3
    got = httpx.get(f"{api.url}/v1/problems/{ids[1]}").json()
    assert got["problem"]["prompt"] == "What is 1+1?" and got["problem"]["answer"] == "2"


def test_a_row_with_an_existing_id_replaces_it_and_the_last_duplicate_wins(api: Api) -> None:
    first = [{"id": "q1", "prompt": "old", "answer": "1"}]
    assert httpx.post(f"{api.url}/v1/problems", json=first).status_code == 201
    second = [
        {"id": "q1", "prompt": "newer", "answer": "2"},
        {"id": "q1", "prompt": "newest", "answer": "3", "hint": "h"},
    ]
    resp = httpx.post(f"{api.url}/v1/problems", json=second)
    assert resp.status_code == 201 and resp.json()["ids"] == ["q1", "q1"]
    assert count(api) == 1
    problem = httpx.get(f"{api.url}/v1/problems/q1").json()["problem"]
    assert (problem["prompt"], problem["answer"], problem["hint"]) == ("newest", "3", "h")


async def test_reposting_a_searched_problem_keeps_its_hint_search(api: Api, aredis: Redis, keys: Keys) -> None:
    """Like `pope data import`: a problem sent again without search fields keeps what the hint
    search found for it; one whose prompt or answer changed under its id keeps nothing."""
    search = hard_hinted_search()
    searched = Problem(prompt="Find x.", answer="7", solution="x is 7", hint="x is", label="hard_hinted", search=search)
    await ProblemStore(aredis, keys).put_many([searched])
    async with httpx.AsyncClient(base_url=api.url) as http:
        resp = await http.post("/v1/problems", json=[{"prompt": "Find x.", "answer": "7", "source": "again"}])
        assert resp.status_code == 201 and resp.json()["ids"] == [searched.id]
        got = Problem.model_validate((await http.get(f"/v1/problems/{searched.id}")).json()["problem"])
        assert (got.label, got.search, got.hint, got.source) == (ProblemLabel.HARD_HINTED, search, "x is", "again")
        changed = [{"id": searched.id, "prompt": "Find y.", "answer": "8"}]
        assert (await http.post("/v1/problems", json=changed)).status_code == 201
        got = Problem.model_validate((await http.get(f"/v1/problems/{searched.id}")).json()["problem"])
        assert (got.prompt, got.label, got.search, got.hint) == ("Find y.", None, None, None)


def test_a_posted_train_copy_of_an_eval_problem_is_excluded_from_training(api: Api) -> None:
    """The same check as `pope data import`: against stored problems and within the request;
    the eval copy of a stored train problem gets its own id and replaces nothing."""
    train = {"prompt": "Compute 2+2.", "answer": "4"}
    [train_id] = httpx.post(f"{api.url}/v1/problems", json=[train]).json()["ids"]
    resp = httpx.post(f"{api.url}/v1/problems", json=[{**train, "split": "eval"}])
    assert resp.status_code == 201, resp.text
    [eval_id] = resp.json()["ids"]
    assert eval_id == f"{train_id}-eval" and resp.json()["leaked"] == [{"train_id": train_id, "eval_id": eval_id}]
    stored = {p["id"]: p for p in httpx.get(f"{api.url}/v1/problems").json()["problems"]}
    assert stored[train_id]["split"] == "train" and stored[eval_id]["split"] == "eval"
    assert stored[train_id]["excluded"] == f"same problem as eval problem {eval_id}"
    assert "excluded" not in stored[eval_id] or stored[eval_id]["excluded"] is None

    both = [{"prompt": "Compute 3+3.", "answer": "6", "split": "eval"}, {"prompt": "compute 3 + 3 .", "answer": "6"}]
    resp = httpx.post(f"{api.url}/v1/problems", json=both)
    eval_3, train_3 = resp.json()["ids"]
    assert resp.json()["leaked"] == [{"train_id": train_3, "eval_id": eval_3}]
    assert httpx.get(f"{api.url}/v1/problems/{train_3}").json()["problem"]["excluded"]

    allowed = [{"prompt": "Compute 4+4.", "answer": "8", "split": "eval"}, {"prompt": "compute 4 + 4 .", "answer": "8"}]
    resp = httpx.post(f"{api.url}/v1/problems", params={"allow_leakage": "true"}, json=allowed)
    eval_4, train_4 = resp.json()["ids"]
    assert resp.json()["leaked"] == [{"train_id": train_4, "eval_id": eval_4}]
    assert httpx.get(f"{api.url}/v1/problems/{train_4}").json()["problem"].get("excluded") is None


def test_an_invalid_row_refuses_the_whole_request(api: Api) -> None:
    bad = rows(4)
    bad[2]["answer"] = ""
    bad[3]["colour"] = "blue"
    resp = httpx.post(f"{api.url}/v1/problems", json=bad)
    assert resp.status_code == 422
    detail = resp.json()["detail"]
    assert [(d["row"], d["field"]) for d in detail] == [(2, "answer"), (3, "colour")]
    assert all(d["message"] for d in detail)
    assert count(api) == 0  # rows 0, 1 were valid but nothing of the request is stored


@pytest.mark.parametrize("body", [[], {"prompt": "x", "answer": "1"}, "text", [1]])
def test_an_empty_list_or_a_non_list_body_is_422(api: Api, body: Any) -> None:
    resp = httpx.post(f"{api.url}/v1/problems", json=body)
    assert resp.status_code == 422, resp.text
    assert resp.json()["detail"][0]["message"]
    assert count(api) == 0


def test_posting_requires_the_bearer_token_when_configured(redis_url: str, keys: Keys, tmp_path: Path) -> None:
    with serving(redis_url, keys, RolloutArchive(tmp_path / "a.jsonl"), token="t0k") as api:
        assert httpx.post(f"{api.url}/v1/problems", json=rows(1)).status_code == 401
        wrong = {"Authorization": "Bearer nope"}
        assert httpx.post(f"{api.url}/v1/problems", json=rows(1), headers=wrong).status_code == 401
        assert count(api) == 0
        right = {"Authorization": "Bearer t0k"}
        assert httpx.post(f"{api.url}/v1/problems", json=rows(1), headers=right).status_code == 201
        assert count(api) == 1
        # Refused at the door, before its body is read or parsed: a body that is not JSON
        # is a 401 too, not the 422 parsing it would give.
        garbage = {"Content-Type": "application/json"}
        assert httpx.post(f"{api.url}/v1/problems", content=b"[{", headers=garbage).status_code == 401
        assert httpx.post(f"{api.url}/v1/problems", content=b"[{", headers={**garbage, **right}).status_code == 422


async def test_get_problem_shows_per_variant_counts(api: Api, aredis: Redis, keys: Keys) -> None:
    async with httpx.AsyncClient(base_url=api.url) as http:
        [pid] = (await http.post("/v1/problems", json=rows(1))).json()["ids"]
        zero = {"attempts": 0, "solves": 0}
        assert (await http.get(f"/v1/problems/{pid}")).json()["stats"] == {"hinted": zero, "unhinted": zero}

        store = ProblemStore(aredis, keys)
        hinted = ScoredGroup.from_raw(
            group("g1", pid, Variant.HINTED, size=4), [Score(reward=1.0)] * 3 + [Score(reward=0.0)]
        )
        unhinted = ScoredGroup.from_raw(group("g2", pid, Variant.UNHINTED, size=2), [Score(reward=0.0)] * 2)
        async with aredis.pipeline(transaction=True) as pipe:
            store.queue_record(pipe, hinted)
            store.queue_record(pipe, unhinted)
            store.queue_record(pipe, hinted)
            await pipe.execute()

        stats = (await http.get(f"/v1/problems/{pid}")).json()["stats"]
        assert stats == {"hinted": {"attempts": 8, "solves": 6}, "unhinted": {"attempts": 2, "solves": 0}}
        assert await store.stats(pid) == stats


def test_unknown_problem_is_404(api: Api) -> None:
    resp = httpx.get(f"{api.url}/v1/problems/p-nope")
    assert resp.status_code == 404 and "p-nope" in resp.json()["detail"]


def fill_archive(archive: RolloutArchive) -> None:
    for n in range(12):
        variant = Variant.HINTED if n % 2 else Variant.UNHINTED
        raw = group(f"g{n}", f"p{n % 3}", variant, size=2, version=n // 4, step=n)
        archive.append(RolloutRecord.from_group(ScoredGroup.from_raw(raw, [Score(reward=1.0), Score(reward=0.0)])))


def fetch_all(api: Api, **params: Any) -> list[list[dict[str, Any]]]:
    pages, cursor = [], None
    while True:
        query = {**params, **({"cursor": cursor} if cursor else {})}
        resp = httpx.get(f"{api.url}/v1/rollouts", params=query)
        assert resp.status_code == 200, resp.text
        body = resp.json()
        pages.append(body["rollouts"])
        cursor = body["next_cursor"]
        if cursor is None:
            return pages


def test_rollouts_page_newest_first_with_filters(api: Api) -> None:
    assert httpx.get(f"{api.url}/v1/rollouts").json() == {"rollouts": [], "next_cursor": None}
    fill_archive(api.archive)
    pages = fetch_all(api, limit=5)
    assert [len(p) for p in pages] == [5, 5, 5, 5, 4]
    seen = [(r["group_id"], r["sample_index"]) for p in pages for r in p]
    assert seen == [(f"g{n}", i) for n in range(11, -1, -1) for i in (1, 0)]

    hinted_p1 = [r for p in fetch_all(api, limit=1, problem_id="p1", variant="hinted") for r in p]
    assert [r["step"] for r in hinted_p1] == [7, 7, 1, 1]
    v2 = [r for p in fetch_all(api, limit=3, weight_version=2) for r in p]
    assert sorted({r["step"] for r in v2}) == [8, 9, 10, 11] and len(v2) == 8


@pytest.mark.parametrize("params", [{"limit": 0}, {"limit": 1001}, {"variant": "sideways"}, {"weight_version": -1}])
def test_rollouts_bad_query_is_422(api: Api, params: dict[str, Any]) -> None:
    assert httpx.get(f"{api.url}/v1/rollouts", params=params).status_code == 422


def test_rollouts_bad_cursor_is_422_or_finds_no_page(api: Api) -> None:
    """Not base64url: refused by the query's pattern; not one of ours: no page there (404)."""
    fill_archive(api.archive)
    assert httpx.get(f"{api.url}/v1/rollouts", params={"cursor": "garbage!"}).status_code == 422
    resp = httpx.get(f"{api.url}/v1/rollouts", params={"cursor": "garbage"})
    assert resp.status_code == 404 and "malformed cursor" in resp.json()["detail"]


def test_the_rollout_service_answers_unreadable_bodies_in_the_row_error_shape(
    redis_url: str, keys: Keys, tmp_path: Path
) -> None:
    from tests.conftest import running_pope

    env = {
        "REDIS_URL": redis_url,
        "POPE_ROLLOUT__KEY_PREFIX": keys.prefix,
        "POPE_ROLLOUT__SCHEDULE": "false",
        "POPE_ROLLOUT__ARCHIVE_DIR": str(tmp_path / "archive"),
    }
    with running_pope(["rollout"], "/readyz", env) as proc:
        resp = httpx.post(
            f"{proc.url}/v1/problems",
            content=b'[{"prompt": "x", ',
            timeout=10,
            headers={"Content-Type": "application/json"},
        )
        assert resp.status_code == 422
        [error] = resp.json()["detail"]
        assert error["row"] is None and error["message"].startswith("the body is not valid JSON")
        status = httpx.get(f"{proc.url}/v1/status", timeout=10).json()
        assert status["rollout"]["waiting_for"] == "scheduler disabled" and "planner" not in status["rollout"]
        # Every 422 of POST /v1/problems has the row-error shape, a bad query's too.
        resp = httpx.post(f"{proc.url}/v1/problems", params={"allow_leakage": "maybe"}, json=rows(1), timeout=10)
        assert resp.status_code == 422 and resp.json()["detail"][0]["field"] == "query.allow_leakage"
        # The history is bounded (a huge one was a 500).
        for history in (10**9, -1, "x"):
            resp = httpx.get(f"{proc.url}/v1/status", params={"history": history}, timeout=10)
            assert resp.status_code == 422 and resp.json()["detail"][0]["loc"] == ["query", "history"]
        assert httpx.get(f"{proc.url}/v1/status", params={"history": 1000}, timeout=10).json()["history"] == []


def test_reads_need_the_token_when_locked_and_probes_stay_open(redis_url: str, keys: Keys, tmp_path: Path) -> None:
    with serving(redis_url, keys, RolloutArchive(tmp_path / "a.jsonl"), token="t0k", reads_locked=True) as api:
        for path in ("/v1/problems", "/v1/problems/nope", "/v1/rollouts"):
            resp = httpx.get(f"{api.url}{path}")
            assert resp.status_code == 401, (path, resp.text)
            assert resp.headers["www-authenticate"] == "Bearer"
        # The scheme's name in any case (RFC 6750 via RFC 7235); the token itself exactly.
        for scheme in ("Bearer", "bearer", "BEARER"):
            assert httpx.get(f"{api.url}/v1/problems", headers={"Authorization": f"{scheme} t0k"}).status_code == 200
        assert httpx.get(f"{api.url}/v1/problems", headers={"Authorization": "Bearer T0K"}).status_code == 401
        assert httpx.get(f"{api.url}/v1/problems", headers={"Authorization": "Basic t0k"}).status_code == 401
        assert httpx.get(f"{api.url}/openapi.json").status_code == 200  # the API's description is open
        # What no route serves is its 405 or 404, token or not.
        assert httpx.put(f"{api.url}/v1/problems").status_code == 405
        assert httpx.post(f"{api.url}/v1/nothing").status_code == 404
        ops = httpx.get(f"{api.url}/openapi.json").json()["paths"]
        assert all(
            op["security"] == [{"bearer": []}] and "401" in op["responses"] for p in ops.values() for op in p.values()
        )


def test_a_body_over_the_limit_is_refused_before_it_is_read(api: Api) -> None:
    limit = RolloutSettings().max_body_bytes
    body = b"[" + b'"x",' * (limit // 4) + b'"x"]'
    resp = httpx.post(f"{api.url}/v1/problems", content=body, headers={"Content-Type": "application/json"})
    assert resp.status_code == 413, resp.text
    assert "max_body_bytes" in resp.json()["detail"]

    def chunks() -> Iterator[bytes]:  # no Content-Length: counted as it arrives
        yield b"["
        for _ in range(limit // 4000 + 1):
            yield b'"xx",' * 1000
        yield b'"x"]'

    resp = httpx.post(f"{api.url}/v1/problems", content=chunks(), headers={"Content-Type": "application/json"})
    assert resp.status_code == 413, resp.text
    assert count(api) == 0


def test_a_nan_in_a_refused_body_is_a_422_not_a_500(api: Api) -> None:
    resp = httpx.post(
        f"{api.url}/v1/problems",
        content=b'[{"prompt": NaN, "answer": Infinity}]',
        headers={"Content-Type": "application/json"},
    )
    assert resp.status_code == 422, resp.text
    assert count(api) == 0


def test_rollouts_filter_by_step_and_reward(api: Api) -> None:
    fill_archive(api.archive)
    at_step = [r for p in fetch_all(api, limit=2, step=5) for r in p]
    assert [(r["group_id"], r["sample_index"]) for r in at_step] == [("g5", 1), ("g5", 0)]
    solved = [r for p in fetch_all(api, limit=7, min_reward=0.5) for r in p]
    assert len(solved) == 12 and {r["reward"] for r in solved} == {1.0}
    failed = [r for p in fetch_all(api, max_reward=0.0, variant="hinted") for r in p]
    assert len(failed) == 6 and {r["reward"] for r in failed} == {0.0}
    assert fetch_all(api, min_reward=0.5, max_reward=0.7) == [[]]
    assert fetch_all(api, min_reward=1, max_reward=0) == [[]]  # an empty range, answered without a scan
    for bad in ({"min_reward": -0.1}, {"max_reward": 1.5}, {"step": -1}, {"min_reward": "nan"}):
        assert httpx.get(f"{api.url}/v1/rollouts", params=bad).status_code == 422, bad


def test_an_archived_hinted_sample_carries_its_hint(api: Api) -> None:
    shown = {"prompt": "Q?\n\nPartial solution:\nHINT", "hint": "HINT"}
    raw = RawGroup.model_validate({**dict(group("gh", "p1", Variant.HINTED)), **shown})
    api.archive.append(RolloutRecord.from_group(ScoredGroup.from_raw(raw, [Score(reward=1.0)] * 2)))
    [record, _] = httpx.get(f"{api.url}/v1/rollouts").json()["rollouts"]
    assert record["hint"] == "HINT" and record["prompt"].endswith(record["hint"])


async def test_the_transfer_table_counts_each_variant_and_its_first_solve(api: Api, aredis: Redis, keys: Keys) -> None:
    solution = "Add the numbers: 2 and 2 make 4, so the answer is 4."
    posted = [
        {"prompt": "What is 2+2?", "answer": "4", "solution": solution, "hint": solution[:13], "label": "hard_hinted"},
        {"prompt": "What is 3+3?", "answer": "6"},
        {"prompt": "What is 4+4?", "answer": "8", "split": "eval"},
    ]
    async with httpx.AsyncClient(base_url=api.url) as http:
        ids = (await http.post("/v1/problems", json=posted)).json()["ids"]
        store = ProblemStore(aredis, keys)

        def scored(gid: str, variant: Variant, step: int, rewards: list[float]) -> ScoredGroup:
            raw = group(gid, ids[0], variant, size=len(rewards), step=step)
            return ScoredGroup.from_raw(raw, [Score(reward=r) for r in rewards])

        # Scored out of order: the first solve is the earliest step's, whenever it lands.
        for g in (
            scored("h1", Variant.HINTED, 3, [1.0, 0.0]),
            scored("u1", Variant.UNHINTED, 2, [0.0, 0.0]),
            scored("h0", Variant.HINTED, 1, [0.0, 1.0]),
            scored("u3", Variant.UNHINTED, 9, [1.0, 0.0]),
            scored("u2", Variant.UNHINTED, 6, [0.0, 1.0]),
            scored("h2", Variant.HINTED, 0, [0.0, 0.0]),  # earlier, but it solved nothing
        ):
            async with aredis.pipeline(transaction=True) as pipe:
                store.queue_record(pipe, g)
                await pipe.execute()

        table = (await http.get("/v1/transfer")).json()
        assert table["count"] == 3 and table["next_offset"] is None
        rows = {r["id"]: r for r in table["rows"]}
        first = rows[ids[0]]
        assert first["hinted"] == {"attempts": 6, "solves": 2, "first_solve_step": 1}
        assert first["unhinted"] == {"attempts": 6, "solves": 2, "first_solve_step": 6}
        assert first["label"] == "hard_hinted" and first["hint_chars"] == 13
        assert first["hint_fraction"] == pytest.approx(13 / len(solution)) and first["hint_fraction_of"] == "chars"
        never = {"attempts": 0, "solves": 0, "first_solve_step": None}
        assert rows[ids[1]]["hinted"] == never and rows[ids[1]]["unhinted"] == never
        assert rows[ids[1]]["hint_fraction"] is None

        # Filtered and paged like GET /v1/problems.
        evals = (await http.get("/v1/transfer", params={"split": "eval"})).json()
        assert [r["id"] for r in evals["rows"]] == [ids[2]]
        page = (await http.get("/v1/transfer", params={"limit": 2})).json()
        assert len(page["rows"]) == 2 and page["next_offset"] == 2
        assert (await http.get("/v1/transfer", params={"limit": 0})).status_code == 422

        # A deleted problem's counts and first solves go with it.
        assert (await http.delete(f"/v1/problems/{ids[0]}")).status_code == 204
        zeros = {"attempts": 0, "solves": 0, "first_solve_step": None}
        assert vars((await store.stats_many([ids[0]]))[ids[0]]["hinted"]) == zeros
        assert await aredis.zcard(keys.first_solves) == 0
