"""docs/data.md's recipes, run as written: each `pope data import` line of the Recipes
section, on a small local folder in that dataset's layout, against a real Redis."""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet
from redis.asyncio import Redis

from services.common.keys import Keys
from services.common.messages import Problem
from services.rollout.store import ProblemStore
from tests.conftest import ROOT

POPE = str(Path(sys.executable).parent / "pope")

DAPO_PREFIX = (
    "Solve the following math problem step by step. The last line of your response should be of the form "
    "Answer: $Answer (without quotes) where $Answer is the answer to the problem.\n\n"
)
DAPO_SUFFIX = '\n\nRemember to put your answer on its own line after "Answer:".'
DAPO_PROBLEMS = [("Find the sum of all integers $n$ with $n^2 < 10$.", "0"), ("How many primes are below $20$?", "8")]
OMNI_ROWS = [
    {
        "domain": ["Mathematics -> Number Theory -> Prime Numbers"],
        "difficulty": 6.5,
        "problem": "Find all primes $p$ such that $p^2 + 2$ is prime.",
        "solution": "If $p \\neq 3$ then $3 \\mid p^2 + 2$.\n\nSo $p = 3$, and $11$ is prime.",
        "answer": "3",
        "source": "china_national_olympiad",
    },
    {
        "domain": ["Mathematics -> Algebra -> Other"],
        "difficulty": 4.0,
        "problem": "Solve $x + 1 = 2$ over the reals.",
        "solution": "Subtract one from both sides.\n\nThus $x = 1$.",
        "answer": "1",
        "source": "imo_shortlist",
    },
    {"domain": ["Mathematics -> Geometry"], "difficulty": 9.0, "problem": "Prove it.", "solution": "...", "answer": ""},
]


def recipe_commands() -> dict[str, list[str]]:
    """The doc's import lines in the Recipes section, by the folder each reads."""
    text = (ROOT / "docs" / "data.md").read_text()
    recipes = text.split("\n## Recipes\n", 1)[1].split("\n## ", 1)[0]
    lines = [line for line in recipes.splitlines() if line.startswith(".venv/bin/pope data import ")]
    return {shlex.split(line)[3]: shlex.split(line) for line in lines}


def dapo_snapshot(root: Path) -> None:
    """DAPO-Math-17k as `hf download --local-dir` leaves it: one parquet file in verl's schema,
    each problem repeated, and the download's own hidden metadata."""
    rows: list[dict[str, Any]] = [
        {
            "data_source": "math_dapo",
            "prompt": [{"content": DAPO_PREFIX + problem + DAPO_SUFFIX, "role": "user"}],
            "ability": "MATH",
            "reward_model": {"ground_truth": answer, "style": "rule-lighteval/MATH_v2"},
            "extra_info": {"index": f"{i:08x}-0000-0000-0000-000000000000"},
        }
        for i, (problem, answer) in enumerate(DAPO_PROBLEMS * 3)
    ]
    (root / "data").mkdir(parents=True)
    pyarrow.parquet.write_table(pa.Table.from_pylist(rows), root / "data" / "dapo-math-17k.parquet")
    (root / "README.md").write_text("---\nlicense: apache-2.0\n---\n# DAPO-Math-17k\n")
    meta = root / ".cache" / "huggingface" / "download" / "data"
    meta.mkdir(parents=True)
    (meta / "dapo-math-17k.parquet.metadata").write_text("0123abcd\n")


def omni_snapshot(root: Path) -> None:
    """Omni-MATH as the Hub ships it: test.jsonl, one object a line."""
    root.mkdir()
    (root / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in OMNI_ROWS))
    (root / "README.md").write_text("---\nlicense: apache-2.0\n---\n# Omni-MATH\n")


def run(argv: list[str], cwd: Path, redis_url: str, keys: Keys) -> subprocess.CompletedProcess[str]:
    assert argv[0] == ".venv/bin/pope"
    argv = [POPE, *argv[1:], "--redis-url", redis_url, "--key-prefix", keys.prefix]
    return subprocess.run(argv, cwd=cwd, capture_output=True, text=True, timeout=120)


async def stored(aredis: Redis, keys: Keys) -> list[Problem]:
    return sorted(await ProblemStore(aredis, keys).all(), key=lambda p: p.prompt)


def test_the_doc_has_one_recipe_per_dataset() -> None:
    assert sorted(recipe_commands()) == ["DAPO-Math-17k", "Omni-MATH"]


async def test_dapo_recipe(redis_url: str, keys: Keys, aredis: Redis, tmp_path: Path) -> None:
    dapo_snapshot(tmp_path / "DAPO-Math-17k")
    out = run(recipe_commands()["DAPO-Math-17k"], tmp_path, redis_url, keys)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "reading 1 file of split 'train': data/dapo-math-17k.parquet" in out.stdout
    assert "read 6 rows: 2 new, 0 replaced, 4 duplicates, 0 errors" in out.stdout
    assert "instruction dapo: taken out of 6 of 6 prompts\n" in out.stdout
    assert "0 of the 2 problems written have a solution" in out.stdout  # answers only: no hints
    problems = await stored(aredis, keys)
    assert [(p.prompt, p.answer, p.source, p.solution, p.split) for p in problems] == sorted(
        (problem, answer, "math_dapo", None, "train") for problem, answer in DAPO_PROBLEMS
    )


async def test_omni_math_recipe(redis_url: str, keys: Keys, aredis: Redis, tmp_path: Path) -> None:
    omni_snapshot(tmp_path / "Omni-MATH")
    out = run(recipe_commands()["Omni-MATH"], tmp_path, redis_url, keys)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "reading 1 file of split 'test': test.jsonl" in out.stdout
    assert "read 3 rows: 2 new, 0 replaced, 0 duplicates, 1 errors" in out.stdout
    assert "error at test.jsonl line 3, field 'answer': String should have at least 1 character" in out.stdout
    assert "2 of the 2 problems written have a solution" in out.stdout  # solutions: hints can be built
    problems = await stored(aredis, keys)
    rows = sorted(OMNI_ROWS[:2], key=lambda r: str(r["problem"]))
    assert [(p.prompt, p.answer, p.solution, p.source, p.split) for p in problems] == [
        (r["problem"], r["answer"], r["solution"], r["source"], "train") for r in rows
    ]
