"""Attack cost, measured side by side in one run (ratios, not absolute times).

1. PGD throughput (example-steps per second): ours / cleverhans'
   ``projected_gradient_descent`` on the same model, examples, budget, steps and step
   size (L-inf, random start, [0, 1] clipping).  Target >= 1.0.  Ours is shown with its
   default early exit (a fooled example leaves the batch) and without it (pure per-step
   cost); robust accuracies are printed next to the times.
2. Robustness curves over a 6-budget grid vs 6 separate ``pgd`` runs (same seed), on SL,
   RL and adversarially trained (``sl_adv``, PGD inner attack) cnn4 models on digits,
   trained here with ``aerl_ray.train.fit`` (15 epochs each), for L-inf and L2, each on a
   standard and a wide grid.  Variants: ``exact`` (``curve="exact"``: the per-example
   running minimum of separate runs, one batched loop) and ``search`` (the default,
   ``curve="search"``: FMN bracket + per-example search + a 100-pair audit; see
   aerl_ray.attacks.curve_search).  Per cell: cost ratio to the separate runs in wall
   time, process CPU time and work (forward+backward example-passes, hook-counted; on a
   CPU a pass costs in proportion to its rows, so time follows work); the search's
   disagreement -- the fraction of (example, nonzero budget) pairs where a separate run
   breaks an example the curve counts as robust -- and the pairs where the curve is
   stronger than every separate run (FMN's points); the audit's own estimate and 95%
   Wilson upper bound as the rows carry them.  Targets: search cost <= 0.5 on the
   standard grid; disagreement <= 0.5%.

Variants are interleaved and the median of the repeats is used, so machine noise hits
both sides alike.  Single-threaded by default: on 2 shared cores, 2 threads thrash on
these small models.

    python bench/attacks.py [--n 360] [--steps 50] [--epochs 15] [--repeats 3]
                            [--curve-repeats 1] [--models sl,rl,sl_adv] [--norms linf,l2]
                            [--skip-throughput] [--ablation] [--quick]

``--quick`` (part 2 only: all 360 test digits, 20 PGD steps, models trained 10 epochs;
about 6 minutes on 2 shared cores) is the fastest configuration that still has every
model, norm and grid.  Keep n at 360: the audit's 100 pairs are a fixed cost, so at
n=120 they alone add 0.1-0.3 to the search's ratio.
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import numpy as np
import torch
import torch.nn.functional as F

from aerl_ray.attacks import Threat, pgd_curve, predict, robustness_curve, run_attack
from aerl_ray.config import DataConfig, TrainConfig
from aerl_ray.data import load_splits
from aerl_ray.models import build_model

GRIDS = {"linf": {"standard": ["0", "1/255", "2/255", "4/255", "8/255", "16/255"],
                  "wide": ["0", "0.05", "0.1", "0.15", "0.2", "0.3"]},
         "l2": {"standard": ["0", "0.125", "0.25", "0.5", "1.0", "2.0"],
                "wide": ["0", "0.5", "1.0", "1.5", "2.0", "3.0"]}}
REGIMES = {"sl": dict(regime="sl"), "rl": dict(regime="rl"),
           "sl_adv": dict(regime="sl_adv", adv_attack="pgd", adv_eps=0.1, adv_steps=5)}


def train_sl(splits, epochs: int = 15, seed: int = 0):
    """Part 1's model: a plain inline SL loop (independent of aerl_ray.train)."""
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


def train_regime(splits, name: str, epochs: int = 15, seed: int = 0):
    """A cnn4 trained with ``aerl_ray.train.fit`` under regime ``name`` (REGIMES)."""
    from aerl_ray.train import fit

    cfg = TrainConfig().replace(dataset="digits", model="cnn4", epochs=epochs, seed=seed,
                                device="cpu", **REGIMES[name])
    with tempfile.TemporaryDirectory() as out:
        res = fit(cfg, out, splits=splits)
    return res.model.eval(), float(res.metrics["test_acc"])


def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=360, help="test examples (digits has 360)")
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--epochs", type=int, default=15, help="training epochs of part 2's models")
    ap.add_argument("--eps", default="8/255", help="L-inf budget of part 1")
    ap.add_argument("--repeats", type=int, default=3, help="repeats of part 1")
    ap.add_argument("--curve-repeats", type=int, default=1, help="repeats of part 2")
    ap.add_argument("--models", default="sl,rl,sl_adv")
    ap.add_argument("--norms", default="linf,l2")
    ap.add_argument("--audit", type=int, default=100, help="audit pairs of the search")
    ap.add_argument("--skip-throughput", action="store_true", help="part 2 only")
    ap.add_argument("--ablation", action="store_true",
                    help="part 2 also runs the search's variants once each (work and "
                         "disagreement, no audit): bracket none/fmn-guide, bisection, "
                         "warm starts")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (0 = default)")
    ap.add_argument("--quick", action="store_true",
                    help="part 2 only, n=360, 20 steps, 10 training epochs (overrides those)")
    args = ap.parse_args(argv)
    if args.quick:
        args.n, args.steps, args.epochs, args.skip_throughput = 360, 20, 10, True
    if args.threads:
        torch.set_num_threads(args.threads)
    splits = load_splits(DataConfig(dataset="digits"))
    if not args.skip_throughput:
        throughput(splits, args)
    curves(splits, args)


def throughput(splits, args) -> None:
    from cleverhans.torch.attacks.projected_gradient_descent import projected_gradient_descent

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


