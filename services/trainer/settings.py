"""Settings of the trainer service (section ``trainer``; env ``POPE_TRAINER__<FIELD>``).

Every default is the POPE authors' GRPO setting (DESIGN.md 1.5).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationInfo, field_validator

from services.common.config import ServiceSettings, section_config
from services.common.engine_client import EngineClient


class WandbSettings(BaseModel):
    """Weights & Biases tracking (``trainer.wandb``), beside TensorBoard: every step's metrics,
    the rollout service's pass@k evaluations and a table of samples (services/trainer/tracking.py).
    Needs the ``wandb`` extra (``pip install 'pope-rl[wandb]'``); the API key comes from
    wandb's own WANDB_API_KEY or ``wandb login``."""

    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)

    project: str | None = Field(None, min_length=1)
    """The wandb project to log to; None: wandb is off."""
    entity: str | None = Field(None, min_length=1)
    """The team or user owning the project (None: wandb's default entity)."""
    name: str | None = Field(None, min_length=1)
    """The run's display name (None: wandb makes one up)."""
    group: str | None = Field(None, min_length=1)
    """Group of the run in the wandb UI (e.g. an experiment's arms)."""
    tags: list[str] = Field(default_factory=list)
    """Tags of the run (JSON list on a flag: ``--wandb.tags '["pope", "qwen3-4b"]'``)."""
    mode: Literal["online", "offline", "disabled"] | None = None
    """wandb's mode; None: wandb's own default (WANDB_MODE, else online). An offline run is
    written under ``dir`` only, for ``wandb sync`` later."""
    dir: Path | None = None
    """Where wandb writes its run directories (``wandb/``); None: wandb's own default
    (WANDB_DIR, else the working directory)."""
    samples_every_steps: int = Field(10, ge=0)
    """Log a table of the step's samples (prompt, hint, completion, reward, variant, ...) every
    this many steps (0: never)."""
    samples_max_rows: int = Field(64, ge=1)
    """Most rows of one samples table: every group's first sample before any group's second."""


