"""Robustness curves by a per-example search over the budget grid, and their audit.

Why.  The exact curve (``pgd(curve="exact")``, :func:`aerl_ray.attacks.pgd.pgd_grid`) is the
per-example running minimum of separate runs: an example still robust at a budget must be
attacked again, for the full number of steps, at the next one.  Most examples of a real
curve are robust at most budgets, and a robust (example, budget) pair is the expensive
kind (all steps, no early exit; a broken pair exits early), so the exact curve costs
about K separate runs on a K-budget grid (bench/attacks.py: 0.99 on the standard grid).

The search (``curve="search"``, the default).  A working attack is monotone in the
budget: a run that cannot break an example at eps does not break it at a smaller eps,
and a point that breaks it at eps breaks it at every larger eps.  So per example the
curve is fixed by one number, its breaking budget, and a search finds it:

1. bracket: one 10-step FMN run (a minimum-norm attack, :mod:`aerl_ray.attacks.fmn`)
   gives each example a small adversarial point.  By default (``bracket="fmn-guide"``)
   it only picks the first budget to probe, so the curve is PGD's alone: a "pgd" row
   means PGD, and a model that masks PGD's gradients still shows it next to AutoAttack
   and in the masking checks.  With ``bracket="fmn"`` the smallest budget whose ball
   holds FMN's point (or a projection of it that still fools the model) is broken --
   exactly, by that point -- and so is every larger budget (a tighter curve, cheaper on
   wide grids, but PGD ∪ FMN);
2. probe, one budget per example at a time, each probe exactly the separate PGD run at
   its budget: the largest undecided budget first (``order="descending"``), so broken
   probes walk down from the bracket and the first robust probe ends the search;
   broken => every larger budget broken (exact); robust => every smaller budget counted
   robust without an attack -- the one inference the exact curve does not make;
3. audit: re-attack a seeded random sample of the (example, budget) pairs the curve
   counts as robust with the separate run (same seed and example ids), fix the breaks
   it finds (valid points) and report the observed fraction with its 95% Wilson upper
   bound, scaled to all (example, nonzero budget) pairs -- the definition of the
   benchmark's disagreement -- in every result's ``extra``.

Why this order and these options (bench/attacks.py and docs/curve-search.md give the
numbers): descending costs each example at most one robust probe; bisection pays up to
log2(K) of them (0.41 vs 0.22 of separate runs on the standard L-inf grid).  Without the
bracket, wide grids pay for a walk of broken probes down to the breaking budget (0.65
of separate runs on the wide L-inf grid; 0.48 with FMN).  ``"fmn-guide"`` uses FMN only to
choose the first probe, so the curve is PGD's alone (cost between the two).  Starting a
probe from the projected point of the broken budget above (``warm="replace"``) saves
10-20% but disagrees with separate runs 3-9 times in 1,000 pairs (a projected point is
a worse start than the separate run's random one), so it is off.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch

logger = logging.getLogger(__name__)

CURVE_MODES = ("exact", "search")
BRACKETS = ("fmn", "fmn-guide", "none")
SEARCH_ORDERS = ("descending", "bisect")
DEFAULT_CURVE = "search"
DEFAULT_AUDIT = 100
DEFAULT_BRACKET = "fmn-guide"  # a pure PGD curve: a "pgd" row means PGD (masking checks)
BRACKET_STEPS = 10  # FMN steps of the bracket: 10 match PGD-50's curve on digits

# status of an (example, budget) pair in pgd_grid; ROBUST/BROKEN were attacked, DROPPED is
# broken by a smaller budget's point, INFERRED is robust because a larger budget is
PENDING, ACTIVE, ROBUST, BROKEN, DROPPED, INFERRED = range(6)


def check_curve_params(curve: str, audit: int, bracket: str = DEFAULT_BRACKET) -> None:
    """Refuse unknown curve modes/brackets and negative or non-integer audit sizes."""
    if curve not in CURVE_MODES:
        raise ValueError(f"curve={curve!r}; known: {', '.join(CURVE_MODES)}")
    if bracket not in BRACKETS:
        raise ValueError(f"bracket={bracket!r}; known: {', '.join(BRACKETS)}")
    if isinstance(audit, bool) or not isinstance(audit, int) or audit < 0:
        raise ValueError(f"audit={audit!r} must be an integer >= 0 (pairs re-attacked)")


def next_budget(status: torch.Tensor, order: str,
                guess: torch.Tensor | None = None) -> torch.Tensor:
    """Per example (rows of ``status`` (n, nb)), the budget index to attack next.

    ``ascending`` (the exact curve): the smallest pending budget.  In a search the
    pending budgets of an example are a contiguous run between its highest robust and
    lowest broken budget; ``descending`` probes ``guess`` first (when given and still
    pending: a minimum-norm attack's estimate of the breaking budget), else the largest
    pending budget, and after a robust probe climbs from the smallest pending one;
    ``bisect`` probes the upper middle.  Rows with nothing pending get an arbitrary
    index."""
    pend = (status == PENDING).to(torch.uint8)
    first = pend.argmax(1)
    if order == "ascending":
        return first
    last = status.shape[1] - 1 - pend.flip(1).argmax(1)
    if order == "bisect":
        return (first + last + 1) // 2
    if order != "descending":
        raise ValueError(f"order={order!r}; known: ascending, {', '.join(SEARCH_ORDERS)}")
    robust = (status == ROBUST).any(1)
    nxt = torch.where(robust, first, last)
    if guess is not None:
        probed = robust | (status == BROKEN).any(1)
        at = guess.clamp(0, status.shape[1] - 1)
        use = ~probed & (guess >= 0) & (status.gather(1, at[:, None]).squeeze(1) == PENDING)
        nxt = torch.where(use, at, nxt)
    return nxt


def settle(status: torch.Tensor, fi: torch.Tensor, fk: torch.Tensor, ok: torch.Tensor,
           search: bool) -> None:
    """Record finished pairs (example ``fi``, budget ``fk``; ``ok`` = still classified
    correctly) in ``status`` (n, nb) and what they imply for the example's other pairs:
    broken => every larger pending/active pair is DROPPED (broken by the same point);
    in a search, robust => every smaller pending pair is INFERRED robust."""
    n, nb = status.shape
    status[fi, fk] = torch.where(ok, ROBUST, BROKEN).to(status.dtype)
    col = torch.arange(nb)[None, :]
    if bool((~ok).any()):
        low = torch.full((n,), nb, dtype=torch.long)
        low.scatter_reduce_(0, fi[~ok], fk[~ok], "amin")
        open_ = (status == PENDING) | (status == ACTIVE)
        status[(col > low[:, None]) & open_] = DROPPED
    if search and bool(ok.any()):
        high = torch.full((n,), -1, dtype=torch.long)
        high.scatter_reduce_(0, fi[ok], fk[ok], "amax")
        status[(col < high[:, None]) & (status == PENDING)] = INFERRED


def wilson_upper(k: int, n: int, z: float = 1.96) -> float:
    """Upper end of the 95% Wilson score interval of k/n (nan for n = 0); the same
    formula as :func:`aerl_ray.results.wilson_interval`, repeated here so the attacks
    do not import pandas."""
    if n <= 0:
        return float("nan")
    p = k / n
    den = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / den
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / den
    return min(1.0, centre + half)


def sample_pairs(robust: torch.Tensor, size: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A seeded uniform sample, without replacement, of ``size`` True cells of ``robust``
    (n, nb): (example indices, budget indices)."""
    cells = robust.nonzero()
    gen = torch.Generator().manual_seed(0x5EA7C4 + 7919 * int(seed))
    pick = torch.randperm(len(cells), generator=gen)[:size]
    pick = pick.sort().values
    return cells[pick, 0], cells[pick, 1]


@dataclass
class AuditReport:
    """The outcome of a curve's spot-check audit.

    Attributes:
        mode: ``exact`` (disagreement 0 by construction, nothing audited) or ``search``.
        audited: robust pairs re-attacked by a separate run.
        breaks: audited pairs the separate run broke.
        unaudited_robust: robust pairs of the returned curve the audit did not cover.
        total_pairs: (example, nonzero budget) pairs of the curve.
        per_budget: budget index -> (audited, breaks).
    """

    mode: str
    audited: int = 0
    breaks: int = 0
    unaudited_robust: int = 0
    total_pairs: int = 0
    per_budget: dict[int, tuple[int, int]] | None = None

    @property
    def estimate(self) -> float:
        """Estimated fraction of all pairs where a separate run breaks an example the
        returned curve counts as robust."""
        if self.mode == "exact":
            return 0.0
        if self.unaudited_robust == 0:
            return 0.0
        if self.audited == 0 or self.total_pairs == 0:
            return float("nan")
        return self.breaks / self.audited * self.unaudited_robust / self.total_pairs

    @property
    def upper(self) -> float:
        """95% Wilson upper bound of :attr:`estimate`."""
        if self.mode == "exact" or self.unaudited_robust == 0:
            return 0.0
        if self.audited == 0 or self.total_pairs == 0:
            return float("nan")
        return wilson_upper(self.breaks, self.audited) * self.unaudited_robust / self.total_pairs

    def extra(self, k: int | None) -> dict:
        """The entries of one row's ``AttackResult.extra`` (``k``: the row's budget index,
        None for eps = 0)."""
        a, b = (self.per_budget or {}).get(k, (0, 0)) if k is not None else (0, 0)
        return {"curve": self.mode, "disagreement_audit": self.estimate,
                "disagreement_upper": self.upper, "audited_pairs": self.audited,
                "audit_breaks": self.breaks, "audited_here": a, "audit_breaks_here": b}


def curve_broken(status: torch.Tensor) -> torch.Tensor:
    """(n, nb) bool: broken at a budget iff some pair at that or a smaller budget was
    broken (the curve's running minimum)."""
    return (status == BROKEN).to(torch.uint8).cummax(1).values.bool()


def audit_curve(model, x: torch.Tensor, y: torch.Tensor, norm, budgets: list[float],
                status: torch.Tensor, xb: torch.Tensor, best: torch.Tensor,
                fwd: torch.Tensor, bwd: torch.Tensor, pc, report: "AuditReport", size: int,
                seed: int, separate) -> None:
    """Re-attack ``size`` seeded robust pairs of a search curve with ``separate(ii, k) ->
    (x_adv, best_loss)`` -- the run a separate call at budget k makes -- and decide
    success as :func:`~aerl_ray.attacks.base.run_attack` does (a fresh forward pass of
    the projected point).  Records counts in ``report``, charges the passes to budget k
    in ``fwd``/``bwd`` and fixes the breaks in ``status``/``xb``/``best`` (broken there,
    hence at every larger budget)."""
    from aerl_ray.attacks.threat import Threat  # noqa: PLC0415

    robust = ~curve_broken(status)
    audited = torch.zeros_like(robust)
    report.per_budget = {}
    ai, ak = sample_pairs(robust, size, seed) if size else (torch.zeros(0, dtype=torch.long),) * 2
    for k in ak.unique().tolist():
        ii = ai[ak == k]
        ii_d = ii.to(x.device)
        threat = Threat(norm, budgets[k])
        f0, b0 = pc.fwd, pc.bwd
        xa, bl = separate(ii, k)
        pts = threat.project(xa, x[ii_d])
        with torch.no_grad():
            broke = (model(pts).argmax(1) != y[ii_d]).cpu()
        fwd[k] += pc.fwd - f0
        bwd[k] += pc.bwd - b0
        audited[ii, k] = True
        report.per_budget[k] = (len(ii), int(broke.sum()))
        report.audited += len(ii)
        report.breaks += int(broke.sum())
        if bool(broke.any()):
            bd = broke.to(x.device)
            status[ii[broke], k] = BROKEN
            xb[k, ii_d[bd]] = pts[bd]
            best[k, ii_d[bd]] = bl[broke].to(best.device, best.dtype)
    report.unaudited_robust = int((~curve_broken(status) & ~audited).sum())


def fmn_bracket(model, x: torch.Tensor, y: torch.Tensor, norm, budgets: list[float],
                status: torch.Tensor, xb: torch.Tensor, best: torch.Tensor, loss_fn,
                steps: int, batch_size: int, evidence: bool = True) -> torch.Tensor:
    """Seed a search with one FMN run (:func:`aerl_ray.attacks.fmn.fmn_core`).

    Returns the guess per example: the smallest budget index that holds its smallest
    adversarial point (-1: none found within the grid).  With ``evidence``, the example
    is also broken at the smallest budget where that point, projected into the ball,
    fools the model (checked by forward passes, budgets up to the guess) -- and so at
    every larger budget; the search then starts just below.  Updates
    ``status``/``xb``/``best`` in place."""
    from aerl_ray.attacks.fmn import fmn_core  # noqa: PLC0415  (fmn imports the registry)
    from aerl_ray.attacks.threat import project_rows  # noqa: PLC0415

    guess = torch.full((len(x),), -1, dtype=torch.long)
    todo = (status == PENDING).all(1).nonzero().view(-1)
    if len(todo) == 0:
        return guess
    dev = x.device
    x_min, n_min = fmn_core(model, x[todo.to(dev)], y[todo.to(dev)], norm, steps=steps,
                            batch_size=batch_size)
    eps = torch.tensor(budgets, dtype=torch.float64)
    k = torch.searchsorted(eps, n_min.double())  # first budget >= the norm
    hit = torch.isfinite(n_min) & (k < len(budgets))
    guess[todo[hit]] = k[hit]
    if not evidence:
        return guess
    ii, kk, xm = todo[hit], k[hit], x_min[hit.to(dev)]
    first = torch.full((len(ii),), -1, dtype=torch.long)
    for j in range(len(budgets)):
        sel = ((kk >= j) & (first < 0)).nonzero().view(-1)
        if len(sel) == 0:
            continue
        rows, sd = ii[sel].to(dev), sel.to(dev)
        pts = project_rows(norm, xm[sd], x[rows], eps[[j] * len(sel)].to(dev, x.dtype))
        with torch.no_grad():
            logits = torch.cat([model(pts[b:b + batch_size])
                                for b in range(0, len(pts), batch_size)])
        fool = logits.argmax(1) != y[rows]
        if bool(fool.any()):
            fd = fool
            xb[j, rows[fd]] = pts[fd]
            best[j, rows[fd]] = loss_fn(logits, y[rows]).detach()[fd]
            first[sel[fool.cpu()]] = j
    got = first >= 0
    settle(status, ii[got], first[got], torch.zeros(int(got.sum()), dtype=torch.bool),
           search=True)
    return guess
