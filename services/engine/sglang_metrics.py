"""What the CPU engine measures, under SGLang 0.5.23's metric names, types, labels and
buckets (sglang/srt/observability/metrics_collector.py), so one dashboard serves both
engines. Exported beside the engine's own ``pope_engine_*`` metrics; only what this engine
really measures (docs/engine.md has the table and each difference in meaning), and
tests/integration/test_sglang_metrics.py checks every name against the pinned wheel.

SGLang labels its tokenizer-side metrics (tokens, requests, latencies) with
``model_name`` (the served model name: the model path unless set) and ``engine_type``
("unified" without prefill/decode disaggregation), plus ``is_streaming`` on some; its
scheduler-side gauges add ``tp_rank``, ``pp_rank`` and ``moe_ep_rank`` (all 0 here: one
process, no parallelism).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from prometheus_client import Counter, Gauge, Histogram

TOKENIZER_LABELS = ("model_name", "engine_type")
SCHEDULER_LABELS = (*TOKENIZER_LABELS, "tp_rank", "pp_rank", "moe_ep_rank")
STREAMING = (*TOKENIZER_LABELS, "is_streaming")

# SGLang's default buckets (TokenizerMetricsCollector), so histograms from both engines add up.
E2E_BUCKETS = (0.1, 0.2, 0.4, 0.6, 0.8, 1, 2, 4, 6, 8, 10, 20, 40, 60, 80, 100, 200, 400, 600, 1200, 1800, 2400)
TTFT_BUCKETS = (0.1, 0.2, 0.4, 0.6, 0.8, 1, 2, 4, 6, 8, 10, 20, 40, 60, 80, 100, 200, 400)
TOKEN_BUCKETS = (
    *(100, 300, 500, 700, 1000, 1500, 2000, 3000, 4000, 5000, 6000, 7000, 8000, 9000, 10000),
    *(12500, 15000, 17500, 20000, 22500, 25000, 27500, 30000, 35000, 40000, 60000, 80000),
    *(100000, 200000, 300000, 400000, 600000, 800000, 1000000, 1100000),
)

PROMPT_TOKENS = Counter("sglang:prompt_tokens_total", "Prompt tokens of the finished sequences", STREAMING)
GENERATION_TOKENS = Counter("sglang:generation_tokens_total", "Tokens the finished sequences generated", STREAMING)
REQUESTS = Counter("sglang:num_requests_total", "Finished sequences (each of n copies counts)", STREAMING)
E2E_LATENCY = Histogram(
    "sglang:e2e_request_latency_seconds", "Arrival to answer of a finished sequence", STREAMING, buckets=E2E_BUCKETS
)
TTFT = Histogram(
    "sglang:time_to_first_token_seconds", "Arrival to a sequence's first sampled token", STREAMING, buckets=TTFT_BUCKETS
)
PROMPT_LENGTHS = Histogram(
    "sglang:prompt_tokens_histogram", "Prompt length of a finished sequence", TOKENIZER_LABELS, buckets=TOKEN_BUCKETS
)
GENERATION_LENGTHS = Histogram(
    "sglang:generation_tokens_histogram",
    "Tokens a finished sequence generated",
    TOKENIZER_LABELS,
    buckets=TOKEN_BUCKETS,
)
RUNNING = Gauge("sglang:num_running_reqs", "Sequences in the batch decoding now", SCHEDULER_LABELS)
QUEUED = Gauge("sglang:num_queue_reqs", "Sequences waiting for a batch", SCHEDULER_LABELS)
GEN_THROUGHPUT = Gauge("sglang:gen_throughput", "Tokens per second of the last batch decoded", SCHEDULER_LABELS)

THROUGHPUT_STALE_S = 30.0
"""SGLang's GEN_THROUGHPUT_STALENESS_SECONDS: past it without a decode, the gauge reads 0."""


@dataclass(frozen=True)
class Finished:
    """One finished sequence, as SGLang counts a finished request (each of n copies is one)."""

    prompt_tokens: int
    generation_tokens: int
    e2e_latency: float
    first_token_latency: float | None
    """Seconds from the request's arrival to its first token; None when it made none or was
    aborted (SGLang observes no time to first token for an aborted request)."""


@dataclass(frozen=True)
class DecodeRate:
    """Tokens a decode batch generated and the seconds it took, and when it ended (monotonic)."""

    tokens: int
    seconds: float
    ended: float

    def now(self, at: float | None = None) -> float:
        """Tokens per second of that batch; 0 once it is ``THROUGHPUT_STALE_S`` old."""
        at = time.monotonic() if at is None else at
        if at - self.ended > THROUGHPUT_STALE_S or self.seconds <= 0:
            return 0.0
        return self.tokens / self.seconds


class SglangMetrics:
    """The sglang: series of one served model."""

    def __init__(self, model_name: str) -> None:
        self.tokenizer = {"model_name": model_name, "engine_type": "unified"}
        self.streaming = {**self.tokenizer, "is_streaming": "false"}  # the engine refuses stream
        self.scheduler = {**self.tokenizer, "tp_rank": "0", "pp_rank": "0", "moe_ep_rank": "0"}

    def finished(self, seq: Finished) -> None:
        PROMPT_TOKENS.labels(**self.streaming).inc(seq.prompt_tokens)
        GENERATION_TOKENS.labels(**self.streaming).inc(seq.generation_tokens)
        REQUESTS.labels(**self.streaming).inc()
        E2E_LATENCY.labels(**self.streaming).observe(seq.e2e_latency)
        if seq.first_token_latency is not None:
            TTFT.labels(**self.streaming).observe(seq.first_token_latency)
        PROMPT_LENGTHS.labels(**self.tokenizer).observe(seq.prompt_tokens)
        GENERATION_LENGTHS.labels(**self.tokenizer).observe(seq.generation_tokens)

    def scheduler_state(self, running: int, queued: int, rate: DecodeRate | None) -> None:
        RUNNING.labels(**self.scheduler).set(running)
        QUEUED.labels(**self.scheduler).set(queued)
        GEN_THROUGHPUT.labels(**self.scheduler).set(rate.now() if rate else 0.0)
