"""One training loop for every regime, dataset and model.

:func:`train_loop` is what a Ray Train worker runs (the sweep passes a
:class:`WorkerContext` with its rank, its DDP wrapper and a per-epoch report hook) and
what :func:`fit` runs in-process for a local run.  The loop owns the optimiser (AdamW,
optional warm-up + linear decay over the real number of steps, gradient clipping),
train/eval modes, devices and logging; regimes only compute losses.

Per epoch it writes a JSON line to ``OUT/metrics.jsonl``, TensorBoard scalars under
``OUT/tb``, ``OUT/last.pt`` (with optimiser/RNG state for resuming) and ``OUT/best.pt`` (the
selected epoch: see :mod:`aerl_ray.selection` -- by default the best robust or clean
*validation* accuracy among the epochs of the run's final regime).

Usage::

    python -m aerl_ray.train --dataset digits --model cnn4 --regime rl --epochs 20 \
        --explore-eps 0.1 --lr 1e-3 --out runs/x
"""
from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from aerl_ray import fastpath, rng
from aerl_ray.checkpoint import atomic_torch_save, load_checkpoint, make_checkpoint
from aerl_ray.config import TrainConfig
from aerl_ray.data import Splits, augment, load_splits
from aerl_ray.models import build_model
from aerl_ray.passes import PassCounter
from aerl_ray.regimes import REGIMES, RegimeContext
from aerl_ray.regimes.schedule import regime_for_epoch
from aerl_ray.selection import Selector

logger = logging.getLogger(__name__)


class DivergedError(FloatingPointError):
    """The training loss became NaN/inf; the trial is stopped with this reason.

    ``epoch`` is the epoch it diverged in (= the number of completed epochs)."""

    def __init__(self, message: str, epoch: int = -1):
        super().__init__(message)
        self.epoch = epoch


@dataclass
class WorkerContext:
    """How the loop is embedded: rank, DDP wrapper, per-epoch hook, resume state."""

    rank: int = 0
    world_size: int = 1
    device: torch.device | None = None
    wrap_model: Callable[[nn.Module], nn.Module] = lambda m: m
    on_epoch: Callable[[dict, Path], None] | None = None  # (metrics, out_dir), all ranks
    resume: dict | None = None  # a loaded last.pt checkpoint
    splits: Splits | None = None  # pre-loaded data (tests, benchmarks)
    final_test: bool = True  # measure test accuracy of the kept model at the end (single
    # runs); a sweep's trials never touch test (the confirmation stage does)
    robust_epochs: frozenset = frozenset()  # epochs that measure the robust validation
    # metric whatever the selection rule (a scheduler's rungs)


@dataclass
class FitResult:
    model: nn.Module
    info: object
    metrics: dict  # final: the last epoch's metrics + totals, selection, test_acc
    history: list[dict] = field(default_factory=list)
    best_path: Path | None = None
    last_path: Path | None = None


def resolve_device(name: str | torch.device | None) -> torch.device:
    """``auto``/None: CUDA when available, else the CPU; ``cuda`` without one: an error."""
    if name in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    name = str(name)
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"device={name!r} requested but no CUDA device is available; "
                           "use --device cpu or auto")
    return torch.device(name)


def lr_factor(step: int, total: int, warmup: int, final_ratio: float) -> float:
    """The lr factor of optimiser step ``step`` (0-based) of ``total``: linear warm-up to 1
    at step ``warmup - 1``, then linear decay that reaches ``final_ratio`` at the last
    step, ``total - 1`` (and stays there)."""
    if warmup and step < warmup:
        return (step + 1) / warmup
    peak = max(warmup - 1, 0)  # the step at the full learning rate
    span = max(1, total - 1 - peak)
    return 1.0 - (1.0 - final_ratio) * min(1.0, (step - peak) / span)


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int,
             device: torch.device) -> float:
    """Top-1 accuracy; the count stays on ``device`` until the end (one host sync)."""
    correct = torch.zeros((), dtype=torch.int64, device=device)
    for i in range(0, len(y), batch):
        out = model(x[i:i + batch].to(device))
        correct += (out.argmax(1) == y[i:i + batch].to(device)).sum()
    return int(correct) / max(1, len(y))


