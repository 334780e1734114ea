"""The sequences decoding now, as one continuously running batch (``RunningBatch``).

Each step samples one token for every row, drops the rows that finished (a stop token,
their length limit, or an abort), and runs the rest one token further; sequences that
arrive meanwhile join at the next step, prefilled into free slots of the batch's KV cache
(lean.SlotCache), so a long row never holds a short one back and a finished row's compute
is gone at once. Each row samples with its own parameters and generator
(sampling.sample_next).

Weights that change while rows run (an update during an in-place or retracting pause,
``reweigh``) are taken up at the next step: the tokens so far are noted as the old
version's (``Sequence.spans``: SGLang's ``weight_versions``), and the rows go on with the
KV cache they have (in place) or with it computed again under the new weights (retract).
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from services.engine.lean import Decoder
from services.engine.sampling import SamplingSpec, sample_next


@dataclass(eq=False)  # compared by identity: two rows may hold the same tokens
class Sequence:
    """One sequence to decode; ``abort`` may be set from another thread at any time."""

    prompt_ids: list[int]
    spec: SamplingSpec
    generator: torch.Generator | None = None
    abort: threading.Event = field(default_factory=threading.Event)
    # Filled in by decode():
    output_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    finish: tuple[str, int | str | None] = ("", None)  # ("stop", matched) | ("length", n) | ("abort", msg)
    changes: list[tuple[str, int]] = field(default_factory=list)  # (old version, its tokens) at each swap
    version: str = "0"  # of the weights that made the last token
    first_token_at: float | None = None  # time.monotonic() when its first token was sampled

    def spans(self) -> list[tuple[str, int, int]]:
        """(version, start, end) of the output tokens each weights made, oldest first; one
        span unless the weights changed while it ran. A change at which this sequence had
        no new token leaves no span."""
        n = len(self.output_ids)
        out: list[tuple[str, int, int]] = []
        for version, upto in [*self.changes, (self.version, n)]:
            end, start = min(upto, n), out[-1][2] if out else 0
            if out and end <= start:
                continue
            if out and out[-1][0] == version:
                out[-1] = (version, out[-1][1], end)
            else:
                out.append((version, start, end))
        return out


class RunningBatch:
    """The rows decoding together: row i in slot i of one KV cache, pending its next token.

    ``join`` prefills new sequences into free slots; ``sample`` draws every row's next
    token and returns the rows that finished (their slots refilled by the last rows);
    ``forward`` runs the others one token on. The owner calls them in that order, once a
    step, and may ``reweigh`` between ``sample`` and ``forward``."""

    def __init__(self, model: Any, version: str, *, slots: int, eos_ids: frozenset[int]) -> None:
        self.model, self.version, self.eos_ids = model, version, eos_ids
        self.decoder = Decoder(model)
        self.cache = self.decoder.cache(slots)
        self.slots = slots
        self.rows: list[Sequence] = []
        self._logits: torch.Tensor | None = None  # [rows, V], each row's next-token logits
        self._tokens: torch.Tensor | None = None  # [rows], sampled and not yet run

    @property
    def free(self) -> int:
        return self.slots - len(self.rows)

    @torch.inference_mode()
    def join(self, seqs: list[Sequence]) -> None:
        """Prefill ``seqs`` (at most ``free``) into the next slots; they sample at the next ``sample``."""
        if not seqs:
            return
        assert len(seqs) <= self.free and self._tokens is None, "join between forward and sample"
        first = len(self.rows)
        # By length, so that rows of similar lengths sit in neighbouring slots, and a decode
        # step's attention reads little padding (lean.attention_spans).
        seqs = sorted(seqs, key=lambda s: len(s.prompt_ids))
        for s in seqs:
            s.version = self.version
        # Room for the longest of them to finish, so the cache does not grow while they run.
        room = max(len(s.prompt_ids) + s.spec.max_new_tokens for s in seqs)
        slots = list(range(first, first + len(seqs)))
        logits = self.decoder.prefill(self.cache, slots, [s.prompt_ids for s in seqs], reserve=room)
        self.rows.extend(seqs)
        self._logits = logits if self._logits is None else torch.cat([self._logits, logits])

    @torch.inference_mode()
    def sample(self) -> list[Sequence]:
        """Every row's next token; the rows that finished with it, out of the batch."""
        if self._logits is None:
            return []
        tokens, logps = sample_next(self._logits, [s.spec for s in self.rows], [s.generator for s in self.rows])
        self._logits = None
        sampled_at = time.monotonic()
        finished: list[int] = []
        # One device-to-host copy per step, not one per row.
        for i, (s, tok, lp) in enumerate(zip(self.rows, tokens.tolist(), logps.tolist(), strict=True)):
            s.output_ids.append(tok)
            s.logprobs.append(lp)
            if s.first_token_at is None:
                s.first_token_at = sampled_at
            if _check_finished(s, tok, self.eos_ids):
                finished.append(i)
        done = [self.rows[i] for i in finished]
        if finished:
            keep = tokens.clone()
            for i in reversed(finished):  # the last row into each finished row's slot
                last = len(self.rows) - 1
                if i != last:
                    self.cache.move(last, i)
                    self.rows[i] = self.rows[last]
                    keep[i] = keep[last]
                self.rows.pop()
            tokens = keep[: len(self.rows)]
        self._tokens = tokens if self.rows else None
        return done

    @torch.inference_mode()
    def reweigh(self, model: Any, version: str, *, recompute: bool) -> None:
        """Go on with weights ``version``: the rows note which weights made their tokens so far,
        and keep their KV cache, or (``recompute``) have it computed again under ``model``."""
        if version == self.version:
            return
        if model is not self.model:
            self.decoder = Decoder(model)
        self.model, self.version = model, version
        for s in self.rows:
            s.changes.append((s.version, len(s.output_ids)))
            s.version = version
        if recompute and self.rows:  # retract: prompt and output so far, prefilled again
            rows = [s.prompt_ids + s.output_ids for s in self.rows]
            self._tokens = None
            self._logits = self.decoder.prefill(self.cache, list(range(len(rows))), rows)

    @torch.inference_mode()
    def forward(self) -> None:
        """Run the sampled tokens: each row's logits for the next ``sample``."""
        if self._tokens is not None:
            self._logits = self.decoder.step(self.cache, self._tokens)
            self._tokens = None


def decode_all(model: Any, seqs: list[Sequence], *, eos_ids: frozenset[int], version: str = "0") -> None:
    """Decode ``seqs`` to completion as one batch, filling their outputs (benchmarks, tests)."""
    live = [s for s in seqs if not finished_before_start(s)]
    batch = RunningBatch(model, version, slots=max(1, len(live)), eos_ids=eos_ids)
    batch.join(live)
    while batch.rows:
        batch.sample()
        batch.forward()


def finished_before_start(s: Sequence) -> bool:
    if s.abort.is_set():
        s.finish = ("abort", "aborted before it started")
        return True
    if s.spec.max_new_tokens == 0:
        s.finish = ("length", 0)
        return True
    return False


def _check_finished(s: Sequence, tok: int, eos_ids: frozenset[int]) -> bool:
    if s.abort.is_set():
        s.finish = ("abort", "request aborted")
    elif tok in s.spec.stop_token_ids or (tok in eos_ids and not s.spec.ignore_eos):
        s.finish = ("stop", tok)
    elif len(s.output_ids) >= s.spec.max_new_tokens:
        s.finish = ("length", s.spec.max_new_tokens)
    else:
        return False
    return True
