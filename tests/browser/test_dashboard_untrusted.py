"""The dashboard against a real rollout service whose reads need the token: the page asks
for it and keeps it out of every URL, and markup and script in a problem, a hint and a
completion show as text and never run."""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import redis
from fastapi import FastAPI
from redis.asyncio import Redis

from services.common.keys import Keys
from services.common.messages import RawGroup, Score, ScoredGroup, TrainerControl, Variant, encode
from services.common.streams import DATA
from services.rollout.service import create_app
from tests.browser.conftest import PageWatch
from tests.conftest import app_in_thread
from tests.factories import sample
from tests.integration.test_dashboard_routes import locked_settings

TOKEN = "dashboard-test-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}

# Each would set window.__pwned (or open an alert) if the page ever parsed it as markup.
PROBLEM = 'Compute 2+2. <img src=x onerror="window.__pwned=1"><script>window.__pwned=2</script>'
HINT = "<b onmouseover=alert(3)>bold</b> <svg onload=window.__pwned=4></svg> step one"
COMPLETION = "<script>window.__pwned=5</script><iframe srcdoc='<script>parent.__pwned=6</script>'></iframe> \\boxed{4}"
ANSWER = "<u>4</u><img src=y onerror=window.__pwned=7>"


@contextlib.contextmanager
def rollout_service(redis_url: str, keys: Keys, tmp_path: Path) -> Iterator[str]:
    settings = locked_settings(redis_url, keys, tmp_path, TOKEN)

    def build(_: Redis) -> FastAPI:
        return create_app(settings)

    with app_in_thread(redis_url, build) as url:
        yield url


def hostile_group(problem_id: str) -> ScoredGroup:
    prompt = f"{PROBLEM}\n\nPartial solution:\n{HINT}"
    samples = [sample(problem_id, Variant.HINTED).model_copy(update={"text": COMPLETION}) for _ in range(2)]
    raw = RawGroup(
        group_id="g-hostile",
        problem_id=problem_id,
        variant=Variant.HINTED,
        prompt=prompt,
        hint=HINT,
        answer="4",
        samples=samples,
        weight_version=0,
        step=3,
        temperature=1.0,
    )
    return ScoredGroup.from_raw(raw, [Score(reward=1.0, extracted=ANSWER), Score(reward=0.0)])


