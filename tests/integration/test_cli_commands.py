"""The `pope` console script: every command of DESIGN.md 4a is registered."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

POPE = str(Path(sys.executable).parent / "pope")


def run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([POPE, *args], capture_output=True, text=True, timeout=60, env=env)


def test_help_lists_every_command() -> None:
    out = run("--help")
    assert out.returncode == 0
    for name in ("up", "engine", "rollout", "verifier", "trainer", "model", "data", "hints", "eval", "experiment"):
        assert f"    {name}" in out.stdout


def test_experiment_and_demo_need_a_base_model_and_say_how_to_make_one(tmp_path: Path) -> None:
    for argv in (["experiment", "pope-vs-grpo"], ["demo"]):
        out = run(*argv, "--base-model", str(tmp_path / "missing"), "--dir", str(tmp_path / "exp"))
        assert out.returncode != 0
        assert "pope model pretrain --out" in out.stderr
        assert not (tmp_path / "exp").exists()


def test_services_take_the_common_options() -> None:
    for name in ("rollout", "trainer"):
        out = run(name, "--help")
        assert all(opt in out.stdout for opt in ("--config", "--port", "--redis-url", "--engine-url"))
    assert "--redis-url" in run("verifier", "--help").stdout


def test_config_show_resolves_and_reports_bad_values(tmp_path: Path) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text("verifier:\n  workers: 5\n")
    out = run("config", "show", "verifier", "--config", str(cfg))
    assert out.returncode == 0 and '"workers": 5' in out.stdout
    cfg.write_text("verifier:\n  workers: none\n")
    out = run("config", "show", "verifier", "--config", str(cfg))
    assert out.returncode == 2
    assert f"{cfg}, section 'verifier', field 'workers'" in out.stderr


def test_model_init_builds_a_model_transformers_loads(tmp_path: Path) -> None:
    out = run("model", "init", "--out", str(tmp_path / "m"))
    assert out.returncode == 0, out.stderr
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(tmp_path / "m"))
    tok = AutoTokenizer.from_pretrained(str(tmp_path / "m"))
    assert type(model).__name__ == "Qwen3ForCausalLM" and model.config.vocab_size == len(tok)
    assert (tmp_path / "m" / "model.safetensors").is_file()
    text = tok.apply_chat_template(
        [{"role": "user", "content": "Compute 2+2."}], add_generation_prompt=True, tokenize=False
    )
    assert text.endswith("<|im_start|>assistant\n") and tok.eos_token == "<|im_end|>"


def test_engine_without_a_model_says_how_to_make_one(tmp_path: Path) -> None:
    out = run("engine", "--model", str(tmp_path / "nothing"))
    assert out.returncode == 1 and "pope model init" in out.stderr


def test_a_typo_in_the_shared_section_is_an_error(tmp_path: Path) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text("shared:\n  max_stalenes: 2\n")
    out = run("config", "show", "trainer", "--config", str(cfg))
    assert out.returncode == 2 and "section 'shared'" in out.stderr and "max_stalenes" in out.stderr


def test_services_without_a_model_say_how_to_make_one(tmp_path: Path) -> None:
    for argv in (["up", "--model", str(tmp_path / "x")], ["rollout", "--model", str(tmp_path / "x")]):
        out = run(*argv)
        assert out.returncode in (1, 2) and "pope model init" in out.stderr and "Traceback" not in out.stderr


def test_a_service_told_to_stop_while_it_starts_exits_0_at_once(tiny_model: Path, tmp_path: Path) -> None:
    """SIGTERM at several moments of a trainer's start (imports, the model's load): it exits
    0 with its line every time, never going on to serve (the chaos run once saw the line
    and then a trainer that came up: an import caught the SystemExit)."""
    import os
    import signal
    import time

    env = {**os.environ, "POPE_TRAINER__CHECKPOINT_DIR": str(tmp_path / "ckpt"), "POPE_TRAINER__ENGINE_URL": ""}
    stopped = 0
    for delay in (0.2, 0.6, 1.0, 1.5, 2.0):
        proc = subprocess.Popen(
            [POPE, "trainer", "--model", str(tiny_model), "--port", "0"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        time.sleep(delay)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
        if "Application startup complete" in err:  # it got that far before the signal: uvicorn's stop
            continue
        if "while starting" not in err:  # before the handler was installed: the default, death by it
            assert proc.returncode == -signal.SIGTERM, err[-2000:]
            continue
        assert proc.returncode == 0 and "pope trainer: stopped by SIGTERM while starting" in err, err[-2000:]
        assert "resolved config" not in err.split("while starting", 1)[1], err[-2000:]
        stopped += 1
    assert stopped, "no SIGTERM landed while the trainer was starting: move the delays"
