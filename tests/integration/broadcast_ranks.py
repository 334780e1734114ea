"""Run under torchrun by test_broadcast.py: the tiny policy sharded with FSDP2 over the
ranks, every weight moved by +0.01, broadcast to the engine at argv[1] as version 1 (and
written to argv[2] as the engine directory of step 1, for the test to compare with).

    python -m torch.distributed.run --standalone --nproc-per-node=2 \\
        tests/integration/broadcast_ranks.py ENGINE_URL OUT_DIR MODEL_DIR
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import torch

from services.common.engine_client import EngineClient
from services.trainer import broadcast, policy
from services.trainer.operations import Ranks, follow
from services.trainer.settings import TrainerSettings
from services.trainer.world import join, leave


async def push(ranks: Ranks, url: str) -> None:
    async with EngineClient(url) as engine:
        conn = await broadcast.connect(engine, "127.0.0.1", 30.0)
        errors = await broadcast.push_broadcast([conn], ranks, torch.float32, 1, 0, 64 << 10, 30.0)
        assert errors == {url: None}, errors
        await conn.close()


def main() -> None:
    url, out, model = sys.argv[1], Path(sys.argv[2]), sys.argv[3]
    world = join("cpu")
    p = policy.build(TrainerSettings(model_path=model, checkpoint_dir=out), world, None)
    with torch.no_grad():
        for param in p.net.parameters():  # elementwise: the same on every shard layout
            param.add_(0.01)
    if world.leader:
        ranks = Ranks(p)
        asyncio.run(push(ranks, url))
        ranks.save_weights(out, 1, 0, torch.float32, 4096 << 20)
        ranks.stop()
    else:
        follow(p)
    leave(world)


if __name__ == "__main__":
    main()
