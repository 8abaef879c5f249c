"""Evaluator memory over many evaluations: RSS must stay flat (no per-trial leak).

An :class:`aerl_ray.evalpool.SweepEvaluator` (what each evaluator actor of a sweep holds)
with the quickstart space's smoke evaluation plan, lightened (PGD 3 steps, FGSM, AutoAttack
APGD-CE/APGD-T with 10 iterations on 8 images, transfer from an SL reference; n=32, Linf eps 0 and 0.1) evaluates ``--evals`` checkpoints in a row, each a
fresh checkpoint dict (a 1-epoch ``tiny`` digits model with its weights perturbed), as
trials of a sweep would send them.  RSS is measured (after ``gc.collect()``) at the start,
after ``--warmup`` evaluations (caches, allocator pools and lazy imports settled) and at
the end; the growth after warm-up, per evaluation, is the leak figure.

    python bench/memory.py [--evals 50] [--warmup 5] [--json]
"""
from __future__ import annotations

import argparse
import gc
import json
import sys
import tempfile
import time
from pathlib import Path

import ray  # noqa: F401 - puts the psutil that ray[default] ships on sys.path
import psutil
import torch

ROOT = Path(__file__).resolve().parent.parent
QUICK = ROOT / "search_spaces" / "quickstart.yaml"


# the smoke plan, lighter: every attack family, fewer budgets and steps
PLAN = {"grids": {"linf": [0, 0.1]}, "n": 8, "batch_size": 8, "indicator_steps": 2,
        "attack_params": {"pgd": {"steps": 3}, "autoattack": {"n_target_classes": 2, "n_iter": 10}}}


def rss_mb() -> float:
    gc.collect()
    return psutil.Process().memory_info().rss / 2**20


def make_checkpoints(tmp: Path) -> tuple[dict, dict]:
    """(reference, target) checkpoints: two 1-epoch tiny models on digits."""
    from aerl_ray.checkpoint import load_checkpoint
    from aerl_ray.config import TrainConfig
    from aerl_ray.train import fit

    out = []
    for name, regime, seed in (("ref", "sl", 0), ("target", "rl", 1)):
        cfg = TrainConfig.from_flat({"dataset": "digits", "model": "tiny", "epochs": 1,
                                     "regime": regime, "seed": seed, "device": "cpu"})
        fit(cfg, tmp / name)
        out.append(load_checkpoint(tmp / name / "best.pt"))
    return out[0], out[1]


def perturbed(ckpt: dict, i: int) -> dict:
    """A new checkpoint dict (new tensors), as a new trial's checkpoint would arrive."""
    g = torch.Generator().manual_seed(i)
    state = {k: (v + 1e-3 * torch.randn(v.shape, generator=g) if v.is_floating_point()
                 else v.clone()) for k, v in ckpt["model_state"].items()}
    return {**ckpt, "model_state": state}


def measure(evals: int = 50, warmup: int = 5) -> dict:
    from aerl_ray.evalpool import SweepEvaluator
    from aerl_ray.space import load_space

    plan_spec = {**load_space(QUICK, smoke=True).evaluation, **PLAN}
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory(prefix="aerl-mem-") as d:
        reference, target = make_checkpoints(Path(d))
    start = rss_mb()
    ev = SweepEvaluator({"search": plan_spec}, reference, seed=0)
    after: dict[int, float] = {}
    t0 = time.perf_counter()
    rows = 0
    for i in range(1, evals + 1):
        res = ev.evaluate(perturbed(target, i), {"run_id": "mem", "trial_id": f"t{i}",
                                                 "checkpoint": f"t{i}/best.pt"})
        rows += len(res["rows"])
        del res
        if i in (warmup, evals):
            after[i] = rss_mb()
    seconds = time.perf_counter() - t0
    growth = after[evals] - after[warmup]
    return {"evals": evals, "warmup": warmup, "rss_start_mb": round(start, 1),
            "rss_after_warmup_mb": round(after[warmup], 1),
            "rss_after_all_mb": round(after[evals], 1), "growth_mb": round(growth, 1),
            "growth_per_eval_kb": round(1024 * growth / max(1, evals - warmup), 1),
            "rows": rows, "seconds": round(seconds, 1),
            "plan": {k: plan_spec[k] for k in ("attacks", "n")}}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python bench/memory.py", description=__doc__.split("\n")[0])
    p.add_argument("--evals", type=int, default=50)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--json", action="store_true", help="print one JSON object only")
    ns = p.parse_args(argv)
    if not 0 < ns.warmup < ns.evals:
        p.error("need 0 < --warmup < --evals")
    r = measure(ns.evals, ns.warmup)
    if ns.json:
        print(json.dumps(r))
        return 0
    print(f"command: python bench/memory.py --evals {ns.evals} --warmup {ns.warmup}")
    print(f"plan: {r['plan']}; {r['rows']} rows in {r['seconds']} s")
    print(f"RSS start (evaluator not yet built): {r['rss_start_mb']} MB")
    print(f"RSS after {ns.warmup} evaluations (warm-up): {r['rss_after_warmup_mb']} MB")
    print(f"RSS after {ns.evals} evaluations: {r['rss_after_all_mb']} MB")
    print(f"growth after warm-up: {r['growth_mb']} MB = {r['growth_per_eval_kb']} KB per "
          f"evaluation")
    return 0


if __name__ == "__main__":
    sys.exit(main())
