"""Every message that crosses a service boundary, as versioned pydantic models.

The pipeline (DESIGN.md 4):

    Problem  --rollout-->  RawGroup  --verifier-->  ScoredGroup  --trainer-->  weights
                           (pope:rollouts)          (pope:scored)
    TrainerControl (version, buffered)       --> pope:state:trainer
    RunShape (the run's shape and format)    --> pope:run
    DeadLetter (a message that failed too often) --> pope:dead

Rules every model keeps:
- JSON on the wire (``encode`` / ``decode``), never pickle; unknown fields are an error,
  so a typo or a message from a newer schema is caught rather than silently dropped.
- ``schema_version`` is on every message; a reader refuses a version it does not know.
- Invariants are checked by validators, so a message that exists is a valid one.

Weight versions are the trainer's step as an int here, with the ``lineage`` they belong to
beside it (0 until a resume rewinds past pushed versions: ``Lineage``). The engine speaks
them as strings, ``"12"`` in lineage 0 and ``"12@3"`` in lineage 3 (``version_name``,
``parse_version``), so one name never means two different weights.
"""

from __future__ import annotations

import hashlib
import math
import re
from datetime import UTC, datetime
from enum import StrEnum
from typing import Annotated, ClassVar, Literal, Self, TypeVar

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    NonNegativeInt,
    ValidationError,
    model_validator,
)

# A logprob is <= 0; allow float error from the engine's log_softmax.
_LOGPROB_SLACK = 1e-4


class Variant(StrEnum):
    """Which prompt a group was sampled from (DESIGN.md 1.3-1.4)."""

    HINTED = "hinted"
    UNHINTED = "unhinted"


class ProblemLabel(StrEnum):
    """The hard-problem filter's verdict (DESIGN.md 1.1-1.2); unset before it runs."""

    EASY = "easy"
    HARD_HINTED = "hard_hinted"
    HARD_UNSOLVED = "hard_unsolved"


class FinishReason(StrEnum):
    """Why the engine stopped a sample: a stop token, the length limit, or an abort."""

    STOP = "stop"
    LENGTH = "length"
    ABORT = "abort"


class Message(BaseModel):
    """Base of every wire message: strict about unknown fields, immutable, versioned."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    schema_version: Literal[1] = 1
    """Bumped on any incompatible change; readers refuse versions they do not know."""


def utc_now() -> datetime:
    return datetime.now(UTC)


NonEmptyStr = Annotated[str, Field(min_length=1)]
TokenId = Annotated[int, Field(ge=0)]


def normalized_text(text: str) -> str:
    """A problem's text for duplicate and leakage matching: case, whitespace and
    punctuation-spacing differences ignored (``"Find  x."`` matches ``"find x ."``)."""
    return " ".join(re.sub(r"([^\w\s])", r" \1 ", text.casefold()).split())


def problem_id_for(prompt: str, answer: str) -> str:
    """Content-derived id, so re-submitting the same problem does not duplicate it."""
    digest = hashlib.sha256(f"{prompt}\x00{answer}".encode()).hexdigest()
    return f"p-{digest[:16]}"


class HintSearch(BaseModel):
    """What the hard-problem filter and the hint search found for one problem (DESIGN.md 1.1-1.2).

    Invariants: successes never exceed attempts; a chosen prefix has a fraction in (0, 1]
    and at least one hinted success.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    label: ProblemLabel
    unhinted_attempts: NonNegativeInt
    unhinted_successes: NonNegativeInt
    prefix_chars: NonNegativeInt | None = None
    """Length of the chosen prefix of ``solution`` (the hint is ``solution[:prefix_chars]``)."""
    prefix_fraction: float | None = Field(None, gt=0.0, le=1.0)
    """Chosen prefix's share of the solution's tokens."""
    prefix_tokens: NonNegativeInt | None = None
    hinted_attempts: NonNegativeInt = 0
    """Hinted samples drawn over the whole search (every prefix tried)."""
    hinted_successes: NonNegativeInt = 0
    """Successes with the chosen prefix, out of ``k_hint``."""
    prefixes_tried: NonNegativeInt = 0
    candidates: NonNegativeInt = 0
    """Cut points the search could choose from (within ``max_fraction``)."""
    cut_level: Literal["paragraph", "sentence", "line", "token"] | None = None
    tokens_spent: NonNegativeInt
    """Completion tokens generated for this problem, filter and search together."""
    method: Literal["linear", "galloping"]
    config: str
    """Fingerprint of the settings that produced this record (k, k_hint, lengths, seed,
    template version): a rebuild with other settings redoes the problem."""
    template_version: str
    model_path: str | None = None

    @model_validator(mode="after")
    def _check(self) -> Self:
        if self.unhinted_successes > self.unhinted_attempts:
            raise ValueError("unhinted_successes exceeds unhinted_attempts")
        if self.prefix_chars is not None and (self.hinted_successes < 1 or self.prefix_fraction is None):
            raise ValueError("a chosen prefix needs a hinted success and its fraction")
        return self


