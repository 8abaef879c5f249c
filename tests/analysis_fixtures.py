"""A small synthetic run dir in the sweep's exact schema, with a known Pareto front.

Headline (sweep's robust objective): autoattack Linf 8/255, n=200.  (clean, robust):

    t00 sl      (0.95, 0.00)  front            t05 rl_adv (0.80, 0.40)  front (duplicate of t01)
    t01 sl_adv  (0.80, 0.40)  front (written twice; the first write (0.50, 0.20) is stale)
    t02 rl      (0.90, 0.10)  front, masking   t06 rl     (0.90, 0.05)  dominated (tie in clean)
    t03 rl_adv  (0.75, 0.45)  front            t07 sl     (0.85, NaN)   never on the front
    t04 hybrid  (0.70, 0.30)  dominated        t08 sl_adv FAILED (0.99, 0.99) excluded
    t09 rl      PRUNED, no evals               t10 hybrid COMPLETE, no evals yet (partial)

Hypervolume vs (0, 0): 0.90*0.10 + 0.80*(0.40-0.10) + 0.75*(0.45-0.40) = 0.3675.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

from aerl_ray import results

RUN_ID = "run-test"
STUDY = "aerl-test"
EPS8, EPS4 = 8 / 255, 4 / 255
EXPECTED_FRONT = {"t00", "t01", "t02", "t03", "t05"}
EXPECTED_HV = 0.90 * 0.10 + 0.80 * 0.30 + 0.75 * 0.05
N = 200

#        tid    regime    status      clean  aa8   pgd8  masking params
TRIALS = [
    ("t00", "sl", "COMPLETE", 0.95, 0.00, 0.00, False, dict(lr=0.1)),
    ("t01", "sl_adv", "COMPLETE", 0.80, 0.40, 0.42, False, dict(lr=0.05)),
    ("t02", "rl", "COMPLETE", 0.90, 0.10, 0.50, True, dict(lr=0.02, explore_eps=0.1)),
    ("t03", "rl_adv", "COMPLETE", 0.75, 0.45, 0.47, False, dict(lr=0.01, explore_eps=0.2)),
    ("t04", "hybrid", "COMPLETE", 0.70, 0.30, 0.31, False, dict(lr=0.003, explore_eps=0.05,
                                                                switch_epoch=3)),
    ("t05", "rl_adv", "COMPLETE", 0.80, 0.40, 0.41, False, dict(lr=0.008, explore_eps=0.3)),
    ("t06", "rl", "COMPLETE", 0.90, 0.05, 0.30, False, dict(lr=0.001, explore_eps=0.4)),
    ("t07", "sl", "COMPLETE", 0.85, math.nan, 0.2, False, dict(lr=0.0005)),
    ("t08", "sl_adv", "FAILED", 0.99, 0.99, 0.99, False, dict(lr=0.09)),
    ("t09", "rl", "PRUNED", math.nan, None, None, False, dict(lr=0.07, explore_eps=0.1)),
    ("t10", "hybrid", "COMPLETE", 0.60, None, None, False, dict(lr=0.004, explore_eps=0.1,
                                                                switch_epoch=5)),
]
REGIMES = ["sl", "sl_adv", "rl", "rl_adv", "hybrid"]
TRIALS_TABLE = results.trials_table(["clean_acc", "robust_aa"], {
    "lr": results.F64, "regime": results.STR, "explore_eps": results.F64,
    "switch_epoch": results.I64})


def _trial_row(tid, regime, status, clean, masking, params, epochs=10, stale=False):
    rl = regime.startswith("rl") or regime == "hybrid"
    ep = epochs * (3 if rl else 1)
    row = {
        "run_id": RUN_ID, "trial_id": tid, "split": "val",
        "number": int(tid[1:]) if tid[1:].isdigit() else None,
        "status": status,
        "error": "" if status == "COMPLETE" else f"{status.lower()} by test",
        "regime": regime, "params": json.dumps({"regime": regime, **params}),
        "config": json.dumps({"regime": regime, **params, "epochs": ep}),
        "config_hash": f"{abs(hash(tid)) % 16**12:012x}", "epochs_run": ep,
        "val_acc": clean, "clean_acc": 0.5 if stale else clean,
        "train_fwd_passes": 1e5 * ep * (2 if "adv" in regime else 1),
        "train_bwd_passes": 1e5 * ep * (2 if "adv" in regime else 1),
        "train_seconds": 3.0 * ep, "eval_seconds": 5.0,
        "checkpoint": f"/ck/{tid}/best.pt", "masking_suspected": masking,
        "finished_at": 1.7e9, "diagnostics": json.dumps({"pgd_aa_gap": masking, "grad_zero": False}),
        "obj_clean_acc": clean,
        "p_lr": params.get("lr"), "p_regime": regime,
        "p_explore_eps": params.get("explore_eps"), "p_switch_epoch": params.get("switch_epoch"),
    }
    return row


def _eval_row(tid, regime, attack, norm, eps, eps_str, clean, robust, ckpt=None, flags=()):
    k = None if robust is None or (isinstance(robust, float) and math.isnan(robust)) else round(robust * N)
    lo, hi = results.wilson_interval(k, N) if k is not None else (math.nan, math.nan)
    return {
        "run_id": RUN_ID, "trial_id": tid, "phase": "search", "split": "val",
        "checkpoint": ckpt or f"/ck/{tid}/best.pt",
        "model": "tiny", "dataset": "digits", "regime": regime, "config_hash": "x" * 12,
        "attack": attack, "norm": norm, "eps": eps, "eps_str": eps_str, "n": N,
        "clean_acc": clean, "robust_acc": math.nan if k is None else robust,
        "ci_low": lo, "ci_high": hi, "seed": 0, "fwd_passes": 1000, "bwd_passes": 1000,
        "queries": 1000, "seconds": 1.5, "params": json.dumps({"steps": 10}),
        "flags": json.dumps(list(flags)),
    }


def make_run_dir(root: Path, with_study: bool = True) -> Path:
    """Write the synthetic run dir under ``root``; returns it."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    run = results.RunDir(root)
    spec = {
        "run_id": RUN_ID, "study_name": STUDY, "optuna_storage": f"sqlite:///{run.optuna_db}",
        "objectives": [{"name": "clean_acc", "direction": "max"},
                       {"name": "robust_aa", "attack": "autoattack", "norm": "Linf",
                        "eps": 0.0313725, "eps_str": "8/255", "direction": "max"}],
        "space_file": "search_spaces/quickstart.yaml", "created_at": 1.7e9,
        "command": "aerl-sweep search_spaces/quickstart.yaml --run-dir RUN",
    }
    run.spec.write_text(json.dumps(spec))

    # first write of t01 (stale, superseded by the resumed sweep's second write)
    results.append_rows(run.trials, [_trial_row("t01", "sl_adv", "COMPLETE", 0.5, False,
                                                dict(lr=0.05), stale=True)], TRIALS_TABLE)
    results.append_rows(run.evals, [_eval_row("t01", "sl_adv", "autoattack", "Linf", EPS8, "8/255",
                                              0.5, 0.2)], results.EVALS)
    trows, erows, irows = [], [], []
    for tid, regime, status, clean, aa8, pgd8, masking, params in TRIALS:
        r = _trial_row(tid, regime, status, clean, masking, params)
        r["obj_robust_aa"] = aa8
        trows.append(r)
        if aa8 is None:
            continue
        fl = ["pgd_aa_gap"] if masking else []
        erows += [
            _eval_row(tid, regime, "autoattack", "Linf", EPS8, "8/255", clean, aa8, flags=fl),
            _eval_row(tid, regime, "pgd", "Linf", EPS8, "8/255", clean, pgd8, flags=fl),
            _eval_row(tid, regime, "autoattack", "Linf", EPS4, "4/255", clean,
                      None if aa8 != aa8 else min(clean, aa8 + 0.15)),
            _eval_row(tid, regime, "pgd", "Linf", EPS4, "4/255", clean, min(clean, pgd8 + 0.15)),
            _eval_row(tid, regime, "pgd", "L2", 0.5, "0.5", clean, min(clean, pgd8 + 0.1)),
        ]
        if tid in ("t00", "t03"):
            erows.append(_eval_row(tid, regime, "transfer:sl_ref", "Linf", EPS8, "8/255", clean,
                                   min(clean, pgd8 + 0.2)))
        rob = 0.0 if aa8 != aa8 else aa8
        for name, val in (("agn", 10 ** (1 - 2 * rob)), ("cos_prev", 0.2 + rob),
                          ("dispersion", 1 - rob), ("entropy_clean", 0.3)):
            irows.append({"run_id": RUN_ID, "trial_id": tid, "checkpoint": f"/ck/{tid}/best.pt",
                          "phase": "search", "split": "val",
                          "norm": "Linf", "eps": EPS8, "indicator": name, "step": -1, "value": val})
            irows.append({"run_id": RUN_ID, "trial_id": tid, "checkpoint": f"/ck/{tid}/best.pt",
                          "phase": "search", "split": "val",
                          "norm": "Linf", "eps": EPS8, "indicator": name, "step": 0, "value": val * 2})
    results.append_rows(run.trials, trows, TRIALS_TABLE)
    results.append_rows(run.evals, erows, results.EVALS)
    results.append_rows(run.indicators, irows, results.INDICATORS)
    if with_study:
        make_study(run)
    return root


