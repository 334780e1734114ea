"""One GRPO optimizer step over a step's scored groups, and its metrics split by variant.

    groups --(filter zero-variance, optional)--> rows --(this rank's share, by tokens)-->
    token-budget micro-batches, padded, packed or with shared prompts --> forward (+ reference forward for KL)
    -> loss -> backward, accumulated -> clip -> AdamW

Runs in a worker thread (torch work never blocks the event loop); returns plain floats.
Under torchrun (world.py) every rank is given the step's groups, trains its share of the
rows and runs as many micro-batches as the rank with the most (a masked row fills in:
FSDP2 gathers each layer in every forward, so all ranks must make the same calls). The
loss is normalised over the whole step's rows on every rank and each rank's backward is
scaled by the world size, so FSDP2's mean over ranks is the sum: the gradient of the step
a single process takes. The metrics are summed over ranks before they are reported.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections import Counter
from collections.abc import Iterator
from typing import Any

import torch

from services.common.messages import FinishReason, ScoredGroup, Variant
from services.trainer.batch import (
    Batch,
    PackedBatch,
    Row,
    SharedBatch,
    collate,
    collate_packed,
    collate_shared,
    micro_batches,
    pack_micro_batches,
    prompt_groups,
    rows_from_groups,
    shared_micro_batches,
    shared_tokens,
    zero_variance,
)
from services.trainer.grpo import LossConfig, normalizer, policy_loss
from services.trainer.settings import TrainerSettings
from services.trainer.world import World, all_max, all_sum, share_rows

_SUMMED = ("tokens", "ratio", "clipped_low", "clipped_high", "approx_kl", "kl_ref", "entropy")


def loss_config(cfg: TrainerSettings) -> LossConfig:
    return LossConfig(
        agg=cfg.loss_agg,
        clip_eps_low=cfg.clip_eps_low,
        clip_eps_high=cfg.clip_eps_high,
        tis_cap=cfg.tis_cap,
        kl_coef=cfg.kl_coef,
        kl_estimator=cfg.kl_estimator,
        entropy_coef=cfg.entropy_coef,
    )


def lr_lambda(cfg: TrainerSettings) -> Any:
    """Multiplier of learning_rate at optimizer step k (0-based): warm-up, then constant or cosine."""

    def factor(k: int) -> float:
        if k < cfg.warmup_steps:
            return (k + 1) / cfg.warmup_steps
        if cfg.lr_schedule == "constant":
            return 1.0
        span = max(cfg.total_steps - cfg.warmup_steps, 1)
        progress = min((k - cfg.warmup_steps) / span, 1.0)
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


def train_step(
    net: Any,
    ref_net: Any,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    groups: list[ScoredGroup],
    cfg: TrainerSettings,
    pad_id: int,
    version: int,
    world: World | None = None,
) -> dict[str, float]:
    """Update ``net`` (a ``policy.Logprobs``) on ``groups``; return the step's metrics
    (``<variant>/<name>`` keys too). ``ref_net``: the frozen reference, for the KL penalty.
    ``world``: this rank's (default: one process on ``cfg.device``)."""
    world = world or World(device=cfg.device)
    started = time.monotonic()
    kept = [g for g in groups if not (cfg.filter_zero_variance and zero_variance(g))]
    rows = rows_from_groups(
        kept,
        scale_by_std=cfg.scale_adv_by_std,
        mask_truncated=cfg.mask_truncated,
        variant_weights=dict(cfg.variant_weights),
    )
    loss_cfg = loss_config(cfg)
    norm = normalizer(
        cfg.loss_agg,
        nominal_samples=cfg.prompts_per_step * cfg.group_size,
        max_response_tokens=cfg.max_new_tokens,
        step_tokens=sum(len(r.old_logprobs) for r in rows if r.trainable),
        step_sequences=sum(r.trainable for r in rows),
    )
    mine = _my_rows(rows, cfg, world)
    layout = list(_layout(mine, cfg, pad_id))
    if world.distributed:  # every rank makes as many forward/backward calls as the busiest
        most = int(all_max(world, float(len(layout))))
        layout += [([], _masked_batch(cfg, pad_id))] * (most - len(layout))
    net.train()
    optimizer.zero_grad(set_to_none=True)
    dev, head_chunk = world.device, cfg.logits_chunk_tokens
    loss_total, ratio_max = 0.0, 0.0
    sums: dict[str, dict[str, float]] = {v.value: dict.fromkeys(_SUMMED, 0.0) for v in Variant}
    for chunk, b in layout:
        ids, temp = b.input_ids.to(dev), b.temperature.to(dev)
        attn = b.attention_mask.to(dev) if isinstance(b, Batch) else None
        pos = b.position_ids.to(dev) if isinstance(b, PackedBatch | SharedBatch) else None
        row_index = b.row_index.to(dev) if isinstance(b, PackedBatch) else None
        prompts = b.prompts.to(dev) if isinstance(b, SharedBatch) else None
        with _autocast(cfg, world):
            new, entropy = net(ids, attn, temp, True, head_chunk, pos, prompts)
            ref = None
            if cfg.kl_coef > 0:
                with torch.no_grad():
                    ref, _ = ref_net(ids, attn, temp, False, head_chunk, pos, prompts)
            if cfg.entropy_coef == 0 and entropy is not None:
                entropy = entropy.detach()  # a metric only: no graph through the softmax
            loss, st = policy_loss(
                new,
                b.old_logprobs.to(dev),
                b.advantages.to(dev),
                b.loss_mask.to(dev),
                loss_cfg,
                norm,
                ref_lp=ref,
                entropy=entropy,
                row_index=row_index,
            )
        (loss * world.size).backward()  # FSDP2 averages over ranks: this makes it the sum
        loss_total += float(loss.detach())
        if chunk:  # (a masked filler row has no ratio)
            ratio_max = max(ratio_max, st.ratio_max)
        for i, row in enumerate(chunk):
            s = sums[row.variant.value]
            for name in _SUMMED:
                s[name] += float(getattr(st, name)[i])
    if world.distributed:
        _reshard(net)
    loss_total, ratio_max, sums = _over_ranks(world, loss_total, ratio_max, sums)
    compute_s = time.monotonic() - started
    grad_norm = torch.nn.utils.clip_grad_norm_(net.parameters(), cfg.grad_clip)
    if hasattr(grad_norm, "full_tensor"):  # a DTensor under FSDP2: the norm over every shard
        grad_norm = grad_norm.full_tensor()
    lr = float(optimizer.param_groups[0]["lr"])  # the rate this step uses
    optimizer.step()
    scheduler.step()
    net.eval()
    out = {
        "loss": loss_total,
        "grad_norm": float(grad_norm),
        "lr": lr,
        "ratio_max": ratio_max,
        "groups": float(len(groups)),
        "groups_filtered_zero_variance": float(len(groups) - len(kept)),
        "time_forward_backward_s": compute_s,
        "time_optimizer_s": time.monotonic() - started - compute_s,
    }
    out.update(_variant_metrics(groups, sums, cfg, version))
    return out


