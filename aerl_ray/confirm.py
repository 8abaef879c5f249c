"""The confirmation stage: the search's choices, retrained with new seeds, on test.

The search selects on validation; its numbers are biased upward by the selection itself
(the front is the luckiest of many noisy draws).  The confirmation stage therefore retrains
each chosen configuration with ``confirm.seeds`` *new* seeds and evaluates it on the
untouched test split with the full plan (AutoAttack ``standard`` at the headline budget,
PGD curves, transfer, full masking diagnostics, a per-example worst case).  Reported
numbers are the mean across seeds with a 95% Student-t interval, next to the mean
within-seed Wilson half-width.

Chosen configurations (:func:`choose_configs`): every trial on the search front or tied
with it within noise, plus (``configs: front+best``, the default) the best trial of each
regime on the first robust objective, so SL vs RL vs RL-adv is always in the table.
"""
from __future__ import annotations

import json
import logging
import math
from typing import Any, Sequence

import pandas as pd

from aerl_ray import results as R
from aerl_ray.front import FRONT, TIED, search_front
from aerl_ray.ledger import CONFIRM, Ticket, confirm_key, search_seed
from aerl_ray.stats import seed_interval

logger = logging.getLogger(__name__)


def primary_objective(spec) -> Any:
    """The first robust objective (else the first objective): what "best of a regime" and
    the paper table's headline mean."""
    return next((o for o in spec.objectives if o.attack is not None), spec.objectives[0])


def choose_configs(trials: pd.DataFrame, spec) -> list[dict[str, Any]]:
    """[{config_id, why, params, number}] in a stable order (see the module doc)."""
    front = search_front(trials, spec.objectives)
    chosen: dict[str, dict[str, Any]] = {}
    for _, r in front.iterrows():
        if r["front_status"] in (FRONT, TIED):
            chosen[str(r["trial_id"])] = {"why": [str(r["front_status"])], "row": r}
    if spec.confirm.get("configs", "front+best") == "front+best" and len(front):
        o = primary_objective(spec)
        col, asc = f"obj_{o.name}", o.direction == "min"
        for regime, g in front.groupby("regime", sort=True):
            best = g.sort_values([col, "trial_id"], ascending=[asc, True]).iloc[0]
            entry = chosen.setdefault(str(best["trial_id"]), {"why": [], "row": best})
            entry["why"].append(f"best {regime}")
    out = []
    for key in sorted(chosen):
        r = chosen[key]["row"]
        out.append({"config_id": key, "why": ", ".join(chosen[key]["why"]),
                    "params": json.loads(r["params"]), "number": int(r["number"])})
    return out


def plan_jobs(spec, configs: Sequence[dict[str, Any]], search_seeds: set[int]) -> list[Ticket]:
    """One ticket per (configuration, seed): seeds the search never used."""
    jobs, used = [], set(search_seeds)
    for c in configs:
        for k in range(int(spec.confirm.get("seeds", 3))):
            seed = 10_000_019 + search_seed(spec.seed, c["number"]) * 7 + k
            while seed in used:
                seed += 1
            used.add(seed)
            jobs.append(Ticket(confirm_key(c["config_id"], k), CONFIRM, c["number"],
                               c["params"], seed, config_id=c["config_id"], seed_index=k,
                               why=c["why"]))
    return jobs


def write_plan(run: R.RunDir, jobs: Sequence[Ticket]) -> None:
    from dataclasses import asdict

    R.write_json_atomic(run.confirm_plan, {"jobs": [asdict(j) for j in jobs]})


def read_plan(run: R.RunDir) -> list[Ticket] | None:
    if not run.confirm_plan.is_file():
        return None
    return [Ticket.of({"_trial": j}) for j in json.loads(run.confirm_plan.read_text())["jobs"]]


def confirmed_table(confirm: pd.DataFrame, evals: pd.DataFrame) -> pd.DataFrame:
    """regime x attack x budget for every confirmed configuration: mean robust (and clean)
    accuracy across seeds with a 95% t-interval, the mean within-seed Wilson half-width,
    n and the number of seeds.  Only COMPLETE confirmation runs count."""
    cols = ["config_id", "regime", "why", "attack", "norm", "eps", "eps_str", "n", "seeds",
            "robust_mean", "robust_low", "robust_high", "wilson_half", "clean_mean",
            "clean_low", "clean_high", "masking_suspected", "params", "attack_params"]
    if confirm.empty or evals.empty:
        return pd.DataFrame(columns=cols)
    done = confirm[confirm["status"] == "COMPLETE"]
    ev = evals[(evals["phase"] == "confirm") & evals["trial_id"].isin(done["trial_id"])]
    ev = ev.merge(done[["trial_id", "config_id", "why", "params", "masking_suspected"]],
                  on="trial_id", suffixes=("", "_c"))
    rows = []
    for (cid, attack, norm, eps), g in ev.groupby(["config_id", "attack", "norm", "eps"],
                                                  sort=True):
        m, lo, hi = seed_interval(g["robust_acc"].tolist())
        cm, clo, chi = seed_interval(g["clean_acc"].tolist())
        half = float(((g["ci_high"] - g["ci_low"]) / 2).mean())
        rows.append({"config_id": cid, "regime": g["regime"].iloc[0], "why": g["why"].iloc[0],
                     "attack": attack, "norm": norm, "eps": float(eps),
                     "eps_str": g["eps_str"].iloc[0], "n": int(g["n"].iloc[0]),
                     "seeds": int(g["trial_id"].nunique()), "robust_mean": m,
                     "robust_low": lo, "robust_high": hi, "wilson_half": half,
                     "clean_mean": cm, "clean_low": clo, "clean_high": chi,
                     "masking_suspected": bool(g["masking_suspected"].fillna(False).any()),
                     "params": g["params_c"].iloc[0] if "params_c" in g else "",
                     "attack_params": g["params"].iloc[0]})
    return pd.DataFrame(rows, columns=cols)


def fmt_interval(mean: float, low: float, high: float, digits: int = 3) -> str:
    """'0.512 ± 0.031' (half the interval), or '0.512 (1 seed)' without an interval."""
    if mean is None or not math.isfinite(mean):
        return "-"
    if low is None or not math.isfinite(low):
        return f"{mean:.{digits}f} (1 seed)"
    return f"{mean:.{digits}f} ± {(high - low) / 2:.{digits}f}"