MAX_PROMPT_CHARS = 32_768
"""Longest problem statement: competition problems run to a few thousand characters; this
is ~8k tokens, already more than most contexts leave once a response's budget is taken."""
MAX_ANSWER_CHARS = 4_096
"""Longest reference answer (a final expression, not a derivation)."""
MAX_SOLUTION_CHARS = 65_536
"""Longest oracle solution (and so hint, a prefix of one): the search cuts at most a
fraction of it, so a longer one could only ever be trimmed."""
MAX_ID_CHARS = 256
"""Longest problem id: ids go into Redis keys, request ids and group ids."""
MAX_NOTE_CHARS = 1_024
"""Longest ``source`` or ``excluded`` note."""


class Problem(Message):
    """A math problem the system trains or evaluates on.

    Invariants:
    - ``prompt`` and ``answer`` are non-empty; ``id`` is derived from them when not given.
    - Every text is bounded in characters (``MAX_PROMPT_CHARS`` and its neighbours): one
      oversized problem stored for training stalls every step that draws it. Whether a
      problem fits the model's context is the rollout service's check (services/rollout/fit.py).
    - ``hint``, when set, is non-empty and is the privileged prefix shown in the hinted
      variant; it is prompt text and is never trained on.
    - ``label == hard_hinted`` implies a hint.
    - ``excluded``, when set, says why the problem is kept out of training (for example,
      a train problem that is also an eval problem); it is still stored and evaluated.
    """

    id: str = Field(
        default="", max_length=MAX_ID_CHARS, description="Stable id; derived from prompt and answer when empty."
    )
    prompt: Annotated[str, Field(min_length=1, max_length=MAX_PROMPT_CHARS)]
    answer: Annotated[str, Field(min_length=1, max_length=MAX_ANSWER_CHARS)]
    solution: Annotated[str, Field(min_length=1, max_length=MAX_SOLUTION_CHARS)] | None = None
    hint: Annotated[str, Field(min_length=1, max_length=MAX_SOLUTION_CHARS)] | None = None
    split: Literal["train", "eval"] = "train"
    label: ProblemLabel | None = None
    source: Annotated[str, Field(max_length=MAX_NOTE_CHARS)] | None = None
    excluded: Annotated[str, Field(max_length=MAX_NOTE_CHARS)] | None = None
    search: HintSearch | None = None
    """The hint search's record, once it has run on this problem."""

    @model_validator(mode="before")
    @classmethod
    def _derive_id(cls, data: object) -> object:
        if isinstance(data, dict) and data.get("id", "") == "":  # not another falsy value: {} is no id
            prompt, answer = data.get("prompt"), data.get("answer")
            if isinstance(prompt, str) and isinstance(answer, str) and prompt and answer:
                data = {**data, "id": problem_id_for(prompt, answer)}
        return data

    @model_validator(mode="after")
    def _check(self) -> Self:
        if self.label is ProblemLabel.HARD_HINTED and self.hint is None:
            raise ValueError("label 'hard_hinted' requires a hint")
        return self


def version_name(step: int, lineage: int = 0) -> str:
    """The engine-facing name of the weights of ``step`` in ``lineage``: ``"12"``, ``"12@3"``."""
    return str(step) if lineage == 0 else f"{step}@{lineage}"


_VERSION = re.compile(r"(\d+)(?:@(\d+))?")


