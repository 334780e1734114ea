"""Decode throughput of the CPU engine against transformers' ``generate``, side by side.

    .venv/bin/python bench/engine.py [--batch 64] [--new-tokens 128] [--repeats 5] [--http]

Both decode the same prompts with the same model, batch size, sampling settings
(temperature 0.8) and number of new tokens (EOS ignored, so every row runs the full
length), torch pinned to one thread. Prints the median tokens/s of each and their ratio.
``--http`` adds the engine measured end to end through ``pope engine`` over HTTP, and the
latency of short requests alone and beside a long one (continuous batching: they join the
running batch rather than wait for it).
The model is the tiny one ``pope model init`` builds, unless ``--model DIR`` is given.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from services.engine.decode import Sequence, decode_all
from services.engine.sampling import SamplingSpec
from services.engine.tiny_model import TinyModelSpec, build_tiny_model


def prompts(batch: int, vocab: int) -> list[list[int]]:
    gen = torch.Generator().manual_seed(0)
    return [torch.randint(3, vocab, (16 + 4 * i,), generator=gen).tolist() for i in range(batch)]


def bench_transformers(model: object, rows: list[list[int]], new: int, pad: int) -> float:
    width = max(len(r) for r in rows)
    ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows])
    mask = (torch.arange(width)[None, :] >= torch.tensor([width - len(r) for r in rows])[:, None]).long()
    start = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(  # type: ignore[attr-defined]
            input_ids=ids,
            attention_mask=mask,
            do_sample=True,
            temperature=0.8,
            top_p=1.0,
            top_k=0,
            max_new_tokens=new,
            min_new_tokens=new,
            pad_token_id=pad,
        )
    elapsed = time.perf_counter() - start
    assert out.shape[1] == width + new
    return len(rows) * new / elapsed


def bench_engine(model: object, rows: list[list[int]], new: int, pad: int, eos: int) -> float:
    spec = SamplingSpec(max_new_tokens=new, temperature=0.8, ignore_eos=True)
    seqs = [Sequence(r, spec) for r in rows]  # one RNG for all rows, as the engine's default and generate
    start = time.perf_counter()
    decode_all(model, seqs, eos_ids=frozenset([eos]))
    elapsed = time.perf_counter() - start
    assert all(len(s.output_ids) == new for s in seqs)
    return len(rows) * new / elapsed


@contextlib.contextmanager
def served(model_dir: Path) -> Iterator[str]:
    """``pope engine`` on ``model_dir`` (torch on one thread), until the block ends: its URL."""
    import httpx

    from services.common.redis_server import free_port

    port = free_port()
    pope = str(Path(sys.executable).parent / "pope")
    proc = subprocess.Popen(
        [pope, "engine", "--model", str(model_dir), "--port", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env={"POPE_ENGINE__TORCH_THREADS": "1", "PATH": ""},
    )
    url = f"http://127.0.0.1:{port}"
    try:
        while True:
            try:
                if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.2)
        yield url
    finally:
        proc.terminate()
        proc.wait(20)


def bench_http(url: str, rows: list[list[int]], new: int, repeats: int) -> list[float]:
    import httpx

    body = {
        "input_ids": rows,
        "sampling_params": {"max_new_tokens": new, "temperature": 0.8, "ignore_eos": True},
        "return_logprob": True,
    }
    rates = []
    for _ in range(repeats + 1):
        start = time.perf_counter()
        resp = httpx.post(f"{url}/generate", json=body, timeout=600)
        elapsed = time.perf_counter() - start
        assert resp.status_code == 200 and all(len(r["output_ids"]) == new for r in resp.json())
        rates.append(len(rows) * new / elapsed)
    return rates[1:]  # the first call warms up


def bench_mixed(url: str, rows: list[list[int]], requests: int) -> tuple[list[float], list[float]]:
    """Latency (s) of short requests (a group: 8 copies of one prompt, 32 new tokens), one
    after another, alone and while a long one (8 rows of 2,000 tokens) decodes."""
    import httpx

    def short(i: int) -> float:
        body = {"input_ids": [rows[i % len(rows)]] * 8, "sampling_params": {"max_new_tokens": 32, "ignore_eos": True}}
        start = time.perf_counter()
        assert httpx.post(f"{url}/generate", json=body, timeout=600).status_code == 200
        return time.perf_counter() - start

    alone = [short(i) for i in range(requests)]
    long = {"input_ids": rows[:8], "sampling_params": {"max_new_tokens": 2000, "ignore_eos": True}, "rid": "long"}
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        running = pool.submit(httpx.post, f"{url}/generate", json=long, timeout=600)
        while "pope_engine_running_sequences 0.0" in httpx.get(f"{url}/metrics").text:
            time.sleep(0.01)
        loaded = [short(i) for i in range(requests)]
        assert not running.done(), "the long request ended before the short ones: make it longer"
        httpx.post(f"{url}/abort_request", json={"rid": "long"})
        running.result()
    return alone, loaded


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, help="HF model directory (default: a fresh tiny model)")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--http", action="store_true", help="also measure through `pope engine` over HTTP")
    args = parser.parse_args()
    torch.set_num_threads(1)
    from transformers import AutoModelForCausalLM

    with tempfile.TemporaryDirectory() as tmp:
        model_dir = args.model or build_tiny_model(Path(tmp) / "tiny", TinyModelSpec())
        model = AutoModelForCausalLM.from_pretrained(str(model_dir)).eval()
        pad = model.generation_config.pad_token_id or 0
        eos = model.generation_config.eos_token_id
        rows = prompts(args.batch, model.config.vocab_size)
        print(
            f"model {model_dir} ({sum(p.numel() for p in model.parameters()):,} params), batch {args.batch}, "
            f"{args.new_tokens} new tokens, temperature 0.8, torch threads {torch.get_num_threads()}"
        )
        bench_engine(model, rows, 8, pad, eos)  # warm-up
        bench_transformers(model, rows, 8, pad)
        hf, ours = [], []
        for _ in range(args.repeats):  # interleaved, so drift in machine load hits both alike
            hf.append(bench_transformers(model, rows, args.new_tokens, pad))
            ours.append(bench_engine(model, rows, args.new_tokens, pad, eos))
        results = {"transformers generate": hf, "pope engine (decode loop)": ours}
        mixed = None
        if args.http:
            with served(model_dir) as url:
                results["pope engine (HTTP /generate)"] = bench_http(url, rows, args.new_tokens, args.repeats)
                mixed = bench_mixed(url, rows, 4 * args.repeats)
        base = statistics.median(hf)
        pairs = sorted(o / h for o, h in zip(ours, hf, strict=True))
        each = ", ".join(f"{r:.2f}" for r in pairs)
        print(f"engine / transformers, each interleaved pair: {each}; median {statistics.median(pairs):.2f}x")
        print(f"{'':32s} {'median tok/s':>12s} {'min':>8s} {'max':>8s} {'vs transformers':>16s}")
        for name, rates in results.items():
            med = statistics.median(rates)
            print(f"{name:32s} {med:12.1f} {min(rates):8.1f} {max(rates):8.1f} {med / base:15.2f}x")
        if mixed is not None:
            print("latency of a group of 8 x 32 new tokens over HTTP (s):")
            for name, times in zip(("alone", "beside 8 x 2,000 running"), mixed, strict=True):
                cut = statistics.quantiles(times, n=10)
                print(f"  {name:28s} median {statistics.median(times):.3f}  p90 {cut[-1]:.3f}  max {max(times):.3f}")


if __name__ == "__main__":
    main()
