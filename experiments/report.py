"""Self-contained HTML reports, with PNG plots and JSON, of a POPE run and of the POPE-vs-GRPO experiment.

    run_report(out_dir, data)         -> report.html, report.json, training.png, passk.png
    experiment_report(out_dir, data)  -> report.html, results.json, table.md, arms.png

Inputs are plain dicts (``EvalReport.model_dump(mode="json")`` and the trainer's metric
lines), so a finished run can be re-rendered from its files alone. Every string from the
data is escaped with ``html.escape``; the pages link nothing but the PNGs beside them.
matplotlib is imported inside the plotting functions, which draw on an Agg canvas of their
own (never pyplot), so importing this module stays cheap and the global backend is untouched.
"""

from __future__ import annotations

import html
import json
import math
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from matplotlib.figure import Figure

VARIANTS = ("unhinted", "hinted")
COLORS = {"unhinted": "tab:blue", "hinted": "tab:orange"}
CSS = (
    "body{font-family:sans-serif;max-width:62rem;margin:2rem auto;padding:0 1rem;color:#222}"
    "table{border-collapse:collapse;margin:1rem 0}td,th{border:1px solid #ccc;padding:.25rem .6rem;"
    "text-align:right}td:first-child,th:first-child{text-align:left}img{max-width:100%}"
)


def _num(x: Any) -> float | None:
    """x as a float; None when missing or not finite (NaN marks a step without that variant)."""
    if isinstance(x, bool) or not isinstance(x, int | float) or not math.isfinite(x):
        return None
    return float(x)


def _fmt(x: float | None, spec: str = ".3f") -> str:
    return "-" if x is None else format(x, spec)


def _stat(report: dict[str, Any] | None, variant: str, name: str) -> float | None:
    """One number of an EvalReport dump's summary; None when the report or variant is absent."""
    return None if report is None else _num(report.get("summary", {}).get(variant, {}).get(name))


def _mean(xs: Iterable[float | None]) -> float | None:
    vals = [x for x in xs if x is not None]
    return sum(vals) / len(vals) if vals else None


