"""Ranking the trials at a rung by several metrics: non-dominated sorting, then an eps-net.

The multi-objective scheduler (:mod:`aerl_ray.moasha`) needs a total order of the trials at
a rung whose top-k sets are nested (the top k are always among the top k + 1).  This module
gives it:

1. **Orientation.**  Values are turned to "larger is better" (``min`` metrics negated).
   A trial missing a value (or with a NaN) counts as ``-inf`` in *every* metric: it
   ranks below every trial with complete values (a NaN usually means a diverged run).
2. **Dominance**, optionally *noise-aware*: ``a`` dominates ``b`` when ``a`` is nowhere
   significantly worse (its upper bound >= ``b``'s lower bound in every metric) and
   somewhere significantly better (its lower bound > ``b``'s upper bound).  The bounds are
   95% Wilson intervals when the number of examples a metric was measured on is known,
   else the point itself (then this is ordinary Pareto dominance).
3. **Non-dominated sorting** into fronts F1, F2, ...  (With noise the relation need not be
   transitive; if the remaining trials dominate each other in a cycle they form one front.)
4. **Within a front, an eps-net order** (greedy farthest-point selection in metric space
   normalised by the rung's range, Chebyshev distance), starting from the lexicographically
   best point.  We use an eps-net rather than hypervolume contributions because (a) it needs
   no reference point -- the contribution of a front's extreme points is decided entirely
   by an arbitrary reference point, and at an early rung the metrics' scale is unknown;
   (b) it keeps the extremes of the front first, which is exactly what a user looking for
   robust-but-less-accurate trials needs; (c) its greedy order is nested by construction
   and costs O(n^2 d) in any number of metrics, where exact hypervolume contributions grow
   exponentially with the number of metrics; (d) it is what Schmucker et al. (2021) found
   to work best for multi-objective ASHA.

Trials with identical values (and sample sizes) form one *class*: they are ranked as one,
so no decision can depend on which of two indistinguishable trials arrived first.

Noise-aware, a trial is ranked below another *only* if that one dominates it beyond the
intervals: its position is the number of trials that do (a domination count), and the
eps-net does not break ties inside a front -- a difference the rung's sample size cannot
resolve never stops a trial, at the price of letting more trials continue.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from aerl_ray.results import wilson_interval

MODES = ("max", "min")


@dataclass(frozen=True)
class Observation:
    """The rung values of one trial: raw metric values and, optionally, sample sizes."""

    values: tuple[float, ...]
    ns: tuple[int | None, ...] = ()

    @property
    def complete(self) -> bool:
        return all(v is not None and not math.isnan(v) for v in self.values)

    def oriented(self, modes: Sequence[str], noise: bool) -> tuple[np.ndarray, np.ndarray]:
        """(lower, upper) bounds, larger is better, -inf for missing/NaN values."""
        if not self.complete:
            worst = np.full(len(modes), -math.inf)
            return worst, worst.copy()
        lo, hi = [], []
        for j, (v, mode) in enumerate(zip(self.values, modes)):
            a = b = float(v)
            n = self.ns[j] if noise and j < len(self.ns) else None
            if n and 0.0 <= a <= 1.0:
                a, b = wilson_interval(round(a * n), int(n))
            if mode == "min":
                a, b = -b, -a
            lo.append(a)
            hi.append(b)
        return np.array(lo, dtype=float), np.array(hi, dtype=float)


@dataclass
class Ranking:
    """The order of a set of observations.

    ``classes`` lists groups of indices (identical observations), best first;
    ``above[i]`` is the number of observations ranked strictly above ``i``: those in
    classes before ``i``'s or, noise-aware, those that dominate ``i`` beyond the intervals;
    ``front[i]`` is the 1-based front of ``i``; ``dominators[i]`` the indices that
    dominate ``i``.
    """

    classes: list[list[int]]
    above: list[int]
    front: list[int]
    n_fronts: int
    dominators: list[list[int]]


def dominance_matrix(lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """``D[i, j]``: ``i`` dominates ``j`` (noise-aware when lo < hi; see module doc)."""
    not_worse = (hi[:, None, :] >= lo[None, :, :]).all(axis=2)
    better = (lo[:, None, :] > hi[None, :, :]).any(axis=2)
    d = not_worse & better
    np.fill_diagonal(d, False)
    return d


def nondominated_fronts(dom: np.ndarray) -> list[list[int]]:
    """Fronts (lists of indices) of a dominance matrix, best first."""
    remaining = np.ones(len(dom), dtype=bool)
    fronts = []
    while remaining.any():
        idx = np.flatnonzero(remaining)
        sub = dom[np.ix_(idx, idx)]
        free = idx[~sub.any(axis=0)]
        if len(free) == 0:  # a dominance cycle (noise-aware relation): one front
            free = idx
        fronts.append(free.tolist())
        remaining[free] = False
    return fronts


def eps_net_order(points: np.ndarray, members: Sequence[int], scale_lo: np.ndarray,
                  scale: np.ndarray) -> list[int]:
    """``members`` in greedy farthest-point order (Chebyshev, normalised), see module doc.

    Starts from the lexicographically largest point; ties in distance go to the
    lexicographically larger point, so the order depends on values only."""
    z = (points - scale_lo) / scale
    z[~np.isfinite(z)] = -1.0  # -inf values sit one range below the rung's minimum
    members = list(members)
    lex = sorted(members, key=lambda i: tuple(points[i]), reverse=True)
    order = [lex[0]]
    rest = lex[1:]
    dist = {i: float(np.abs(z[i] - z[order[0]]).max()) for i in rest}
    while rest:
        best = max(rest, key=lambda i: (dist[i], tuple(points[i])))
        order.append(best)
        rest.remove(best)
        for i in rest:
            dist[i] = min(dist[i], float(np.abs(z[i] - z[best]).max()))
    return order


def rank(observations: Sequence[Observation], modes: Sequence[str],
         noise: bool = False) -> Ranking:
    """Rank ``observations`` (see the module docstring)."""
    n = len(observations)
    if n == 0:
        return Ranking([], [], [], 0, [])
    keys: dict[tuple, list[int]] = {}
    for i, o in enumerate(observations):
        ns = tuple(o.ns) if noise else ()
        vals = (tuple(float(v) for v in o.values) if o.complete
                else (-math.inf,) * len(o.values))
        keys.setdefault((vals, ns), []).append(i)
    groups = list(keys.values())
    reps = [g[0] for g in groups]
    bounds = [observations[r].oriented(modes, noise) for r in reps]
    lo = np.stack([b[0] for b in bounds])
    hi = np.stack([b[1] for b in bounds])
    mid = (lo + hi) / 2
    mid[np.isneginf(lo)] = -math.inf
    dom = dominance_matrix(lo, hi)
    finite = np.where(np.isfinite(mid), mid, np.nan)
    with np.errstate(all="ignore"):
        scale_lo = np.nan_to_num(np.nanmin(finite, axis=0), nan=0.0) if finite.size else 0
        scale_hi = np.nan_to_num(np.nanmax(finite, axis=0), nan=0.0) if finite.size else 0
    scale = np.where(scale_hi - scale_lo > 0, scale_hi - scale_lo, 1.0)
    fronts = nondominated_fronts(dom)
    classes, above, front = [], [0] * n, [0] * n
    count = 0
    for f_no, f in enumerate(fronts, start=1):
        for g in eps_net_order(mid, f, scale_lo, scale):
            members = groups[g]
            classes.append(members)
            for i in members:
                above[i] = count
                front[i] = f_no
            count += len(members)
    dominators = [[] for _ in range(n)]
    for a in range(len(groups)):
        for b in np.flatnonzero(dom[a]):
            for i in groups[b]:
                dominators[i].extend(groups[a])
    if noise:  # ranked below another only if dominated beyond the intervals
        above = [len(d) for d in dominators]
    return Ranking(classes, above, front, len(fronts), dominators)
