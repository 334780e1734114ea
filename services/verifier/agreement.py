"""How often the verifier's verdict is the right one, against raw math-verify, by kind.

    python -m services.verifier.agreement [--url http://host:8001] [--corpus FILE]

The corpus (``tests/data/verifier/agreement.jsonl``, one case a line: kind, gold,
completion, expected verdict) is scored three ways: raw math-verify as its README has it
(``verify(parse(gold), parse(completion))``), raw math-verify with the gold wrapped in
``$...$`` (what a bare LaTeX gold needs), and the verifier: a running service's
``POST /v1/verify`` with ``--url``, else an in-process scoring pool (the same worker code)
under each scoring policy. Prints one row per kind: cases, then how many verdicts each
way agrees with the expected one.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from services.common.messages import ScoringPolicy

CORPUS = Path(__file__).resolve().parents[2] / "tests" / "data" / "verifier" / "agreement.jsonl"
KINDS = ("plain", "abandoned", "multi_box", "gold_delimited", "unboxed", "number_format", "interval", "matrix")
"""The fixed list of kinds the corpus covers, in table order."""


@dataclass(frozen=True)
class Case:
    kind: str
    gold: str
    completion: str
    expected: int
    note: str = ""


def load(path: Path = CORPUS) -> list[Case]:
    cases = [Case(**json.loads(line)) for line in path.read_text().splitlines() if line.strip()]
    unknown = {c.kind for c in cases} - set(KINDS)
    if unknown:
        raise ValueError(f"{path}: kinds {sorted(unknown)} are not in the fixed list {KINDS}")
    return cases


def raw_verdicts(cases: Iterable[Case], wrap_gold: bool = False) -> list[int]:
    """Raw in-process math-verify, no extraction of ours; its timeouts off (SIGALRM), so
    only for inputs that cannot hang, as this corpus's."""
    from math_verify import parse, verify

    logging.getLogger("math_verify").setLevel(logging.ERROR)
    out = []
    for c in cases:
        gold = parse(f"${c.gold}$" if wrap_gold else c.gold, parsing_timeout=None)
        out.append(int(verify(gold, parse(c.completion, parsing_timeout=None), timeout_seconds=None)))
    return out


def service_verdicts(cases: list[Case], url: str, token: str | None = None) -> tuple[list[int], str]:
    """Verdicts of a running verifier's POST /v1/verify, and the policy it says it used."""
    import httpx

    rows = [{"answer": c.completion, "gold": c.gold} for c in cases]
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    resp = httpx.post(f"{url}/v1/verify", json=rows, headers=headers, timeout=300)
    resp.raise_for_status()
    return [int(s["reward"] > 0) for s in resp.json()], resp.headers.get("X-Pope-Scoring-Policy", "?")


def pool_verdicts(cases: list[Case], policy: ScoringPolicy, workers: int = 2) -> list[int]:
    """Verdicts of an in-process scoring pool (the service's worker code) under ``policy``."""
    from services.verifier.pool import ScoringPool

    async def run() -> list[int]:
        pool = ScoringPool(workers, timeout_s=30, policy=policy)
        await pool.start()
        try:
            scores = await asyncio.gather(*(pool.score(c.gold, [c.completion]) for c in cases))
        finally:
            await pool.close()
        return [int(s[0].reward > 0) for s in scores]

    return asyncio.run(run())


def table(cases: list[Case], columns: dict[str, list[int]]) -> dict[str, dict[str, int]]:
    """Per kind (and "all"): cases, and agreements with the expected verdict per column."""
    out: dict[str, dict[str, int]] = {}
    for kind in (*KINDS, "all"):
        idx = [i for i, c in enumerate(cases) if kind in ("all", c.kind)]
        out[kind] = {"cases": len(idx)} | {
            name: sum(v[i] == cases[i].expected for i in idx) for name, v in columns.items()
        }
    return out


def markdown(rows: dict[str, dict[str, int]]) -> str:
    names = list(next(iter(rows.values())))
    lines = ["| kind | " + " | ".join(names) + " |", "|" + "---|" * (len(names) + 1)]
    lines += [f"| {kind} | " + " | ".join(str(r[n]) for n in names) + " |" for kind, r in rows.items()]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--corpus", type=Path, default=CORPUS)
    ap.add_argument("--url", help="a running verifier; default: an in-process pool per policy")
    ap.add_argument("--token", help="the verifier's api_token, if it has one")
    ap.add_argument("--misses", action="store_true", help="also list each case the verifier gets wrong")
    args = ap.parse_args()
    cases = load(args.corpus)
    columns = {"raw": raw_verdicts(cases), "raw, gold in $": raw_verdicts(cases, wrap_gold=True)}
    if args.url:
        ours, policy = service_verdicts(cases, args.url, args.token)
        columns[f"verifier ({policy})"] = ours
    else:
        for p in ScoringPolicy:
            columns[f"verifier ({p})"] = pool_verdicts(cases, p)
    print(markdown(table(cases, columns)))
    if args.misses:
        last = list(columns)[-1]
        for c, v in zip(cases, columns[last], strict=True):
            if v != c.expected:
                print(f"miss [{c.kind}] expected {c.expected}: gold {c.gold!r}, completion {c.completion!r}")


if __name__ == "__main__":
    main()
