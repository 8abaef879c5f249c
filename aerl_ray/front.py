"""The search front: one function, called by every consumer.

:func:`search_front` reads the trials table's objective columns (``obj_<name>``: the very
values told to the Optuna study) and returns every COMPLETE trial with

- ``on_front``: non-dominated on the point estimates -- exactly ``study.best_trials``;
- ``front_status``: ``front``, ``tied within noise`` or ``dominated``, read with each
  objective's 95% interval (:func:`aerl_ray.stats.front_status`): a dominance the intervals
  cannot resolve is not shown as one;
- ``dominated_by`` / ``tied_with``: the trial ids behind that status.

The sweep's printout, ``report/pareto.csv``, ``report.html`` and the confirmation stage's
choice of configurations all call it.
"""
from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np
import pandas as pd

from aerl_ray.stats import DOMINATED, FRONT, TIED, front_status

__all__ = ["search_front", "front_members", "FRONT", "TIED", "DOMINATED"]


def _objs(objectives: Sequence) -> list[tuple[str, int]]:
    out = []
    for o in objectives:
        name = o["name"] if isinstance(o, Mapping) else o.name
        direction = o.get("direction", "max") if isinstance(o, Mapping) else o.direction
        out.append((name, 1 if direction == "max" else -1))
    return out


def search_front(trials: pd.DataFrame, objectives: Sequence) -> pd.DataFrame:
    """COMPLETE trials with ``on_front``, ``front_status``, ``dominated_by``, ``tied_with``
    (sorted: front first, then by the first objective, best first)."""
    objs = _objs(objectives)
    cols = [f"obj_{n}" for n, _ in objs]
    if trials.empty or "status" not in trials or any(c not in trials for c in cols):
        return trials.iloc[0:0].assign(on_front=[], front_status=[], dominated_by=[],
                                       tied_with=[])
    ok = trials[trials["status"] == "COMPLETE"].reset_index(drop=True)
    signs = np.array([s for _, s in objs], dtype=float)
    pts = ok[cols].to_numpy(dtype=float) * signs
    half = np.zeros_like(pts)
    for j, (n, _) in enumerate(objs):
        lo, hi = f"obj_{n}_low", f"obj_{n}_high"
        if lo in ok and hi in ok:
            half[:, j] = np.nan_to_num((ok[hi].to_numpy(dtype=float)
                                        - ok[lo].to_numpy(dtype=float)) / 2)
    status, dom, ties = front_status(pts, half)
    ids = ok["trial_id"].astype(str).tolist()
    from aerl_ray.stats import pareto_mask

    out = ok.assign(on_front=pareto_mask(pts), front_status=status,
                    dominated_by=[",".join(ids[i] for i in d) for d in dom],
                    tied_with=[",".join(ids[i] for i in t) for t in ties])
    order = {FRONT: 0, TIED: 1, DOMINATED: 2, "": 3}
    return out.assign(_o=out["front_status"].map(order)).sort_values(
        ["_o", cols[0]], ascending=[True, objs[0][1] < 0]).drop(columns="_o").reset_index(
        drop=True)


def front_members(trials: pd.DataFrame, objectives: Sequence) -> pd.DataFrame:
    """The point front (``study.best_trials``'s trials), with their noise statuses."""
    f = search_front(trials, objectives)
    return f[f["on_front"]] if len(f) else f
