"""Run schemathesis (the pinned CLI, as a subprocess) against a running service and read its
JSON report: ``fuzz(schema, url, report_dir)`` returns a ``Report``, ``assert_clean`` fails
the test with the run's own failure text (each failure with a curl line reproducing it).

Every check (``--checks all``), one worker (the CI machine has two cores), a fixed seed,
no example database (each run stands alone), ``--continue-on-failure`` so that one run
finds every distinct failure of an operation, not only the first.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import yaml

ROOT = Path(__file__).resolve().parents[2]
CONFIG = Path(__file__).resolve().parent / "schemathesis.toml"
"""The rules JSON Schema cannot say, each a narrow exception to one check (read it)."""

CASES = int(os.environ.get("FUZZ_CASES", "1000"))
"""The floor of generated cases per service (``make fuzz`` raises it)."""

SEED = int(os.environ.get("FUZZ_SEED", "0"))
SHRINK = os.environ.get("FUZZ_SHRINK", "0") == "1"
"""Shrink each failure to a minimal request (``make fuzz``); off in CI, where shrinking the
failures known today would take most of the tier's time."""
REQUEST_TIMEOUT_S = 10.0
RUN_TIMEOUT_S = float(os.environ.get("FUZZ_TIMEOUT_S", "240"))
"""The most one service's run may take (inside pytest's own per-test timeout)."""


@dataclass
class Report:
    cases: int
    failures: dict[str, int]
    """Each failure group's title (its check), and how many distinct failures it holds."""
    errors: list[str]
    """Requests that got no response (a timeout, a reset connection) and fatal errors."""
    operations: int
    output: str = field(repr=False)

    @property
    def server_errors(self) -> int:
        return sum(n for title, n in self.failures.items() if title == "Server error")

    @property
    def timeouts(self) -> int:
        return sum(1 for e in self.errors if "timeout" in e.lower() or "timed out" in e.lower())


def fuzz(
    schema: str,
    url: str,
    report_dir: Path,
    *,
    headers: dict[str, str] | None = None,
    env: dict[str, str] | None = None,
    cases: int = CASES,
    mode: str = "all",
    phases: str = "examples,coverage,fuzzing,stateful",
) -> Report:
    """Fuzz ``url`` from ``schema`` (a URL or a file), generating at least ``cases`` cases in
    all (spread over the schema's operations that take input: one without parameters or a
    body has a single case to send). The hooks of tests/fuzz/hooks.py are loaded; ``env``
    reaches them. ``mode``: schemathesis's generation mode (positive, negative, all);
    ``phases``: the phases to run."""
    per_operation = math.ceil(cases / operations(schema))
    command = [
        *(sys.executable, "-m", "schemathesis.cli", "--config-file", str(CONFIG), "run", schema, "--url", url),
        *("--checks", "all", "--max-examples", str(per_operation), "--continue-on-failure", "--mode", mode),
        *("--phases", phases),
        *("--seed", str(SEED), "--workers", "1", "--generation-database", "none"),
        *("--request-timeout", str(REQUEST_TIMEOUT_S), "--suppress-health-check", "all"),
        *("--report", "json,junit", "--report-dir", str(report_dir), "--output-sanitize", "false"),
        "--no-color",
        *(() if SHRINK else ("--no-shrink",)),
    ]
    for name, value in (headers or {}).items():
        command += ["-H", f"{name}: {value}"]
    environ = {**os.environ, **(env or {}), "PYTHONPATH": str(ROOT), "SCHEMATHESIS_HOOKS": "tests.fuzz.hooks"}
    try:  # in report_dir: schemathesis keeps a cache (.schemathesis/) in its working directory
        proc = subprocess.run(
            command, capture_output=True, text=True, env=environ, cwd=report_dir, check=False, timeout=RUN_TIMEOUT_S
        )
    except subprocess.TimeoutExpired as exc:
        raise AssertionError(f"the fuzz of {url} ran past {RUN_TIMEOUT_S:.0f}s (FUZZ_TIMEOUT_S)") from exc
    output = proc.stdout + proc.stderr
    (report_dir / "output.txt").write_text(output)
    reports = sorted(report_dir.glob("json-*.json"))
    assert reports, f"schemathesis wrote no report (exit {proc.returncode}):\n{output[-4000:]}"
    doc = json.loads(reports[-1].read_text())
    return Report(
        cases=doc["test_cases"]["generated"],
        failures={f["title"]: f["count"] for f in doc["failures"]},
        errors=[e["title"] for e in doc["errors"]],
        operations=doc["operations"]["tested"],
        output=output,
    )


def operations(schema: str) -> int:
    """How many operations (path and method) of ``schema`` take parameters or a body (at least 1)."""
    if schema.startswith("http"):
        doc = httpx.get(schema, timeout=10).raise_for_status().json()
    else:
        doc = yaml.safe_load(Path(schema).read_text())
    methods = {"get", "put", "post", "delete", "patch", "head", "options"}
    taking = [
        op
        for item in doc["paths"].values()
        for method, op in item.items()
        if method in methods and (op.get("parameters") or item.get("parameters") or op.get("requestBody"))
    ]
    return max(len(taking), 1)


def assert_clean(report: Report, cases: int = CASES) -> None:
    """No check failed, no 5xx, nothing timed out or went unanswered, and enough cases ran."""
    summary = (
        f"{report.cases} cases, {report.server_errors} 5xx, {report.timeouts} timeouts, "
        f"failures by check {report.failures}, errors {report.errors}"
    )
    print(f"fuzz: {summary}")  # the counts of a clean run (pytest -rP shows them)
    tail = report.output[-12000:]
    assert report.cases >= cases, f"only {summary} (floor {cases})\n{tail}"
    assert not report.failures and not report.errors, f"{summary}\n{tail}"
