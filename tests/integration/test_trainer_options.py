"""Switch the trainer's options on and see each do what its name says, in the metrics."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest
import torch
from redis.asyncio import Redis

from services.common.keys import Keys
from services.common.messages import FinishReason, RawGroup, Sample, Score, ScoredGroup, Variant
from services.common.streams import DeliveryPolicy, publish
from services.trainer.loop import Trainer
from services.trainer.settings import TrainerSettings
from services.trainer.sink import NoSink

POLICY = DeliveryPolicy(block_ms=100)


def group(trainer: Trainer, gid: str, variant: Variant, rewards: list[float], truncated: bool = False) -> ScoredGroup:
    """On-policy samples: completions drawn from the trainer's own model, with its logprobs."""
    gen = torch.Generator().manual_seed(hash(gid) % 2**31)
    samples = []
    for _ in rewards:
        prompt = [1, 40, 41, 42]
        completion = torch.randint(3, 500, (6,), generator=gen).tolist()
        with torch.no_grad():
            logits = trainer.policy.lm(torch.tensor([prompt + completion])).logits[0] / 0.8
        lp = torch.log_softmax(logits, -1)
        logprobs = [float(lp[len(prompt) - 1 + k, t]) for k, t in enumerate(completion)]
        samples.append(
            Sample(
                problem_id="p",
                variant=variant,
                prompt_ids=prompt,
                completion_ids=completion,
                logprobs=logprobs,
                weight_version=trainer.version,
                text="",
                finish_reason=FinishReason.LENGTH if truncated else FinishReason.STOP,
            )
        )
    raw = RawGroup(
        group_id=gid,
        problem_id="p",
        variant=variant,
        prompt="q",
        answer="1",
        samples=samples,
        weight_version=trainer.version,
        step=trainer.version + 1,
        temperature=0.8,
    )
    return ScoredGroup.from_raw(raw, [Score(reward=r) for r in rewards])


async def run_steps(trainer: Trainer, aredis: Redis, keys: Keys, batches: list[list[ScoredGroup]]) -> list[Any]:
    stop = asyncio.Event()
    task = asyncio.create_task(trainer.run(stop))
    start = trainer.version
    try:
        for n, batch in enumerate(batches, start=1):
            for g in batch:
                await publish(aredis, keys.scored, g, POLICY)
            async with asyncio.timeout(60):
                while trainer.version < start + n:
                    await asyncio.sleep(0.02)
    finally:
        stop.set()
        await task
    return list(trainer.history)


def offline_settings(tiny_model: Path, tmp_path: Path, redis_url: str, keys: Keys, **kw: Any) -> TrainerSettings:
    """A trainer of ``tiny_model`` with no engine (its pushes go nowhere), groups of 4, and
    everything it writes under ``tmp_path``; ``kw`` sets the rest."""
    return TrainerSettings(
        **{
            "model_path": str(tiny_model),
            "checkpoint_dir": tmp_path / "ckpt",
            "metrics_log": tmp_path / "m.jsonl",
            "tensorboard_dir": tmp_path / "tb",
            "redis_url": redis_url,
            "key_prefix": keys.prefix,
            "streams": POLICY,
            "group_size": 4,
            **kw,
        }
    )


async def test_each_option_shows_in_the_metrics(
    tiny_model: Path, tmp_path: Path, redis_url: str, keys: Keys, aredis: Redis
) -> None:
    cfg = offline_settings(
        tiny_model,
        tmp_path,
        redis_url,
        keys,
        prompts_per_step=3,
        learning_rate=1e-2,
        lr_schedule="cosine",
        warmup_steps=2,
        total_steps=4,
        filter_zero_variance=True,
        kl_coef=0.1,
        entropy_coef=0.01,
        tis_cap=2.0,
        clip_eps_high=0.28,
        mask_truncated=True,
        variant_weights={"hinted": 2.0, "unhinted": 1.0},
        max_steps=2,
    )
    trainer = await asyncio.to_thread(Trainer, cfg, aredis, NoSink())
    first = [
        group(trainer, "a", Variant.HINTED, [1, 0, 0, 1]),
        group(trainer, "b", Variant.UNHINTED, [0, 0, 0, 0]),
        group(trainer, "c", Variant.UNHINTED, [1, 0, 1, 0], truncated=True),
    ]
    [one] = await run_steps(trainer, aredis, keys, [first])
    assert one["groups_filtered_zero_variance"] == 1  # group b: no signal, left out, counted
    assert one["unhinted/zero_variance_frac"] == 0.5 and one["hinted/zero_variance_frac"] == 0.0
    assert one["unhinted/truncated"] == 4 and one["hinted/truncated"] == 0
    assert one["lr"] == pytest.approx(0.5e-2)  # warm-up: step 1 of 2
    assert one["kl_ref_mean"] == pytest.approx(0.0, abs=1e-9)  # the model still is the reference
    assert one["entropy_mean"] > 0 and one["hinted/solve_rate"] == 1.0 and one["unhinted/solve_rate"] == 0.5
    assert one["hinted/reward_mean"] == 0.5 and one["tokens"] == 4 * 6  # truncated c masked out: only a trains

    second = [group(trainer, f"{x}2", Variant.HINTED, [1, 0, 0, 0]) for x in "def"]
    history = await run_steps(trainer, aredis, keys, [second])
    two = history[-1]
    assert two["lr"] == pytest.approx(1e-2)  # warm-up done
    assert two["kl_ref_mean"] > 0  # the policy moved away from the frozen reference
    assert two["staleness/0"] == 3
    # The same metrics in TensorBoard event files and in Redis for GET /v1/status?history=N.
    assert list((tmp_path / "tb").glob("events.out.tfevents.*"))
    steps = [json.loads(x)["step"] for x in await aredis.lrange(keys.history("trainer"), 0, -1)]
    assert steps == [2, 1]

    # max_steps=2: a full third batch is read and buffered, but not trained on.
    stop = asyncio.Event()
    task = asyncio.create_task(trainer.run(stop))
    try:
        for x in "ghi":
            await publish(aredis, keys.scored, group(trainer, f"{x}3", Variant.HINTED, [1, 0, 0, 0]), POLICY)
        async with asyncio.timeout(30):
            while len(trainer.buffer) < 3:
                await asyncio.sleep(0.02)
        assert trainer.version == 2
    finally:
        stop.set()
        await task


def test_dr_grpo_and_seq_mean_are_accepted() -> None:
    for agg in ("dr_grpo", "seq_mean", "token_mean"):
        assert TrainerSettings(loss_agg=agg).loss_agg == agg  # type: ignore[arg-type]
