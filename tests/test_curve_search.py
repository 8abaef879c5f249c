"""The search curve (``pgd`` with ``curve="search"``): the policy against a monotone
oracle, invariants of the raw curve, its disagreement with separate runs and its cost on
trained digits models, the audit's accounting, FMN, and the parameters."""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from aerl_ray.attacks import ATTACKS, Threat, pgd_curve, predict, robustness_curve, run_attack
from aerl_ray.attacks.curve_search import (PENDING, AuditReport, curve_broken, next_budget,
                                           settle, wilson_upper)
from aerl_ray.attacks.fmn import fmn_core
from aerl_ray.attacks.pgd import pgd_grid
from tests.attack_fixtures import *  # noqa: F401,F403  (fixtures)

STANDARD = [0, 1 / 255, 2 / 255, 4 / 255, 8 / 255, 16 / 255]
WIDE = [0, 0.05, 0.1, 0.15, 0.2, 0.3]
L2 = [0, 0.25, 0.5, 1.0, 1.5, 3.0]
EXTRA_KEYS = {"curve", "disagreement_audit", "disagreement_upper", "audited_pairs",
              "audit_breaks", "audited_here", "audit_breaks_here"}


def _separate(model, x, y, norm, grid, **params) -> torch.Tensor:
    """(n, nonzero budgets) success of separate runs."""
    return torch.stack([run_attack("pgd", model, x, y, Threat(norm, e), **params).success
                        for e in grid if e > 0], 1)


def _stack(results, grid) -> torch.Tensor:
    return torch.stack([r.success for r, e in zip(results, grid) if e > 0], 1)


def _work(results) -> int:
    return sum(r.fwd_passes + r.bwd_passes for r in results)


# --- the policy alone, against an oracle ----------------------------------------------------
@settings(max_examples=200, deadline=None)
@given(nb=st.integers(1, 7), data=st.data(), order=st.sampled_from(["descending", "bisect"]),
       guided=st.booleans())
def test_search_policy_recovers_a_monotone_oracle(nb, data, order, guided):
    """With an attack that is monotone per example (robust below its breaking index b,
    broken from b on; b = nb: never), the search finds every b exactly; descending spends
    at most one robust probe per example, and with a correct guess at most two probes."""
    b = torch.tensor(data.draw(st.lists(st.integers(0, nb), min_size=1, max_size=20)))
    n = len(b)
    guess = torch.where(b < nb, b, torch.tensor(-1)) if guided else None
    status = torch.full((n, nb), PENDING, dtype=torch.int8)
    probes = torch.zeros(n, dtype=torch.long)
    robust_probes = torch.zeros(n, dtype=torch.long)
    for _ in range(n * nb + 1):
        live = (status == PENDING).any(1)
        if not bool(live.any()):
            break
        fi = live.nonzero().view(-1)
        fk = next_budget(status, order, guess)[fi]
        assert bool((status[fi, fk] == PENDING).all())
        ok = fk < b[fi]
        settle(status, fi, fk, ok, search=True)
        probes[fi] += 1
        robust_probes[fi] += ok.long()
    else:
        pytest.fail("the search did not finish")
    assert torch.equal(curve_broken(status), torch.arange(nb)[None, :] >= b[:, None])
    if order == "descending":
        assert int(robust_probes.max()) <= 1
        if guided:
            assert int(probes.max()) <= 2


# --- raw output invariants ------------------------------------------------------------------
@settings(max_examples=12, deadline=None)
@given(norm=st.sampled_from(["linf", "l2"]),
       picks=st.lists(st.integers(0, 5), min_size=1, max_size=5),
       bracket=st.sampled_from(["fmn", "fmn-guide", "none"]),
       order=st.sampled_from(["descending", "bisect"]), warm=st.sampled_from(["off", "replace"]),
       steps=st.integers(1, 4), restarts=st.integers(1, 2), start=st.integers(0, 330),
       audit=st.integers(0, 8))
def test_search_curve_raw_output_invariants(sl_model, digits, norm, picks, bracket, order,
                                            warm, steps, restarts, start, audit):
    """Whatever the options, the curve :func:`pgd_grid` returns (no re-projection after
    it) is monotone per example, its points lie in the ball and in [0, 1], its success
    is the model's verdict on them, and every row carries the audit columns."""
    grid = sorted((WIDE if norm == "linf" else L2)[i] for i in picks)  # may repeat budgets
    x, y = digits.x_test[start:start + 24], digits.y_test[start:start + 24]
    res = pgd_grid(sl_model, x, y, norm, grid, steps=steps, restarts=restarts, seed=start,
                   curve="search", audit=audit, bracket=bracket, order=order, warm=warm,
                   bracket_steps=3)
    prev = torch.zeros(len(x), dtype=torch.bool)
    for e, r in zip(grid, res):
        assert float(r.x_adv.min()) >= 0.0 and float(r.x_adv.max()) <= 1.0
        assert Threat(norm, e).contains(r.x_adv, x, tol=1e-5)
        assert torch.equal(r.success, predict(sl_model, r.x_adv) != y)
        assert bool((r.success | ~prev).all())  # broken at eps => broken at larger eps
        prev = r.success
        assert EXTRA_KEYS <= set(r.extra)
        assert r.extra["curve"] == "search" and r.extra["audited_pairs"] <= audit
    if grid[0] == 0:
        assert torch.equal(res[0].success, predict(sl_model, x) != y)


