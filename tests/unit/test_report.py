"""The run and experiment reports: files, plots, numbers in the HTML and the markdown table."""

import html
import json
import math
from pathlib import Path
from typing import Any

from experiments.report import experiment_report, experiment_table, run_report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def evaluation(unhinted: tuple[float, float], hinted: tuple[float, float] | None = None, k: int = 8) -> dict[str, Any]:
    """An EvalReport dump (model_dump(mode="json")) with the given (pass@1, pass@k) per variant."""

    def row(p1: float, pk: float) -> dict[str, float]:
        return {
            "problems": 20.0,
            "samples": 160.0,
            "pass@1": p1,
            f"pass@{k}": pk,
            "response_tokens_mean": 61.5,
            "truncated_frac": 0.0125,
        }

    summary = {"unhinted": row(*unhinted)}
    if hinted is not None:
        summary["hinted"] = row(*hinted)
    settings = {"split": "eval", "k": k, "temperature": 0.8, "top_p": 0.95, "max_new_tokens": 256}
    return {
        "split": "eval",
        "k": k,
        "weight_versions": [0],
        "settings": settings,
        "summary": summary,
        "problems": [],
        "seconds": 12.5,
    }


def run_data(after_unhinted_pk: float, title: str = "POPE run <b>seed 1</b>") -> dict[str, Any]:
    metrics: list[dict[str, Any]] = []
    for step in range(1, 13):
        m: dict[str, Any] = {
            "step": step,
            "loss": 0.1,
            "entropy": 0.5,
            "reward_unhinted": 0.02 * (step % 3),
            "unhinted/solve_rate": 0.1 * (step % 2),
            "reward_hinted": 0.3 + 0.02 * step,
            "hinted/solve_rate": 0.6,
        }
        metrics.append(m)
    metrics[3]["reward_hinted"] = math.nan  # a step without a hinted group
    metrics[3]["hinted/solve_rate"] = math.nan
    del metrics[5]["reward_unhinted"], metrics[5]["unhinted/solve_rate"]  # an older log line without them
    return {
        "title": title,
        "task": "link-chains-v11",
        "arm": "pope",
        "seed": 1,
        "steps": 12,
        "rollouts": 3072,
        "wall_s": 754.0,
        "base_model": "tiny-chains-base",
        "settings": {"lr": 1e-6, "group": 8, "note": "a<b"},
        "before": evaluation((0.05, 0.25), (0.40, 0.80)),
        "after": evaluation((0.07, after_unhinted_pk), (0.55, 0.9)),
        "metrics": metrics,
        "hints": {"counts": {"found": 14, "none": 6}, "hint_fraction_mean": 0.18},
    }


def assert_png(path: Path) -> None:
    data = path.read_bytes()
    assert data.startswith(PNG_MAGIC)
    assert len(data) > 1024


def test_run_report_files_numbers_and_escaping(tmp_path: Path) -> None:
    data = run_data(after_unhinted_pk=0.35)
    out = run_report(tmp_path / "run", data)

    assert out == tmp_path / "run" / "report.html"
    assert_png(tmp_path / "run" / "training.png")
    assert_png(tmp_path / "run" / "passk.png")
    assert json.loads((tmp_path / "run" / "report.json").read_text())["rollouts"] == 3072
    page = out.read_text()
    assert '<img src="training.png"' in page and '<img src="passk.png"' in page
    assert "rose from 0.250 to 0.350" in page and "did not rise" not in page
    assert "already solved some of them unhinted (pass@8 0.250)" in page  # the base was not at zero
    # before/after table: variant, pass@1 before/after, pass@8 before/after
    assert "<td>unhinted</td><td>0.050</td><td>0.070</td><td>0.250</td><td>0.350</td>" in page
    assert "<td>hinted</td><td>0.400</td><td>0.550</td><td>0.800</td><td>0.900</td>" in page
    assert "<th>pass@8 before</th>" in page
    # mean hinted reward skips the NaN step: mean of 0.3 + 0.02 * step over steps != 4
    hinted = [0.3 + 0.02 * s for s in range(1, 13) if s != 4]
    assert f"{sum(hinted) / len(hinted):.3f} in hinted groups" in page
    assert "18.0% of the solution" in page and "<td>found</td><td>14</td>" in page
    assert "&lt;b&gt;seed 1&lt;/b&gt;" in page and "<b>seed 1</b>" not in page
    assert "<td>a&lt;b</td>" in page
    assert "<script" not in page and "<link" not in page  # self-contained