def _table(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    def tr(cells: Sequence[Any], tag: str) -> str:
        return "<tr>" + "".join(f"<{tag}>{html.escape(str(c))}</{tag}>" for c in cells) + "</tr>"

    return "<table>\n" + "\n".join([tr(header, "th"), *(tr(r, "td") for r in rows)]) + "\n</table>"


def _settings(settings: dict[str, Any]) -> str:
    rows = [(k, v if isinstance(v, str) else json.dumps(v, default=str)) for k, v in settings.items()]
    return "<h2>Settings</h2>\n" + _table(["setting", "value"], rows)


def _page(title: str, body: list[str]) -> str:
    head = f'<meta charset="utf-8"><title>{html.escape(title)}</title><style>{CSS}</style>'
    top = f"<!DOCTYPE html>\n<html><head>{head}</head><body>\n<h1>{html.escape(title)}</h1>\n"
    return top + "\n".join(body) + "\n</body></html>\n"


def _figure(width: float, height: float) -> Figure:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


# ---------------------------------------------------------------- one run


def _series(metrics: list[dict[str, Any]], key: str) -> tuple[list[int], list[float]]:
    """(steps, values) of one metric, skipping steps where it is missing or NaN."""
    points = [(int(m["step"]), v) for m in metrics if (v := _num(m.get(key))) is not None]
    return [s for s, _ in points], [v for _, v in points]


def _rolling(values: list[float], window: int = 5) -> list[float]:
    """Trailing mean over the last ``window`` points (fewer at the start)."""
    return [sum(values[max(0, i + 1 - window) : i + 1]) / min(i + 1, window) for i in range(len(values))]


def _plot_training(path: Path, metrics: list[dict[str, Any]]) -> None:
    fig = _figure(11, 4)
    panels = (
        ("mean reward (share of samples solved)", "reward_{}"),
        ("solve rate (share of groups with a success)", "{}/solve_rate"),
    )
    for i, (title, key) in enumerate(panels):
        ax = fig.add_subplot(1, 2, i + 1)
        for variant in VARIANTS:
            steps, vals = _series(metrics, key.format(variant))
            ax.scatter(steps, vals, s=10, alpha=0.3, color=COLORS[variant])
            ax.plot(steps, _rolling(vals), color=COLORS[variant], label=f"{variant} (rolling mean of 5)")
        ax.set(title=title, xlabel="trainer step", ylim=(-0.03, 1.03))
        ax.legend(fontsize=8)
    fig.savefig(path, dpi=100)


def _plot_passk(path: Path, before: dict[str, Any], after: dict[str, Any]) -> None:
    names = ("pass@1", f"pass@{int(after['k'])}")
    groups = [
        (v, n) for v in VARIANTS for n in names if _stat(before, v, n) is not None or _stat(after, v, n) is not None
    ]
    fig = _figure(max(5.0, 1.5 * len(groups) + 2), 4)
    ax = fig.add_subplot()
    for offset, label, report, color in ((-0.2, "before", before, "tab:gray"), (0.2, "after", after, "tab:green")):
        vals = [_stat(report, v, n) for v, n in groups]
        bars = ax.bar([i + offset for i in range(len(groups))], [v or 0.0 for v in vals], 0.4, label=label, color=color)
        ax.bar_label(bars, labels=[_fmt(v) for v in vals], fontsize=8)
    ax.set_xticks(range(len(groups)), [f"{v}\n{n}" for v, n in groups])
    ax.set(ylim=(0, 1.12), ylabel="held-out hard problems", title="pass@k before and after training")
    ax.legend(fontsize=8)
    fig.savefig(path, dpi=100)


def _rise(before: float | None, after: float | None, k: int) -> str:
    """The sentence on unhinted pass@k, compared at the 3 decimals shown (never 'rose from 0.250 to 0.250')."""
    if before is None or after is None:
        return f"Unhinted pass@{k} could not be compared (before: {_fmt(before)}, after: {_fmt(after)})."
    if round(after, 3) > round(before, 3):
        return f"Unhinted pass@{k} on the held-out hard problems rose from {before:.3f} to {after:.3f}."
    return f"Unhinted pass@{k} on the held-out hard problems did not rise ({before:.3f} -> {after:.3f})."


def _story(data: dict[str, Any]) -> str:
    k = int(data["after"]["k"])
    hinted = _mean(_series(data["metrics"], "reward_hinted")[1])
    unhinted = _mean(_series(data["metrics"], "reward_unhinted")[1])
    text = (
        f"This run ({data['arm']}, seed {data['seed']}) trained {data['base_model']} on {data['task']} "
        f"problems for {data['steps']} steps, generating {data['rollouts']} samples in "
        f"{data['wall_s'] / 60:.1f} min. "
    )
    if hinted is None:
        text += f"It trained on unhinted groups only, with a mean reward of {_fmt(unhinted)} per sample. "
    else:
        text += (
            f"POPE tries each hard problem both as is (unhinted) and with the start of a solution in the prompt "
            f"(hinted): hinted groups earn reward where unhinted groups do not, and learning from them is meant "
            f"to carry over to the unhinted problem. Mean reward per sample was {_fmt(hinted)} in hinted groups "
            f"and {_fmt(unhinted)} in unhinted ones. "
        )
    before, after = (_stat(data[w], "unhinted", f"pass@{k}") for w in ("before", "after"))
    text += _rise(before, after, k)
    if reach := within_reach(data["before"]):
        text += " " + reach
    return text


def within_reach(base_eval: dict[str, Any]) -> str | None:
    """What to say when the base model already solved held-out hard problems unhinted: then
    they are not out of its reach, GRPO gets reward too, and a run does not test what POPE
    is for. (Bases of other materials, seeds or machines differ; docs/experiments/ names each
    table's base by the hash of its weights.) None when it solved none."""
    k = int(base_eval["k"])
    solved = _stat(base_eval, "unhinted", f"pass@{k}")
    if not solved:
        return None
    return (
        f"The base model already solved some of them unhinted (pass@{k} {solved:.3f}), so they were not "
        "out of its reach: plain GRPO will get reward too."
    )


def _before_after(before: dict[str, Any], after: dict[str, Any]) -> str:
    k = int(after["k"])
    names = ("pass@1", f"pass@{k}")
    rows = [
        (v, *(_fmt(_stat(r, v, n)) for n in names for r in (before, after)))
        for v in VARIANTS
        if v in before["summary"] or v in after["summary"]
    ]
    return _table(["variant", "pass@1 before", "pass@1 after", f"pass@{k} before", f"pass@{k} after"], rows)


def _hints(hints: dict[str, Any] | None) -> str:
    if not hints:
        return "<h2>Hint search</h2>\n<p>No hint search summary.</p>"
    frac = _fmt(_num(hints.get("hint_fraction_mean")), ".1%")
    return f"<h2>Hint search</h2>\n<p>Mean hint length: {frac} of the solution.</p>\n" + _table(
        ["result", "problems"], sorted(hints.get("counts", {}).items())
    )


def _samples(examples: list[dict[str, Any]]) -> str:
    """Training samples as the model wrote them (prompt, then completion), with their reward."""
    if not examples:
        return ""
    parts = ["<h2>What the model wrote</h2>"]
    for e in examples:
        parts.append(
            f"<h3>{html.escape(str(e['variant']))} sample at step {int(e['step'])}, reward "
            f"{float(e['reward']):.0f}</h3><pre>{html.escape(str(e['prompt']))}</pre>"
            f'<pre style="background:#f4f4f4">{html.escape(str(e["text"]))}</pre>'
        )
    return "".join(parts)


def run_report(out_dir: Path, data: dict[str, Any]) -> Path:
    """Render one run: report.html, report.json (``data`` as given), training.png, passk.png."""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "report.json").write_text(json.dumps(data, indent=2) + "\n")
    _plot_training(out_dir / "training.png", data["metrics"])
    _plot_passk(out_dir / "passk.png", data["before"], data["after"])
    body = [
        f"<p>{html.escape(_story(data))}</p>",
        "<h2>Evaluation before and after</h2>",
        _before_after(data["before"], data["after"]),
        '<img src="passk.png" alt="pass@k before and after">',
        "<h2>Training</h2>",
        '<img src="training.png" alt="reward and solve rate per step">',
        _samples(data.get("examples") or []),
        _settings(data["settings"]),
        _hints(data.get("hints")),
    ]
    path = out_dir / "report.html"
    path.write_text(_page(data["title"], body))
    return path