@settings(max_examples=10, deadline=None)
@given(norm=st.sampled_from(["linf", "l2"]),
       picks=st.lists(st.integers(1, 5), min_size=1, max_size=5),
       bracket=st.sampled_from(["fmn-guide", "none"]),
       order=st.sampled_from(["descending", "bisect"]), steps=st.integers(1, 4),
       restarts=st.integers(1, 2), start=st.integers(0, 330), seed=st.integers(0, 3))
def test_search_is_the_exact_curve_up_to_its_one_inference(sl_model, digits, norm, picks,
                                                          bracket, order, steps, restarts,
                                                          start, seed):
    """Search vs exact on the real attack.  Without FMN evidence and warm starts every
    probe is the separate run at its budget, so (a) the search claims no break the exact
    curve (the running minimum of separate runs) lacks; and (b) an audit of every pair
    it counts robust re-runs exactly the separate runs it skipped, after which it *is*
    the exact curve."""
    grid = [0] + sorted({(WIDE if norm == "linf" else L2)[i] for i in picks})
    x, y = digits.x_test[start:start + 24], digits.y_test[start:start + 24]
    params = dict(steps=steps, restarts=restarts, seed=seed)
    exact = _stack(pgd_grid(sl_model, x, y, norm, grid, curve="exact", **params), grid)
    kw = dict(curve="search", bracket=bracket, order=order, bracket_steps=3, **params)
    bare = _stack(pgd_grid(sl_model, x, y, norm, grid, audit=0, **kw), grid)
    assert not bool((bare & ~exact).any())
    full = pgd_grid(sl_model, x, y, norm, grid, audit=10 ** 6, **kw)
    assert torch.equal(_stack(full, grid), exact)
    assert full[-1].extra["audited_pairs"] == int((~bare).sum())


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_fmn_core_raw_output(norm, sl_model, digits):
    """FMN's raw points: in [0, 1]; where it reports a finite norm, the point has that
    norm and fools the model; elsewhere it is the clean point."""
    x, y = digits.x_test[:48], digits.y_test[:48]
    xb, nrm = fmn_core(sl_model, x, y, norm, steps=8)
    assert float(xb.min()) >= 0.0 and float(xb.max()) <= 1.0
    found = torch.isfinite(nrm)
    assert bool(found.any())
    size = Threat(norm, 1.0).size(xb - x).cpu()
    assert torch.allclose(size[found], nrm[found], atol=1e-5)
    assert bool((predict(sl_model, xb[found]) != y[found]).all())
    assert torch.equal(xb[~found], x[~found])
    # the one-run curve: broken wherever the smallest adversarial fits in the ball
    curve = robustness_curve("fmn", sl_model, x, y, norm, WIDE if norm == "linf" else L2,
                             steps=8)
    for e, r in zip(WIDE if norm == "linf" else L2, curve):
        assert bool(r.success[nrm <= e - 1e-6].all())


# --- disagreement with separate runs and cost on small trained models -----------------------
@pytest.mark.parametrize("norm,grid", [("linf", STANDARD), ("linf", WIDE), ("l2", L2)])
@pytest.mark.parametrize("which", ["sl_model", "sl_model_b"])
def test_search_disagrees_with_separate_runs_at_most_half_a_percent(which, norm, grid, digits,
                                                                    request):
    """The issue's bound: a separate run breaks an example the (default) search curve
    counts as robust in <= 0.5% of the (example, budget) pairs; on the standard grid
    the curve costs <= 0.5 of the separate runs' forward+backward example-passes."""
    model = request.getfixturevalue(which)
    x, y = digits.x_test[:120], digits.y_test[:120]
    params = dict(steps=10, seed=1)
    sep_results = [run_attack("pgd", model, x, y, Threat(norm, e), **params) for e in grid]
    sep = _stack(sep_results, grid)
    curve = pgd_curve(model, x, y, norm, grid, audit=20, **params)
    dis = float((sep & ~_stack(curve, grid)).float().mean())
    assert dis <= 0.005, dis
    if grid is STANDARD:
        assert _work(curve) <= 0.5 * _work(sep_results), (_work(curve), _work(sep_results))