def test_run_report_says_when_pass_at_k_did_not_rise(tmp_path: Path) -> None:
    data = run_data(after_unhinted_pk=0.25)  # equal to before
    data["hints"] = None
    data["after"]["summary"].pop("hinted")
    page = run_report(tmp_path, data).read_text()
    assert html.escape("did not rise (0.250 -> 0.250)") in page and "rose from" not in page
    assert "<td>hinted</td><td>0.400</td><td>-</td><td>0.800</td><td>-</td>" in page
    assert "No hint search summary." in page


def test_run_report_says_nothing_of_reach_when_the_base_solved_none(tmp_path: Path) -> None:
    data = run_data(after_unhinted_pk=0.10)
    data["before"] = evaluation((0.0, 0.0), (0.40, 0.80))
    page = run_report(tmp_path, data).read_text()
    assert "rose from 0.000 to 0.100" in page and "already solved" not in page


def experiment_data() -> dict[str, Any]:
    runs = [
        {
            "arm": "pope",
            "seed": 2,
            "status": "done",
            "rollouts": 3000,
            "wall_s": 600.0,
            "after": evaluation((0.10, 0.40), (0.50, 0.90)),
        },
        {
            "arm": "pope",
            "seed": 1,
            "status": "done",
            "rollouts": 3100,
            "wall_s": 660.0,
            "after": evaluation((0.12, 0.50)),
        },  # hinted not evaluated
        {
            "arm": "grpo",
            "seed": 1,
            "status": "done",
            "rollouts": 2900,
            "wall_s": 540.0,
            "after": evaluation((0.06, 0.30), (0.45, 0.85)),
        },
        {"arm": "grpo", "seed": 2, "status": "pending", "rollouts": 0, "wall_s": 0.0, "after": None},
    ]
    return {
        "title": "POPE vs GRPO <i>v2</i>",
        "task": "link-chains-v11",
        "base_model": "tiny-chains-base",
        "settings": {"steps": 40},
        "k": 8,
        "base": evaluation((0.05, 0.25), (0.40, 0.80)),
        "arms": ["pope", "grpo"],
        "runs": runs,
    }


def test_experiment_table_rows_and_means() -> None:
    rows = [
        [c.strip() for c in line.strip("|").split("|")] for line in experiment_table(experiment_data()).splitlines()
    ]
    assert rows[0] == [
        "arm",
        "seed",
        "unhinted pass@1",
        "unhinted pass@8",
        "hinted pass@1",
        "hinted pass@8",
        "rollouts",
        "wall min",
    ]
    body = rows[2:]
    assert body[0] == ["base", "-", "0.050", "0.250", "0.400", "0.800", "0", "-"]
    assert body[1] == ["pope", "1", "0.120", "0.500", "-", "-", "3100", "11.0"]
    assert body[2] == ["pope", "2", "0.100", "0.400", "0.500", "0.900", "3000", "10.0"]
    # mean over both seeds; hinted only over the seed that has it
    assert body[3] == ["pope", "n=2", "0.110", "0.450", "0.500", "0.900", "3050", "10.5"]
    assert math.isclose(float(body[3][3]), (0.40 + 0.50) / 2)
    assert body[4] == ["grpo", "1", "0.060", "0.300", "0.450", "0.850", "2900", "9.0"]
    assert body[5] == ["grpo", "n=1", "0.060", "0.300", "0.450", "0.850", "2900", "9.0"]
    assert len(body) == 6  # the pending run has no row


def test_experiment_report_files(tmp_path: Path) -> None:
    data = experiment_data()
    out = experiment_report(tmp_path, data)
    assert out == tmp_path / "report.html"
    assert_png(tmp_path / "arms.png")
    assert (tmp_path / "table.md").read_text() == experiment_table(data)
    assert json.loads((tmp_path / "results.json").read_text())["arms"] == ["pope", "grpo"]
    page = out.read_text()
    assert "<td>pope</td><td>n=2</td><td>0.110</td><td>0.450</td>" in page
    assert '<img src="arms.png"' in page
    assert "<li>grpo seed 2: pending</li>" in page
    assert "&lt;i&gt;v2&lt;/i&gt;" in page and "<i>v2</i>" not in page
    assert "<td>steps</td><td>40</td>" in page
