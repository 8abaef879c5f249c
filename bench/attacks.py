"""Attack cost, measured side by side in one run (ratios, not absolute times).

1. PGD throughput (example-steps per second): ours / cleverhans'
   ``projected_gradient_descent`` on the same model, examples, budget, steps and step
   size (L-inf, random start, [0, 1] clipping).  Target >= 1.0.  Ours is shown with its
   default early exit (a fooled example leaves the batch) and without it (pure per-step
   cost); robust accuracies are printed next to the times.
2. Many budgets in one pass: ``pgd_curve`` (the default path: ``robustness_curve`` ->
   ``pgd_grid``, all budgets' (example, budget) pairs batched in one loop) over a
   6-budget grid / 6 separate ``pgd`` runs (same seeds).  Per example, the curve equals
   the running minimum of the separate runs (checked and printed).  Target <= 0.35.
   Also shown: the budget-by-budget loop (``one_loop=False``), separate runs without
   early exit (conventional full-length PGD), and the work -- backward example-passes --
   of each, since on a CPU a pass costs in proportion to its rows: the time ratio cannot
   go below the work ratio, and the work of an exact curve cannot go below the budget
   loop's (every still-robust example must be attacked at the next budget).

Variants are interleaved and the median of ``--repeats`` timings is used, so machine
noise hits both sides alike; part 2 shows wall and process CPU time (the CPU time is
steadier on a shared machine).  Model: cnn4 trained for 15 epochs on digits (SL, ~3 s).
Single-threaded by default: on 2 shared cores, 2 threads thrash on these small models.

    python bench/attacks.py [--n 360] [--steps 50] [--repeats 3] [--threads 1]
"""
from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch
import torch.nn.functional as F

from aerl_ray.attacks import Threat, pgd_curve, predict, robustness_curve, run_attack
from aerl_ray.config import DataConfig
from aerl_ray.data import load_splits
from aerl_ray.models import build_model

GRIDS = {"standard": ["0", "1/255", "2/255", "4/255", "8/255", "16/255"],
         "wide": ["0", "0.05", "0.1", "0.15", "0.2", "0.3"]}