def input_grad_norm(model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                    device: torch.device) -> float:
    """Mean per-example ||grad_x CE|| (summed CE, so no 1/B factor) on a fixed batch."""
    x = x.to(device).requires_grad_(True)
    loss = F.cross_entropy(model(x), y.to(device), reduction="sum")
    (g,) = torch.autograd.grad(loss, x)
    return float(g.flatten(1).norm(dim=1).mean())


def train_step(model: nn.Module, loss_fn, x: torch.Tensor, y: torch.Tensor, ctx: RegimeContext,
               opt: torch.optim.Optimizer, sched, grad_clip: float,
               precision: str = "fp32") -> tuple[torch.Tensor, dict]:
    """One optimisation step of any regime; returns (loss value, regime stats).

    The loss value is a detached 0-dim tensor on the device: the step never waits for
    the device.  The caller checks that it is finite (the loop: at most every
    ``fastpath.FINITE_CHECK_STEPS`` steps; a diverged run is stopped, nothing of it is
    saved).  ``precision`` bf16 runs the regime's forward passes under autocast."""
    opt.zero_grad(set_to_none=True)
    with fastpath.autocast(precision, x.device):
        loss, stats = loss_fn(model, x, y, ctx)
    value = torch.as_tensor(stats.get("loss_value", loss)).detach()
    loss.backward()
    if grad_clip > 0:
        nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    opt.step()
    sched.step()
    return value, stats


def _seed_everything(cfg: TrainConfig, rank: int) -> torch.Generator:
    torch.manual_seed(cfg.seed)  # identical initial weights on every rank
    if cfg.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
    return torch.Generator().manual_seed(_rank_seed(cfg.seed, rank))


def _rank_seed(seed: int, rank: int) -> int:
    return seed * 1009 + 7919 * rank + 1


