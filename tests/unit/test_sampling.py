"""The next-token sampler: logprobs before truncation, truncation itself, parameter checks,
and seeds as SGLang has them (``generators``)."""

from __future__ import annotations

import math

import pytest
import torch

from services.engine.sampling import DEFAULT_SEED, SamplingError, SamplingSpec, generators, sample_next, truncated


def test_reported_logprob_is_temperature_scaled_and_taken_before_truncation() -> None:
    logits = torch.tensor([[2.0, 1.0, 0.5, -1.0]])
    spec = SamplingSpec(temperature=0.5, top_k=1)  # top_k=1: greedy, logprob at T=1
    tok, lp = sample_next(logits, [spec], [None])
    assert int(tok) == 0 and math.isclose(float(lp), float(torch.log_softmax(logits, -1)[0, 0]), rel_tol=1e-6)
    spec = SamplingSpec(temperature=0.5, top_p=0.5)  # truncation leaves only token 0
    tok, lp = sample_next(logits, [spec], [torch.Generator().manual_seed(0)])
    assert int(tok) == 0
    assert math.isclose(float(lp), float(torch.log_softmax(logits / 0.5, -1)[0, 0]), rel_tol=1e-6)


def test_top_k_top_p_min_p_keep_the_right_tokens() -> None:
    logp = torch.log_softmax(torch.tensor([3.0, 2.0, 1.0, 0.0, -1.0]), -1)  # already sorted

    def kept(spec: SamplingSpec) -> list[int]:
        return (~truncated(logp[None, :], [spec])[0]).nonzero().flatten().tolist()

    assert kept(SamplingSpec(top_k=2)) == [0, 1]
    probs = logp.exp()
    assert kept(SamplingSpec(top_p=float(probs[0]) - 1e-3)) == [0]
    assert kept(SamplingSpec(top_p=float(probs[0]) + 1e-3)) == [0, 1]
    assert kept(SamplingSpec(min_p=0.3)) == [0, 1]  # p1/p0 = e^-1 = 0.37 >= 0.3 > e^-2
    assert kept(SamplingSpec()) == [0, 1, 2, 3, 4]


def test_sampling_follows_the_distribution() -> None:
    logits = torch.log(torch.tensor([[0.7, 0.2, 0.1]]))
    gen = torch.Generator().manual_seed(0)
    counts = torch.zeros(3)
    for _ in range(3000):
        tok, _ = sample_next(logits, [SamplingSpec()], [gen])
        counts[int(tok)] += 1
    assert torch.allclose(counts / 3000, torch.tensor([0.7, 0.2, 0.1]), atol=0.03)


def test_each_row_keeps_its_own_truncation() -> None:
    logp = torch.log_softmax(torch.tensor([[3.0, 2.0, 1.0, 0.0]] * 2), -1)
    removed = truncated(logp, [SamplingSpec(top_k=1), SamplingSpec()])
    assert removed.tolist() == [[False, True, True, True], [False, False, False, False]]


def test_rows_sample_independently_of_their_batch() -> None:
    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(1))
    specs = [SamplingSpec(temperature=1.0)] * 3
    together, _ = sample_next(logits, specs, [torch.Generator().manual_seed(i) for i in range(3)])
    alone, _ = sample_next(logits[1:2], specs[:1], [torch.Generator().manual_seed(1)])
    assert int(together[1]) == int(alone[0])


@pytest.mark.parametrize(
    ("params", "reason"),
    [
        ({"tempreature": 1}, "unknown sampling parameter"),
        ({"json_schema": "{}"}, "not supported by the CPU engine"),
        ({"top_p": 1.5}, "top_p"),
        ({"n": 0}, "n must be"),
        ({"max_new_tokens": "8"}, "must be int"),
        ({"stop_token_ids": [999]}, "stop_token_ids"),
        ({"temperature": -0.1}, "temperature"),
        ({"sampling_seed": 2**63}, "sampling_seed"),
        ({"sampling_seed": 1.5}, "must be int"),
        ({"sampling_seed": 2**70}, "sampling_seed"),
        ({"temperature": float("nan")}, "non-negative finite"),
        ({"temperature": float("inf")}, "non-negative finite"),
        ({"top_p": float("nan")}, "top_p"),
        ({"min_p": float("nan")}, "min_p"),
        ({"top_k": 0}, "top_k must be -1"),
        ({"top_k": -2}, "top_k must be -1"),
        ({"stop_token_ids": 5}, "list of token ids"),
        ({"stop_token_ids": [True]}, "list of token ids"),
        ({"min_new_tokens": False}, "not supported"),  # not its default 0, though False == 0
        ({"skip_special_tokens": "yes"}, "must be bool"),
    ],
)
def test_bad_parameters_are_refused(params: dict[str, object], reason: str) -> None:
    with pytest.raises(SamplingError, match=reason):
        SamplingSpec.parse(params, vocab_size=100)


