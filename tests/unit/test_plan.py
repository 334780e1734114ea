"""The memory plan (services/trainer/plan.py): its activation estimate against what
autograd really saves in a small Qwen3 on CPU, its parameter count, the smallest fit,
and `pope trainer plan` beside `pope trainer --port`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, PreTrainedModel, Qwen3Config

from services.cli import _trainer, _trainer_plan, build_parser
from services.common.config import check_shared_keys, load_settings
from services.common.settings_cli import settings_from_args
from services.engine.settings import EngineSettings
from services.rollout.settings import RolloutSettings
from services.trainer import plan
from services.trainer.grpo import _head_logprobs
from services.trainer.settings import TrainerSettings
from services.verifier.settings import VerifierSettings

SMALL = Qwen3Config(
    vocab_size=2000,
    hidden_size=256,
    intermediate_size=768,
    num_hidden_layers=4,
    num_attention_heads=8,
    num_key_value_heads=4,
    head_dim=32,
    tie_word_embeddings=True,
    max_position_embeddings=1024,
)
T = 256


def saved_bytes(model: PreTrainedModel, ids: torch.Tensor) -> int:
    """Bytes of the distinct storages the decoder's forward saves for backward, weights
    left out (they are parameters, not activations)."""
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        ptr = t.untyped_storage().data_ptr()
        if ptr not in weights:
            seen[ptr] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model.get_decoder()(input_ids=ids, attention_mask=torch.ones_like(ids)).last_hidden_state
    assert out.requires_grad  # a graph was built, so the hooks saw what backward would need
    return sum(seen.values())


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, PreTrainedModel]:
    out = tmp_path_factory.mktemp("small")
    SMALL.to_json_file(out / "config.json")
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(SMALL, dtype=torch.float32)
    model.train()  # checkpointing applies in training mode only
    return out, model


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_activation_estimate_is_within_20_percent_of_what_autograd_saves(
    small: tuple[Path, PreTrainedModel], dtype: torch.dtype
) -> None:
    model_dir, fp32_model = small
    model = fp32_model if dtype == torch.float32 else AutoModelForCausalLM.from_config(SMALL, dtype=dtype).train()
    act = torch.finfo(dtype).bits // 8
    shape, _ = plan.model_params(model_dir)
    ids = torch.randint(0, SMALL.vocab_size, (1, T), generator=torch.Generator().manual_seed(0))
    measured = saved_bytes(model, ids) / T
    estimate = plan.decoder_bytes_per_token(shape, act=act, checkpointed=False)
    assert abs(estimate - measured) / measured < 0.2, (estimate, measured)

    # Reentrant checkpointing saves each layer's input through save_for_backward, which
    # the hooks see; the non-reentrant kind hides the layer's inputs in its own hooks.
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": True})
    try:
        measured_ckpt = saved_bytes(model, ids) / T
    finally:
        model.activation_checkpointing_disable()
    estimate_ckpt = plan.decoder_bytes_per_token(shape, act=act, checkpointed=True)
    print(f"per token: measured {measured:.0f} / {measured_ckpt:.0f} B, estimate {estimate} / {estimate_ckpt}")
    assert abs(estimate_ckpt - measured_ckpt) / measured_ckpt < 0.2, (estimate_ckpt, measured_ckpt)
    assert measured_ckpt < measured / 5


def test_the_lm_heads_saved_logits_are_as_estimated() -> None:
    shape = plan.Shape.from_config(SMALL.to_dict())
    chunk = 128
    head = torch.nn.Linear(SMALL.hidden_size, SMALL.vocab_size, bias=False)
    hidden = torch.randn(chunk, SMALL.hidden_size, requires_grad=True)
    targets = torch.randint(0, SMALL.vocab_size, (chunk,))
    weights = {head.weight.untyped_storage().data_ptr()}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        if t.untyped_storage().data_ptr() not in weights:
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        _head_logprobs(head, hidden, targets, torch.full((chunk,), 0.8), True)
    measured = sum(seen.values()) / chunk  # per position; includes the [chunk, hidden] input
    estimate = plan.head_saved_bytes_per_position(shape)
    assert abs(estimate - measured) / measured < 0.2, (estimate, measured)


def test_the_parameter_count_comes_from_the_meta_model(small: tuple[Path, PreTrainedModel]) -> None:
    model_dir, model = small
    _, params = plan.model_params(model_dir)
    assert params.total == sum(p.numel() for p in model.parameters())
    assert params.root == SMALL.vocab_size * SMALL.hidden_size + SMALL.hidden_size  # tied embedding, final norm


def test_qwen3_4b_shape_has_4b_parameters_and_fits_with_checkpointing(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps(plan.QWEN3_4B_CONFIG))
    shape, params = plan.model_params(tmp_path)
    assert 4.0e9 < params.total < 4.05e9  # Qwen3-4B: 4.0 B parameters
    p1, p4 = (plan.plan(shape, params, n, 16384, 4096) for n in (1, 4))
    assert p1.sharded_state == 4 * p4.sharded_state  # only the sharded state shrinks with N
    assert p1.total - p1.sharded_state == p4.total - p4.sharded_state
    budget = 80 * plan.GIB
    n = plan.smallest_fit(shape, params, budget, 16384, 4096, checkpointed=True)
    assert n is not None and plan.plan(shape, params, n, 16384, 4096).total_ckpt <= budget
    assert n == 1 or plan.plan(shape, params, n - 1, 16384, 4096).total_ckpt > budget


def test_trainer_plan_is_a_subcommand_and_trainer_alone_still_serves(
    small: tuple[Path, PreTrainedModel], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    serve = build_parser().parse_args(["trainer", "--port", "9002", "--learning-rate", "3e-6"])
    assert serve.func is _trainer and serve.trainer_action is None
    settings = settings_from_args(TrainerSettings, serve)
    assert (settings.port, settings.learning_rate) == (9002, 3e-6)
    config = tmp_path / "pope.yaml"
    config.write_text(f"shared:\n  model_path: {small[0]}\ntrainer:\n  micro_batch_tokens: 1024\n")
    args = build_parser().parse_args(["trainer", "plan", "--config", str(config), "--nproc", "2"])
    assert args.func is _trainer_plan
    assert _trainer_plan(args) == 0
    out = capsys.readouterr().out
    assert "micro-batch tokens (trainer.micro_batch_tokens)" in out and " 1024\n" in out
    assert "fp32 master weights / 2" in out


def test_the_paper_config_loads_and_its_comment_has_the_plans_numbers(tmp_path: Path) -> None:
    path = Path(__file__).parents[2] / "configs" / "paper-qwen3-4b.yaml"
    check_shared_keys(path, [EngineSettings, RolloutSettings, VerifierSettings, TrainerSettings])
    for model in (EngineSettings, RolloutSettings, VerifierSettings):
        load_settings(model, path)
    cfg = load_settings(TrainerSettings, path)
    (tmp_path / "config.json").write_text(json.dumps(plan.QWEN3_4B_CONFIG))
    shape, params = plan.model_params(tmp_path)
    act = 2 if cfg.bf16 else 4
    text = path.read_text()
    for n in (1, 4):
        pl = plan.plan(shape, params, n, cfg.micro_batch_tokens, cfg.logits_chunk_tokens, act)
        assert f"total {pl.total / plan.GIB:.1f} / {pl.total_ckpt / plan.GIB:.1f} GiB" in text