def train_loop(cfg: TrainConfig, out_dir: str | os.PathLike,
               wctx: WorkerContext | None = None) -> FitResult:
    """Train ``cfg`` and return the final model (best weights) and metrics."""
    wctx = wctx or WorkerContext()
    out = Path(out_dir)
    chief = wctx.rank == 0
    device = wctx.device or resolve_device(cfg.device)
    fastpath.check_precision(cfg.precision.value, device)
    fastpath.configure_backends(cfg.cudnn_benchmark, cfg.deterministic)
    gen = _seed_everything(cfg, wctx.rank)
    # per-step draws (exploration, augmentation, random starts) on the training device;
    # on the CPU this is ``gen`` itself
    dgen = fastpath.device_generator(gen, device, _rank_seed(cfg.seed, wctx.rank) + 2)
    splits = wctx.splits or load_splits(cfg.data)
    info = splits.info
    data = fastpath.place_splits(splits, device, cfg.resident_data)  # train/val on device
    base = build_model(cfg.model.model, info, cfg.model.spectral_norm).to(device)
    fastpath.prepare_model(base, channels_last=cfg.channels_last, compile=cfg.compile,
                           precision=cfg.precision.value, device=device,
                           sample=(data.x_train[:cfg.batch_size],
                                   data.y_train[:cfg.batch_size]))
    counter = PassCounter(base)
    model = wctx.wrap_model(base)
    # identical initial weights on every rank, but each rank its own dropout stream (with
    # the chief's seed every rank would draw the same dropout masks)
    torch.manual_seed(_rank_seed(cfg.seed, wctx.rank) + 1)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    per_rank = len(splits.y_train) // wctx.world_size
    steps_per_epoch = max(1, math.ceil(per_rank / cfg.batch_size))
    # the schedule's horizon: all epochs, or (pass_budget) the steps the budget affords,
    # re-estimated from the measured passes per step
    horizon = {"steps": cfg.epochs * steps_per_epoch}
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(
        s, horizon["steps"], cfg.warmup_epochs * steps_per_epoch, cfg.final_lr_ratio))

    selector = Selector.of(cfg)
    start_epoch, wall0 = 0, 0.0
    totals = {"select_fwd_passes": 0, "select_bwd_passes": 0}
    last_metrics: dict = {}
    if wctx.resume is not None:
        st = wctx.resume["train_state"]
        base.load_state_dict(wctx.resume["model_state"])
        opt.load_state_dict(st["optimizer"])
        sched.load_state_dict(st["scheduler"])
        _restore_rng(st, gen, wctx, device, dgen)
        counter.fwd, counter.bwd = st["fwd_passes"], st["bwd_passes"]
        selector.load_state(st["selection"])
        totals.update(st.get("totals") or {})
        start_epoch, wall0 = wctx.resume["epoch"] + 1, st["wall_seconds"]
        last_metrics = dict(wctx.resume.get("metrics") or {})
        logger.info("resuming at epoch %d (kept epoch %d so far)", start_epoch,
                    selector.best_epoch)

    @contextlib.contextmanager
    def attack_mode():  # inner attacks of adversarial regimes see the model in eval mode
        was = model.training
        model.eval()
        try:
            yield
        finally:
            model.train(was)

    def no_sync():  # a regime's partial forward+backward: DDP all-reduces once per step
        return model.no_sync() if hasattr(model, "no_sync") else contextlib.nullcontext()

    ctx = RegimeContext(cfg=cfg.regime, num_classes=info.num_classes, generator=gen,
                        attack_mode=attack_mode, no_sync=no_sync, device_generator=dgen)
    flat = cfg.to_flat()
    writer = _tb_writer(out) if chief else None
    gx, gy = data.x_val[:256], data.y_val[:256]
    history: list[dict] = []
    budget_spent = bool(cfg.pass_budget) and counter.fwd + counter.bwd >= cfg.pass_budget
    t_start = time.perf_counter() - wall0
    for epoch in range(start_epoch, cfg.epochs):
        t0 = time.perf_counter()
        ctx.epoch = epoch
        active = regime_for_epoch(cfg.regime, epoch)
        loss_fn = REGIMES.get(active)
        model.train()
        perm = torch.randperm(len(splits.y_train), generator=torch.Generator().manual_seed(
            cfg.seed * 100003 + epoch))[wctx.rank::wctx.world_size][:per_rank]
        perm = perm.to(data.x_train.device)  # resident data: batches gathered on the device
        sums = fastpath.EpochSums(device)  # read once per epoch (no per-step host sync)
        for step, i in enumerate(range(0, per_rank, cfg.batch_size)):
            if budget_spent:  # pass_budget reached: finish this (partial) epoch, then stop
                break
            idx = perm[i:i + cfg.batch_size]
            x, y = data.x_train[idx].to(device), data.y_train[idx].to(device)
            if cfg.data.augment:
                x = augment(x, dgen)
            x = fastpath.memory_format(x, cfg.channels_last)
            loss_value, stats = train_step(model, loss_fn, x, y, ctx, opt, sched, cfg.grad_clip,
                                           cfg.precision.value)
            sums.add(loss_value, stats, y)
            if (step + 1) % fastpath.FINITE_CHECK_STEPS == 0:
                _check_finite(sums, epoch, active, cfg)
            if cfg.pass_budget:
                spent = (counter.fwd + counter.bwd) * wctx.world_size  # all ranks alike
                horizon["steps"] = min(cfg.epochs * steps_per_epoch, math.ceil(
                    cfg.pass_budget * sched.last_epoch / max(1, spent)))
                budget_spent = spent >= cfg.pass_budget
        _check_finite(sums, epoch, active, cfg)
        sums = sums.read()
        model.eval()
        last_epoch = budget_spent or epoch == cfg.epochs - 1
        with counter.paused():  # compute figures count training passes only
            val_acc = accuracy(model, data.x_val, data.y_val, cfg.eval_batch_size, device)
            grad_norm = input_grad_norm(model, gx, gy, device)
            sel = selector.measure(base, data.x_val.to(device), data.y_val.to(device),
                                   cfg.data.split_seed, cfg.eval_batch_size, epoch,
                                   force=epoch in wctx.robust_epochs)
        totals["select_fwd_passes"] += sel["select_fwd"] * wctx.world_size
        totals["select_bwd_passes"] += sel["select_bwd"] * wctx.world_size
        kept = selector.offer(epoch, active, val_acc, sel["val_robust_acc"], last_epoch)
        m = {"epoch": epoch, "regime_active": active,
             "train_loss": sums["loss"] / max(1, sums["n"]),
             # accuracy on the clean training inputs and on the adversarial ones the regime
             # trained on (None where the regime did not compute them: PGD-AT has no
             # clean forward, SL no adversarial one)
             "train_acc": sums["correct"] / sums["clean_n"] if sums["clean_n"] else None,
             "train_adv_acc": sums["correct_adv"] / sums["adv_n"] if sums["adv_n"] else None,
             "mean_reward": (sums["reward"] / sums["reward_n"]) if sums["reward_n"] else None,
             "val_acc": val_acc, "val_acc_n": len(splits.y_val),
             "val_robust_acc": sel["val_robust_acc"], "val_robust_acc_n": sel["val_robust_n"],
             "val_masking": sel["val_masking"],
             "input_grad_norm": grad_norm,
             "fwd_passes": counter.fwd * wctx.world_size,
             "bwd_passes": counter.bwd * wctx.world_size, **totals,
             "lr": sched.get_last_lr()[0], "epoch_seconds": time.perf_counter() - t0,
             "wall_seconds": time.perf_counter() - t_start, "selected": kept,
             "selected_epoch": selector.best_epoch, "epochs_done": epoch + 1}
        history.append(m)
        last_metrics = m
        logger.info("epoch %d %s loss %.4f train_acc %s train_adv_acc %s val_acc %.4f%s%s",
                    epoch, active, m["train_loss"], _fmt(m["train_acc"]),
                    _fmt(m["train_adv_acc"]), val_acc,
                    "" if sel["val_robust_acc"] is None
                    else f" val_robust_acc {sel['val_robust_acc']:.4f}",
                    " (kept)" if kept else "")
        # every rank's generators (dropout, exploration, augmentation, random starts),
        # gathered on the chief: a resumed rank continues its own streams
        rng_states = rng.gather(rng.capture(gen, device, dgen), wctx.rank, wctx.world_size)
        if chief:
            state = {"optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                     "rng": rng_states, "fwd_passes": counter.fwd,
                     "bwd_passes": counter.bwd, "selection": selector.state(),
                     "totals": dict(totals), "wall_seconds": m["wall_seconds"]}
            if kept:
                atomic_torch_save(make_checkpoint(base, flat, info, epoch, m,
                                                  selection=selector.info(epoch)),
                                  out / "best.pt")
            atomic_torch_save(make_checkpoint(base, flat, info, epoch, m, state), out / "last.pt")
            _append_jsonl(out / "metrics.jsonl", m)
            for k, v in m.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool):
                    writer.add_scalar(f"train/{k}", v, epoch)
            writer.flush()
        if wctx.on_epoch is not None:
            wctx.on_epoch(m, out)
        if budget_spent:
            logger.info("pass budget %d reached after %d passes", cfg.pass_budget,
                        m["fwd_passes"] + m["bwd_passes"])
            break
    counter.remove()
    if writer is not None:
        writer.close()
    return _finish(cfg, base, info, splits, out, history, last_metrics, device, chief,
                   wctx.final_test)