def _masked_batch(cfg: TrainerSettings, pad_id: int) -> Batch | PackedBatch:
    """A micro-batch of one two-token row out of the loss (no gradient, no metric): what a
    rank with fewer micro-batches than another runs, so that every rank makes the same calls."""
    row = Row([pad_id, pad_id], 1, [0.0], 0.0, 1.0, False, Variant.HINTED)
    if cfg.pack_sequences:
        return collate_packed([row])
    return collate_shared([row], pad_id) if cfg.share_prompts else collate([row], pad_id)


def _reshard(net: Any) -> None:
    """Free every FSDP2 unit's gathered weights: a unit kept gathered after its backward
    (policy.place, with shared prompts) would otherwise run the next step's forward on the
    weights from before this step's optimizer update."""
    from torch.distributed.fsdp import FSDPModule

    for module in net.modules():
        if isinstance(module, FSDPModule):
            module.reshard()


def _over_ranks(
    world: World, loss: float, ratio_max: float, sums: dict[str, dict[str, float]]
) -> tuple[float, float, dict[str, dict[str, float]]]:
    """The step's loss and per-variant sums added up, and the largest ratio, over ranks."""
    if not world.distributed:
        return loss, ratio_max, sums
    keys = [(v, name) for v in sums for name in _SUMMED]
    flat = all_sum(world, torch.tensor([loss] + [sums[v][n] for v, n in keys], dtype=torch.float64))
    out: dict[str, dict[str, float]] = {v: {} for v in sums}
    for (v, name), value in zip(keys, flat[1:].tolist(), strict=True):
        out[v][name] = value
    return float(flat[0]), all_max(world, ratio_max), out


