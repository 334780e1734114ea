"""The dashboard in headless Chromium against a real `pope up` run (the CPU engine, the
verifier, the trainer): it loads with no console error, every chart has data points, the
problems table sorts and filters, the inspector shows a hinted prompt with its hint
marked, and the page moves on when the trainer steps. Screenshots: ``artifacts``."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import httpx

from services.common.keys import Keys
from tests.browser.conftest import PageWatch
from tests.e2e.test_pope_up import PROBLEMS, run_pope_up

CHARTS = [
    "chart-reward",
    "chart-solved",
    "chart-zero-variance",
    "chart-eval",
    "chart-throughput",
    "chart-groups",
    "chart-staleness",
    "chart-step-time",
]


def column(page: Any, index: int) -> list[str]:
    """The text of one column of the problems table, top to bottom."""
    cells = f"rows => rows.map(r => r.cells[{index}].textContent)"
    return list(page.eval_on_selector_all("#problems-table tbody tr", cells))


def wait_above(page: Any, element: str, field: str, value: int, timeout_s: float = 30) -> None:
    """Until ``data-<field>`` of element ``#<element>`` is a number above ``value``."""
    check = f"() => Number(document.getElementById('{element}').dataset.{field}) > {value}"
    page.wait_for_function(check, timeout=timeout_s * 1000)


def test_the_dashboard_follows_a_pope_up_run(
    watched: PageWatch, tiny_model: Path, tmp_path: Path, redis_url: str, keys: Keys, artifacts: Path
) -> None:
    def on_the_page(api: str, proc: subprocess.Popen[bytes], log: Path) -> None:
        page = watched.page
        page.goto(api)
        for chart in CHARTS:  # the eval chart needs the step-0 evaluation: up to a minute
            wait_above(page, chart, "points", 0, timeout_s=120)
        page.wait_for_selector("#engines-table tbody tr[data-url]")
        page.screenshot(path=str(artifacts / "run-loaded.png"), full_page=True)

        # Every engine of the registry, with the weights it serves.
        engines = httpx.get(f"{api}/v1/status", timeout=10).json()["engine"]["engines"]
        shown = page.eval_on_selector_all("#engines-table tbody tr[data-url]", "rows => rows.map(r => r.dataset.url)")
        assert sorted(shown) == sorted(e["url"] for e in engines) and shown

        # The problems table: every problem, sortable by a column, filterable.
        every = f"() => document.querySelectorAll('#problems-table tbody tr').length === {len(PROBLEMS)}"
        page.wait_for_function(every)
        page.click('#problems-table th[data-key="unhinted_attempts"]')
        ascending = [int(x.replace(",", "")) for x in column(page, 7)]
        assert ascending == sorted(ascending) and ascending[-1] > 0
        assert page.get_attribute('#problems-table th[data-key="unhinted_attempts"]', "aria-sort") == "ascending"
        page.click('#problems-table th[data-key="unhinted_attempts"]')
        assert [int(x.replace(",", "")) for x in column(page, 7)] == sorted(ascending, reverse=True)
        page.select_option("#problems-split", "eval")
        assert column(page, 3) == ["eval"]
        page.select_option("#problems-split", "")
        page.fill("#problems-filter", "7^2")
        [only] = page.eval_on_selector_all("#problems-table tbody tr", "rows => rows.map(r => r.title)")
        assert only == "Compute $7^2$."
        page.fill("#problems-filter", "")

        # The inspector: a hinted rollout, its hint marked inside its prompt.
        page.select_option("#f-variant", "hinted")
        page.click("#f-apply")
        page.wait_for_selector('#rollouts-table tbody tr[data-variant="hinted"]')
        page.click('#rollouts-table tbody tr[data-variant="hinted"]')
        page.wait_for_selector("#rollout-detail mark.hint")
        hint = page.text_content("#rollout-detail mark.hint")
        assert hint in {p["hint"] for p in PROBLEMS if "hint" in p}
        assert hint in (page.text_content("#rollout-detail pre.prompt") or "")
        page.screenshot(path=str(artifacts / "run-inspector.png"), full_page=True)

        # Paging through the archive (every variant): an older page, then back.
        page.click("#f-clear")
        page.wait_for_selector("#page-older:not([disabled])", timeout=120_000)
        page.uncheck("#live")  # hold the newest page still while comparing
        keys_of = "rows => rows.map(r => r.dataset.key)"
        first = page.eval_on_selector_all("#rollouts-table tbody tr[data-key]", keys_of)
        page.click("#page-older")
        page.wait_for_selector("#page-number:has-text('page 2')")
        older = page.eval_on_selector_all("#rollouts-table tbody tr[data-key]", keys_of)
        assert older and not set(older) & set(first)
        page.click("#page-newer")  # the newest page again, which the run may have moved on since
        page.wait_for_selector("#page-number:has-text('page 1')")
        again = page.eval_on_selector_all("#rollouts-table tbody tr[data-key]", keys_of)
        assert again and not set(again) & set(older)
        page.check("#live")

        # Live: the trainer steps and the page follows, its curves with it.
        step = int(page.get_attribute("#overview", "data-step") or 0)
        points = int(page.get_attribute("#chart-reward", "data-points") or 0)
        wait_above(page, "overview", "step", step, timeout_s=180)
        wait_above(page, "chart-reward", "points", points)
        page.screenshot(path=str(artifacts / "run-updated.png"), full_page=True)

        assert watched.errors == [], watched.errors
        assert watched.dialogs == []

    run_pope_up(tiny_model, tmp_path, redis_url, keys, while_running=on_the_page)