def _check_finite(sums: fastpath.EpochSums, epoch: int, active: str, cfg: TrainConfig) -> None:
    """Stop a diverged run (reads the epoch's loss sum: one host sync)."""
    if not sums.loss_finite():
        raise DivergedError(f"training loss became {float(sums.loss)} in epoch {epoch} "
                            f"(regime {active}, lr={cfg.lr}); lower the learning rate "
                            "or enable --grad-clip", epoch=epoch)


def _restore_rng(st: dict, gen: torch.Generator, wctx: WorkerContext,
                 device: torch.device, dgen: torch.Generator | None = None) -> None:
    """This rank's generators from a ``last.pt`` train state (see :mod:`aerl_ray.rng`)."""
    states = st.get("rng")
    if states is not None and len(states) == wctx.world_size:
        rng.restore(states[wctx.rank], gen, device, dgen)
        return
    if states is not None:  # resumed with another number of workers: streams cannot match
        logger.warning("last.pt holds RNG states of %d workers, this run has %d: rank %d "
                       "continues from rank %d's streams with a rank-specific offset",
                       len(states), wctx.world_size, wctx.rank, wctx.rank % len(states))
        rng.restore(states[wctx.rank % len(states)], gen, device, dgen)
        if wctx.rank >= len(states):
            gen.manual_seed(int(torch.randint(2**62, (1,), generator=gen)) + wctx.rank)
            if dgen is not None and dgen is not gen:
                dgen.manual_seed(int(torch.randint(2**62, (1,), generator=gen)) + wctx.rank)
        return
    # an older checkpoint: only the chief's seeded generator was saved
    logger.warning("last.pt has no per-rank RNG state (an older checkpoint): dropout and "
                   "the other global generators restart; the resumed run is not exact")
    gen.set_state(st["generators"][0])
    if wctx.rank:
        gen.manual_seed(int(torch.randint(2**62, (1,), generator=gen)) + wctx.rank)
    if dgen is not None and dgen is not gen:
        dgen.manual_seed(int(torch.randint(2**62, (1,), generator=gen)) + wctx.rank)


