"""`pope data import` / `pope data export` as real subprocesses against a real Redis."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from redis.asyncio import Redis

from services.common.keys import Keys
from services.common.messages import Problem, problem_id_for
from services.rollout.store import ProblemStore

POPE = str(Path(sys.executable).parent / "pope")

TRAIN = [
    {"problem": "Compute $2+2$.", "final_answer": 4, "solution": "Add: $\\boxed{4}$."},
    {"problem": "Compute $3 \\cdot 5$.", "final_answer": "15"},
    {"problem": "compute $3 \\cdot 5$ .", "final_answer": "15"},  # duplicate of the row above
    {"problem": "What is $6 \\cdot 7$?", "final_answer": "42"},  # also an eval problem
]
EVAL = [{"problem": "What is $6 \\cdot 7$?", "final_answer": "42"}, {"problem": "Compute $9+9$.", "final_answer": 18}]
MAP = ["--map", "prompt=problem", "--map", "answer=final_answer"]


def pope(redis_url: str, keys: Keys, *args: str) -> subprocess.CompletedProcess[str]:
    argv = [POPE, "data", *args, "--redis-url", redis_url, "--key-prefix", keys.prefix]
    return subprocess.run(argv, capture_output=True, text=True, timeout=120)


def jsonl(path: Path, rows: list[dict[str, object]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


async def stored(aredis: Redis, keys: Keys) -> dict[str, Problem]:
    return {p.id: p for p in await ProblemStore(aredis, keys).all()}


async def test_import_dedups_flags_leakage_and_is_idempotent(
    redis_url: str, keys: Keys, aredis: Redis, tmp_path: Path
) -> None:
    eval_file, train_file = jsonl(tmp_path / "eval.jsonl", EVAL), jsonl(tmp_path / "train.jsonl", TRAIN)
    out = pope(redis_url, keys, "import", str(eval_file), *MAP, "--split", "eval", "--source", "evalset")
    assert out.returncode == 0, out.stderr
    assert "read 2 rows: 2 new, 0 replaced, 0 duplicates, 0 errors" in out.stdout

    out = pope(redis_url, keys, "import", str(train_file), *MAP, "--source", "trainset")
    assert out.returncode == 0, out.stderr
    assert "read 4 rows: 3 new, 0 replaced, 1 duplicates, 0 errors" in out.stdout
    eval_id = problem_id_for("What is $6 \\cdot 7$?", "42")
    assert f"train {eval_id}-train = eval {eval_id}" in out.stdout

    problems = await stored(aredis, keys)
    assert len(problems) == 5
    assert problems[eval_id].split == "eval" and problems[eval_id].excluded is None
    assert problems[eval_id + "-train"].excluded == f"same problem as eval problem {eval_id}"
    four = problems[problem_id_for("Compute $2+2$.", "4")]
    assert (four.split, four.source, four.solution, four.excluded) == ("train", "trainset", "Add: $\\boxed{4}$.", None)

    out = pope(redis_url, keys, "import", str(train_file), *MAP, "--source", "trainset")
    assert out.returncode == 0 and "read 4 rows: 0 new, 3 replaced, 1 duplicates" in out.stdout
    assert await stored(aredis, keys) == problems


async def test_bad_rows_are_reported_and_the_rest_imports(
    redis_url: str, keys: Keys, aredis: Redis, tmp_path: Path
) -> None:
    path = tmp_path / "mixed.jsonl"
    path.write_text('{"prompt": "Compute 1+1.", "answer": "2"}\n{"prompt": "Compute 1+2.",\n{"prompt": "x"}\n')
    out = pope(redis_url, keys, "import", str(path))
    assert out.returncode == 0, out.stderr
    assert "1 new" in out.stdout and "2 errors" in out.stdout
    assert (
        "error at line 2: invalid JSON" in out.stdout
        and "error at line 3, field 'answer': Field required" in out.stdout
    )
    assert [p.prompt for p in (await stored(aredis, keys)).values()] == ["Compute 1+1."]

    path.write_text('{"prompt": "Compute 1+2."}\nnot json\n')
    out = pope(redis_url, keys, "import", str(path))
    assert out.returncode == 1 and "0 new" in out.stdout and "2 errors" in out.stdout
    out = pope(redis_url, keys, "import", str(tmp_path / "missing.jsonl"))
    assert out.returncode == 1 and "no such file" in out.stderr and "Traceback" not in out.stderr


async def test_export_round_trips_and_filters(redis_url: str, keys: Keys, aredis: Redis, tmp_path: Path) -> None:
    store = ProblemStore(aredis, keys)
    originals = [
        Problem(prompt="Compute 2+2.", answer="4", label="easy", source="s"),
        Problem(prompt="Compute 3+3.", answer="6", hint="Three and", label="hard_hinted", split="eval"),
        Problem(prompt="Compute 4+4.", answer="8", excluded="kept out"),
    ]
    await store.put_many(originals)
    out = pope(redis_url, keys, "export", str(tmp_path / "all.jsonl"))
    assert out.returncode == 0 and "wrote 3 problems" in out.stdout
    lines = (tmp_path / "all.jsonl").read_text().splitlines()
    assert {Problem.model_validate_json(line) for line in lines} == set(originals)

    out = pope(redis_url, keys, "export", str(tmp_path / "easy.jsonl"), "--split", "train", "--label", "easy")
    assert out.returncode == 0 and "wrote 1 problems" in out.stdout
    assert json.loads((tmp_path / "easy.jsonl").read_text())["prompt"] == "Compute 2+2."

    # Into a fresh prefix (under this test's, so the fixture cleans it) and out again: byte for byte.
    other = Keys(keys.prefix + "copy:")
    out = pope(redis_url, other, "import", str(tmp_path / "all.jsonl"))
    assert out.returncode == 0 and "3 new" in out.stdout, out.stdout + out.stderr
    assert pope(redis_url, other, "export", str(tmp_path / "again.jsonl")).returncode == 0
    assert (tmp_path / "again.jsonl").read_text() == (tmp_path / "all.jsonl").read_text()


async def test_whole_file_failures_import_nothing_and_say_why(
    redis_url: str, keys: Keys, aredis: Redis, tmp_path: Path
) -> None:
    snap = tmp_path / "snap"
    (snap / "data").mkdir(parents=True)
    jsonl(snap / "data" / "test-00000-of-00001.jsonl", [{"prompt": "Compute 1+1.", "answer": "2"}])
    out = pope(redis_url, keys, "import", str(snap))
    assert out.returncode == 1 and "Traceback" not in out.stderr
    assert "no data files of split 'train' (found test: data/test-00000-of-00001.jsonl); pick one with --hf-split" in (
        out.stderr
    )
    plain = jsonl(tmp_path / "plain.jsonl", [{"prompt": "Compute 1+1.", "answer": "2"}])
    out = pope(redis_url, keys, "import", str(plain), "--strip-instruction", "dapo")
    assert out.returncode == 1 and "instruction dapo was found in none of the 1 prompts; nothing imported" in out.stderr
    out = pope(redis_url, keys, "import", str(plain), "--map", "answer=reward_model..ground_truth")
    assert out.returncode == 1 and "Traceback" not in out.stderr
    assert "column path 'reward_model..ground_truth': cannot read '..ground_truth'" in out.stderr, out.stderr
    assert await stored(aredis, keys) == {}
    out = pope(redis_url, keys, "import", str(snap), "--hf-split", "test", "--strip-pattern", r"^Compute\s*")
    assert out.returncode == 0 and "taken out of 1 of 1 prompts" in out.stdout, out.stdout + out.stderr
    assert [p.prompt for p in (await stored(aredis, keys)).values()] == ["1+1."]


def test_import_help_names_the_layouts_and_flags() -> None:
    out = subprocess.run([POPE, "data", "import", "--help"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0
    text = " ".join(out.stdout.split())
    for words in (
        "--map FIELD=PATH",
        "reward_model.ground_truth, prompt[0].content, prompt[role=user].content",
        "last user message",
        "--hf-split NAME",
        "--strip-instruction {dapo,verl-gsm8k,verl-math}",
        "--strip-pattern REGEX",
        "docs/data.md",
    ):
        assert words in text, words
