"""Settings of the trainer service (section ``trainer``; env ``POPE_TRAINER__<FIELD>``).

Every default is the POPE authors' GRPO setting (DESIGN.md 1.5).
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field

from services.common.config import ServiceSettings, section_config


class TrainerSettings(ServiceSettings):
    section = "trainer"
    model_config = section_config("trainer")

    port: int = Field(8002, ge=0, le=65535)
    """HTTP: health, metrics and training state."""
    engine_url: str = "http://127.0.0.1:30000"
    """Engine that receives new weights (/update_weights_from_disk)."""
    model_path: str | None = None
    """HF-format model directory to start training from."""
    checkpoint_dir: Path = Path("runs/checkpoints")
    """Where checkpoints (HF safetensors + run record) go; the engine must see this path."""
    group_size: int = Field(8, ge=2)
    """Samples per group (G), as the rollout service makes them."""
    prompts_per_step: int = Field(32, ge=1)
    """Groups per optimizer step."""
    learning_rate: float = Field(1e-6, gt=0.0)
    """AdamW learning rate."""
    weight_decay: float = Field(0.01, ge=0.0)
    """AdamW weight decay."""
    grad_clip: float = Field(0.3, gt=0.0)
    """Max global gradient norm."""
    clip_eps: float = Field(0.2, gt=0.0)
    """PPO ratio clip: the ratio is clipped to [1 - eps, 1 + eps]."""
    kl_coef: float = Field(0.0, ge=0.0)
    """KL penalty weight (none by default)."""
    scale_adv_by_std: bool = False
    """Divide advantages by the group's reward std (off: advantage = reward - group mean)."""
    loss_agg: Literal["constant", "token_mean", "seq_mean"] = "constant"
    """'constant': sum over tokens / nominal samples per step; or token- or sequence-mean."""
    mask_truncated: bool = False
    """Exclude truncated responses from the loss (by default they stay, with reward 0)."""
    max_staleness: int = Field(1, ge=0)
    """Groups sampled more than this many versions before the trainer's are dropped."""
    seed: int = 0
    """Seed for torch and Python RNGs, recorded in every checkpoint's run record."""
    micro_batch: int = Field(8, ge=1)
    """Samples per forward/backward pass; gradients accumulate over a step's micro-batches."""
    device: str = "cpu"
    """Torch device of the policy ("cpu", "cuda")."""
    keep_checkpoints: int = Field(3, ge=1)
    """Newest checkpoints kept on disk; older ones are deleted."""
    consumer_name: str = "trainer"
    """This trainer's consumer name in group "trainers"; stable, so a restart takes back its own pending groups."""
    repush_interval_s: float = Field(10.0, gt=0.0)
    """How often to check that the engine serves the trainer's version (and re-push if not)."""