def _fmt(v: float | None) -> str:
    return "-" if v is None else f"{v:.4f}"


def _finish(cfg, base, info, splits, out, history, last_metrics, device, chief,
            final_test: bool = True) -> FitResult:
    """Load the kept weights, add test accuracy, write final.json.

    The totals (passes, seconds) come from the last epoch's metrics, which a resumed run
    restores from its checkpoint: a run resumed after its last epoch reports what it cost."""
    best_path, last_path = out / "best.pt", out / "last.pt"
    final = dict(last_metrics)
    if best_path.exists():
        best = load_checkpoint(best_path)
        base.load_state_dict(best["model_state"])
        sel = dict(best.get("selection") or {})
        final.update(best_epoch=int(best["epoch"]), best_val_acc=sel.get("val_acc"),
                     best_val_robust_acc=sel.get("val_robust_acc"),
                     selected_regime=sel.get("regime"), selection=sel.get("reason", ""))
    base.eval()
    if final_test:
        final["test_acc"] = accuracy(base, splits.x_test, splits.y_test, cfg.eval_batch_size,
                                     device)
    if chief:  # temp file + rename, like every other result file
        tmp = out / ".final.json.tmp"
        tmp.write_text(json.dumps(final, indent=1))
        os.replace(tmp, out / "final.json")
    return FitResult(base, info, final, history, best_path if best_path.exists() else None,
                     last_path if last_path.exists() else None)


def _tb_writer(out: Path):
    from torch.utils.tensorboard import SummaryWriter

    return SummaryWriter(str(out / "tb"))


def _append_jsonl(path: Path, row: dict) -> None:
    """Append one line and fsync; readers drop a torn last line after a crash."""
    with open(path, "a") as f:
        f.write(json.dumps(row) + "\n")
        f.flush()
        os.fsync(f.fileno())


def read_metrics(path: str | os.PathLike) -> list[dict]:
    rows = []
    for line in Path(path).read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            logger.warning("ignoring a torn line in %s", path)
    return rows


class RunDirError(ValueError):
    """``--out``/``--resume`` would overwrite, damage or miss a run; says what to do."""


def fit(cfg: TrainConfig, out_dir: str | os.PathLike, resume: bool = False,
        splits: Splits | None = None, overwrite: bool = False) -> FitResult:
    """Train in this process (no Ray).

    ``resume=True`` continues from ``OUT/last.pt`` (a finished run is returned as it is,
    untouched); otherwise ``OUT`` must not hold a run unless ``overwrite=True``."""
    out = Path(out_dir)
    state = None
    if resume:
        if not (out / "last.pt").is_file():
            raise RunDirError(f"nothing to resume in {out} (no last.pt); run without --resume "
                              "to start a new run there")
        state = load_checkpoint(out / "last.pt")
        diff = config_diff(with_defaults(state["config"]), cfg.to_flat())
        if diff:
            raise RunDirError(f"{out}/last.pt was trained with different settings: {diff}; "
                              "resume with the original flags (see its config.json) or "
                              "train into another --out")
        if run_finished(cfg, state) and (out / "final.json").is_file():
            logger.info("%s already finished at epoch %d; nothing to resume", out,
                        state["epoch"])
            return load_fit_result(out)
    else:
        existing = [n for n in ("last.pt", "best.pt", "metrics.jsonl", "final.json")
                    if (out / n).exists()]
        if existing and not overwrite:
            raise RunDirError(f"{out} already holds a run ({', '.join(existing)}); use --resume "
                              "to continue it, --overwrite to replace it, or another --out")
    splits = splits or load_splits(cfg.data)  # bad data fails before OUT is touched
    if not resume:
        for name in existing:
            (out / name).unlink()
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(cfg.to_flat(), indent=1))
    return train_loop(cfg, out, WorkerContext(resume=state, splits=splits))