# ---------------------------------------------------------------- the experiment


def _finished(data: dict[str, Any], arm: str) -> list[dict[str, Any]]:
    runs = [r for r in data["runs"] if r["arm"] == arm and r["status"] == "done" and r.get("after") is not None]
    return sorted(runs, key=lambda r: r["seed"])


def _cells(report: dict[str, Any] | None, k: int) -> list[float | None]:
    return [_stat(report, v, n) for v in VARIANTS for n in ("pass@1", f"pass@{k}")]


def _minutes(seconds: float | None) -> str:
    return _fmt(None if seconds is None else seconds / 60, ".1f")


def _rows(data: dict[str, Any]) -> list[list[str]]:
    """Header, the base model, then per arm its finished runs by seed and their mean (seed column 'n=<count>')."""
    k = int(data["k"])
    rows = [
        [
            "arm",
            "seed",
            "unhinted pass@1",
            f"unhinted pass@{k}",
            "hinted pass@1",
            f"hinted pass@{k}",
            "rollouts",
            "wall min",
        ],
        ["base", "-", *map(_fmt, _cells(data["base"], k)), "0", "-"],
    ]
    for arm in data["arms"]:
        runs = _finished(data, arm)
        cells = [[*_cells(r["after"], k), _num(r["rollouts"]), _num(r["wall_s"])] for r in runs]
        for run, c in zip(runs, cells, strict=True):
            rows.append([arm, str(run["seed"]), *map(_fmt, c[:4]), _fmt(c[4], ".0f"), _minutes(c[5])])
        if runs:
            mean = [_mean(col) for col in zip(*cells, strict=True)]
            rows.append([arm, f"n={len(runs)}", *map(_fmt, mean[:4]), _fmt(mean[4], ".0f"), _minutes(mean[5])])
    return rows


def experiment_table(data: dict[str, Any]) -> str:
    """The results as a markdown table (table.md): base, each finished run, each arm's mean."""
    header, *rows = _rows(data)
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows]) + "\n"


def _plot_arms(path: Path, data: dict[str, Any]) -> None:
    name = f"pass@{int(data['k'])}"
    fig = _figure(max(4.0, 1.6 * len(data["arms"]) + 1.5), 4)
    ax = fig.add_subplot()
    for i, arm in enumerate(data["arms"]):
        vals = [v for r in _finished(data, arm) if (v := _stat(r["after"], "unhinted", name)) is not None]
        if vals:
            mean = sum(vals) / len(vals)
            ax.bar(i, mean, 0.6, color="tab:blue", alpha=0.35, label=None if ax.containers else "arm mean")
            ax.scatter(
                [i + 0.12 * (j - (len(vals) - 1) / 2) for j in range(len(vals))],
                vals,
                color="black",
                zorder=3,
                s=18,
                label=None if ax.collections else "one seed",
            )
    base = _stat(data["base"], "unhinted", name)
    if base is not None:
        ax.axhline(base, color="gray", linestyle="--", label=f"base model ({base:.3f})")
    ax.set_xticks(range(len(data["arms"])), data["arms"])
    ax.set(
        xlim=(-0.6, len(data["arms"]) - 0.4),
        ylim=(0, 1.05),
        ylabel=f"unhinted {name}",
        title=f"Unhinted {name} after training, per arm",
    )
    ax.legend(fontsize=8)
    fig.savefig(path, dpi=100)


def _pending(data: dict[str, Any]) -> str:
    runs = [r for r in data["runs"] if r["status"] != "done" or r.get("after") is None]
    items = "".join(f"<li>{html.escape(str(r['arm']))} seed {html.escape(str(r['seed']))}: pending</li>" for r in runs)
    return "<h2>Pending runs</h2>\n" + (f"<ul>{items}</ul>" if runs else "<p>None.</p>")


def experiment_report(out_dir: Path, data: dict[str, Any]) -> Path:
    """Render the experiment: report.html, results.json (``data`` as given), table.md, arms.png."""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "results.json").write_text(json.dumps(data, indent=2) + "\n")
    (out_dir / "table.md").write_text(experiment_table(data))
    _plot_arms(out_dir / "arms.png", data)
    header, *rows = _rows(data)
    intro = (
        f"Arms {', '.join(data['arms'])} trained from {data['base_model']} on {data['task']} problems; "
        f"each run is evaluated on the evaluation split with k={data['k']} samples per problem."
    )
    body = [
        f"<p>{html.escape(intro)}</p>",
        "<h2>Results</h2>",
        _table(header, rows),
        '<img src="arms.png" alt="unhinted pass@k per arm">',
        _pending(data),
        _settings(data["settings"]),
    ]
    path = out_dir / "report.html"
    path.write_text(_page(data["title"], body))
    return path