class TrainerSettings(ServiceSettings):
    section = "trainer"
    model_config = section_config("trainer")

    port: int = Field(8002, ge=0, le=65535)
    """HTTP: health, metrics and training state."""
    engine_url: str = "http://127.0.0.1:30000"
    """Engine that receives new weights (/update_weights_from_disk); empty: none (checkpoints only)."""
    engine_api_key: SecretStr | None = Field(None, min_length=1)
    """The engine's API key (SGLang's --api-key, the CPU engine's ``engine.api_key``), when it has one."""
    engine_admin_key: SecretStr | None = Field(None, min_length=1)
    """The engine's admin key (SGLang's --admin-api-key, the CPU engine's ``engine.admin_api_key``),
    when it has one: every call of the trainer but /model_info is a control call (weight
    updates and sync, pause, continue), which such an engine opens with this key only."""

    engine_urls: list[str] = Field(default_factory=list)
    """More engines, each pushed every version as ``engine_url`` is (JSON list on a flag:
    ``--engine-urls '["http://h1:30000", "http://h2:30000"]'``)."""
    engine_discovery: str | None = None
    """``host:port`` of a DNS name whose addresses are engines (a Kubernetes headless
    Service), resolved at every check: engines that appear are loaded and routed, ones that
    go are forgotten. None: the engines are the listed ones only."""
    router_admin_key: SecretStr | None = Field(None, min_length=1)
    """The router's control-plane key (``pope router`` with ``POPE_ROUTER_ADMIN_KEY``), when it has one."""
    router_url: str | None = None
    """SGLang's router (``sglang-router``), whose workers the trainer keeps to the engines
    serving its weights: one that dies or lags past ``max_staleness`` leaves it until it is
    loaded again; a new one joins once loaded. None: no router (one engine)."""
    engine_dead_after: int = Field(2, ge=1)
    """Checks (every ``repush_interval_s``) an engine may fail to answer in a row before it is
    dead and taken out of the router; a push that cannot reach it (after its retries) makes it
    dead at once."""

    in_flight_updates: bool = False
    """Load each new version without draining generation first (PipelineRL's way, which the
    POPE authors used): the engine pauses with ``in_flight_pause``, loads, continues, and the
    requests it held go on with the new weights, each sample recording which weights made
    which tokens (staleness is judged by the oldest; the importance ratio stays against the
    engine's own logprobs). Off: an update waits for the requests in flight, as SGLang's
    disk update does."""
    in_flight_pause: Literal["retract", "in_place"] = "retract"
    """How an in-flight update holds the requests: ``retract`` computes their KV cache again
    under the new weights when they go on; ``in_place`` keeps the old one (cheaper, its
    first tokens after the update see keys and values of the old weights)."""

    def engine_client(self, url: str | None = None) -> EngineClient:
        """A client of ``url`` (``engine_url`` by default) that sends ``engine_api_key``, and
        ``engine_admin_key`` on the control calls."""
        key, admin = self.engine_keys()
        return EngineClient(url or self.engine_url, api_key=key, admin_key=admin)

    def engine_keys(self) -> tuple[str | None, str | None]:
        """EngineClient's ``api_key`` and ``admin_key`` from these settings."""
        return (
            self.engine_api_key.get_secret_value() if self.engine_api_key else None,
            self.engine_admin_key.get_secret_value() if self.engine_admin_key else None,
        )

    def engine_list(self) -> list[str]:
        """``engine_url`` (if set) and ``engine_urls``, each once, without trailing slashes."""
        urls = [u.rstrip("/") for u in [self.engine_url, *self.engine_urls] if u]
        return list(dict.fromkeys(urls))

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
    adam_beta1: float = Field(0.9, ge=0.0, lt=1.0)
    """AdamW's first-moment decay."""
    adam_beta2: float = Field(0.999, ge=0.0, lt=1.0)
    """AdamW's second-moment decay."""
    adam_eps: float = Field(1e-8, gt=0.0)
    """AdamW's epsilon. At the default (torch's) AdamW's first step moves every weight with a
    gradient by about the learning rate whatever the gradient's size; an epsilon near the
    gradients' own size makes small gradients take proportionally small steps."""
    grad_clip: float = Field(0.3, gt=0.0)
    """Max global gradient norm."""
    clip_eps_low: float = Field(0.2, gt=0.0, lt=1.0)
    """PPO ratio clip below: the ratio is clipped to [1 - clip_eps_low, 1 + clip_eps_high]."""
    clip_eps_high: float = Field(0.2, gt=0.0)
    """PPO ratio clip above (DAPO's clip-higher raises it, e.g. 0.28)."""
    tis_cap: float | None = Field(None, gt=0.0)
    """Truncated importance sampling: correct the trainer/engine mismatch with weights capped here (e.g. 2.0)."""
    kl_coef: float = Field(0.0, ge=0.0)
    """Weight of a KL penalty to a frozen reference model (none by default)."""
    kl_estimator: Literal["k3", "k2"] = "k3"
    """The penalty's per-token estimator (services/trainer/grpo.py): k3, exp(r) - r - 1, or
    k2, r^2 / 2, whose gradient stays linear in the log-ratio r where k3's grows exponentially."""
    ref_model_path: str | None = None
    """Reference model for the KL penalty (default: model_path, the starting weights)."""
    entropy_coef: float = Field(0.0, ge=0.0)
    """Entropy bonus weight (none by default)."""
    filter_zero_variance: bool = False
    """Leave out groups whose rewards are all equal (they carry no GRPO signal); counted per variant."""
    variant_weights: dict[str, float] = Field(default_factory=lambda: {"hinted": 1.0, "unhinted": 1.0})
    """Loss weight per prompt variant (scales the advantages of that variant's groups)."""
    max_new_tokens: int = Field(16384, ge=1)
    """The longest response, as the rollout service samples it (the dr_grpo normaliser)."""
    scale_adv_by_std: bool = False
    """Divide advantages by the group's reward std (off: advantage = reward - group mean)."""
    loss_agg: Literal["constant", "token_mean", "seq_mean", "dr_grpo"] = "constant"
    """'constant': sum over tokens / nominal samples per step; token- or sequence-mean; or
    'dr_grpo': sum / (nominal samples x max_new_tokens)."""
    lr_schedule: Literal["constant", "cosine"] = "constant"
    """Learning-rate schedule after warm-up."""
    warmup_steps: int = Field(0, ge=0)
    """Linear warm-up from 0 over this many steps."""
    total_steps: int = Field(1000, ge=1)
    """Length of the cosine schedule (it ends at min_lr_ratio x learning_rate)."""
    min_lr_ratio: float = Field(0.0, ge=0.0, le=1.0)
    """Floor of the cosine schedule, as a fraction of learning_rate."""
    mask_truncated: bool = False
    """Exclude truncated responses from the loss (by default they stay, with reward 0)."""
    max_staleness: int = Field(1, ge=0)
    """Groups sampled more than this many versions before the trainer's are dropped."""
    seed: int = 0
    """Seed for torch and Python RNGs, recorded in every checkpoint's run record."""
    micro_batch_tokens: int = Field(16384, ge=1)
    """Token budget of one forward/backward pass (rows x padded length, the rows' total
    length with pack_sequences, or what share_prompts computes); gradients accumulate over
    a step's micro-batches, so memory stays bounded however long the responses are."""
    pack_sequences: bool = False
    """Lay a micro-batch's rows end to end, without pad tokens, up to micro_batch_tokens in
    all (positions restart on each row and attention never crosses rows); loss and gradient
    equal the padded layout's (rows x longest row within micro_batch_tokens). Off for now:
    it becomes the default with the FSDP2 trainer work (issue 30). The padding it removes
    and its CPU step time: docs/benchmarks.md, "Packed sequences"."""
    share_prompts: bool = True
    """Compute each group's prompt once for its completions: a micro-batch runs its distinct
    prompts (each but its last token) through the decoder, then its completions, which
    attend to their prompt's keys and values (services/trainer/prefix.py); loss and
    gradients equal the padded layout's. micro_batch_tokens counts what it computes (the
    prompts x the longest, plus the rows x the longest completion), and a group stays in
    one micro-batch unless it alone exceeds the budget (then it is split, each part
    computing the prompt again). pack_sequences, when on, takes precedence (its layout
    recomputes each row's prompt). Works with layer_checkpointing and under torchrun, where
    each decoder layer then stays gathered from its first backward to the step's end (the
    completions' backward reaches the prompt forward's graph), so a rank holds the whole
    model's weights at the end of the backward: turn it off where FSDP2 must keep them
    sharded, and where responses are long it saves little. Off: every row runs prompt +
    completion. Step times: docs/benchmarks.md, "Shared prompts"."""
    logits_chunk_tokens: int = Field(4096, ge=1)
    """Positions whose vocabulary logits are held at once: bounds the logits' memory for large
    vocabularies. A micro-batch of more positions runs the LM head chunk by chunk, each
    recomputed in the backward; one of at most this many has its logits computed once and
    kept (no recompute). With a small vocabulary set it to micro_batch_tokens or more (the
    link-chains model's 514 tokens: 8192 positions of logits are 17 MB)."""
    device: str = "cpu"
    """Torch device of the policy ("cpu", "cuda")."""
    torch_threads: int | None = Field(None, ge=1)
    """Torch intra-op threads of each trainer process (each rank under torchrun), with one
    inter-op thread; set at start, before the model loads. None: torch's choice (every core),
    except under ``pope up``, which splits the cores between the engine and the trainer
    when neither count is set (services/common/threads.py) and says what it chose; a count set here
    is kept there."""
    keep_checkpoints: int = Field(3, ge=1)
    """Newest resume states kept on disk; older ones are deleted."""
    save_every: int = Field(10, ge=1)
    """Steps between resume states (master weights, optimizer, RNG, the ledger). Groups are
    acked only once a resume state covers them, so a crash retrains at most this many
    steps' groups (once, on the restored weights). The engine's model directory is written
    every step whatever this is. The default comes from the save costs measured side by
    side (bench/checkpoint_cost.py, docs/benchmarks.md): on a Qwen3-0.6B shape the resume
    state is 6.8 GB and took 6.3x as long as the bf16 engine directory (17.7 s against
    2.8 s here; 12 bytes a parameter against 2, so about 6x at any size), on the tiny model
    2x (0.017 s against 0.009 s). Every 10 steps it adds about 0.6 of an engine directory's
    write per step, and a crash retrains at most 10 steps' groups."""
    serving_dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """dtype of the engine's model directory: "auto" is bfloat16 when the trainer runs on
    CUDA (SGLang serves bf16) and float32 on CPU (the CPU engine's dtype, so the first
    on-policy importance ratio is 1 up to float error)."""

    @field_validator("cpu_offload")
    @classmethod
    def _offload_needs_a_gpu(cls, value: bool, info: ValidationInfo) -> bool:
        device = str(info.data.get("device", ""))
        if value and not device.startswith("cuda"):
            raise ValueError(f"moves the sharded state off a GPU: it needs device 'cuda' (device is {device!r})")
        return value

    def weights_dtype(self) -> Any:
        """``serving_dtype`` as a torch dtype, "auto" resolved by ``device``."""
        import torch

        if self.serving_dtype == "auto":
            return torch.bfloat16 if self.device.startswith("cuda") else torch.float32
        return getattr(torch, self.serving_dtype)

    weight_sync: Literal["disk", "broadcast"] = "disk"
    """How new weights reach the engines: "disk", each engine loads the model directory
    (/update_weights_from_disk; the engines must see checkpoint_dir); "broadcast", rank 0
    sends them over a torch process group per engine (SGLang's /update_weights_from_distributed,
    in flattened buckets; the CPU engine over gloo), falling back to disk for an engine the
    broadcast fails, each engine paused (``in_flight_pause``) while its buckets arrive. The
    trainer side speaks gloo only: the CPU engine's; SGLang on GPUs would need NCCL, not done
    yet. The model directory is written every step either way (docs/benchmarks.md,
    "Weight sync", has both costs)."""
    broadcast_bucket_mb: int = Field(512, ge=1)
    """Largest flattened bucket of a broadcast, in MiB: one /update_weights_from_distributed
    call and one collective each; rank 0 holds one bucket beside the model."""
    broadcast_timeout_s: float = Field(120.0, gt=0.0)
    """Longest wait of each broadcast call and collective (joining a group, one bucket): an
    engine that dies or stalls fails its own push after this, the others go on."""
    broadcast_host: str | None = None
    """The address engines reach trainer rank 0 at (it hosts each group's TCP store on a free
    port, and gloo's connections). None: this machine's address on the route to each
    engine (127.0.0.1 for a local one); set it where that route is not the way back (NAT,
    a Kubernetes Service: the trainer pod's IP). Gloo picks its own interface by the
    hostname: set GLOO_SOCKET_IFNAME where that does not resolve to a reachable one."""
    weights_shard_mb: int = Field(4096, ge=1)
    """Largest safetensors shard of the engine's model directory, in MiB."""
    stop_grace_s: float = Field(3.0, gt=0.0)
    """How long SIGTERM waits for the step in progress and the resume state of what was
    trained since the last one (then the loop is cancelled; nothing is lost, up to
    save_every steps are trained again). 3 s keeps `pope up`'s stop within its deadline;
    set it to a resume state's write time where the supervisor waits (compose and the
    Kubernetes manifests set 840, inside their 900 s)."""
    keep_weights: int = Field(2, ge=1)
    """Newest engine model directories kept; the one served or being loaded is never deleted."""
    consumer_name: str = "trainer"
    """This trainer's consumer name in group "trainers"; stable, so a restart takes back its own pending groups."""
    repush_interval_s: float = Field(10.0, gt=0.0)
    """How often to check every engine: that it answers and serves the trainer's version
    (re-pushed if not), and that the router's workers are the engines that may serve."""
    bf16: bool = False
    """bf16 compute on CUDA, the master weights and AdamW state staying float32: autocast in
    one process; under torchrun FSDP2's mixed precision (each layer gathered in bf16)."""
    reduce_dtype: Literal["float32", "bfloat16"] = "float32"
    """dtype FSDP2 sums gradients over ranks in (with bf16; float32 is exact, bfloat16 halves
    the traffic)."""
    nproc: int = Field(1, ge=1)
    """Trainer processes on this node: above 1, ``pope trainer`` runs itself under torchrun
    with this many ranks, the policy sharded by FSDP2 (one GPU each with device "cuda").
    Rank 0 is the service; several nodes: torchrun directly (docs/deployment.md)."""
    layer_checkpointing: bool = False
    """Recompute each decoder layer's activations in the backward instead of keeping them:
    activation memory drops to about a layer's inputs (``pope trainer plan`` gives both),
    at about a third more compute."""
    cpu_offload: bool = False
    """Under torchrun on CUDA: keep the sharded weights, gradients and AdamW state in host
    memory (FSDP2's CPUOffloadPolicy), each layer copied to the GPU as it runs."""
    record_groups: Path | None = None
    """Append every trained group to this JSON-lines file (its ids, token ids, logprobs,
    rewards and the step that trained it), for ``pope trainer replay --groups FILE``."""
    metrics_log: Path = Path("runs/trainer_metrics.jsonl")
    """Every step's metrics, one JSON object per line (also at GET /v1/history and /metrics)."""
    tensorboard_dir: Path | None = Path("runs/tensorboard")
    """TensorBoard event files of every step's metrics (None: off)."""
    wandb: WandbSettings = Field(default_factory=WandbSettings)
    """Weights & Biases: the step metrics, the evaluations and samples tables (off unless
    ``project`` is set)."""
    history_len: int = Field(1000, ge=1)
    """Steps of metrics kept in Redis for GET /v1/status?history=N on the rollout service."""
    max_steps: int | None = Field(None, ge=1)
    """Stop training at this step (groups keep being read and stay pending); None: no limit."""
