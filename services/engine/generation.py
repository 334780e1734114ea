"""One /generate request: checking it as SGLang 0.5.23 checks it, bounding it, decoding it,
and its answer in SGLang's shape.

Bounds (``Limits``, from the engine's settings) refuse at once, with 400, a request that
would hold the engine for long or grow it without limit, before any sequence is made:
more prompts than ``max_prompts``, ``n`` over ``max_n``, or more tokens in all (rows x n x
(prompt + max_new_tokens), max_new_tokens capped to the context first, as SGLang caps it)
than ``max_request_tokens``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Any

from prometheus_client import Counter, Histogram

from services.engine.decode import Sequence
from services.engine.runtime import EngineRuntime
from services.engine.sampling import SamplingError, SamplingSpec, generators
from services.engine.sglang_metrics import Finished, SglangMetrics

PROMPT_TOKENS = Counter("pope_engine_prompt_tokens_total", "Prompt tokens prefilled")
GEN_TOKENS = Counter("pope_engine_generation_tokens_total", "Tokens generated")
LATENCY = Histogram(
    "pope_engine_e2e_latency_seconds",
    "Generate request latency",
    buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120),
)


@dataclass(frozen=True)
class Limits:
    """The engine's bounds on one request (EngineSettings documents each)."""

    max_request_bytes: int = 32 * 1024 * 1024
    max_prompts: int = 1024
    max_n: int = 64
    max_request_tokens: int = 4 * 1024 * 1024


class BadRequest(ValueError):
    """The request is malformed; answered with 400 and this message."""


class ClientGone(Exception):
    """The client of a /generate disconnected before its answer was ready."""


def _per_prompt(value: Any, n: int, name: str) -> list[Any]:
    """SGLang lets a field be one value for all prompts or a list with one per prompt."""
    if isinstance(value, list):
        if len(value) != n:
            raise BadRequest(f"{name} has {len(value)} entries for {n} prompts")
        return value
    return [value] * n


_TOKENIZING = threading.Lock()
"""One tokenization at a time: a fast tokenizer's settings are shared state (concurrent calls
from threads can fail with "Already borrowed")."""


def _prompts_one_at_a_time(body: dict[str, Any], rt: EngineRuntime, max_prompts: int) -> tuple[list[list[int]], bool]:
    with _TOKENIZING:
        return _prompts(body, rt, max_prompts)


def _prompts(body: dict[str, Any], rt: EngineRuntime, max_prompts: int) -> tuple[list[list[int]], bool]:
    """The prompts as token ids, and whether the request was a batch (at most ``max_prompts``)."""
    ids, text = body.get("input_ids"), body.get("text")
    if (ids is None) == (text is None):
        raise BadRequest("give exactly one of 'text' and 'input_ids'")
    if text is not None:
        texts = text if isinstance(text, list) else [text]
        if not texts or not all(isinstance(t, str) and t for t in texts):
            raise BadRequest("'text' must be a non-empty string or a list of them")
        if len(texts) > max_prompts:
            raise BadRequest(f"{len(texts)} prompts in one request; this engine takes at most {max_prompts}")
        return [rt.tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts], isinstance(text, list)
    batch = isinstance(ids, list) and bool(ids) and all(isinstance(r, list) for r in ids)
    rows: list[Any] = ids if batch else [ids]  # type: ignore[assignment]
    if len(rows) > max_prompts:
        raise BadRequest(f"{len(rows)} prompts in one request; this engine takes at most {max_prompts}")
    rows = [_integral(row) for row in rows]
    for i, row in enumerate(rows):
        if not isinstance(row, list) or not row or not all(type(t) is int for t in row):
            raise BadRequest(
                f"input_ids[{i}] must be a non-empty list of token ids"
                if batch
                else "'input_ids' must be a non-empty list of token ids (or a list of them)"
            )
        if not all(0 <= t < rt.vocab_size for t in row):
            raise BadRequest(f"input_ids contain a token id outside [0, {rt.vocab_size})")
    return rows, batch


def _integral(row: Any) -> Any:
    """``row`` with integral floats as ints: JSON has one number type, and JSON Schema's
    integer (the declared type of token ids) counts 5.0 as one."""
    if not isinstance(row, list):
        return row
    return [int(t) if isinstance(t, float) and t.is_integer() else t for t in row]


def _rids(rid: Any, prompts: int, batch: bool) -> list[str]:
    """Each prompt's rid as SGLang 0.5.23 names it (``GenerateReqInput._normalize_rid``): a
    single request keeps its rid; in a batch a string ``r`` names prompt i ``r_i``, a list
    must hold one distinct rid per prompt, and prompts without one get fresh ids."""
    if rid is not None and not isinstance(rid, str | list):
        raise BadRequest("The rid should be a string or a list of strings.")
    if isinstance(rid, list) and not all(isinstance(r, str) and r for r in rid):
        raise BadRequest("The rid should be a string or a list of strings.")  # non-empty ones
    if not batch:
        given = rid[0] if isinstance(rid, list) and len(rid) == 1 else rid
        if given is not None and not isinstance(given, str):
            raise BadRequest("The rid of a single request should be a string.")
        return [given or uuid.uuid4().hex]
    if rid is None:
        return [uuid.uuid4().hex for _ in range(prompts)]
    if isinstance(rid, str):
        return [f"{rid}_{i}" for i in range(prompts)]
    if len(rid) != prompts:
        raise BadRequest("The specified rids length mismatch with the batch_size for batch processing.")
    if len(set(rid)) != len(rid):
        raise BadRequest(
            f"Duplicate request IDs detected within the request: {sorted({r for r in rid if rid.count(r) > 1})}"
        )
    return list(rid)


