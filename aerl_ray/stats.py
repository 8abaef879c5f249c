"""Uncertainty and fronts: the one place where intervals and Pareto dominance are computed.

Every consumer (the sweep's printout, ``pareto.csv``, ``report.html``, the paper table, the
Optuna study) calls these functions, so they cannot disagree:

- :func:`wilson_interval`: the 95% interval of an accuracy measured on ``n`` examples.
- :func:`seed_interval`: mean and 95% Student-t interval across seeds (a comparison of
  regimes claims something about training, not only about the test images).
- :func:`pareto_mask`: non-dominated rows (point estimates; what Optuna's
  ``study.best_trials`` returns).
- :func:`front_status`: the same front read with the intervals: a trial is shown as
  *dominated* only when another beats it beyond the noise, and front members whose every
  objective lies within the noise of another member are *tied within noise*.
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np

FRONT, TIED, DOMINATED = "front", "tied within noise", "dominated"


def wilson_interval(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval of a binomial proportion k/n."""
    if n <= 0:
        return (float("nan"), float("nan"))
    p = k / n
    den = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / den
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / den
    return (max(0.0, centre - half), min(1.0, centre + half))


def wilson_of(p: float, n: int) -> tuple[float, float]:
    """:func:`wilson_interval` of a measured proportion ``p`` on ``n`` examples."""
    if n is None or not n or p is None or not math.isfinite(p):
        return (float("nan"), float("nan"))
    return wilson_interval(int(round(p * n)), int(n))


def seed_interval(values: Sequence[float], level: float = 0.95) -> tuple[float, float, float]:
    """(mean, low, high): the mean across seeds and its Student-t interval.

    One seed gives an interval of (nan, nan): a single run says nothing about the spread
    over seeds, and the table says so instead of showing a zero-width interval."""
    v = np.asarray([x for x in values if x is not None and math.isfinite(x)], dtype=float)
    if len(v) == 0:
        return (float("nan"), float("nan"), float("nan"))
    mean = float(v.mean())
    if len(v) < 2:
        return (mean, float("nan"), float("nan"))
    from scipy.stats import t

    half = float(t.ppf(0.5 + level / 2, len(v) - 1) * v.std(ddof=1) / math.sqrt(len(v)))
    return (mean, mean - half, mean + half)


def pareto_mask(points) -> np.ndarray:
    """Boolean mask of the non-dominated rows of an (n, k) array, every column maximised.

    Rows with a NaN/inf value are never on the front; identical points are all kept."""
    p = np.asarray(points, dtype=float)
    p = p.reshape(len(p), -1) if p.size else p.reshape(0, 1)
    finite = np.isfinite(p).all(axis=1)
    mask = finite.copy()
    q = p[finite]
    for j, i in enumerate(np.flatnonzero(finite)):
        if (((q >= q[j]).all(axis=1)) & ((q > q[j]).any(axis=1))).any():
            mask[i] = False
    return mask


def front_status(points, half_widths=None) -> tuple[list[str], list[list[int]], list[list[int]]]:
    """Read a front with its noise.  ``points`` (n, k), every column maximised;
    ``half_widths`` (n, k): half-widths of each value's 95% interval (0 or NaN = exact).

    Returns, per row: the status (``front``, ``tied within noise``, ``dominated`` or ``""``
    for rows with a non-finite value), the rows that dominate it beyond the noise, and the
    rows it is tied with.  Row ``a`` *beats* ``b`` on objective j beyond the noise when
    ``a_j - b_j > sqrt(h_a^2 + h_b^2)``; ``a`` dominates ``b`` beyond the noise when it is
    no worse on every objective and beats it beyond the noise on one.  Dominated rows:
    dominated beyond the noise.  Tied rows: a row off the point front that nothing
    dominates beyond the noise, or a point-front row whose every objective is within the
    noise of another point-front row (``ties`` names the rows it cannot be told apart
    from).  Front rows: the rest of the point front.
    """
    p = np.asarray(points, dtype=float)
    p = p.reshape(len(p), -1) if p.size else p.reshape(0, 1)
    h = (np.zeros_like(p) if half_widths is None
         else np.nan_to_num(np.asarray(half_widths, dtype=float).reshape(p.shape)))
    n = len(p)
    finite = np.isfinite(p).all(axis=1)
    on_front = pareto_mask(p)
    status, dominators, ties = [""] * n, [[] for _ in range(n)], [[] for _ in range(n)]
    for b in np.flatnonzero(finite):
        for a in np.flatnonzero(finite):
            if a == b:
                continue
            noise = np.sqrt(h[a] ** 2 + h[b] ** 2)
            diff = p[a] - p[b]
            if (diff >= 0).all() and (diff > noise).any():
                dominators[b].append(int(a))
            elif (diff >= 0).all() and (diff > 0).any():  # dominates only within the noise
                ties[b].append(int(a))
            elif on_front[a] and on_front[b] and (np.abs(diff) <= noise).all():
                ties[b].append(int(a))
        if dominators[b]:
            status[b], ties[b] = DOMINATED, []
        elif not on_front[b] or ties[b]:
            status[b] = TIED
        else:
            status[b] = FRONT
    return status, dominators, ties


def finite_or_none(v) -> float | None:
    """``float(v)`` when it is a finite number, else None (NaN, inf, None, text)."""
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None