def parse_version(name: str | None) -> tuple[int, int]:
    """``(step, lineage)`` of an engine's weight version name (None: the start weights)."""
    if name is None:
        return 0, 0
    match = _VERSION.fullmatch(name.strip())
    if match is None:
        raise ValueError(f"weight version {name!r} is not '<step>' or '<step>@<lineage>'")
    return int(match[1]), int(match[2] or 0)


class Lineage(BaseModel):
    """Which weights the trainer's history holds: its own ``id`` and, for every lineage it
    forked from, the last step of that lineage it keeps (``kept``).

    A resume that rewinds past versions already pushed (the trainer saved its resume
    state at step 10, pushed 11 and 12, then crashed) starts a new lineage at the resumed
    step, so the new 11 is never confused with the lost one: ``Lineage(id=1,
    forked_at=10, kept={0: 10})`` holds (5, 0) and (10, 0) and (11, 1), not (11, 0).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    id: NonNegativeInt = 0
    forked_at: NonNegativeInt = 0
    """The step this lineage resumed from (its rollout position): its first own step is
    ``forked_at + 1``."""
    kept: dict[int, NonNegativeInt] = Field(default_factory=dict)
    """Ancestor lineage -> the last step of it that is in this history."""

    def holds(self, step: int, lineage: int) -> bool:
        """Whether the weights (``step``, ``lineage``) are in this history."""
        if lineage == self.id:
            return True
        last = self.kept.get(lineage)
        return last is not None and step <= last

    def fork(self, new_id: int, at: int) -> Lineage:
        """The lineage that resumes this one's step ``at`` (a checkpoint it wrote, so at or
        after its own ``forked_at``) under ``new_id``."""
        if new_id <= self.id or at < self.forked_at:
            raise ValueError(f"cannot fork lineage {self.id} (from step {self.forked_at}) at step {at} as {new_id}")
        return Lineage(id=new_id, forked_at=at, kept={**self.kept, self.id: at})


class VersionSpan(BaseModel):
    """Completion tokens ``[start, end)`` of a sample, sampled by weights (``step``,
    ``lineage``): SGLang's ``meta_info.weight_versions``, by the trainer's names."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    step: NonNegativeInt
    lineage: NonNegativeInt = 0
    start: NonNegativeInt
    end: NonNegativeInt


class Sample(Message):
    """One completion sampled from the engine for one prompt variant of one problem.

    Invariants:
    - ``logprobs`` has one entry per completion token, each the log-probability of that
      token under the temperature-scaled sampling distribution (DESIGN.md 3), so <= 0.
    - ``prompt_ids`` is non-empty; token ids are non-negative.
    - ``weight_version`` is the version (step) of the oldest weights that sampled it, and
      ``lineage`` the lineage of that version (``Lineage``).
    - ``version_spans``, when the weights changed while it was sampled (an in-flight
      update), cover the completion in order, the first of them the oldest weights; empty:
      every token came from ``weight_version``.
    """

    problem_id: NonEmptyStr
    variant: Variant
    prompt_ids: list[TokenId] = Field(min_length=1)
    completion_ids: list[TokenId]
    logprobs: list[float]
    finish_reason: FinishReason
    weight_version: NonNegativeInt
    text: str
    lineage: NonNegativeInt = 0
    version_spans: list[VersionSpan] = Field(default_factory=list)

    @property
    def versions(self) -> list[tuple[int, int]]:
        """(step, lineage) of every weights that sampled it, oldest first."""
        return [(v.step, v.lineage) for v in self.version_spans] or [(self.weight_version, self.lineage)]

    @model_validator(mode="after")
    def _check(self) -> Self:
        if spans := self.version_spans:
            ends = [0, *(v.end for v in spans)]
            if any(v.start != ends[i] or v.end < v.start for i, v in enumerate(spans)) or ends[-1] != len(
                self.completion_ids
            ):
                raise ValueError(f"version_spans must cover the {len(self.completion_ids)} tokens in order: {spans}")
            if (spans[0].step, spans[0].lineage) != (self.weight_version, self.lineage):
                raise ValueError("weight_version and lineage must be those of the first (oldest) version span")
        if len(self.logprobs) != len(self.completion_ids):
            raise ValueError(
                f"logprobs has {len(self.logprobs)} entries but completion_ids has "
                f"{len(self.completion_ids)}; they must be one per completion token"
            )
        for i, lp in enumerate(self.logprobs):
            if not math.isfinite(lp) or lp > _LOGPROB_SLACK:
                raise ValueError(f"logprobs[{i}] = {lp} is not a log-probability (finite, <= 0)")
        return self