def test_hostile_text_shows_as_text_and_the_token_stays_out_of_urls(
    watched: PageWatch, redis_url: str, keys: Keys, tmp_path: Path, artifacts: Path
) -> None:
    with rollout_service(redis_url, keys, tmp_path) as url:
        posted = [{"prompt": PROBLEM, "answer": "4", "solution": f"{HINT} then add", "hint": HINT}]
        resp = httpx.post(f"{url}/v1/problems", json=posted, headers=AUTH, timeout=30)
        assert resp.status_code == 201, resp.text
        [pid] = resp.json()["ids"]

        # Into pope:scored, as the verifier delivers (the sync client: Playwright's sync API
        # holds an event loop on this thread).
        with redis.Redis.from_url(redis_url) as client:
            client.xadd(keys.scored, {DATA: encode(hostile_group(pid))})
        archived = poll(lambda: httpx.get(f"{url}/v1/rollouts", headers=AUTH).json()["rollouts"])
        assert archived[0]["text"] == COMPLETION  # stored as sent

        page = watched.page
        page.goto(url)
        # Reads need the token: the page asks for it. A wrong one is refused and asked again.
        page.wait_for_selector("#token-dialog[open]")
        page.fill("#token-input", "not-the-token")
        page.click("#token-submit")
        page.wait_for_selector("#token-error:not([hidden])")
        assert "refused" in page.text_content("#token-error")
        page.fill("#token-input", TOKEN)
        page.click("#token-submit")
        page.wait_for_selector(f'#problems-table tbody tr[data-id="{pid}"]')
        assert page.evaluate("sessionStorage.getItem('pope-rl-token')") == TOKEN

        # The hostile row in the problems table, and its rollout in the inspector.
        page.click(f'#problems-table tbody tr[data-id="{pid}"]')
        page.wait_for_selector('#rollouts-table tbody tr[data-variant="hinted"]')
        page.click('#rollouts-table tbody tr[data-key="g-hostile/0"]')
        page.wait_for_selector("#rollout-detail mark.hint")
        page.hover("#rollout-detail mark.hint")  # an onmouseover, were it markup
        page.wait_for_timeout(500)
        page.screenshot(path=str(artifacts / "untrusted-text.png"), full_page=True)

        assert page.text_content("#rollout-detail mark.hint") == HINT
        assert page.text_content("#rollout-detail pre.prompt") == f"{PROBLEM}\n\nPartial solution:\n{HINT}"
        assert page.text_content("#rollout-detail pre.completion") == COMPLETION
        assert ANSWER in page.text_content("#rollout-detail dl")
        assert ANSWER in page.text_content('#rollouts-table tbody tr[data-key="g-hostile/0"]')
        assert PROBLEM[:60] in (page.get_attribute(f'#problems-table tbody tr[data-id="{pid}"]', "title") or "")
        # Its row: the hint's share of the solution, and the step of its first (hinted) solve.
        cells = page.eval_on_selector_all(
            f'#problems-table tbody tr[data-id="{pid}"] td', "cs => cs.map(c => c.textContent)"
        )
        share = f"{round(100 * len(HINT) / len(HINT + ' then add'))}%"
        assert cells[4] == share and cells[5:11] == ["2", "1", "0", "0", "3", "–"], cells
        # Nothing of it became an element, and nothing ran.
        made = page.evaluate(
            "['script', 'img', 'iframe', 'svg b', 'b', 'u'].map(s => document.querySelectorAll('main ' + s).length)"
        )
        svg_charts = page.evaluate("document.querySelectorAll('main figure > svg').length")
        assert made[:2] == [0, 0] and made[2:] == [0, 0, 0, 0], made
        assert svg_charts == 8  # the charts' own SVGs, and no other
        assert page.evaluate("document.querySelectorAll('main svg').length") == svg_charts
        assert page.evaluate("window.__pwned") is None
        assert watched.dialogs == []
        # The one error the page logged is the browser's own line for the wrong token's 401
        # (the page reads from /openapi.json that reads need a token, and asks before reading).
        assert len(watched.errors) == 1 and "401" in watched.errors[0], watched.errors

        # The token went in a header, never in a URL.
        api_calls = [r for r in watched.requests if "/v1/" in r.url]
        assert api_calls and all(TOKEN not in r.url for r in watched.requests)
        assert all(r.headers.get("authorization") == f"Bearer {TOKEN}" for r in api_calls[-5:])
        assert TOKEN not in page.url


def poll(read: Any, within_s: float = 20.0) -> Any:
    deadline = time.monotonic() + within_s
    while not (found := read()):
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.2)
    return found


def test_the_curves_show_each_step_once_after_a_trainer_resumed(
    watched: PageWatch, redis_url: str, keys: Keys, tmp_path: Path
) -> None:
    """A trainer that resumed from step 3 pushes steps 4.. again, while its abandoned 4 and 5
    stay deeper in the history: the charts show steps 1-4, with 4's new values."""

    def row(step: int, reward: float) -> str:
        return json.dumps({"step": step, "at": 0.0, "hinted/reward_mean": reward, "unhinted/reward_mean": reward / 2})

    with rollout_service(redis_url, keys, tmp_path) as url, redis.Redis.from_url(redis_url) as client:
        abandoned = [row(1, 0.1), row(2, 0.2), row(3, 0.3), row(4, 0.4), row(5, 0.5)]
        client.lpush(keys.history("trainer"), *abandoned, row(4, 0.9))  # LPUSH: the last is the newest
        client.set(keys.state("trainer"), encode(TrainerControl(version=4, buffered=0, instance="trainer")))
        page = watched.page
        page.goto(url)
        page.fill("#token-input", TOKEN)
        page.click("#token-submit")
        page.wait_for_function("() => Number(document.getElementById('chart-reward').dataset.points) > 0")
        hinted = page.eval_on_selector_all(
            '#chart-reward g.points[data-series="hinted"] title', "ts => ts.map(t => t.textContent)"
        )
        assert hinted == ["hinted @ 1: 0.100", "hinted @ 2: 0.200", "hinted @ 3: 0.300", "hinted @ 4: 0.900"]
        assert page.get_attribute("#overview", "data-step") == "4"
        assert watched.errors == [], watched.errors
