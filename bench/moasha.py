"""MOASHA vs no early stopping vs Ray's ASHA: hypervolume of the validation front vs compute.

On digits, a quickstart-like space (regimes sl/rl/rl_adv/hybrid; lr, explore_eps, adv_eps,
switch_epoch), the same randomly sampled configurations for every arm within a seed
(paired), each trial a real Ray Tune function trainable running ``aerl_ray.train.train_loop``
and reporting every epoch:

(a) ``none``        no early stopping: every trial runs ``--epochs`` epochs;
(b) ``asha``        Ray's ``AsyncHyperBandScheduler`` on ``val_acc``;
(c) ``moasha``      MOASHA (``--moasha-mode``, promote by default) on (val clean acc, val
                    robust acc), both measured at the rungs by ``aerl_ray.rungs`` (PGD-k on
                    the fixed validation subset, masking checks; counted in the compute);
(d) ``moasha-stop`` MOASHA in stop mode (when (c) promotes), for reference.

Compute = training example-passes (forward + backward, hook-counted; the per-epoch
validation pass is excluded in every arm) + rung-evaluation passes; seconds = the trials'
training + rung-evaluation time.  The front of an arm: every trial at the last epoch it
trained (early-stopped trials count with what they reached), measured afterwards on the
validation split by the same rung-metric function ("front eval", the same for every arm,
not counted).  Hypervolume: reference point (0, 0).  The anytime curve: the hypervolume of
the trials finished so far vs the compute spent by all trials at that moment.

Targets (issue 14): MOASHA's final hypervolume >= 0.98 of (a)'s with <= 0.5 of (a)'s
compute; at equal compute (the smaller of (b)'s and (c)'s totals) its hypervolume is above
(b)'s.  Scheduler settings (grace 3, eta 3, promote) were chosen on replays of seeds 0-5;
the reported seeds are 10-12.

    python bench/moasha.py                 # 3 seeds x 4 arms x 24 trials x 20 epochs
    python bench/moasha.py --smoke         # 1 seed, 2 trials, 3 epochs, 3 arms (~15 CPU-s)
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import os
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from analysis.pareto import hypervolume_2d  # noqa: E402

ARMS = ("none", "asha", "moasha", "moasha-stop")


def sample_space(seed: int, n: int) -> list[dict]:
    """``n`` configurations of the quickstart-like space, from a seeded RNG."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        regime = rng.choice(["sl", "rl", "rl_adv", "hybrid"])
        c = {"regime": regime, "lr": math.exp(rng.uniform(math.log(3e-4), math.log(1e-2)))}
        if regime != "sl":
            c["explore_eps"] = rng.uniform(0.02, 0.3)
        if regime == "rl_adv":
            c["adv_eps"] = rng.uniform(0.02, 0.1)
        if regime == "hybrid":
            c["switch_epoch"] = rng.randint(2, 16)
        out.append(c)
    return out


def train_config(c: dict, epochs: int, seed: int, model: str):
    from aerl_ray.config import DataConfig, ModelConfig, RegimeConfig, TrainConfig

    reg = RegimeConfig(regime=c["regime"], explore_eps=c.get("explore_eps", 0.1),
                       adv_eps=c.get("adv_eps", 0.01),
                       switch_epoch=min(c.get("switch_epoch", 0), epochs - 1))
    return TrainConfig(data=DataConfig(dataset="digits"), model=ModelConfig(model=model),
                       regime=reg, epochs=epochs, lr=c["lr"], seed=seed, device="cpu")