def make_study(run: results.RunDir) -> None:
    import optuna
    from optuna.distributions import (CategoricalDistribution, FloatDistribution,
                                      IntDistribution)
    from optuna.trial import TrialState, create_trial

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    dists = {"lr": FloatDistribution(1e-4, 0.1, log=True),
             "regime": CategoricalDistribution(REGIMES),
             "explore_eps": FloatDistribution(0.0, 0.5),
             "switch_epoch": IntDistribution(0, 10)}
    study = optuna.create_study(study_name=STUDY, storage=f"sqlite:///{run.optuna_db}",
                                directions=["maximize", "maximize"])

    def add(tid, regime, params, state, values=None):
        p = {"regime": regime, **{k: v for k, v in params.items() if v is not None}}
        study.add_trial(create_trial(state=state, values=values, params=p,
                                     distributions={k: dists[k] for k in p},
                                     user_attrs={"tune_trial_id": tid}))

    for tid, regime, status, clean, aa8, _pgd, _m, params in TRIALS:
        if status == "COMPLETE" and aa8 is not None and aa8 == aa8:
            add(tid, regime, params, TrialState.COMPLETE, [clean, aa8])
        elif status == "FAILED":
            add(tid, regime, params, TrialState.FAIL)
        elif status == "PRUNED":
            add(tid, regime, params, TrialState.PRUNED)
    # a crash left a stale RUNNING duplicate of t03, and a resume re-told t01
    add("t03", "rl_adv", dict(lr=0.01, explore_eps=0.2), TrialState.RUNNING)
    add("t01", "sl_adv", dict(lr=0.05), TrialState.COMPLETE, [0.80, 0.40])
