"""Under DDP a training step all-reduces the gradients once, whatever the regime: the
fused FGSM step back-propagates its clean loss itself, and its forward must be inside
``no_sync`` too (DDP arms the all-reduce in the forward).  2 ranks over gloo on the CPU,
torch.multiprocessing, no Ray."""
from __future__ import annotations

import json
from pathlib import Path

import torch

from aerl_ray.config import TrainConfig
from tests.test_resume import _free_port, _small

REGIMES = {"sl": {}, "sl_adv": {"adv_attack": "fgsm"}, "rl_adv": {"adv_attack": "fgsm"},
           "igr": {}}


def _worker(rank: int, world: int, port: int, out: str, splits) -> None:
    import torch.distributed as dist
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook
    from torch.nn.parallel import DistributedDataParallel as DDP

    from aerl_ray.train import WorkerContext, train_loop

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world)
    try:
        counts = {}
        for regime, kw in REGIMES.items():
            calls = []

            def counting(state, bucket):
                calls.append(bucket.index())
                return allreduce_hook(state, bucket)

            def wrap(m):
                ddp = DDP(m, bucket_cap_mb=1000)  # one bucket: one all-reduce per sync
                ddp.register_comm_hook(None, counting)
                return ddp

            cfg = TrainConfig.from_flat(dict(dataset="digits", model="tiny", regime=regime,
                                             epochs=1, batch_size=32, deterministic=False,
                                             **kw))
            run = Path(out, regime)
            run.mkdir(exist_ok=True)
            train_loop(cfg, run, WorkerContext(rank=rank, world_size=world, wrap_model=wrap,
                                               splits=splits))
            counts[regime] = len(calls)
        Path(out, f"rank{rank}.json").write_text(json.dumps(counts))
    finally:
        dist.destroy_process_group()


def test_every_regime_all_reduces_once_per_step(tmp_path, digits_splits):
    import torch.multiprocessing as mp

    mp.spawn(_worker, args=(2, _free_port(), str(tmp_path), _small(digits_splits, 128)),
             nprocs=2, join=True)
    for rank in (0, 1):
        counts = json.loads((tmp_path / f"rank{rank}.json").read_text())
        steps = 128 // 2 // 32  # per-rank images / batch size
        assert counts == {r: steps for r in REGIMES}, counts