class RawGroup(Message):
    """G samples of one prompt variant of one problem: the unit of GRPO normalisation.

    Invariants:
    - ``group_id`` is unique: it is the idempotency key of every consumer downstream.
    - every sample has this group's ``problem_id`` and ``variant``.
    - ``weight_version`` is the oldest weight version among the samples (staleness is
      judged by the oldest policy that contributed).
    - ``prompt`` is the rendered prompt text (for a hinted group it contains the hint);
      ``answer`` is the gold answer the verifier scores against.
    - ``temperature`` is the sampling temperature: the trainer recomputes logprobs at
      exactly this temperature, so the importance ratio compares like with like.
    - ``template_version`` names the prompt template that rendered ``prompt``.
    - ``hint``, when set, is the privileged prefix the hinted prompt shows, found in
      ``prompt`` (it marks the hint for readers: the archive, the dashboard, wandb); an
      unhinted group has none.
    - ``lineage`` is the trainer lineage the group was planned under (part of its
      identity); each sample says which weights sampled it.
    """

    group_id: NonEmptyStr
    problem_id: NonEmptyStr
    variant: Variant
    prompt: str
    answer: NonEmptyStr
    samples: list[Sample] = Field(min_length=1)
    created_at: datetime = Field(default_factory=utc_now)
    weight_version: NonNegativeInt
    step: NonNegativeInt
    temperature: float = Field(gt=0.0)
    template_version: str = ""
    lineage: NonNegativeInt = 0
    hint: str | None = None
    """The hint shown in ``prompt`` (a hinted group's; None in one made before the field)."""

    @model_validator(mode="after")
    def _check_group(self) -> Self:
        if self.hint is not None:
            if self.variant is not Variant.HINTED:
                raise ValueError("only a hinted group shows a hint")
            if not self.hint or self.hint not in self.prompt:
                raise ValueError("hint must be a non-empty part of prompt")
        for i, s in enumerate(self.samples):
            if s.problem_id != self.problem_id:
                raise ValueError(
                    f"samples[{i}].problem_id {s.problem_id!r} differs from the group's {self.problem_id!r}"
                )
            if s.variant != self.variant:
                raise ValueError(f"samples[{i}].variant {s.variant!r} differs from the group's {self.variant!r}")
        oldest = min(s.weight_version for s in self.samples)
        if self.weight_version != oldest:
            raise ValueError(f"weight_version {self.weight_version} must be the oldest sample version ({oldest})")
        return self


class ScoringPolicy(StrEnum):
    """Which rules scored a sample: which boxes count and how a gold answer is read
    (services/verifier/scoring.py has them; docs/verifier.md with examples)."""

    LAST_BOX_V1 = "last-box-v1"
    """The last box alone; the gold wrapped in $...$ whatever it holds."""
    JOINED_BOXES_V2 = "joined-boxes-v2"
    """The last box with the boxes joined to it by and/or/commas/\\quad; the gold read as
    written when it is delimited or a sentence; LaTeX decimal commas and thousands."""