def with_defaults(flat: dict) -> dict:
    """A checkpoint's flat config with the fields added since it was written at their
    defaults (which reproduce what such a run did), so it still compares equal."""
    return {**TrainConfig().to_flat(), **flat}


def config_diff(old: dict, new: dict) -> str:
    """'lr: 0.001 -> 0.002, epochs: 10 -> 12' for the keys that differ ('' if none)."""
    keys = sorted(set(old) | set(new), key=str)
    return ", ".join(f"{k}: {old.get(k, '(unset)')!r} -> {new.get(k, '(unset)')!r}"
                     for k in keys if old.get(k) != new.get(k))


def run_finished(cfg: TrainConfig, last: dict) -> bool:
    """Did the run of checkpoint ``last`` (a last.pt) train all it was asked to?"""
    st = last.get("train_state") or {}
    spent = st.get("fwd_passes", 0) + st.get("bwd_passes", 0)
    return int(last["epoch"]) + 1 >= cfg.epochs or bool(cfg.pass_budget and
                                                          spent >= cfg.pass_budget)


def load_fit_result(out: str | os.PathLike) -> FitResult:
    """The result of a finished run, read from its files (nothing is recomputed)."""
    from aerl_ray.checkpoint import model_from_checkpoint

    out = Path(out)
    best = out / "best.pt"
    model, info = model_from_checkpoint(best)
    final = json.loads((out / "final.json").read_text())
    history = read_metrics(out / "metrics.jsonl") if (out / "metrics.jsonl").exists() else []
    return FitResult(model, info, final, history, best, out / "last.pt")


def build_parser() -> argparse.ArgumentParser:
    from aerl_ray.cli import add_config_arguments

    p = argparse.ArgumentParser(
        prog="python -m aerl_ray.train",
        description="Train one classifier (SL, RL, adversarial, hybrid, baselines) and write "
                    "best.pt/last.pt checkpoints, metrics.jsonl and TensorBoard events to --out.")
    p.add_argument("--out", required=True, help="output directory of the run")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in OUT from its last.pt (same flags)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace a run already in OUT (default: refuse)")
    p.add_argument("--log-level", default="INFO", help="logging level (default: INFO)")
    p.add_argument("--plugin", action="append", default=[], metavar="MODULE_OR_PATH",
                   help="import your own regimes/models/attacks/datasets first (a module "
                        "name, a .py file or a package dir; repeatable)")
    add_config_arguments(p)
    return p


def main(argv: list[str] | None = None) -> int:
    from aerl_ray.cli import config_from_args, fail, normalize_argv, setup_logging
    from aerl_ray.config import ConfigError
    from aerl_ray.data import DatasetUnavailableError

    parser = build_parser()
    ns = parser.parse_args(normalize_argv(argv))
    setup_logging(ns.log_level)
    from aerl_ray.plugins import PluginError, load_plugins

    try:
        load_plugins(ns.plugin)
        cfg = config_from_args(ns)
        res = fit(cfg, ns.out, resume=ns.resume, overwrite=ns.overwrite)
    except (ConfigError, DatasetUnavailableError, DivergedError, ValueError, RuntimeError,
            PluginError) as e:
        fail(parser, e)
    except KeyboardInterrupt:
        parser.exit(130, f"interrupted; resume with python -m aerl_ray.train --resume "
                         f"--out {ns.out} (and the same flags)\n")
    m = res.metrics
    print(f"trained {cfg.model.model} ({cfg.regime.regime}) on {cfg.data.dataset}: "
          f"test_acc {m['test_acc']:.4f} of the kept epoch {m.get('best_epoch')} "
          f"({m.get('selection', '')}); {m['fwd_passes']} fwd / {m['bwd_passes']} bwd passes, "
          f"{m['wall_seconds']:.1f}s")
    print(f"checkpoints: {res.best_path}, {res.last_path}; metrics: {Path(ns.out) / 'metrics.jsonl'}"
          f"; tensorboard --logdir {Path(ns.out) / 'tb'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