def trial_fn(config: dict, splits=None) -> None:
    """One trial: train_loop, a Tune report per epoch, rung metrics at the rungs."""
    import torch
    from ray import tune

    from aerl_ray.checkpoint import load_checkpoint
    from aerl_ray.models import build_model
    from aerl_ray.rungs import robust_val_metrics
    from aerl_ray.train import WorkerContext, train_loop

    torch.set_num_threads(1)
    cfg = train_config(config["space"], config["epochs"], config["train_seed"], config["model"])
    out = Path(config["out"])
    out.mkdir(parents=True, exist_ok=True)
    resume, rung = None, {"passes": 0, "seconds": 0.0}
    ckpt = tune.get_checkpoint()
    if ckpt is not None:  # promote mode: resume from the rung checkpoint
        with ckpt.as_directory() as d:
            resume = load_checkpoint(Path(d) / "last.pt")
            rung = json.loads((Path(d) / "rung.json").read_text())
    evaluator = build_model(config["model"], splits.info)
    rungs = set(config["rung_epochs"])

    def on_epoch(m: dict, out_dir: Path) -> None:
        it = m["epoch"] + 1
        r = {"epoch": it, "val_acc": m["val_acc"], "wall": time.time(),
             "train_passes": m["fwd_passes"] + m["bwd_passes"],
             "train_seconds": m["wall_seconds"]}
        at_rung = it in rungs
        if at_rung:
            evaluator.load_state_dict(load_checkpoint(out_dir / "last.pt")["model_state"])
            rm = robust_val_metrics(evaluator, splits.x_val, splits.y_val, **config["rung"])
            rung["passes"] += rm["fwd_passes"] + rm["bwd_passes"]
            rung["seconds"] += rm["seconds"]
            r.update(clean_acc=rm["clean_acc"], robust_acc=rm["robust_acc"],
                     clean_acc_n=rm["n"], robust_acc_n=rm["n"], masking=rm["masking"])
        r.update(rung_passes=rung["passes"], rung_seconds=rung["seconds"])
        if at_rung and config["checkpoint"]:
            with tempfile.TemporaryDirectory() as d:
                shutil.copy(out_dir / "last.pt", Path(d) / "last.pt")
                (Path(d) / "rung.json").write_text(json.dumps(rung))
                tune.report(r, checkpoint=tune.Checkpoint.from_directory(d))
        else:
            tune.report(r)

    train_loop(cfg, out, WorkerContext(splits=splits, on_epoch=on_epoch, resume=resume))


def scheduler(arm: str, a: argparse.Namespace, records: list):
    from ray.tune.schedulers import AsyncHyperBandScheduler

    from aerl_ray.moasha import MOASHA

    kw = dict(grace_period=a.grace, reduction_factor=a.eta, max_t=a.epochs)
    if arm == "asha":
        return AsyncHyperBandScheduler(metric="val_acc", mode="max", **kw)
    if arm.startswith("moasha"):
        mode = "stop" if arm == "moasha-stop" else a.moasha_mode
        return MOASHA(["clean_acc", "robust_acc"], ["max", "max"], mode=mode,
                      on_decision=records.append, **kw)
    return None


def run_arm(arm: str, seed: int, space: list[dict], splits, a, root: Path) -> dict:
    from ray import tune

    from aerl_ray.moasha import MOASHA

    records: list = []
    sched = scheduler(arm, a, records)
    rung_epochs = ([] if not arm.startswith("moasha") else
                   [int(m) for m in MOASHA(["x"], ["max"], grace_period=a.grace,
                                           reduction_factor=a.eta,
                                           max_t=a.epochs).config.milestones() if m < a.epochs])
    base = {"epochs": a.epochs, "model": a.model, "rung_epochs": rung_epochs,
            "rung": dict(eps=a.eps, steps=a.steps, n=a.n, seed=0),
            "checkpoint": arm == "moasha" and a.moasha_mode == "promote"}
    param_space = {**base, "idx": tune.grid_search(list(range(len(space))))}
    trainable = tune.with_resources(tune.with_parameters(_trial_entry, splits=splits,
                                                         space=space, seed=seed,
                                                         root=str(root / arm)), {"cpu": 1})
    rows: list[dict] = []

    class Rows(tune.Callback):  # every reported result, in the driver
        def on_trial_result(self, iteration, trials, trial, result, **info):
            rows.append({"idx": trial.config["idx"], **{k: result[k] for k in (
                "epoch", "wall", "train_passes", "rung_passes", "train_seconds",
                "rung_seconds")}})

    t0 = time.perf_counter()
    results = tune.Tuner(trainable, param_space=param_space,
                         tune_config=tune.TuneConfig(scheduler=sched, reuse_actors=True),
                         run_config=tune.RunConfig(storage_path=str(root / "tune"),
                                                   name=f"{arm}_s{seed}", verbose=0,
                                                   callbacks=[Rows()])).fit()
    wall = time.perf_counter() - t0
    if results.errors:
        raise RuntimeError(f"{arm} seed {seed}: {len(results.errors)} trials failed: "
                           f"{results.errors[0]}")
    return {"rows": rows, "wall": wall, "records": records}


def _trial_entry(config: dict, splits=None, space=None, seed=0, root="") -> None:
    idx = config["idx"]
    trial_fn({**config, "space": space[idx], "train_seed": seed * 1000 + idx,
              "out": f"{root}/s{seed}/t{idx:02d}"}, splits=splits)


