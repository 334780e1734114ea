"""The policy on one trainer rank: the model (sharded with FSDP2 under torchrun), its AdamW
and LR schedule, the frozen reference, and their checkpoints.

    build(settings, world)          load (the newest resume state, else model_path) and shard
    train(policy, groups, version)  one GRPO step (step.py) on this rank's share of the rows
    engine_tensors(policy)          the full weights in the serving dtype, one tensor at a time
                                    (every rank gathers; rank 0 gets them)
    save_resume / load_resume       the sharded resume state (torch.distributed.checkpoint)

Under torchrun every decoder layer is its own FSDP2 unit and the root (``Logprobs``, which
holds the embeddings, the final norm and the LM head) is one more, so a layer's weights
are gathered only while it runs. The resume state is a DCP checkpoint keyed by the Hugging
Face names: it loads at any world size, one process included (DCP reshards on load).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from services.common.messages import ScoredGroup
from services.trainer import checkpoint
from services.trainer.grpo import token_logprobs
from services.trainer.prefix import Prompts
from services.trainer.settings import TrainerSettings
from services.trainer.step import lr_lambda, train_step
from services.trainer.world import World, send

log = logging.getLogger(__name__)

DCP_DIR = "dcp"


class Logprobs(nn.Module):
    """A causal LM whose forward is ``grpo.token_logprobs``: the module FSDP2 shards at the
    root, so that the embeddings, the final norm and the chunked LM head are gathered by
    its own forward (token_logprobs calls the decoder and the head apart, never the
    model's forward)."""

    def __init__(self, lm: Any) -> None:
        super().__init__()
        self.lm = lm

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None,
        temperature: torch.Tensor,
        with_entropy: bool = False,
        chunk_tokens: int = 4096,
        position_ids: torch.Tensor | None = None,
        prompts: Prompts | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        logp, entropy = token_logprobs(
            self.lm, input_ids, attention_mask, temperature, with_entropy, chunk_tokens, position_ids, prompts
        )
        # Fresh tensors, not views: FSDP2's pre-backward hook sits on what the root returns,
        # and an in-place op on a view would drop it.
        return logp.clone(), (entropy.clone() if entropy is not None else None)


@dataclass
class Policy:
    """What one rank trains with. ``lm`` is the Hugging Face model inside ``net``."""

    net: Logprobs
    ref: Logprobs | None
    optimizer: torch.optim.Optimizer
    scheduler: Any
    tokenizer: Any
    settings: TrainerSettings
    world: World
    resumed: checkpoint.TrainerState | None = None  # the resume state it was loaded from

    @property
    def lm(self) -> Any:
        return self.net.lm


def build(settings: TrainerSettings, world: World, resume: Path | None) -> Policy:
    """The policy, sharded over ``world``: the resume state at ``resume`` when given (its
    architecture from the directory's config, its weights and AdamW state from the DCP
    checkpoint), else ``settings.model_path``. Every rank reads the files itself; under
    torchrun the resume state is rank 0's ``resume`` (the others' is not looked at)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if world.distributed:  # rank 0's choice: every rank loads the very same resume state
        chosen = send(world, {"resume": str(resume) if resume is not None else None} if world.leader else None)
        resume = Path(chosen["resume"]) if chosen["resume"] is not None else None
    if resume is not None:
        lm = _architecture(resume)
    elif settings.model_path is not None:
        lm = AutoModelForCausalLM.from_pretrained(settings.model_path, dtype=torch.float32)
    else:
        raise ValueError("no model to train: set trainer.model_path (or --model), or resume from checkpoint_dir")
    if settings.layer_checkpointing:
        lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    net = place(Logprobs(lm), settings, world)
    optimizer = torch.optim.AdamW(
        net.parameters(),
        lr=settings.learning_rate,
        betas=(settings.adam_beta1, settings.adam_beta2),
        eps=settings.adam_eps,
        weight_decay=settings.weight_decay,
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(settings))
    ref = None
    if settings.kl_coef > 0:  # frozen: the starting weights unless told otherwise
        ref_source = settings.ref_model_path or settings.model_path
        if ref_source is None:
            raise ValueError("kl_coef > 0 needs a reference model: set trainer.ref_model_path (or model_path)")
        ref_lm: Any = AutoModelForCausalLM.from_pretrained(ref_source, dtype=torch.float32)
        ref = place(Logprobs(ref_lm.requires_grad_(False)), settings, world).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(resume) if resume is not None else settings.model_path)
    policy = Policy(net, ref, optimizer, scheduler, tokenizer, settings, world)
    if resume is not None:
        policy.resumed = load_resume(policy, resume)
    log.info(
        "policy on %s (%s)", world.device, f"FSDP2 over {world.size} ranks" if world.distributed else "one process"
    )
    return policy


def _architecture(directory: Path) -> Any:
    """The model its ``config.json`` describes, float32, weights left uninitialised (the
    resume state overwrites every one; buffers computed at construction, such as rotary
    frequencies, are made as usual)."""
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig
    from transformers.initialization import no_init_weights

    config = AutoConfig.from_pretrained(directory)
    with no_init_weights():
        lm: Any = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    lm.tie_weights()  # (which skipping the initialisation skips too)
    if (directory / "generation_config.json").is_file():  # from_config makes a default one
        lm.generation_config = GenerationConfig.from_pretrained(directory)
    return lm


def place(net: Logprobs, settings: TrainerSettings, world: World) -> Logprobs:
    """``net`` on this rank's device: moved there in one process; under torchrun sharded
    with FSDP2, each decoder layer a unit, the root another."""
    if not world.distributed:
        return net.to(world.device)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard

    mesh = init_device_mesh(world.device.split(":")[0], (world.size,))
    mp = MixedPrecisionPolicy()  # float32 everywhere
    if settings.bf16 and world.device.startswith("cuda"):
        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=getattr(torch, settings.reduce_dtype))
    offload = CPUOffloadPolicy() if settings.cpu_offload else OffloadPolicy()
    if not settings.cpu_offload:
        net = net.to(world.device)
    layers = _decoder_layers(net.lm)
    for layer in layers:
        unit = fully_shard(layer, mesh=mesh, mp_policy=mp, offload_policy=offload)
        if settings.share_prompts and not settings.pack_sequences:
            # A layer runs twice a micro-batch (prompts, then completions: prefix.py), and the
            # completions' backward reaches into the prompt forward's graph through the keys
            # and values before that call's own pre-backward hook gathers the layer again: so
            # the layer stays gathered from its first backward on. step.py reshards every
            # unit once the step's backwards are done.
            unit.set_reshard_after_backward(False)
    # The root's float inputs are the sampling temperatures: cast to bf16 (0.8 becomes
    # 0.80078125) they would bias every logprob against the engine's. The layers' inputs
    # are hidden states, bf16 already.
    root_mp = MixedPrecisionPolicy(mp.param_dtype, mp.reduce_dtype, mp.output_dtype, cast_forward_inputs=False)
    fully_shard(net, mesh=mesh, mp_policy=root_mp, offload_policy=offload)
    return net


def _decoder_layers(lm: Any) -> list[nn.Module]:
    """The model's repeated blocks: the classes its ``_no_split_modules`` names (Hugging
    Face's own list of what must stay whole on one device)."""
    names = set(getattr(lm, "_no_split_modules", None) or [])
    layers = [m for m in lm.modules() if type(m).__name__ in names]
    if not layers:
        raise ValueError(
            f"{type(lm).__name__} names no decoder layer class (_no_split_modules): cannot shard it per layer"
        )
    return layers


def train(policy: Policy, groups: list[ScoredGroup], version: int) -> dict[str, float]:
    """One optimizer step on ``groups`` (every rank is given all of them and trains its share)."""
    pad_id = policy.tokenizer.pad_token_id if policy.tokenizer.pad_token_id is not None else 0
    return train_step(
        policy.net,
        policy.ref,
        policy.optimizer,
        policy.scheduler,
        groups,
        policy.settings,
        pad_id,
        version,
        policy.world,
    )


def engine_tensors(policy: Policy, dtype: torch.dtype) -> Iterator[tuple[str, torch.Tensor]]:
    """The model's weights by Hugging Face name, each full and cast to ``dtype`` on the CPU,
    tied weights once (the first name). A collective under torchrun: every rank iterates it
    to the end, in step; rank 0 receives the tensors, the others nothing."""
    from torch.distributed.tensor import DTensor

    lm = policy.lm
    tied = checkpoint.tied_names(lm)
    for name, tensor in lm.state_dict().items():
        if name in tied:
            continue
        full = tensor.full_tensor() if isinstance(tensor, DTensor) else tensor
        if policy.world.leader:
            yield name, checkpoint.cast(full, dtype)
        del full


def _state(policy: Policy, with_optimizer: bool) -> dict[str, Any]:
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_state_dict

    if not with_optimizer:
        return {"model": get_model_state_dict(policy.lm)}
    model, optim = get_state_dict(policy.lm, policy.optimizer)
    return {"model": model, "optimizer": optim}


def save_resume(policy: Policy, directory: Path) -> None:
    """Write this rank's shard of the master weights and AdamW state into ``directory`` (a
    collective: every rank calls it with the same path; files fsynced). An AdamW that has
    not stepped yet is left out: torch would make its state by stepping it at rate 0, which
    starts every moment's step count at 1 (the live optimizer's too)."""
    from torch.distributed.checkpoint.state_dict_saver import save

    stepped = bool(policy.optimizer.state)
    save(_state(policy, stepped), checkpoint_id=str(directory / DCP_DIR), no_dist=not policy.world.distributed)


def load_resume(policy: Policy, directory: Path) -> checkpoint.TrainerState:
    """Load the resume state at ``directory`` (written at any world size) into this rank's
    shards, with the LR schedule and the RNGs; returns its trainer state."""
    from torch.distributed.checkpoint.filesystem import FileSystemReader
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_state_dict
    from torch.distributed.checkpoint.state_dict_loader import load

    trainer_state = checkpoint.load_state(directory)  # first: refuses another run format
    stored = FileSystemReader(str(directory / DCP_DIR)).read_metadata().state_dict_metadata
    stepped = any(key.startswith("optimizer.") for key in stored)
    state = _state(policy, stepped)
    load(state, checkpoint_id=str(directory / DCP_DIR), no_dist=not policy.world.distributed)
    if stepped:
        set_state_dict(
            policy.lm, policy.optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"]
        )
    else:
        set_model_state_dict(policy.lm, state["model"])
    if trainer_state.lr_scheduler:
        policy.scheduler.load_state_dict(trainer_state.lr_scheduler)
    checkpoint.restore_rng(directory, trainer_state)
    return trainer_state
