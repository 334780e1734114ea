"""Weight sync to a CPU engine, disk against broadcast, side by side in one run, on the
tiny model and on a Qwen3-0.6B-shaped one (random weights, the real shapes).

    .venv/bin/python bench/weight_sync.py [--repeats 3] [--skip-large] [--bucket-mb 512]

disk: the trainer writes the engine's model directory (float32, as the trainer does for
the CPU engine: services/trainer/checkpoint.py) and the engine loads it
(/update_weights_from_disk). broadcast: services/trainer/broadcast.py's push, the group
opened once beforehand (its set-up time is printed apart). Medians over the repeats, torch
at one thread in both processes. The engine is a real `pope engine` subprocess. Needs
about 12 GB of memory and 5 GB of disk for the 0.6B shape.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.checkpoint_cost import QWEN3_0_6B
from services.common.engine_client import EngineClient
from services.common.redis_server import free_port
from services.engine.tiny_model import build_tiny_model
from services.trainer import broadcast, checkpoint
from services.trainer.operations import Ranks
from services.trainer.policy import Logprobs, Policy
from services.trainer.settings import TrainerSettings
from services.trainer.world import World


def engine(model_dir: Path) -> tuple[subprocess.Popen[bytes], str]:
    """`pope engine` on a free port, one torch thread; returns once healthy."""
    port = free_port()
    pope = str(Path(sys.executable).parent / "pope")
    env = {**os.environ, "POPE_ENGINE__TORCH_THREADS": "1"}
    proc = subprocess.Popen([pope, "engine", "--model", str(model_dir), "--port", str(port)], env=env)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        assert proc.poll() is None, "the engine exited"
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise TimeoutError("the engine did not become healthy")


async def measure(name: str, model: Any, tokenizer: Any, root: Path, repeats: int, bucket_mb: int) -> None:
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-6)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda k: 1.0)
    ranks = Ranks(Policy(Logprobs(model), None, optimizer, scheduler, tokenizer, TrainerSettings(), World()))
    shard, dtype = 4096 << 20, torch.float32
    start_dir = checkpoint.save_weights(root, model, tokenizer, 0, 0, dtype, shard)
    proc, url = engine(start_dir)
    times: dict[str, list[float]] = {"disk": [], "broadcast": []}
    try:
        async with EngineClient(url, timeout=1800) as client:
            t0 = time.perf_counter()
            conn = await broadcast.connect(client, "127.0.0.1", 600.0)
            connect_s = time.perf_counter() - t0
            for i in range(repeats):
                t0 = time.perf_counter()
                path = ranks.save_weights(root, 2 * i + 1, 0, dtype, shard)
                await client.update_weights_from_disk(str(path), 2 * i + 1)
                times["disk"].append(time.perf_counter() - t0)
                t0 = time.perf_counter()
                errors = await broadcast.push_broadcast([conn], ranks, dtype, 2 * i + 2, 0, bucket_mb << 20, 600.0)
                times["broadcast"].append(time.perf_counter() - t0)
                assert errors == {url: None}, errors
                assert await client.served_version() == (2 * i + 2, 0)
                shutil.rmtree(path)
            await conn.close()
    finally:
        proc.terminate()
        proc.wait(60)
    med = {k: statistics.median(v) for k, v in times.items()}
    params = sum(p.numel() for p in model.parameters())
    nbytes = sum(p.numel() * p.element_size() for p in model.parameters())  # tied weights once, as sent
    print(f"\n{name}: {params / 1e6:.1f}M parameters, float32, {repeats} repeats (median), buckets {bucket_mb} MiB")
    print(f"  disk       {med['disk']:8.3f} s   (save_weights + /update_weights_from_disk)")
    print(f"  broadcast  {med['broadcast']:8.3f} s   (begin, buckets, end; group opened once in {connect_s:.3f} s)")
    print(f"  disk / broadcast: {med['disk'] / med['broadcast']:.2f}x   ({nbytes / 2**20:.0f} MiB sent)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--bucket-mb", type=int, default=512)
    ap.add_argument("--skip-large", action="store_true", help="the tiny model only")
    args = ap.parse_args()
    torch.set_num_threads(1)
    from transformers import AutoModelForCausalLM, AutoTokenizer, Qwen3Config, Qwen3ForCausalLM

    Path("runs").mkdir(exist_ok=True)
    with tempfile.TemporaryDirectory(dir="runs", prefix="weight-sync-") as tmp:
        root = Path(tmp)
        tiny_dir = build_tiny_model(root / "tiny")
        tokenizer = AutoTokenizer.from_pretrained(str(tiny_dir))
        tiny = AutoModelForCausalLM.from_pretrained(str(tiny_dir), dtype=torch.float32)
        asyncio.run(measure("tiny model", tiny, tokenizer, root / "tiny-w", args.repeats, args.bucket_mb))
        if args.skip_large:
            return
        torch.manual_seed(0)
        large = Qwen3ForCausalLM(Qwen3Config(**QWEN3_0_6B)).float()
        asyncio.run(measure("Qwen3-0.6B shape", large, tokenizer, root / "large-w", args.repeats, args.bucket_mb))


if __name__ == "__main__":
    main()