def _finish_reason(seq: Sequence) -> dict[str, Any]:
    kind, detail = seq.finish
    if kind == "stop":
        return {"type": "stop", "matched": detail}
    if kind == "length":
        return {"type": "length", "length": detail}
    return {"type": "abort", "message": detail}


def _text(rt: EngineRuntime, seq: Sequence) -> str:
    ids = seq.output_ids
    if seq.finish[0] == "stop" and not seq.spec.no_stop_trim:
        ids = ids[:-1]  # SGLang leaves the matched stop token out of the text
    return str(rt.tokenizer.decode(ids, skip_special_tokens=seq.spec.skip_special_tokens))


def _flag(body: dict[str, Any], name: str) -> bool:
    value = body.get(name, False)
    if value is not None and not isinstance(value, bool):
        raise BadRequest(f"'{name}' must be a boolean")
    return bool(value)


async def generate(rt: EngineRuntime, body: dict[str, Any], limits: Limits) -> Any:
    start = time.monotonic()
    if _flag(body, "stream"):
        raise BadRequest("streaming is not supported by the CPU engine")
    # In a thread: tokenizing megabytes of text takes seconds, and the event loop answers
    # /health, aborts and the trainer's checks meanwhile.
    prompts, batch = await asyncio.to_thread(_prompts_one_at_a_time, body, rt, limits.max_prompts)
    raw_params = body.get("sampling_params")
    if isinstance(raw_params, list) and not all(isinstance(p, dict) for p in raw_params):
        raise BadRequest("sampling_params must be an object or a list of objects, one per prompt")
    try:
        specs = [
            SamplingSpec.parse(p, rt.vocab_size, limits.max_n)
            for p in _per_prompt(raw_params, len(prompts), "sampling_params")
        ]
    except SamplingError as exc:
        raise BadRequest(str(exc)) from exc
    if len({spec.n for spec in specs}) > 1:
        raise BadRequest("The parallel_sample_num should be the same for all samples in sample params.")
    flags = body.get("return_logprob")
    logprob = _per_prompt(False if flags is None else flags, len(prompts), "return_logprob")
    if not all(isinstance(flag, bool) for flag in logprob):
        raise BadRequest("'return_logprob' must be a boolean or a list of them, one per prompt")
    n = specs[0].n
    # SGLang makes a request with n > 1 a batch, and gives each of the n copies of a prompt
    # a fresh rid (tokenizer_manager._handle_batch_request): the prompt's own rid then names
    # no sequence, so an abort by it stops nothing, there as here.
    rids = _rids(body.get("rid"), len(prompts), batch or n > 1)
    text_in_logprobs = _flag(body, "return_text_in_logprobs")

    capped = []
    for i, (prompt, spec) in enumerate(zip(prompts, specs, strict=True)):
        room = rt.context_len - len(prompt)
        if room <= 0:
            raise BadRequest(f"prompt {i} has {len(prompt)} tokens; the context length is {rt.context_len}")
        # As SGLang does: cap the completion to the context.
        capped.append(dataclasses.replace(spec, max_new_tokens=room) if spec.max_new_tokens > room else spec)
    work = n * sum(len(prompt) + spec.max_new_tokens for prompt, spec in zip(prompts, capped, strict=True))
    if work > limits.max_request_tokens:
        raise BadRequest(
            f"the request asks for {work} tokens (rows x n x (prompt + max_new_tokens)); "
            f"this engine takes at most {limits.max_request_tokens} in one request"
        )

    seqs, seq_rids, rows = [], [], []
    for i, (prompt, spec) in enumerate(zip(prompts, capped, strict=True)):
        # The n copies share the seed under deterministic inference, as on SGLang (DESIGN.md 3).
        for gen in generators(spec, deterministic=rt.deterministic, process_rng=rt.process_rng):
            seqs.append(Sequence(prompt, spec, gen))
            seq_rids.append(rids[i] if n == 1 else uuid.uuid4().hex)
            rows.append(i)
    await rt.run(seq_rids, seqs)
    latency = time.monotonic() - start

    sglang = SglangMetrics(rt.model_path)
    out = []
    for seq, i, out_id in zip(seqs, rows, seq_rids, strict=True):
        spans = seq.spans()
        meta: dict[str, Any] = {
            "id": out_id,
            "prompt_tokens": len(seq.prompt_ids),
            "completion_tokens": len(seq.output_ids),
            "cached_tokens": 0,
            "finish_reason": _finish_reason(seq),
            # As SGLang 0.5.23 reports them (sglang/srt/utils/weight_versions.py): which
            # weights made which tokens, and the last of them as weight_version.
            "weight_version": spans[-1][0],
            "weight_versions": [{"version": v, "start": a, "end": b} for v, a, b in spans],
            "e2e_latency": latency,
        }
        if logprob[i]:
            meta["output_token_logprobs"] = [
                [lp, tok, rt.tokenizer.decode([tok]) if text_in_logprobs else None]
                for lp, tok in zip(seq.logprobs, seq.output_ids, strict=True)
            ]
        out.append({"text": _text(rt, seq), "output_ids": seq.output_ids, "meta_info": meta})
        GEN_TOKENS.inc(len(seq.output_ids))
        first = None if seq.first_token_at is None or seq.finish[0] == "abort" else seq.first_token_at - start
        sglang.finished(Finished(len(seq.prompt_ids), len(seq.output_ids), latency, first))
    PROMPT_TOKENS.inc(sum(len(p) for p in prompts))
    LATENCY.observe(latency)
    return out if batch or len(out) > 1 else out[0]
