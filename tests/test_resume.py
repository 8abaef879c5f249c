"""Resuming is exact: every random stream the loop uses continues where it stopped, per
rank.  cnn4 has dropout (torch's global generator); the DDP test runs 2 ranks over gloo
on the CPU with torch.multiprocessing (no Ray)."""
from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest
import torch

from aerl_ray.checkpoint import load_checkpoint
from aerl_ray.config import TrainConfig
from aerl_ray.train import WorkerContext, fit, read_metrics, train_loop


class Stop(Exception):
    pass


def _stop_after(epoch: int):
    def hook(m, out):
        if m["epoch"] == epoch:
            raise Stop

    return hook


def _cfg(**kw) -> TrainConfig:
    base = dict(dataset="digits", model="cnn4", epochs=4, lr=1e-3, batch_size=64, seed=0,
                train_limit=0)
    return TrainConfig.from_flat({**base, **kw})


@pytest.mark.parametrize("regime", ["sl", "rl"])
def test_resume_with_dropout_is_bit_identical(tmp_path, digits_splits, regime):
    """cnn4 (dropout 0.25/0.5): a run interrupted after epoch 1 and resumed gives the
    uninterrupted run's losses and weights exactly (the old last.pt re-seeded dropout)."""
    c = _cfg(regime=regime, final_lr_ratio=0.1)
    full = fit(c, tmp_path / "full", splits=digits_splits)
    mid = tmp_path / "mid"
    mid.mkdir()
    with pytest.raises(Stop):
        train_loop(c, mid, WorkerContext(on_epoch=_stop_after(1), splits=digits_splits))
    resumed = fit(c, mid, resume=True, splits=digits_splits)
    rows = read_metrics(mid / "metrics.jsonl")
    assert [r["epoch"] for r in rows] == [0, 1, 2, 3]
    assert [r["train_loss"] for r in rows] == [r["train_loss"] for r in full.history]
    fs, rs = full.model.state_dict(), resumed.model.state_dict()
    assert all(torch.equal(fs[k], rs[k]) for k in fs)


# --- 2 DDP ranks (gloo, CPU) --------------------------------------------------------------
def _small(splits, n: int):
    """The first n training images (a cheap DDP run)."""
    import dataclasses

    return dataclasses.replace(splits, x_train=splits.x_train[:n], y_train=splits.y_train[:n])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank: int, world: int, port: int, out: str, cfg_flat: dict, splits) -> None:
    """On each rank: an uninterrupted run, a run stopped after epoch 0 and its resumption
    (one process group for the three: a spawn costs seconds of imports)."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world)
    try:
        cfg = TrainConfig.from_flat(cfg_flat)
        for name, stop, resume in (("full", -1, False), ("mid", 0, False),
                                   ("mid", -1, True)):
            run_dir = Path(out, name)
            run_dir.mkdir(exist_ok=True)
            losses = []

            def on_epoch(m, _out, losses=losses, stop=stop):
                losses.append([m["epoch"], m["train_loss"]])
                if m["epoch"] == stop:
                    raise Stop

            dist.barrier()  # the chief's last.pt is complete before anyone reads it
            state = load_checkpoint(run_dir / "last.pt") if resume else None
            try:
                train_loop(cfg, run_dir, WorkerContext(
                    rank=rank, world_size=world, wrap_model=lambda m: DDP(m),
                    on_epoch=on_epoch, resume=state, splits=splits))
            except Stop:
                pass
            tag = f"{name}{'_resumed' if resume else ''}"
            Path(out, f"{tag}_rank{rank}.json").write_text(json.dumps(losses))
    finally:
        dist.destroy_process_group()


def test_ddp_ranks_resume_their_own_streams(tmp_path, digits_splits):
    """2 ranks, RL (exploration and dropout draw per rank): last.pt holds one RNG state
    per rank, the ranks' streams differ, and an interrupted + resumed run reproduces the
    uninterrupted per-rank losses exactly (the old last.pt gave every rank the chief's
    generator and re-seeded dropout).  The data is passed in, so the workers do not
    import scikit-learn; deterministic=False spares them torch._inductor's import (every
    op here is deterministic on the CPU anyway)."""
    import torch.multiprocessing as mp

    cfg = _cfg(regime="rl", epochs=2, explore_eps=0.2, deterministic=False)
    mp.spawn(_ddp_worker, args=(2, _free_port(), str(tmp_path), cfg.to_flat(),
                                _small(digits_splits, 256)), nprocs=2, join=True)
    runs = {tag: [json.loads((tmp_path / f"{tag}_rank{r}.json").read_text()) for r in (0, 1)]
            for tag in ("full", "mid", "mid_resumed")}
    st = load_checkpoint(tmp_path / "mid" / "last.pt")["train_state"]
    assert len(st["rng"]) == 2 and st["rng"][0].keys() == st["rng"][1].keys()
    for key in ("generator", "torch_cpu"):  # exploration and dropout differ between ranks
        assert not torch.equal(st["rng"][0][key], st["rng"][1][key]), key
    for rank in (0, 1):
        assert runs["mid"][rank] == runs["full"][rank][:1]
        assert runs["mid_resumed"][rank] == runs["full"][rank][1:], rank
    assert runs["full"][0] != runs["full"][1]  # the ranks' losses differ
