"""In-flight weight updates: a generation held by an in-place or retracting pause goes on
with weights loaded meanwhile, and reports which weights made which tokens as SGLang 0.5.23
does (``meta_info.weight_versions``); the trainer's fleet updates that way without waiting
for the requests in flight."""

from __future__ import annotations

import asyncio
import shutil
from pathlib import Path

import pytest
import torch
from redis.asyncio import Redis
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from services.common.engine_client import EngineClient, GenerateOutput, SamplingParams
from services.common.keys import Keys
from services.trainer.fleet import Fleet
from services.trainer.settings import TrainerSettings
from tests.conftest import running_engine

# Long enough to outlast an update, with the continuous engine too.
LONG = SamplingParams(max_new_tokens=3000, temperature=1.0, ignore_eos=True, sampling_seed=5)
PROMPT = [1, 2, 3, 4]


@pytest.fixture(scope="module")
def other_model(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model with every weight moved: other logprobs for the same tokens."""
    out = tmp_path_factory.mktemp("other-model")
    shutil.copytree(tiny_model, out, dirs_exist_ok=True)
    weights = load_file(str(tiny_model / "model.safetensors"))
    gen = torch.Generator().manual_seed(1)
    save_file(
        {k: v + 0.05 * torch.randn(v.shape, generator=gen) for k, v in weights.items()}, str(out / "model.safetensors")
    )
    return out


def teacher_forced(model_dir: Path, out: GenerateOutput) -> list[float]:
    """log_softmax(logits / 1.0) of each output token under ``model_dir``'s weights."""
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    ids = torch.tensor([PROMPT + out.output_ids])
    with torch.inference_mode():
        logits = model(input_ids=ids).logits[0, len(PROMPT) - 1 : -1].float()
    return torch.log_softmax(logits, -1).gather(-1, torch.tensor(out.output_ids)[:, None])[:, 0].tolist()


@pytest.mark.parametrize("mode", ["retract", "in_place"])
async def test_weights_loaded_during_a_pause_make_the_rest_of_the_tokens(
    tiny_model: Path, other_model: Path, mode: str
) -> None:
    with running_engine(tiny_model) as url:
        async with EngineClient(url) as engine:
            generation = asyncio.create_task(engine.generate([PROMPT], LONG))
            await asyncio.sleep(0.3)  # some tokens in
            await engine.pause(mode)  # type: ignore[arg-type]
            await engine.update_weights_from_disk(str(other_model), 5)  # at once: nothing drained
            assert not generation.done()
            await engine.resume()
            [out] = await generation
    spans = out.meta_info.weight_versions
    assert spans is not None and [s.version for s in spans] == ["0", "5"], spans
    k = spans[0].end
    assert 0 < k < LONG.max_new_tokens and (spans[0].start, spans[1].start, spans[1].end) == (0, k, LONG.max_new_tokens)
    assert out.meta_info.weight_version == "5"  # SGLang names the last span's weights there
    assert out.weight_version == 0 and [(v.step, v.start, v.end) for v in out.version_spans] == [
        (0, 0, k),
        (5, k, LONG.max_new_tokens),
    ]
    old, new = teacher_forced(tiny_model, out), teacher_forced(other_model, out)
    assert torch.allclose(torch.tensor(out.logprobs[:k]), torch.tensor(old[:k]), atol=1e-4)
    after, theirs = torch.tensor(out.logprobs[k:]), torch.tensor(new[k:])
    if mode == "retract":  # the KV cache computed again under the new weights: exactly theirs
        assert torch.allclose(after, theirs, atol=1e-4)
    else:  # in place: the old weights' keys and values of the first k tokens are kept
        assert not torch.allclose(after, torch.tensor(old[k:]), atol=1e-3)


async def test_the_fleet_updates_in_flight_without_draining(
    tiny_model: Path, other_model: Path, aredis: Redis, keys: Keys
) -> None:
    with running_engine(tiny_model) as url:
        for in_flight in (False, True):
            settings = TrainerSettings(engine_url=url, key_prefix=keys.prefix, in_flight_updates=in_flight)
            fleet = Fleet(settings, aredis)
            async with EngineClient(url) as engine:
                await engine.update_weights_from_disk(str(tiny_model), 0)
                generation = asyncio.create_task(engine.generate([PROMPT], LONG))
                await asyncio.sleep(0.3)
                assert await fleet.push(other_model, 1)
                [out] = await generation
                versions = [s.version for s in out.meta_info.weight_versions or []]
                if in_flight:  # loaded at once; the request went on with the new weights
                    assert versions == ["0", "1"]
                else:  # the load waited for the request in flight, which is all v0's
                    assert versions == ["0"]
                assert (await engine.model_info()).weight_version == "1"
            await fleet.aclose()
