"""The engine's lean forward (services/engine/lean.py) against transformers' own forward of
the same model, and the continuous batch (services/engine/decode.py) on top of it.

Every check compares logits with a plain full-sequence forward pass of the HF model: rows of
different lengths prefilled together (with copies of one prompt computed once), decode
steps, a row moved into a finished row's slot, a cache that grows, and rows joining a batch
that is already running. Qwen3 is the project's architecture; Qwen2 (biases, no q/k norms)
and Llama are the others the decoder claims."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

from services.engine.decode import RunningBatch, Sequence, decode_all
from services.engine.lean import Decoder, Unsupported, attention_spans, buckets, unsupported
from services.engine.sampling import SamplingSpec

SHAPE = dict(
    vocab_size=300,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
)


def build(kind: str) -> Any:
    torch.manual_seed(0)
    if kind == "qwen3":
        model = Qwen3ForCausalLM(Qwen3Config(**SHAPE, head_dim=16, tie_word_embeddings=True))
    elif kind == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(**SHAPE, tie_word_embeddings=False))
    else:
        model = LlamaForCausalLM(LlamaConfig(**SHAPE, rope_theta=500000.0))
    return model.eval()


def last_logits(model: Any, ids: list[int]) -> torch.Tensor:
    with torch.inference_mode():
        return model(input_ids=torch.tensor([ids])).logits[0, -1].float()


@pytest.mark.parametrize("kind", ["qwen3", "qwen2", "llama"])
def test_prefill_and_steps_match_transformers(kind: str) -> None:
    model = build(kind)
    decoder = Decoder(model)
    gen = torch.Generator().manual_seed(1)
    rows = [torch.randint(0, 300, (n,), generator=gen).tolist() for n in (3, 40, 7, 7, 31)]
    rows[3] = rows[2]  # a copy, computed once
    cache = decoder.cache(6)
    logits = decoder.prefill(cache, [0, 1, 2, 3, 4], rows)
    for row, got in zip(rows, logits, strict=True):
        torch.testing.assert_close(got, last_logits(model, row), atol=2e-5, rtol=1e-4)
    assert cache.lens[:5].tolist() == [len(r) for r in rows]
    for step in range(3):  # the cache grows past its first capacity on the way
        tokens = torch.randint(0, 300, (5,), generator=gen)
        rows = [[*r, int(t)] for r, t in zip(rows, tokens, strict=True)]
        logits = decoder.step(cache, tokens)
        for row, got in zip(rows, logits, strict=True):
            torch.testing.assert_close(got, last_logits(model, row), atol=2e-5, rtol=1e-4, msg=f"step {step}")
    cache.move(4, 1)  # row 1 finished: the last row takes its slot
    rows = [rows[0], rows[4], rows[2], rows[3]]
    tokens = torch.tensor([5, 6, 7, 8])
    logits = decoder.step(cache, tokens)
    for row, t, got in zip(rows, tokens.tolist(), logits, strict=True):
        torch.testing.assert_close(got, last_logits(model, [*row, t]), atol=2e-5, rtol=1e-4)


def test_a_step_over_rows_of_many_lengths_runs_in_spans_and_matches_transformers() -> None:
    model = build("qwen3")
    decoder = Decoder(model)
    gen = torch.Generator().manual_seed(3)
    rows = [torch.randint(0, 300, (n,), generator=gen).tolist() for n in [*([4] * 20), *range(100, 120)]]
    assert len(attention_spans([len(r) + 1 for r in rows])) == 3  # 16 short rows, 4 + 12, 8 long
    cache = decoder.cache(len(rows))
    decoder.prefill(cache, list(range(len(rows))), rows)
    tokens = torch.randint(0, 300, (len(rows),), generator=gen)
    logits = decoder.step(cache, tokens)
    for row, t, got in zip(rows, tokens.tolist(), logits, strict=True):
        torch.testing.assert_close(got, last_logits(model, [*row, t]), atol=2e-5, rtol=1e-4)
    assert attention_spans([50] * 40) == [(0, 40, 50)]  # nothing to save: one span


def test_buckets_bound_the_padding() -> None:
    rows = [tuple(range(n)) for n in (4, 5, 6, 20, 24, 25, 100)]
    cut = buckets(rows)
    assert [[len(r) for r in b] for b in cut] == [[4, 5], [6], [20, 24, 25], [100]]
    assert [r for b in cut for r in b] == rows


def test_rows_joining_a_running_batch_decode_as_a_plain_forward_pass() -> None:
    """Rows join at the next step, while others run; each row's logprobs are those of a
    plain forward pass over its own tokens, whoever shared its steps."""
    model = build("qwen3")
    gen = torch.Generator().manual_seed(2)
    long = SamplingSpec(max_new_tokens=40, temperature=1.0, ignore_eos=True)
    short = SamplingSpec(max_new_tokens=4, temperature=0.7, ignore_eos=True)
    batch = RunningBatch(model, "0", slots=5, eos_ids=frozenset())
    first = [Sequence(torch.randint(0, 300, (9,), generator=gen).tolist(), long, torch.Generator().manual_seed(0))]
    batch.join(first)
    finished: list[Sequence] = []
    for step in range(60):
        if step in (3, 5, 11):  # at 5, the rows that joined at 3 are still running
            batch.join([Sequence(torch.randint(0, 300, (n,), generator=gen).tolist(), short) for n in (2, 17)])
        finished += batch.sample()
        if not batch.rows:
            break
        batch.forward()
    assert len(finished) == 7 and not batch.rows
    assert [len(s.output_ids) for s in finished if s.spec is short] == [4] * 6
    assert finished[-1] is first[0] and len(first[0].output_ids) == 40
    for s in finished:
        ids = torch.tensor([s.prompt_ids + s.output_ids])
        with torch.inference_mode():
            logp = torch.log_softmax(model(input_ids=ids).logits[0].float() / s.spec.temperature, dim=-1)
        want = [logp[len(s.prompt_ids) - 1 + i, t].item() for i, t in enumerate(s.output_ids)]
        assert max(abs(a - b) for a, b in zip(want, s.logprobs, strict=True)) < 1e-4


def test_a_finished_row_leaves_and_its_slot_is_reused() -> None:
    model = build("qwen3")
    batch = RunningBatch(model, "0", slots=2, eos_ids=frozenset())
    spec = [SamplingSpec(max_new_tokens=n, ignore_eos=True) for n in (1, 6)]
    a, b = (Sequence([1, 2, 3], s) for s in spec)
    batch.join([a, b])
    assert batch.free == 0
    assert batch.sample() == [a] and batch.rows == [b] and batch.free == 1
    batch.forward()
    c = Sequence([4, 5], SamplingSpec(max_new_tokens=2, ignore_eos=True))
    batch.join([c])
    assert batch.rows == [b, c]
    while batch.rows:
        batch.sample()
        batch.forward()
    assert [len(s.output_ids) for s in (a, b, c)] == [1, 6, 2]


def test_a_weight_change_mid_run_is_noted_and_retract_recomputes() -> None:
    model, other = build("qwen3"), build("qwen3")
    with torch.no_grad():
        for p in other.parameters():
            p.add_(torch.randn_like(p) * 0.5)
    for recompute in (False, True):
        batch = RunningBatch(model, "1", slots=1, eos_ids=frozenset())
        s = Sequence([7, 8, 9], SamplingSpec(max_new_tokens=6, temperature=1.0, ignore_eos=True))
        batch.join([s])
        for _ in range(3):
            batch.sample()
            batch.forward()
        batch.sample()
        batch.reweigh(other, "2", recompute=recompute)
        batch.forward()
        while batch.rows:
            batch.sample()
            batch.forward()
        assert s.spans() == [("1", 0, 4), ("2", 4, 6)]
        ids = s.prompt_ids + s.output_ids
        with torch.inference_mode():
            new = torch.log_softmax(other(input_ids=torch.tensor([ids])).logits[0].float(), dim=-1)
        gap = abs(new[len(ids) - 2, ids[-1]].item() - s.logprobs[-1])
        # Retract: the last token's logprob is the new weights' over the whole sequence; in
        # place, the old weights' keys and values stay in the cache, so it differs.
        assert gap < 1e-4 if recompute else gap > 1e-2, (recompute, gap)


def test_decode_all_runs_a_batch_to_completion() -> None:
    model = build("qwen3")
    seqs = [Sequence([1, 2], SamplingSpec(max_new_tokens=n, ignore_eos=True)) for n in (0, 3, 5)]
    decode_all(model, seqs, eos_ids=frozenset())
    assert [len(s.output_ids) for s in seqs] == [0, 3, 5]
    assert [s.finish[0] for s in seqs] == ["length"] * 3


def test_other_architectures_are_refused_with_the_reason() -> None:
    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=100))
    assert "model_type 'gpt2'" in (unsupported(gpt2) or "")
    with pytest.raises(Unsupported, match="gpt2"):
        Decoder(gpt2)
    sliding = Qwen2ForCausalLM(Qwen2Config(**SHAPE, use_sliding_window=True, sliding_window=16))
    assert "sliding" in (unsupported(sliding) or "")
