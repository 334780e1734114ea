"""The engine's runtime: a model, a request queue, and one thread that decodes.

Requests from the HTTP server are queued as jobs of sequences. The decode thread runs one
continuous batch (decode.RunningBatch, up to ``max_batch`` rows): before every step the
sequences that arrived join it (an idle engine first waits ``batch_wait_ms`` for a burst
to gather), each step finishes some rows and frees their slots, and a job answers once all
its sequences have finished. Queued sequences that are aborted answer at once. Torch runs
in that thread, never on the event loop, so health checks and aborts answer while it
decodes.

Weight updates (``update_weights``) load the new weights beside the serving ones, then
swap them in. As SGLang does: while generating, once the rows running have finished on the
weights they started with (or were aborted, if asked), new rows waiting meanwhile
(``_drained``: SGLang's writer lock); while paused in place or retracting (``pause``), at
once, the rows going on with the new weights when generation continues, each sequence
noting which weights made which of its tokens. A load that fails leaves the old weights
serving.

Weight updates are serialized (``_update_lock``), as SGLang serializes them under its
tokenizer manager's ``model_update_lock`` (a writer lock): a second update waits for the
first to finish, then runs. Every ``from_pretrained`` of the process also holds one
lock (``_LOAD_LOCK``): transformers' loading is not thread-safe. For the length of a load
it swaps process-wide state (``torch.nn.init``'s functions, ``PreTrainedModel.init_weights``,
``torch.linspace``, a meta-device context, the default dtype) and on exit restores what it
found on entry; loads that overlap restore each other's swapped state, which then stays:
four concurrent loads left every later one failing with "Cannot copy out of meta tensor"
until a restart (tests/integration/test_engine_hostile.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from services.engine.decode import RunningBatch, Sequence, finished_before_start
from services.engine.lean import unsupported
from services.engine.sglang_metrics import DecodeRate
from services.engine.weight_sync import WeightGroups

log = logging.getLogger(__name__)

PauseMode = Literal["abort", "in_place", "retract"]


class WeightLoadError(RuntimeError):
    """New weights could not be loaded; the old ones keep serving."""


class WeightsNotFound(WeightLoadError):
    """No model directory at the path given (an HTTP 404, SGLang's 400)."""


class WeightUpdateBusy(WeightLoadError):
    """The update cannot be serialized behind the one in progress (an HTTP 409)."""


RATE_WINDOW_S = 1.0
"""The decode rate (``last_rate``) is of windows this long."""

_LOAD_LOCK = threading.Lock()
"""Held by every ``from_pretrained`` of the process (see the module docstring)."""


@dataclass
class Job:
    """The sequences of one HTTP request; ``on_done`` is called from the decode thread."""

    rids: list[str]
    seqs: list[Sequence]
    on_done: Callable[[str], None]  # called with the weight version that decoded the job
    arrived: float = field(default_factory=time.monotonic)
    left: int = 0  # sequences not finished yet (the decode thread counts them down)


def load_model(path: str | Path, device: str, dtype: torch.dtype) -> Any:
    """An HF causal LM from a local directory, in eval mode (typed Any: transformers'
    model classes are not usefully typed)."""
    from transformers import AutoModelForCausalLM

    with _LOAD_LOCK:
        model: Any = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype)
    return model.to(device).eval()


def load_checked(path: str | Path, device: str, dtype: torch.dtype) -> Any:
    """``load_model``, refusing a checkpoint that does not fill the whole model: transformers
    initialises missing weights at random and, with mismatched shapes, warns and goes on;
    served, either would be a silently different model."""
    from transformers import AutoModelForCausalLM

    with _LOAD_LOCK:
        loaded: Any = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype, output_loading_info=True)
    model, info = loaded
    problems = {k: v for k, v in info.items() if k in ("missing_keys", "mismatched_keys") and v}
    if problems:
        raise WeightLoadError(f"the checkpoint at {path!r} does not fit its config: {problems}")
    return model.to(device).eval()


