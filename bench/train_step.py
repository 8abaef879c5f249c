"""Training-step cost, measured side by side in one run (ratios, not absolute times).

1. our SL step (``aerl_ray.train.train_step`` with the ``sl`` regime) / a bare PyTorch
   loop on the same model and batch.  Target <= 1.05.
2. our RL-adv step (FGSM on the PG loss, 2 forward + 2 backward) / the paper's released
   scheme (``PolicyAdvEpsilonAgent.adv_update``: clean forward, full backward with
   retain_graph for the input gradient, an adversarial forward whose result is discarded,
   then clean + adversarial forwards again and a backward through both: 4 forward + 3
   graph-backwards).  Target <= 0.6.
3. every registered regime (and the pgd / fgsm_rs / trades inner attacks): counted passes
   per step (``aerl_ray.passes``) relative to SL, against the measured step-time ratio
   to SL (this process's CPU time, so other jobs on a shared machine do not count).  Target:
   within 15% (``tests/test_passes.py`` asserts it on a smaller batch).

Steps of the compared variants are interleaved and the median per-step time is used, so
machine noise hits both sides alike.  Default: cnn4 on a CIFAR-shaped batch (128 x 3 x 32
x 32) on the CPU (or ``--device cuda``).

    python bench/train_step.py [--model cnn4] [--batch 128] [--steps 15] [--device cpu]
                               [--regime-steps 7] [--adv-steps 10]
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from aerl_ray.config import RegimeConfig
from aerl_ray.data import DatasetInfo
from aerl_ray.models import build_model
from aerl_ray.passes import PassCounter
from aerl_ray.regimes import REGIMES, RegimeContext
from aerl_ray.regimes.policy_gradient import rewards, sample_actions
from aerl_ray.train import train_step


def seed_adv_update(model, opt, x, y, eps, rate, g):
    """The released RL-adv update, re-expressed (reference only)."""
    def pg(inp):
        logits = model(inp)
        a, _ = sample_actions(logits, 0.1, "per_batch", g)
        logp = F.log_softmax(logits, 1).gather(1, a[:, None]).squeeze(1)
        return -(logp * rewards(a, y, "01")).mean()

    x = x.clone().requires_grad_(True)
    opt.zero_grad()
    loss_clean = pg(x)                                   # forward 1
    loss_clean.backward(retain_graph=True)               # backward 1 (full)
    x_adv = (x.detach() + eps * x.grad.sign()).clamp(0, 1)
    _ = pg(x_adv)                                        # forward 2 (value only logged)
    opt.zero_grad()
    total = pg(x) + rate * pg(x_adv)                     # forwards 3, 4
    total.backward()                                     # backward 2 (both graphs)
    opt.step()


def bare_sl_step(model, opt, x, y):
    opt.zero_grad(set_to_none=True)
    loss = F.cross_entropy(model(x), y)
    loss.backward()
    opt.step()


def timed(fn) -> float:
    t = time.perf_counter()
    fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - t


def cpu_timed(fn) -> float:
    t = time.process_time()
    fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.process_time() - t


def pass_table(setup, x, y, steps: int, adv_steps: int) -> list[tuple[str, float, float]]:
    """(variant, counted passes / SL's, measured time / SL's) for every regime."""
    variants = {name: {} for name in REGIMES.names()}
    variants.update({f"sl_adv:{a}": {"adv_attack": a, "adv_steps": adv_steps}
                     for a in ("fgsm_rs", "pgd", "trades")})
    steppers = {}
    for name, kw in variants.items():
        regime = name.split(":")[0]
        if regime == "hybrid":
            kw = {**kw, "switch_epoch": 1}
        model, opt, sched, ctx = setup(regime, **kw)
        ctx.epoch = 1  # hybrid: its RL phase
        fn = REGIMES.get(regime)
        step = (lambda m=model, f=fn, c=ctx, o=opt, s=sched:
                train_step(m, f, x, y, c, o, s, 0.0))
        with PassCounter(model) as pc:
            step()
        steppers[name] = (step, pc.fwd + pc.bwd)
    sl_step, sl_passes = steppers["sl"]
    rows = []
    for name, (step, passes) in steppers.items():
        ta, tb = [], []
        for i in range(steps):
            for f, acc in ((sl_step, ta), (step, tb)) if i % 2 else ((step, tb), (sl_step, ta)):
                acc.append(cpu_timed(f))
        rows.append((name, passes / sl_passes,
                     statistics.median(tb) / statistics.median(ta)))
    return rows


def compare(a, b, steps: int, warmup: int = 2) -> tuple[float, float]:
    for _ in range(warmup):
        a(), b()
    ta, tb = [], []
    for _ in range(steps):
        ta.append(timed(a))
        tb.append(timed(b))
    return statistics.median(ta), statistics.median(tb)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="cnn4")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--steps", type=int, default=15)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--regime-steps", type=int, default=7,
                   help="interleaved steps per regime of the pass-count table (0 = skip)")
    p.add_argument("--adv-steps", type=int, default=10, help="steps of pgd/trades")
    a = p.parse_args()
    dev = torch.device(a.device)
    info = DatasetInfo("cifar10", 10, 3, 32, (0.49, 0.48, 0.45), (0.25, 0.24, 0.26))
    torch.manual_seed(0)
    x = torch.rand(a.batch, 3, 32, 32, device=dev)
    y = torch.randint(0, 10, (a.batch,), device=dev)

    def setup(regime, **kw):
        torch.manual_seed(0)
        model = build_model(a.model, info).to(dev).train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
        cfg = RegimeConfig(regime=regime, **{"adv_eps": 0.01, "explore_mode": "per_batch", **kw})
        ctx = RegimeContext(cfg=cfg, num_classes=10, generator=torch.Generator().manual_seed(0))
        return model, opt, sched, ctx

    m1, o1, s1, c1 = setup("sl")
    m2, o2, _, _ = setup("sl")
    ours_sl, bare = compare(lambda: train_step(m1, REGIMES.get("sl"), x, y, c1, o1, s1, 0.0),
                            lambda: bare_sl_step(m2, o2, x, y), a.steps)
    m3, o3, s3, c3 = setup("rl_adv")
    m4, o4, _, _ = setup("rl_adv")
    g = torch.Generator().manual_seed(0)
    ours_adv, seed = compare(lambda: train_step(m3, REGIMES.get("rl_adv"), x, y, c3, o3, s3, 0.0),
                             lambda: seed_adv_update(m4, o4, x, y, 0.01, 1.0, g), a.steps)
    print(f"model {a.model}, batch {a.batch}x3x32x32, device {dev}, {a.steps} steps "
          f"(median), torch threads {torch.get_num_threads()}")
    print(f"{'comparison':40s} {'ours s':>9s} {'reference s':>12s} {'ratio':>7s} target")
    print(f"{'SL step / bare PyTorch loop':40s} {ours_sl:9.4f} {bare:12.4f} "
          f"{ours_sl / bare:7.3f} <= 1.05")
    print(f"{'RL-adv step (2+2) / seed scheme (4+3)':40s} {ours_adv:9.4f} {seed:12.4f} "
          f"{ours_adv / seed:7.3f} <= 0.60")
    if a.regime_steps:
        print(f"\npasses per step relative to SL (SL = 3 forward-equivalents per example), "
              f"{a.regime_steps} interleaved steps, median CPU-time ratios; pgd/trades "
              f"{a.adv_steps} steps")
        print(f"{'regime':18s} {'counted':>8s} {'measured':>9s} {'error':>7s} target")
        for name, counted, measured in pass_table(setup, x, y, a.regime_steps, a.adv_steps):
            print(f"{name:18s} {counted:8.2f} {measured:9.2f} {counted / measured - 1:+7.1%} "
                  "within 15%")


if __name__ == "__main__":
    main()