def _my_rows(rows: list[Row], cfg: TrainerSettings, world: World) -> list[Row]:
    """This rank's share of the rows, balanced by tokens; with shared prompts, whole groups
    (by the tokens they compute), so that no prompt is computed on two ranks."""
    if world.size == 1:
        return rows
    if cfg.pack_sequences or not cfg.share_prompts:
        return [rows[i] for i in share_rows([len(r.ids) for r in rows], world.size)[world.rank]]
    groups = prompt_groups(rows)
    return [r for i in share_rows([shared_tokens(g) for g in groups], world.size)[world.rank] for r in groups[i]]


def _layout(rows: list[Row], cfg: TrainerSettings, pad_id: int) -> Iterator[tuple[list[Row], Batch | PackedBatch]]:
    """The step's micro-batches, each with its tensors: packed end to end, with shared prompts,
    or right-padded."""
    if cfg.pack_sequences:
        for chunk in pack_micro_batches(rows, cfg.micro_batch_tokens):
            yield chunk, collate_packed(chunk)
    elif cfg.share_prompts:
        for chunk in shared_micro_batches(rows, cfg.micro_batch_tokens):
            yield chunk, collate_shared(chunk, pad_id)
    else:
        for chunk in micro_batches(rows, cfg.micro_batch_tokens):
            yield chunk, collate(chunk, pad_id)


def _variant_metrics(
    groups: list[ScoredGroup], sums: dict[str, dict[str, float]], cfg: TrainerSettings, version: int
) -> dict[str, float]:
    out: dict[str, float] = {}
    all_tokens = sum(s["tokens"] for s in sums.values())
    for key in ("ratio", "approx_kl", "kl_ref", "entropy"):
        out[f"{key}_mean"] = sum(s[key] for s in sums.values()) / max(all_tokens, 1.0)
    out["clip_frac"] = sum(s["clipped_low"] + s["clipped_high"] for s in sums.values()) / max(all_tokens, 1.0)
    out["tokens"] = all_tokens
    for v in Variant:
        mine = [g for g in groups if g.variant is v]
        s, name = sums[v.value], v.value
        rewards = [r for g in mine for r in g.rewards]
        samples = [x for g in mine for x in g.samples]
        out[f"reward_{name}"] = sum(rewards) / len(rewards) if rewards else float("nan")  # kept for dashboards
        out[f"{name}/groups"] = float(len(mine))
        out[f"{name}/reward_mean"] = out[f"reward_{name}"]
        n = len(mine) or float("nan")
        out[f"{name}/solve_rate"] = sum(any(r > 0 for r in g.rewards) for g in mine) / n
        out[f"{name}/zero_variance_frac"] = sum(zero_variance(g) for g in mine) / n
        out[f"{name}/truncated"] = float(sum(x.finish_reason is FinishReason.LENGTH for x in samples))
        out[f"{name}/response_len_mean"] = (
            sum(len(x.completion_ids) for x in samples) / len(samples) if samples else float("nan")
        )
        tok = max(s["tokens"], 1.0)
        out[f"{name}/clip_frac"] = (s["clipped_low"] + s["clipped_high"]) / tok
        out[f"{name}/approx_kl"] = s["approx_kl"] / tok
        out[f"{name}/kl_ref"] = s["kl_ref"] / tok
        out[f"{name}/entropy"] = s["entropy"] / tok
        out[f"{name}/ratio_mean"] = s["ratio"] / tok
    for lag, count in Counter(version - g.weight_version for g in groups).items():
        out[f"staleness/{lag}"] = float(count)  # a histogram: groups per versions behind
    for policy, count in Counter(g.policy for g in groups).items():
        out[f"scoring/{policy}"] = float(count)  # which verifier rules scored the step's groups
    return out


def _autocast(cfg: TrainerSettings, world: World) -> Any:
    """bf16 autocast on CUDA when asked, in one process; a no-op context elsewhere (under
    FSDP2 the mixed-precision policy casts the gathered weights instead: policy.py)."""
    if cfg.bf16 and world.device.startswith("cuda") and not world.distributed:
        return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()