@pytest.mark.parametrize("raw", ["greedy", 5, [1], True])
def test_sampling_params_must_be_an_object(raw: object) -> None:
    with pytest.raises(SamplingError, match="must be an object"):
        SamplingSpec.parse(raw, vocab_size=100)


def test_n_is_capped_and_integral_floats_are_integers() -> None:
    with pytest.raises(SamplingError, match="parallel_sample_num"):
        SamplingSpec.parse({"n": 10**6}, vocab_size=100, max_n=64)
    spec = SamplingSpec.parse({"n": 2.0, "max_new_tokens": 8.0, "stop_token_ids": [3.0]}, vocab_size=100, max_n=64)
    assert (spec.n, spec.max_new_tokens, spec.stop_token_ids) == (2, 8, (3,))


def test_sglang_defaults_are_accepted_and_top_k_off_values_normalised() -> None:
    spec = SamplingSpec.parse({"top_k": 1 << 30, "regex": None, "min_new_tokens": 0, "temperature": 1}, 100)
    assert spec.top_k == -1 and spec.temperature == 1.0
    assert SamplingSpec.parse({"top_k": -1}, 100).top_k == -1
    assert SamplingSpec.parse({"temperature": 0}, 100).greedy


def draws(gens: list[torch.Generator], steps: int = 16) -> list[list[float]]:
    """``steps`` uniforms per copy, drawn a step at a time for all copies, as decode does."""
    out: list[list[float]] = [[] for _ in gens]
    for _ in range(steps):
        for row, g in zip(out, gens, strict=True):
            row.append(float(torch.rand((), generator=g)))
    return out


def test_under_deterministic_inference_the_n_copies_of_a_request_share_its_seed() -> None:
    """SGLang seeds every copy of a request with its sampling_seed (42 without one), so the
    copies of one prompt are one sample: the rollout's groups must not rely on n."""
    rng = torch.Generator().manual_seed(0)
    copies = draws(generators(SamplingSpec(n=4, sampling_seed=7), deterministic=True, process_rng=rng))
    assert all(c == copies[0] for c in copies)
    assert copies[0] == draws(generators(SamplingSpec(sampling_seed=7), deterministic=True, process_rng=rng))[0]
    assert copies[0] != draws(generators(SamplingSpec(sampling_seed=8), deterministic=True, process_rng=rng))[0]
    unseeded = draws(generators(SamplingSpec(n=2), deterministic=True, process_rng=rng))
    forty_two = draws(generators(SamplingSpec(sampling_seed=DEFAULT_SEED), deterministic=True, process_rng=rng))
    assert unseeded == forty_two * 2


def test_without_deterministic_inference_the_seed_is_ignored() -> None:
    """SGLang's default: sampling_seed does not count; every copy draws from the process RNG."""
    rng = torch.Generator().manual_seed(0)
    gens = generators(SamplingSpec(n=3, sampling_seed=7), deterministic=False, process_rng=rng)
    assert all(g is rng for g in gens)
    first, again = (
        draws(generators(SamplingSpec(sampling_seed=7), deterministic=False, process_rng=rng)) for _ in "ab"
    )
    assert first != again


def test_a_tiny_temperature_is_greedy_as_in_sglang() -> None:
    spec = SamplingSpec.parse({"temperature": 1e-300}, vocab_size=100)
    assert spec.greedy and spec.temperature == 0.0
    logits = torch.randn(1, 100) * 5
    tokens, logprobs = sample_next(logits, [spec], [torch.Generator().manual_seed(0)])
    assert int(tokens[0]) == int(logits.argmax()) and torch.isfinite(logprobs).all()