class Score(BaseModel):
    """The verifier's verdict on one sample (also the reply row of POST /v1/verify)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    reward: float = Field(ge=0.0, le=1.0)
    extracted: str | None = None
    timed_out: bool = False
    error: str | None = None


class ScoredGroup(RawGroup):
    """A RawGroup with one Score per sample, in sample order.

    Invariants: everything RawGroup keeps, plus ``len(scores) == len(samples)``.
    """

    scores: list[Score]
    scored_at: datetime = Field(default_factory=utc_now)
    policy: ScoringPolicy = ScoringPolicy.LAST_BOX_V1
    """The rules that scored it (a group without one came from a verifier older than the record)."""

    @model_validator(mode="after")
    def _check_scores(self) -> Self:
        if len(self.scores) != len(self.samples):
            raise ValueError(f"{len(self.scores)} scores for {len(self.samples)} samples; need one per sample")
        return self

    @classmethod
    def from_raw(
        cls, raw: RawGroup, scores: list[Score], policy: ScoringPolicy = ScoringPolicy.JOINED_BOXES_V2
    ) -> ScoredGroup:
        return cls(**dict(raw), scores=scores, policy=policy)

    @property
    def rewards(self) -> list[float]:
        return [s.reward for s in self.scores]


class TrainerControl(Message):
    """The trainer's control state, the one record the rollout scheduler acts on
    (``<prefix>state:trainer``, written and read through ``services.common.run``).

    Metrics are not here: each step's go to the trainer's history list and metrics log.
    """

    kind: Literal["trainer_control"] = "trainer_control"
    version: NonNegativeInt
    """The trainer's step, which is also the version of its newest weights."""
    buffered: NonNegativeInt
    """Scored groups read and waiting for a step: every other scored group the trainer
    holds is acked (trained, duplicate, dropped), so pending == buffered when drained."""
    dropped_stale: NonNegativeInt = 0
    """Groups dropped as too stale so far in this run."""
    dropped_aborted: NonNegativeInt = 0
    """Groups dropped because a sample was aborted by the engine (never trained)."""
    max_steps: NonNegativeInt | None = None
    """Where the trainer stops stepping, if set."""
    awaiting_checkpoint: NonNegativeInt = 0
    """Groups trained but not yet covered by a resume checkpoint: still pending (unacked)
    in the trainers' group, so pending == buffered + awaiting_checkpoint when drained."""
    dropped_lineage: NonNegativeInt = 0
    """Groups dropped because weights that sampled them were lost in a rewind."""
    lineage: Lineage = Field(default_factory=Lineage)
    """The history the trainer's weights belong to (a resume that rewound past pushed
    versions starts a new one); the scheduler plans under it."""
    instance: NonEmptyStr
    """The trainer process that wrote it."""
    updated_at: datetime = Field(default_factory=utc_now)


RUN_FORMAT = 4
"""The layout of a run's durable records (Redis keys and messages, checkpoints, plan log).
2: deterministic group ids, a run record, the plan log, typed trainer control state.
3: the engine's model directory apart from the resume state (``save_every``); lineages.
4: the resume state's weights and AdamW state as a sharded torch.distributed.checkpoint.
Records of another format are refused, never half-read."""


class RunShape(Message):
    """What every service of one run must agree on, written once under the run's key
    prefix (``<prefix>run``) by the first service to start; the others compare theirs.
    Declared once, in the config's ``shared`` section."""

    kind: Literal["run"] = "run"
    run_format: int = RUN_FORMAT
    group_size: int = Field(ge=1)
    prompts_per_step: int = Field(ge=1)
    max_new_tokens: int = Field(ge=1)
    max_staleness: int = Field(ge=0)
    written_by: NonEmptyStr = "unknown"
    """The service and instance that wrote the record."""
    written_at: datetime = Field(default_factory=utc_now)

    SHAPE_FIELDS: ClassVar[tuple[str, ...]] = ("group_size", "prompts_per_step", "max_new_tokens", "max_staleness")

    def differences(self, other: RunShape) -> list[str]:
        """The shape fields where ``other`` differs, as 'field: ours vs theirs'."""
        return [
            f"{f} is {getattr(self, f)} here but {getattr(other, f)} in the run record"
            for f in self.SHAPE_FIELDS
            if getattr(self, f) != getattr(other, f)
        ]


class DeadLetter(Message):
    """A stream entry that could not be handled; kept with its error for a human.

    ``data`` is the entry's original payload, verbatim (it may not even be valid JSON).
    """

    stream: NonEmptyStr
    group: NonEmptyStr
    entry_id: NonEmptyStr
    data: str
    error: str
    failures: NonNegativeInt
    at: datetime = Field(default_factory=utc_now)


class MessageError(ValueError):
    """A payload that is not a valid message of the expected type (never retried)."""


M = TypeVar("M", bound=BaseModel)


def encode(message: BaseModel) -> bytes:
    return message.model_dump_json().encode()


def decode(model: type[M], data: bytes | str) -> M:
    """Parse and validate ``data`` as ``model``; raise MessageError with the reason."""
    try:
        return model.model_validate_json(data)
    except ValidationError as exc:
        raise MessageError(f"not a valid {model.__name__}: {exc}") from exc