def train_sl(splits, epochs: int = 15, seed: int = 0):
    torch.manual_seed(seed)
    net = build_model("cnn4", splits.info)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3)
    x, y = splits.x_train, splits.y_train
    for _ in range(epochs):
        perm = torch.randperm(len(x))
        for i in range(0, len(x), 64):
            idx = perm[i:i + 64]
            loss = F.cross_entropy(net(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return net.eval()


def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=360, help="test examples (digits has 360)")
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--eps", default="8/255", help="L-inf budget of part 1")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (0 = default)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from cleverhans.torch.attacks.projected_gradient_descent import projected_gradient_descent

    splits = load_splits(DataConfig(dataset="digits"))
    model = train_sl(splits)
    x, y = splits.x_test[:args.n], splits.y_test[:args.n]
    clean = float((predict(model, x) == y).float().mean())
    threat = Threat("linf", args.eps)
    eps, rel = threat.eps, 2.5 / args.steps
    print(f"cnn4 on digits, n={len(x)}, clean acc {clean:.3f}, threads "
          f"{torch.get_num_threads()}, {args.steps} steps, step {rel:.3f} eps")

    def ch():
        torch.manual_seed(0)
        xa = projected_gradient_descent(model, x, eps, rel * eps, args.steps, np.inf,
                                        clip_min=0.0, clip_max=1.0, y=y, rand_init=True,
                                        sanity_checks=False)
        return float((predict(model, xa) == y).float().mean())

    variants = {
        "cleverhans PGD": ch,
        "ours (early exit)": lambda: run_attack("pgd", model, x, y, threat, steps=args.steps,
                                                step_size=rel).robust_acc,
        "ours (no early exit)": lambda: run_attack("pgd", model, x, y, threat,
                                                   steps=args.steps, step_size=rel,
                                                   early_stop=False).robust_acc,
    }
    times: dict[str, list[float]] = {k: [] for k in variants}
    accs: dict[str, float] = {}
    for _ in range(args.repeats):
        for k, fn in variants.items():
            t, accs[k] = timed(fn)
            times[k].append(t)
    med = {k: statistics.median(v) for k, v in times.items()}
    work = len(x) * args.steps
    print(f"\n1. PGD throughput, Linf eps={args.eps} (example-steps/s; robust acc)")
    for k in variants:
        print(f"   {k:<22} {work / med[k]:>10.0f}/s  {med[k]:6.2f} s  acc {accs[k]:.3f}")
    for k in ("ours (early exit)", "ours (no early exit)"):
        print(f"   ratio {k} / cleverhans = {med['cleverhans PGD'] / med[k]:.2f}  "
              f"(target >= 1.0)")

    print(f"\n2. 6-budget curve in one pass vs 6 separate runs ({args.steps} steps, seed 0)")
    for gname, grid in GRIDS.items():
        kw = dict(steps=args.steps, seed=0)
        runs = {
            "curve (one loop)": lambda: pgd_curve(model, x, y, "linf", grid, **kw),
            "6 separate": lambda: [run_attack("pgd", model, x, y, Threat("linf", e), **kw)
                                   for e in grid],
            "6 separate w/o early exit": lambda: [
                run_attack("pgd", model, x, y, Threat("linf", e), early_stop=False, **kw)
                for e in grid],
            "budget-by-budget loop": lambda: robustness_curve(
                "pgd", model, x, y, "linf", grid, one_loop=False, **kw),
        }
        wall: dict[str, list[float]] = {k: [] for k in runs}
        cpu: dict[str, list[float]] = {k: [] for k in runs}
        res = {}
        for _ in range(args.repeats):
            for k, fn in runs.items():
                c0, t0 = time.process_time(), time.perf_counter()
                res[k] = fn()
                wall[k].append(time.perf_counter() - t0)
                cpu[k].append(time.process_time() - c0)
        w = {k: statistics.median(v) for k, v in wall.items()}
        c = {k: statistics.median(v) for k, v in cpu.items()}
        bwd = {k: sum(r.bwd_passes for r in v) for k, v in res.items()}
        curve, sep = res["curve (one loop)"], res["6 separate"]
        broken = torch.zeros(len(x), dtype=torch.bool)
        envelope = []  # per-example running minimum of the separate runs
        for r in sep:
            broken |= r.success
            envelope.append(broken.clone())
        exact = all(torch.equal(r.success, b) for r, b in zip(curve, envelope))
        print(f"   grid {gname} {grid}")
        print(f"     curve robust acc    {[round(r.robust_acc, 3) for r in curve]}")
        print(f"     separate robust acc {[round(r.robust_acc, 3) for r in sep]}")
        print(f"     curve == per-example running minimum of the separate runs: {exact}")
        for k in runs:
            print(f"     {k:<26} wall {w[k]:6.2f} s  cpu {c[k]:6.2f} s  bwd passes {bwd[k]:>7}")
        s_, f_ = "6 separate", "6 separate w/o early exit"
        print(f"     ratio curve / separate = {w['curve (one loop)'] / w[s_]:.2f} wall, "
              f"{c['curve (one loop)'] / c[s_]:.2f} cpu, "
              f"{bwd['curve (one loop)'] / bwd[s_]:.3f} work  (target <= 0.35)")
        print(f"     ratio curve / separate w/o early exit = "
              f"{w['curve (one loop)'] / w[f_]:.2f} wall, "
              f"{c['curve (one loop)'] / c[f_]:.2f} cpu, "
              f"{bwd['curve (one loop)'] / bwd[f_]:.3f} work")
        print(f"     least work of an exact curve (budget loop) / separate = "
              f"{bwd['budget-by-budget loop'] / bwd[s_]:.3f}")

if __name__ == "__main__":
    main()
