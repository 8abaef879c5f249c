"""Sweep overhead, measured side by side in one run (ratios, not absolute times).

Runs the quickstart space in smoke size (tiny model, digits) on a fresh local Ray:

1. ``in_process`` mode (1-worker trials run the training loop inside the Tune trial):
   sweep wall time (``Tuner.fit`` and the whole ``run_sweep``) / ideal parallel time of
   the same trials on the same resources, i.e. the makespan lower bound of a pipeline with
   ``concurrency`` training slots and ``actors`` evaluators:
   max(sum(train) / concurrency, sum(evaluator compute) / actors, max(train + eval)).
   Target <= 1.15 on 2 CPUs.  Per-trial overhead = trial wall time - training - evaluation.
2. the same trials in ``ray_train`` mode (a TorchTrainer per trial, Train V2): the
   per-trial overhead that in_process mode saves.

    python bench/sweep_overhead.py [--num-samples 6] [--epochs 3]
"""
from __future__ import annotations

import argparse
import logging
import tempfile
import time
from pathlib import Path

import ray

from aerl_ray import sweep

SPACE = Path(__file__).resolve().parent.parent / "search_spaces" / "quickstart.yaml"


def run(mode: str, n: int, epochs: int, tmp: Path) -> dict:
    t0 = time.perf_counter()
    res = sweep.run_sweep(SPACE, tmp / mode, smoke=True, num_samples=n, verbose=0,
                          num_cpus=2, overrides={"fixed": {"epochs": epochs},
                                                 "resources": {"mode": mode}})
    total = time.perf_counter() - t0
    ray.shutdown()
    t = res.trials
    conc = res.concurrency
    from aerl_ray.space import load_space

    actors = int(load_space(SPACE, smoke=True).evaluation.get("actors", 1))
    ideal = max(float(t["train_seconds"].sum()) / conc,
                float(t["eval_compute_seconds"].sum()) / actors,
                float((t["train_seconds"] + t["eval_compute_seconds"]).max()))
    overhead = (t["trial_seconds"] - t["train_seconds"] - t["eval_seconds"]).mean()
    return {"mode": mode, "trials": len(t), "concurrency": conc, "fit": res.fit_seconds,
            "total": total, "ideal": ideal, "per_trial_overhead": float(overhead),
            "trial_seconds": float(t["trial_seconds"].mean()),
            "train": float(t["train_seconds"].mean())}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--num-samples", type=int, default=6)
    p.add_argument("--epochs", type=int, default=3)
    a = p.parse_args()
    logging.basicConfig(level=logging.WARNING)
    with tempfile.TemporaryDirectory() as d:
        rows = [run(m, a.num_samples, a.epochs, Path(d)) for m in ("in_process", "ray_train")]
    print(f"quickstart --smoke, {a.num_samples} trials x {a.epochs} epochs, local Ray 2 CPUs")
    print(f"{'mode':11s} {'conc':>4s} {'fit s':>7s} {'total s':>8s} {'ideal s':>8s} "
          f"{'fit/ideal':>9s} {'total/ideal':>11s} {'trial s':>8s} {'train s':>8s} "
          f"{'overhead s/trial':>16s}")
    for r in rows:
        print(f"{r['mode']:11s} {r['concurrency']:4d} {r['fit']:7.1f} {r['total']:8.1f} "
              f"{r['ideal']:8.1f} {r['fit'] / r['ideal']:9.2f} {r['total'] / r['ideal']:11.2f} "
              f"{r['trial_seconds']:8.1f} {r['train']:8.1f} {r['per_trial_overhead']:16.1f}")
    saving = rows[1]["trial_seconds"] - rows[0]["trial_seconds"]
    for r in rows:
        print(f"{r['mode']}: sweep overhead {(r['fit'] - r['ideal']) / r['trials']:.1f} s per trial "
              "over the ideal schedule (Tune scheduling, trial start-up, evaluator hand-off)")
    print(f"in_process saves {saving:.1f} s per trial vs a TorchTrainer per trial "
          f"(trial wall time {rows[0]['trial_seconds']:.1f} s vs {rows[1]['trial_seconds']:.1f} s)")


if __name__ == "__main__":
    main()