def front_eval(arm: str, seed: int, n_trials: int, splits, a, root: Path) -> dict:
    """(clean, robust) on validation of every trial's last trained model."""
    import torch

    from aerl_ray.checkpoint import load_checkpoint
    from aerl_ray.models import build_model
    from aerl_ray.rungs import robust_val_metrics

    torch.set_num_threads(1)
    model = build_model(a.model, splits.info)
    out = {}
    for idx in range(n_trials):
        ck = load_checkpoint(root / arm / f"s{seed}" / f"t{idx:02d}" / "last.pt")
        model.load_state_dict(ck["model_state"])
        r = robust_val_metrics(model, splits.x_val, splits.y_val, eps=a.eps, steps=a.steps,
                               n=a.n, seed=0)
        out[idx] = (r["clean_acc"], r["robust_acc"], int(ck["epoch"]) + 1)
    return out


def summarise(run: dict, front: dict) -> dict:
    """Totals, the final hypervolume and the anytime curve (compute, seconds, HV)."""
    rows = sorted(run["rows"], key=lambda r: r["wall"])
    last = {}
    for r in rows:
        last[r["idx"]] = r
    final_wall = {i: r["wall"] for i, r in last.items()}
    spent, secs, done, curve = {}, {}, {}, []
    for r in rows:
        spent[r["idx"]] = r["train_passes"] + r["rung_passes"]
        secs[r["idx"]] = r["train_seconds"] + r["rung_seconds"]
        if r["wall"] == final_wall[r["idx"]]:
            done[r["idx"]] = front[r["idx"]][:2]
            curve.append((sum(spent.values()), sum(secs.values()),
                          hypervolume_2d(list(done.values()))))
    return {"front": {i: v for i, v in sorted(front.items())}, "records": run["records"],
            "passes": sum(spent.values()), "seconds": sum(secs.values()),
            "rung_passes": sum(r["rung_passes"] for r in last.values()),
            "hv": hypervolume_2d([v[:2] for v in front.values()]), "curve": curve,
            "epochs": sum(v[2] for v in front.values()), "wall": run["wall"],
            "stopped": sum(1 for v in front.values()
                           if v[2] < max(x[2] for x in front.values()))}


def hv_at(curve: list, passes: float) -> float:
    h = 0.0
    for p, _, v in curve:
        if p <= passes * (1 + 1e-9):
            h = v
    return h


def report(res: dict, arms: list[str], a) -> list[str]:
    lines = [f"bench/moasha.py: digits, {a.model}, {a.trials} trials x {a.epochs} epochs, "
             f"seeds {a.seeds}; rungs grace {a.grace} eta {a.eta}; MOASHA {a.moasha_mode}; "
             f"rung metric PGD-{a.steps} Linf eps {a.eps} on {a.n} val images + checks",
             f"{'seed':>4s} {'arm':12s} {'passes':>10s} {'/(a)':>6s} {'seconds':>8s} {'/(a)':>6s} "
             f"{'rung %':>6s} {'epochs':>6s} {'stopped':>7s} {'HV':>7s} {'/(a)':>6s} "
             f"{'HV@C*':>7s} {'wall s':>7s}"]
    ratios = {arm: [] for arm in arms}
    for seed in a.seeds:
        ref = res[(seed, "none")]
        cstar = min(res[(seed, "asha")]["passes"], res[(seed, "moasha")]["passes"]) \
            if "asha" in arms and "moasha" in arms else ref["passes"]
        for arm in arms:
            s = res[(seed, arm)]
            r = (s["passes"] / ref["passes"], s["seconds"] / ref["seconds"], s["hv"] / ref["hv"],
                 hv_at(s["curve"], cstar) / ref["hv"])
            ratios[arm].append(r)
            lines.append(f"{seed:4d} {arm:12s} {s['passes']:10.0f} {r[0]:6.3f} "
                         f"{s['seconds']:8.1f} {r[1]:6.3f} "
                         f"{100 * s['rung_passes'] / s['passes']:6.1f} {s['epochs']:6d} "
                         f"{s['stopped']:7d} {s['hv']:7.4f} {r[2]:6.3f} {r[3]:7.3f} "
                         f"{s['wall']:7.1f}")
    lines.append("mean over seeds (ratios to (a)): passes, seconds, final HV, HV at C* "
                 "(C* = the smaller of ASHA's and MOASHA's total passes)")
    for arm in arms:
        m = np.mean(ratios[arm], axis=0)
        lines.append(f"     {arm:12s} passes {m[0]:.3f}  seconds {m[1]:.3f}  HV {m[2]:.3f}  "
                     f"HV@C* {m[3]:.3f}")
    if "asha" in arms and "moasha" in arms:
        mo, asha = np.array(ratios["moasha"]), np.array(ratios["asha"])
        ok1 = mo[:, 2].mean() >= 0.98 and mo[:, 0].mean() <= 0.5
        ok2 = mo[:, 3].mean() > asha[:, 3].mean()
        lines.append(f"target 1 (MOASHA HV >= 0.98 of (a) at <= 0.5 of its compute, mean): "
                     f"HV {mo[:, 2].mean():.3f}, compute {mo[:, 0].mean():.3f} -> "
                     f"{'MET' if ok1 else 'NOT MET'} (per seed: HV "
                     f"{', '.join(f'{v:.3f}' for v in mo[:, 2])}; compute "
                     f"{', '.join(f'{v:.3f}' for v in mo[:, 0])})")
        lines.append(f"target 2 (at equal compute MOASHA HV > ASHA HV, mean): "
                     f"{mo[:, 3].mean():.3f} vs {asha[:, 3].mean():.3f} -> "
                     f"{'MET' if ok2 else 'NOT MET'} (per seed: "
                     f"{', '.join(f'{x:.3f} vs {y:.3f}' for x, y in zip(mo[:, 3], asha[:, 3]))})")
    return lines