def _interleaved(runs: dict, repeats: int) -> tuple[dict, dict, dict]:
    """Run each variant ``repeats`` times, interleaved; median wall and CPU seconds."""
    wall: dict[str, list[float]] = {k: [] for k in runs}
    cpu: dict[str, list[float]] = {k: [] for k in runs}
    res = {}
    for _ in range(repeats):
        for k, fn in runs.items():
            c0, t0 = time.process_time(), time.perf_counter()
            res[k] = fn()
            wall[k].append(time.perf_counter() - t0)
            cpu[k].append(time.process_time() - c0)
    return ({k: statistics.median(v) for k, v in wall.items()},
            {k: statistics.median(v) for k, v in cpu.items()}, res)


ABLATION = {"no audit": {},
            "bracket none": {"bracket": "none"},
            "bracket fmn-guide": {"bracket": "fmn-guide"},
            "bisect, no bracket": {"bracket": "none", "order": "bisect"},
            "warm replace, no bracket": {"bracket": "none", "warm": "replace"},
            "warm replace + fmn": {"warm": "replace"}}


def _ablation(model, x, y, norm, grid, kw, sep, running, sep_work) -> None:
    """Variants of the search, once each, without the audit: work / separate runs'
    work, disagreement and pairs stronger than every separate run."""
    from aerl_ray.attacks.pgd import pgd_grid

    for name, opts in ABLATION.items():
        res = pgd_grid(model, x, y, norm, grid, curve="search", audit=0, **kw, **opts)
        c = torch.stack([r.success for r in res[1:]], 1)
        w = sum(r.fwd_passes + r.bwd_passes for r in res)
        print(f"        ablation {name:<26} work {w / sep_work:.3f}  disagree "
              f"{float((sep & ~c).float().mean()):.2%}  stronger {int((c & ~running).sum())}")


def curves(splits, args) -> None:
    x, y = splits.x_test[:args.n], splits.y_test[:args.n]
    print(f"\n2. 6-budget curves vs 6 separate runs: {args.steps} PGD steps, seed 0, "
          f"n={len(x)}, search audit {args.audit} pairs, {args.curve_repeats} repeat(s)")
    cols = ("model", "norm", "grid", "exact wall/cpu/work", "search wall/cpu/work",
            "disagree", "stronger", "audit est/upper (breaks/pairs)")
    print("   " + " | ".join(cols))
    summary = []
    for mname in args.models.split(","):
        t0 = time.perf_counter()
        model, acc = train_regime(splits, mname, epochs=args.epochs)
        print(f"   -- {mname}: {args.epochs} epochs, trained in {time.perf_counter() - t0:.0f} s, test acc {acc:.3f}")
        for norm in args.norms.split(","):
            for gname, grid in GRIDS[norm].items():
                kw = dict(steps=args.steps, seed=0)
                runs = {
                    "separate": lambda: [run_attack("pgd", model, x, y, Threat(norm, e), **kw)
                                         for e in grid],
                    "exact": lambda: pgd_curve(model, x, y, norm, grid, curve="exact", **kw),
                    "search": lambda: pgd_curve(model, x, y, norm, grid, curve="search",
                                                audit=args.audit, **kw),
                }
                w, c, res = _interleaved(runs, args.curve_repeats)
                work = {k: sum(r.fwd_passes + r.bwd_passes for r in v) for k, v in res.items()}
                sep = torch.stack([r.success for r in res["separate"][1:]], 1)
                srch = torch.stack([r.success for r in res["search"][1:]], 1)
                exact = torch.stack([r.success for r in res["exact"][1:]], 1)
                running = sep.to(torch.uint8).cummax(1).values.bool()
                same = torch.equal(exact, running)  # exact mode's contract, checked
                dis = float((sep & ~srch).float().mean())
                stronger = int((srch & ~running).sum())
                ex = res["search"][1].extra
                ratio = {k: (w[k] / w["separate"], c[k] / c["separate"],
                             work[k] / work["separate"]) for k in ("exact", "search")}
                summary.append((mname, norm, gname, ratio["search"], dis))
                fmt = "{:.2f}/{:.2f}/{:.3f}"
                print(f"   {mname} | {norm} | {gname} | {fmt.format(*ratio['exact'])} | "
                      f"{fmt.format(*ratio['search'])} | {dis:.2%} "
                      f"({int((sep & ~srch).sum())}/{sep.numel()}) | {stronger} | "
                      f"{ex['disagreement_audit']:.2%}/{ex['disagreement_upper']:.2%} "
                      f"({ex['audit_breaks']}/{ex['audited_pairs']})")
                if args.ablation:
                    _ablation(model, x, y, norm, grid, kw, sep, running, work["separate"])
                fg = robustness_curve("fgsm", model, x, y, norm, grid)
                fgs = torch.stack([r.success for r in fg[1:]], 1)
                print(f"        robust acc separate {[round(r.robust_acc, 3) for r in res['separate']]}"
                      f"  search {[round(r.robust_acc, 3) for r in res['search']]}"
                      f"  fgsm {[round(r.robust_acc, 3) for r in fg]}"
                      f"  (exact == running minimum of separate: {same}; search == fgsm "
                      f"per example: {torch.equal(srch, fgs)}, fgsm breaks the search "
                      f"misses: {int((fgs & ~srch).sum())})")
    std = [r for r in summary if r[2] == "standard"]
    worst_std = max(r[3][2] for r in std) if std else float("nan")
    worst_std_wall = max(r[3][0] for r in std) if std else float("nan")
    worst_dis = max(r[4] for r in summary) if summary else float("nan")
    print(f"\n   search / separate on the standard grids: worst work {worst_std:.3f}, worst "
          f"wall {worst_std_wall:.2f}  (target <= 0.5: {'met' if max(worst_std, worst_std_wall) <= 0.5 else 'NOT met'})")
    print(f"   worst disagreement of the search: {worst_dis:.2%}  (target <= 0.5%: "
          f"{'met' if worst_dis <= 0.005 else 'NOT met'})")


if __name__ == "__main__":
    main()