class EngineRuntime:
    """Owns the model and the decode thread; every method is safe to call from any thread."""

    def __init__(
        self,
        model_path: str,
        *,
        weight_version: str = "0",
        device: str = "cpu",
        dtype: torch.dtype = torch.float32,
        max_batch: int = 64,
        batch_wait_ms: float = 5.0,
        deterministic: bool = False,
        weight_sync_timeout_s: float = 120.0,
    ) -> None:
        from transformers import AutoTokenizer

        self.model_path = model_path
        self.device, self.dtype = device, dtype
        self.max_batch, self.batch_wait_s = max_batch, batch_wait_ms / 1000
        # SGLang's --enable-deterministic-inference: whether sampling_seed counts (sampling.generators).
        self.deterministic = deterministic
        self.process_rng = torch.Generator()  # unseeded sampling; only the decode thread draws
        self.process_rng.seed()  # a fresh seed per start, as SGLang picks a random --random-seed
        self.tokenizer: Any = AutoTokenizer.from_pretrained(model_path)
        self.model: Any = load_model(model_path, device, dtype)
        self.weight_version = weight_version
        self.weight_groups = WeightGroups(weight_sync_timeout_s)  # broadcast weight sync
        self.vocab_size = int(self.model.config.vocab_size)
        self.context_len = int(getattr(self.model.config, "max_position_embeddings", 1 << 20))
        eos = self.model.generation_config.eos_token_id or self.tokenizer.eos_token_id
        self.eos_ids = frozenset([eos] if isinstance(eos, int) else (eos or []))
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        reason = unsupported(self.model)
        if reason:
            raise WeightLoadError(f"the CPU engine cannot serve {model_path!r}: {reason}")
        self._queue: queue.Queue[Job | None] = queue.Queue()
        self._jobs: dict[int, tuple[Job, str]] = {}  # id(sequence) -> its job and rid, until it finishes
        self._batch: RunningBatch | None = None  # kept between busy spells while the model is the same
        self._model_lock = threading.Lock()  # held by the decode thread while its batch has rows
        self._drain = threading.Condition()  # guards _draining
        self._draining = 0  # weight updates waiting for the running rows to finish
        self._swap_lock = threading.Lock()  # guards (model, weight_version) together
        self._update_lock = threading.Lock()  # one weight update at a time (module docstring)
        self._resume = threading.Event()  # cleared while paused
        self._resume.set()
        self._pause_mode: PauseMode = "abort"  # of the last pause
        self._live: dict[str, list[Sequence]] = {}  # rid -> its sequences, until done
        self._live_lock = threading.Lock()
        self._closing = False  # set once: every sequence submitted after is aborted at once
        self._thread = threading.Thread(target=self._loop, name="decode", daemon=True)
        self.running = 0  # sequences in the batch decoding now
        self.queued = 0  # sequences submitted and not yet in the running batch
        self.last_rate: DecodeRate | None = None  # tokens/s over the last RATE_WINDOW_S of decoding
        self._window: tuple[int, float] | None = None  # tokens so far in the current window, its start

    # Lifecycle.
    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self.close()
        self._resume.set()
        self._queue.put(None)
        self._thread.join(timeout=30)

    def close(self) -> None:
        """Abort what runs and whatever is submitted from now on, so that every request
        answers at once (finish_reason abort) and the server can stop: at SIGTERM, since a
        generation can run for minutes and uvicorn waits for the requests in flight."""
        with self._live_lock:
            self._closing = True
        self.abort(abort_all=True)

    # Requests.
    def submit(self, job: Job) -> None:
        with self._live_lock:
            for rid, seq in zip(job.rids, job.seqs, strict=True):
                self._live.setdefault(rid, []).append(seq)
                self._jobs[id(seq)] = (job, rid)
                if self._closing:
                    seq.abort.set()
            job.left = len(job.seqs)
            self.queued += len(job.seqs)
        self._queue.put(job)

    async def run(self, rids: list[str], seqs: list[Sequence]) -> str:
        """Queue the sequences and wait for them; return the weight version that decoded them."""
        loop = asyncio.get_running_loop()
        done: asyncio.Future[str] = loop.create_future()

        def on_done(version: str) -> None:
            def settle() -> None:
                if not done.done():
                    done.set_result(version)

            loop.call_soon_threadsafe(settle)

        self.submit(Job(rids, seqs, on_done))
        try:
            return await asyncio.shield(done)
        except asyncio.CancelledError:  # the client went away: stop decoding for it
            for seq in seqs:
                seq.abort.set()
            raise

    def abort(self, rid: str | None = None, *, abort_all: bool = False) -> int:
        """Abort the sequences of ``rid`` (or all); they finish with finish_reason abort.
        As SGLang 0.5.23 does: a rid no live sequence has aborts nothing (its tokenizer
        manager drops it), and one that a sequence has aborts every sequence whose rid
        starts with it (its scheduler matches by prefix). Returns how many were still
        running or queued and not already aborted."""
        with self._live_lock:
            if abort_all:
                targets = [s for ss in self._live.values() for s in ss]
            elif rid and rid in self._live:
                targets = [s for r, ss in self._live.items() if r.startswith(rid) for s in ss]
            else:
                targets = []
        targets = [s for s in targets if not s.finish[0] and not s.abort.is_set()]
        for s in targets:
            s.abort.set()
        return len(targets)

    def pause(self, mode: PauseMode = "abort") -> None:
        """Stop generating: ``abort`` aborts what is running; ``in_place``/``retract`` hold it
        (weights loaded meanwhile go on from its KV cache, or from one computed again)."""
        self._pause_mode = mode
        self._resume.clear()
        if mode == "abort":
            self.abort(abort_all=True)

    def resume(self) -> None:
        self._resume.set()

    @property
    def closing(self) -> bool:
        return self._closing

    @property
    def paused(self) -> bool:
        return not self._resume.is_set()

    @property
    def queue_depth(self) -> int:
        """Sequences waiting for a place in the running batch."""
        return self.queued

    # Weights.
    def update_weights(self, path: str, version: str | None, abort_all: bool = False) -> str:
        """Load weights from ``path`` and swap them in (``_drained``); return a message.

        Waits for an update in progress, as SGLang's writer lock does. Refused
        (WeightUpdateBusy, 409) while a distributed update session is open: its
        begin..end bracket belongs to whoever opened it and may last as long as they
        like (a trainer that died never ends it), so waiting for it could be forever,
        and loading in the middle of it would serve a mix of two checkpoints."""
        self._refuse_during_session()
        try:
            found = (Path(path) / "config.json").is_file()
        except (OSError, ValueError):  # a NUL byte, a name too long
            found = False
        if not found:
            raise WeightsNotFound(f"no HF model directory at {path!r} (no config.json there)")
        with self._update_lock:
            self._refuse_during_session()  # again: a session may have begun while this waited
            return self._update_from(path, version, abort_all)

    def _refuse_during_session(self) -> None:
        if self.weight_groups.session_open:
            raise WeightUpdateBusy(
                "a distributed weight update (begin_weight_update .. end_weight_update) is in progress; "
                "load from disk after end_weight_update"
            )

    def _update_from(self, path: str, version: str | None, abort_all: bool) -> str:
        try:
            new = load_checked(path, self.device, self.dtype)
        except WeightLoadError:
            raise
        except Exception as exc:  # any failure to read or build the model
            raise WeightLoadError(f"failed to load weights from {path!r}: {type(exc).__name__}: {exc}") from exc
        if int(new.config.vocab_size) != self.vocab_size:
            raise WeightLoadError(
                f"model at {path!r} has vocab_size {new.config.vocab_size}; "
                f"the served tokenizer needs {self.vocab_size}"
            )
        served = {k: tuple(v.shape) for k, v in self.model.state_dict().items()}
        loaded = {k: tuple(v.shape) for k, v in new.state_dict().items()}
        if served != loaded:
            differ = sorted(k for k in served.keys() | loaded.keys() if served.get(k) != loaded.get(k))[:5]
            raise WeightLoadError(f"model at {path!r} is not the served architecture (differs at {differ})")
        if abort_all:
            self.abort(abort_all=True)
        if self.paused and self._pause_mode != "abort":
            # A batch held by the pause goes on with these weights when generation continues
            # (SGLang too loads at once while paused, without waiting for its requests).
            self._swap(new, path, version)
        else:
            with self._drained():  # waits for the rows running to finish
                self._swap(new, path, version)
        log.info("serving weights from %s as version %s", path, self.weight_version)
        return f"Succeeded to update model weights from {path}."

    def _swap(self, model: Any, path: str, version: str | None) -> None:
        with self._swap_lock:
            self.model, self.model_path = model, path
            if version is not None:
                self.weight_version = version

    def _current(self) -> tuple[Any, str]:
        with self._swap_lock:
            return self.model, self.weight_version

    def load_tensors(self, named: list[tuple[str, torch.Tensor]], version: str | None, abort_all: bool = False) -> str:
        """Copy ``named`` (Hugging Face names, any float dtype) into the serving weights once
        the rows running have finished (``_drained``); return a message. Every name and shape
        is checked first, so a refused load changes nothing. A tied weight is sent once and updates both names.
        Serialized with the disk loads (``update_weights``)."""
        with self._update_lock:
            return self._copy_in(named, version, abort_all)

    def _copy_in(self, named: list[tuple[str, torch.Tensor]], version: str | None, abort_all: bool) -> str:
        weights = self.model.state_dict()  # name -> tensor sharing the parameter's storage
        for name, tensor in named:
            if name not in weights:
                raise WeightLoadError(f"the served model has no weight named {name!r}")
            if tuple(tensor.shape) != tuple(weights[name].shape):
                raise WeightLoadError(
                    f"{name!r} has shape {list(tensor.shape)}; the served model's is {list(weights[name].shape)}"
                )
        if abort_all:
            self.abort(abort_all=True)

        def copy() -> None:
            with self._swap_lock, torch.no_grad():
                for name, tensor in named:
                    weights[name].copy_(tensor)
                if version is not None:
                    self.weight_version = version

        if self.paused and self._pause_mode != "abort":
            copy()  # as update_weights: a held batch goes on with these weights (the decode thread waits)
        else:
            with self._drained():  # waits for the rows running to finish
                copy()
        log.info("loaded %d broadcast tensors; serving version %s", len(named), self.weight_version)
        return "Succeeded to update parameter online."

    # The decode thread.
    def _hold(self) -> None:
        """Between decode steps: wait out an in-place pause (an abort ends the wait)."""
        while not self._resume.wait(timeout=0.05):
            with self._live_lock:
                if all(s.abort.is_set() for ss in self._live.values() for s in ss):
                    return

    @contextlib.contextmanager
    def _drained(self) -> Iterator[None]:
        """No sequence decoding for the length of the block: new ones wait, and the block
        begins once those running have finished (SGLang's writer lock on weight updates)."""
        with self._drain:
            self._draining += 1
        try:
            with self._model_lock:  # held by the decode thread while its batch has rows
                yield
        finally:
            with self._drain:
                self._draining -= 1
                self._drain.notify_all()

    def _loop(self) -> None:
        waiting: deque[Sequence] = deque()  # submitted, not yet in the batch, oldest first
        batch: RunningBatch | None = None  # holds self._model_lock while it is not None
        stopping = False
        while True:
            stopping |= self._take(waiting, block=batch is None and not waiting and not stopping)
            self._drop_finished(waiting)
            if batch is None:
                if not waiting:
                    if stopping:
                        return
                    continue
                try:
                    batch = self._open()
                except Exception as exc:  # no batch could be made (out of memory): fail what waits
                    log.exception("could not start a batch for %d sequences", len(waiting))
                    for seq in waiting:
                        seq.finish = ("abort", f"engine error: {type(exc).__name__}: {exc}")
                        self._finished(seq)
                    with self._live_lock:
                        self.queued -= len(waiting)
                    waiting.clear()
                    continue
                if batch is None:  # paused, or a weight update is waiting for its turn
                    continue
            if not self.paused and not self._draining:
                admit = [waiting.popleft() for _ in range(min(batch.free, len(waiting)))]
                with self._live_lock:
                    self.queued -= len(admit)
            else:
                admit = []
            running = batch
            try:
                running.join(admit)
                self.running = rows = len(running.rows)
                if not rows:
                    self._close(keep=True)
                    batch = None
                    continue
                for seq in running.sample():
                    self._finished(seq)
                self._count(rows)
                self._hold()
                model, version = self._current()
                running.reweigh(model, version, recompute=self._pause_mode == "retract")
                running.forward()
            except Exception as exc:  # a bug or OOM must fail the requests, not the engine
                failed = running.rows + [s for s in admit if s not in running.rows]
                log.exception("decode failed for a batch of %d sequences", len(failed))
                for seq in failed:
                    seq.finish = ("abort", f"engine error: {type(exc).__name__}: {exc}")
                    self._finished(seq)
                running.rows.clear()
                self._close(keep=False)
                batch = None

    def _take(self, waiting: deque[Sequence], *, block: bool) -> bool:
        """Move submitted sequences to ``waiting``; with ``block``, wait for the first job and
        whatever arrives within the batch window after it. Whether stop was asked."""
        deadline = None
        while True:
            try:
                if block and deadline is None:
                    job = self._queue.get()
                    deadline = time.monotonic() + self.batch_wait_s
                elif deadline is not None and len(waiting) < self.max_batch:
                    job = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
                else:
                    job = self._queue.get_nowait()
            except queue.Empty:
                return False
            if job is None:  # whatever comes after is aborted (close): taken without blocking
                return True
            waiting.extend(job.seqs)

    def _drop_finished(self, waiting: deque[Sequence]) -> None:
        """Answer at once the waiting sequences that will never run (aborted, or asked for
        no tokens): SGLang drops an aborted request from its queue."""
        if any(s.abort.is_set() or s.spec.max_new_tokens == 0 for s in waiting):
            keep = [s for s in waiting if not finished_before_start(s)]
            with self._live_lock:
                self.queued -= len(waiting) - len(keep)
            for s in waiting:
                if s.finish[0]:
                    self._finished(s)
            waiting.clear()
            waiting.extend(keep)

    def _open(self) -> RunningBatch | None:
        """A batch to run sequences in, holding the model lock; None while paused or while
        a weight update waits (the caller tries again)."""
        if self.paused:
            self._resume.wait(timeout=0.05)
            return None
        with self._drain:
            if self._draining:
                self._drain.wait(timeout=0.05)
                return None
            self._model_lock.acquire()
        try:
            model, version = self._current()
            if self._batch is None or self._batch.model is not model:
                self._batch = None
                self._batch = RunningBatch(model, version, slots=self.max_batch, eos_ids=self.eos_ids)
            self._batch.reweigh(model, version, recompute=False)
        except BaseException:
            self._model_lock.release()
            raise
        return self._batch

    def _close(self, *, keep: bool) -> None:
        """The batch has no rows: let a weight update in (not ``keep``: drop its cache, as after a failure)."""
        if not keep:
            self._batch = None
        self.running = 0
        self._count(0, end=True)
        self._model_lock.release()

    def _count(self, tokens: int, *, end: bool = False) -> None:
        """``tokens`` decoded just now; every RATE_WINDOW_S (and at the end of a busy spell)
        the rate of the window is published as ``last_rate``."""
        now = time.monotonic()
        total, since = self._window or (0, now)
        total += tokens
        if total and (end or now - since >= RATE_WINDOW_S):
            self.last_rate = DecodeRate(total, now - since, now)
            self._window = None
        else:
            self._window = (total, since) if not end else None

    def _finished(self, seq: Sequence) -> None:
        """``seq`` is done: its job answers once all its sequences are."""
        job, rid = self._jobs.pop(id(seq))
        with self._live_lock:
            live = self._live.get(rid, [])
            if seq in live:
                live.remove(seq)
            if not live:
                self._live.pop(rid, None)
            job.left -= 1
            done = job.left == 0
        if done:
            job.on_done(seq.version)