def test_full_audit_finds_exactly_the_disagreements(sl_model, digits):
    """An audit of every robust pair is the set of separate runs the curve skipped: it
    breaks exactly the pairs where a separate run disagrees, and the fixed curve agrees
    with every separate run.  (warm="replace" is the variant that disagrees.)"""
    x, y = digits.x_test[:120], digits.y_test[:120]
    params = dict(steps=10, warm="replace", bracket="none")
    sep = _separate(sl_model, x, y, "l2", L2, steps=10)
    c0 = _stack(pgd_grid(sl_model, x, y, "l2", L2, audit=0, **params), L2)
    missed = sep & ~c0
    assert int(missed.sum()) >= 1  # else the test proves nothing
    full = pgd_grid(sl_model, x, y, "l2", L2, audit=10 ** 6, **params)
    cf = _stack(full, L2)
    ex = full[1].extra
    assert ex["audited_pairs"] == int((~c0).sum())
    assert ex["audit_breaks"] == int(missed.sum())
    assert not bool((sep & ~cf).any())  # the fixed curve misses nothing
    assert bool((cf | ~c0).all())  # the audit only adds breaks
    assert ex["disagreement_audit"] == 0.0 and ex["disagreement_upper"] == 0.0
    assert sum(r.extra["audited_here"] for r in full) == ex["audited_pairs"]


def test_partial_audit_is_reproducible_and_bounds_the_rest(sl_model, digits):
    x, y = digits.x_test[:120], digits.y_test[:120]
    params = dict(steps=10, warm="replace", bracket="none", audit=60, seed=2)
    a = pgd_grid(sl_model, x, y, "l2", L2, **params)
    b = pgd_grid(sl_model, x, y, "l2", L2, **params)
    assert all(torch.equal(r.success, s.success) and r.extra == s.extra for r, s in zip(a, b))
    ex = a[1].extra
    assert ex["audited_pairs"] == 60
    assert 0.0 <= ex["disagreement_audit"] <= ex["disagreement_upper"] <= 1.0
    sep = _separate(sl_model, x, y, "l2", L2, steps=10, seed=2)
    true = float((sep & ~_stack(a, L2)).float().mean())
    assert true <= ex["disagreement_upper"], (true, ex)


def test_exact_mode_reports_zero_disagreement(sl_model, digits):
    x, y = digits.x_test[:40], digits.y_test[:40]
    res = pgd_curve(sl_model, x, y, "linf", WIDE, steps=5, curve="exact")
    for r in res:
        assert r.extra["curve"] == "exact" and r.extra["audited_pairs"] == 0
        assert r.extra["disagreement_audit"] == 0.0 and r.extra["disagreement_upper"] == 0.0


def test_fmn_bracket_breaks_at_least_where_fmn_does(sl_model, digits):
    """bracket="fmn": FMN's smallest adversarial points are evidence, so the curve is
    broken wherever the same FMN run's curve is; "fmn-guide" only orders the probes, so
    it claims no break that no separate run made."""
    x, y = digits.x_test[:60], digits.y_test[:60]
    fmn = robustness_curve("fmn", sl_model, x, y, "l2", L2, steps=10)
    ev = pgd_curve(sl_model, x, y, "l2", L2, steps=5, bracket="fmn", audit=0)
    for f, c in zip(fmn, ev):
        assert bool((c.success | ~f.success).all())
    guide = pgd_curve(sl_model, x, y, "l2", L2, steps=5, bracket="fmn-guide", audit=0)
    sep = _separate(sl_model, x, y, "l2", L2, steps=5)
    running = sep.to(torch.uint8).cummax(1).values.bool()
    assert not bool((_stack(guide, L2) & ~running).any())


def test_curve_parameters_are_pgd_parameters_and_checked(sl_model, batch8):
    x, y = batch8
    ATTACKS.get("pgd").validate_params({"curve": "search", "audit": 5, "bracket": "none"})
    for bad in ({"curve": "fast"}, {"audit": -1}, {"audit": 2.5}, {"bracket": "fab"}):
        with pytest.raises(ValueError):
            pgd_curve(sl_model, x, y, "linf", [0, 0.1], **bad)
        with pytest.raises(ValueError):
            run_attack("pgd", sl_model, x, y, Threat("linf", 0.1), **bad)
    with pytest.raises(ValueError):
        pgd_grid(sl_model, x, y, "linf", [0, 0.1], order="random")
    # a single run ignores the curve parameters
    a = run_attack("pgd", sl_model, x, y, Threat("linf", 0.1), steps=3, curve="exact")
    b = run_attack("pgd", sl_model, x, y, Threat("linf", 0.1), steps=3, curve="search")
    assert torch.equal(a.success, b.success)


@given(n=st.integers(1, 5000), data=st.data())
def test_wilson_upper_matches_the_results_interval(n, data):
    from aerl_ray.results import wilson_interval

    k = data.draw(st.integers(0, n))
    assert math.isclose(wilson_upper(k, n), wilson_interval(k, n)[1], rel_tol=1e-12)
    assert k / n <= wilson_upper(k, n) + 1e-12 and wilson_upper(k, n) <= 1.0


def test_audit_report_scales_to_all_pairs():
    r = AuditReport("search", audited=50, breaks=1, unaudited_robust=400, total_pairs=1000)
    assert r.estimate == pytest.approx(1 / 50 * 400 / 1000)
    assert r.upper == pytest.approx(wilson_upper(1, 50) * 0.4)
    assert math.isnan(AuditReport("search", unaudited_robust=3, total_pairs=10).upper)
    assert AuditReport("search", total_pairs=10).upper == 0.0  # nothing robust: nothing to miss