def plot(res: dict, arms: list[str], a, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    colors = {"none": "k", "asha": "tab:orange", "moasha": "tab:blue", "moasha-stop": "tab:cyan"}
    for seed in a.seeds:
        ref = res[(seed, "none")]
        for arm in arms:
            c = res[(seed, arm)]["curve"]
            for ax, j, norm in ((axes[0], 0, ref["passes"]), (axes[1], 1, ref["seconds"])):
                ax.step([p[j] / norm for p in c], [p[2] / ref["hv"] for p in c], where="post",
                        color=colors[arm], alpha=0.8,
                        label=arm if seed == a.seeds[0] else None)
    for ax, what in zip(axes, ("example-passes (fwd+bwd)", "trial seconds")):
        ax.set_xlabel(f"cumulative compute, {what} / (a)'s total")
        ax.axhline(0.98, color="grey", ls=":", lw=1)
        ax.axvline(0.5, color="grey", ls=":", lw=1)
        ax.set_ylim(0.5, 1.05)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("hypervolume of the finished trials / (a)'s final")
    axes[0].legend(loc="lower right", fontsize=8)
    fig.suptitle(f"MOASHA vs ASHA vs no early stopping: digits, {a.trials} trials x "
                 f"{a.epochs} epochs, seeds {a.seeds}", fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> list[str]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--smoke", action="store_true",
                   help="the test-suite size: 1 seed, 2 trials, 3 epochs, 3 arms")
    p.add_argument("--seeds", type=int, nargs="+", default=[10, 11, 12])
    p.add_argument("--trials", type=int, default=24)
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--grace", type=int, default=3)
    p.add_argument("--eta", type=float, default=3)
    p.add_argument("--moasha-mode", choices=["stop", "promote"], default="promote")
    p.add_argument("--model", default="tiny")
    p.add_argument("--eps", type=float, default=0.1, help="Linf budget of the rung PGD")
    p.add_argument("--steps", type=int, default=5, help="rung PGD steps")
    p.add_argument("--n", type=int, default=144,
                   help="validation images per rung eval (digits has 144: all of them)")
    p.add_argument("--plot", default=str(Path(__file__).with_name("moasha_hv_vs_compute.png")))
    p.add_argument("--json", default="", help="also write the summaries here")
    a = p.parse_args(argv)
    if a.smoke:
        a.seeds, a.trials, a.epochs, a.grace, a.eta, a.steps, a.n = [10], 2, 3, 1, 2, 2, 32
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("ray.tune").setLevel(logging.ERROR)  # no per-trial log files: quiet
    os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")
    import ray
    import torch

    from aerl_ray.config import DataConfig
    from aerl_ray.data import load_splits

    torch.set_num_threads(1)
    if __name__ != "__main__":  # imported (the smoke test): workers cannot import us
        ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    if not ray.is_initialized():
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    splits = load_splits(DataConfig(dataset="digits"))
    arms = list(ARMS if a.moasha_mode == "promote" and not a.smoke else ARMS[:3])
    res = {}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        for seed in a.seeds:
            space = sample_space(seed, a.trials)
            for arm in arms:
                run = run_arm(arm, seed, space, splits, a, root)
                res[(seed, arm)] = summarise(run, front_eval(arm, seed, a.trials, splits, a,
                                                             root))
                print(f"  seed {seed} {arm}: {run['wall']:.0f} s", flush=True)
    lines = report(res, arms, a)
    print("\n".join(lines))
    if not a.smoke or a.plot != str(Path(__file__).with_name("moasha_hv_vs_compute.png")):
        plot(res, arms, a, Path(a.plot))
    if a.json:
        Path(a.json).write_text(json.dumps({f"{s}/{arm}": v for (s, arm), v in res.items()},
                                           indent=1, default=str))
    return lines


if __name__ == "__main__":
    main()
