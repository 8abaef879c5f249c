"""Attack invariants (parametrised over the ATTACKS registry), differential tests against
cleverhans and AutoAttack, the many-budget pass and bad-input errors."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from aerl_ray.attacks import (ATTACKS, AttackInputError, Norm, Threat, TransferCache,
                              parse_eps, parse_eps_grid, pgd_curve, predict,
                              robustness_curve, run_attack)
from aerl_ray.registry import UnknownNameError
from tests.attack_fixtures import *  # noqa: F401,F403  (fixtures)

GRIDS = {"linf": [0.0, 0.05, 0.15, 0.3], "l2": [0.0, 0.5, 2.0]}




def cheap_params(name: str, source: nn.Module) -> dict:
    spec = ATTACKS.get(name)
    params = dict(spec.fast_params)
    if "source" in spec.requires:
        params["source"] = source
    return params


@pytest.mark.parametrize("norm", ["linf", "l2"])
@pytest.mark.parametrize("name", ATTACKS.names())
def test_attack_invariants(name, norm, sl_model, sl_model_b, digits):
    """Each registered attack's RAW output (its function called directly, not through
    run_attack, which re-projects and re-predicts) is in the ball and the box, and its
    success mask is exactly "the model misclassifies the returned point"."""
    x, y = digits.x_test[:24], digits.y_test[:24]
    spec = ATTACKS.get(name)
    sl_model.eval()
    for eps in GRIDS[norm]:
        threat = Threat(norm, eps)
        r = spec.fn(sl_model, x, y, threat, **cheap_params(name, sl_model_b))
        assert r.x_adv.shape == x.shape
        assert float(r.x_adv.min()) >= 0.0 and float(r.x_adv.max()) <= 1.0
        assert float(threat.size(r.x_adv - x).max()) <= eps * (1 + 1e-5) + 1e-6, eps
        assert torch.equal(r.success.cpu(), (predict(sl_model, r.x_adv) != y).cpu()), eps
        if eps == 0:
            assert torch.equal(r.success.cpu(), (predict(sl_model, x) != y).cpu())


@pytest.mark.parametrize("norm", ["linf", "l2"])
@pytest.mark.parametrize("name", ATTACKS.names())
def test_run_attack_curve_over_budgets(name, norm, sl_model, sl_model_b, digits):
    """Through run_attack: eps = 0 is the clean accuracy, accuracy falls with the budget
    and the largest budget does something."""
    x, y = digits.x_test[:24], digits.y_test[:24]
    clean_acc = float((predict(sl_model, x) == y).float().mean())
    accs = [run_attack(name, sl_model, x, y, Threat(norm, eps),
                       **cheap_params(name, sl_model_b)).robust_acc for eps in GRIDS[norm]]
    assert accs[0] == pytest.approx(clean_acc)
    assert all(b <= a + 1e-9 for a, b in zip(accs, accs[1:])), accs
    assert accs[-1] < clean_acc


@pytest.mark.parametrize("name", ATTACKS.names())
def test_curve_is_monotone_and_keeps_eval_mode(name, sl_model, sl_model_b, digits):
    x, y = digits.x_test[24:40], digits.y_test[24:40]
    sl_model.train()
    try:
        res = robustness_curve(name, sl_model, x, y, "linf", [0, 0.1, 0.2],
                               **cheap_params(name, sl_model_b))
        assert sl_model.training  # mode restored
    finally:
        sl_model.eval()
    accs = [r.robust_acc for r in res]
    assert accs == sorted(accs, reverse=True)
    for eps, r in zip([0, 0.1, 0.2], res):  # carried-over points are valid at the budget
        assert Threat("linf", eps).contains(r.x_adv, x)
        assert torch.equal(r.success, predict(sl_model, r.x_adv) != y)


def test_pgd_curve_equals_separate_runs(sl_model, digits):
    x, y = digits.x_test[:96], digits.y_test[:96]
    grid = [0, 2 / 255, 8 / 255, 0.08, 0.12, 0.2]
    params = dict(steps=10, restarts=2, seed=3, batch_size=32, curve="exact")
    curve = pgd_curve(sl_model, x, y, "linf", grid, **params)
    separate = [run_attack("pgd", sl_model, x, y, Threat("linf", e), **params) for e in grid]
    broken = torch.zeros(len(x), dtype=torch.bool)
    for c, s in zip(curve, separate):
        broken |= s.success  # per-example running minimum of the separate runs
        assert torch.equal(c.success, broken)
    assert [c.robust_acc for c in curve] == [s.robust_acc for s in separate]
    assert sum(c.bwd_passes for c in curve) < sum(s.bwd_passes for s in separate)


def test_pgd_random_start_follows_the_example(digits):
    x = digits.x_test[:6]
    t = Threat("linf", 0.1)
    full = t.random_start(x, torch.arange(6), restart=0, seed=1)
    sub = t.random_start(x[[4, 1]], torch.tensor([4, 1]), restart=0, seed=1)
    assert torch.equal(sub, full[[4, 1]])
    assert not torch.equal(full, t.random_start(x, torch.arange(6), restart=1, seed=1))


def test_pgd_best_point_counts_any_fooling_iterate(sl_model, digits):
    x, y = digits.x_test[:64], digits.y_test[:64]
    kw = dict(steps=15, step_size=0.5, seed=0)  # big steps overshoot: last != best
    es = run_attack("pgd", sl_model, x, y, Threat("linf", 0.12), early_stop=True, **kw)
    full = run_attack("pgd", sl_model, x, y, Threat("linf", 0.12), early_stop=False, **kw)
    assert torch.equal(es.success, full.success)
    assert es.bwd_passes < full.bwd_passes


@pytest.mark.parametrize("norm,eps", [("linf", 0.1), ("l2", 0.75)])
def test_pgd_at_least_as_strong_as_cleverhans(norm, eps, sl_model, digits):
    from cleverhans.torch.attacks.projected_gradient_descent import \
        projected_gradient_descent

    x, y = digits.x_test[:120], digits.y_test[:120]
    steps, rel = 20, 2.5 / 20
    ours = run_attack("pgd", sl_model, x, y, Threat(norm, eps), steps=steps, step_size=rel)
    torch.manual_seed(0)
    x_ch = projected_gradient_descent(sl_model, x, eps, rel * eps, steps,
                                      np.inf if norm == "linf" else 2, clip_min=0.0,
                                      clip_max=1.0, y=y, rand_init=True, sanity_checks=False)
    ch_acc = float((predict(sl_model, x_ch) == y).float().mean())
    assert ours.robust_acc <= ch_acc + 0.02, (ours.robust_acc, ch_acc)


def test_autoattack_at_least_as_strong_as_pgd(sl_model, digits):
    x, y = digits.x_test[:48], digits.y_test[:48]
    t = Threat("linf", 0.1)
    ours = run_attack("pgd", sl_model, x, y, t, steps=20)
    aa = run_attack("autoattack", sl_model, x, y, t, version="custom",
                    attacks=["apgd-ce", "apgd-t"], n_iter=25, n_target_classes=3)
    assert aa.robust_acc <= ours.robust_acc + 0.02, (aa.robust_acc, ours.robust_acc)


@pytest.mark.parametrize("loss", ["ce", "margin", "dlr"])
def test_sl_model_falls_at_large_budget(loss, sl_model, digits):
    x, y = digits.x_test[:64], digits.y_test[:64]
    r = run_attack("pgd", sl_model, x, y, Threat("linf", 0.3), steps=20, loss=loss)
    assert r.robust_acc <= 0.05


def test_l2_step_does_not_shrink_for_tiny_gradients():
    """||g|| = 8e-9: our step keeps full length; cleverhans' 1e-12-floored squared norm
    (the paper's PGD) shrinks it ~100x."""
    from cleverhans.torch.utils import optimize_linear

    g = torch.full((2, 1, 8, 8), 1e-9)
    g[1] *= 3
    ours = Threat("l2", 1.0).direction(g).flatten(1).norm(dim=1)
    assert torch.allclose(ours, torch.ones(2), atol=1e-3)
    theirs = optimize_linear(g, 1.0, norm=2).flatten(1).norm(dim=1)
    assert float(theirs.max()) < 0.05


def test_transfer_cache_reuses_crafted_points(sl_model, sl_model_b, digits, tmp_path):
    x, y = digits.x_test[:16], digits.y_test[:16]
    cache = TransferCache(tmp_path)
    t = Threat("linf", 0.1)
    a = run_attack("transfer", sl_model, x, y, t, source=sl_model_b, steps=5, cache=cache)
    b = run_attack("transfer", sl_model, x, y, t, source=sl_model_b, steps=5, cache=cache)
    assert not a.extra["cached"] and b.extra["cached"]
    assert b.extra["source_bwd_passes"] == 0 < a.extra["source_bwd_passes"]
    assert torch.equal(a.x_adv, b.x_adv)
    fresh = TransferCache(tmp_path)  # the disk copy survives a new cache object
    c = run_attack("transfer", sl_model, x, y, t, source=sl_model_b, steps=5, cache=fresh)
    assert c.extra["cached"] and torch.equal(a.x_adv, c.x_adv)
    d = run_attack("transfer", sl_model, x, y, t.with_eps(0.2), source=sl_model_b, steps=5,
                   cache=cache)
    assert not d.extra["cached"]


def test_transfer_cache_tells_sources_apart_by_more_than_weights(sl_model, sl_model_b,
                                                                 digits):
    """Two wrappers of the same weights that differ in a plain attribute (a logit
    temperature) craft different sets and must not share a cache entry (the old key
    fingerprinted only the state dict)."""
    from aerl_ray.attacks.transfer import model_fingerprint
    from aerl_ray.diagnostics import LogitScale

    x, y = digits.x_test[:32], digits.y_test[:32]
    cache = TransferCache()
    hot, cold = LogitScale(sl_model_b, 1.0), LogitScale(sl_model_b, 1000.0)
    assert model_fingerprint(hot) != model_fingerprint(cold)
    assert model_fingerprint(hot) == model_fingerprint(LogitScale(sl_model_b, 1.0))
    t = Threat("linf", 0.1)
    a = run_attack("transfer", sl_model, x, y, t, source=hot, steps=5, cache=cache)
    b = run_attack("transfer", sl_model, x, y, t, source=cold, steps=5, cache=cache)
    assert not a.extra["cached"] and not b.extra["cached"] and len(cache) == 2
    c = run_attack("transfer", sl_model, x, y, t, source=LogitScale(sl_model_b, 1.0),
                   steps=5, cache=cache)
    assert c.extra["cached"] and torch.equal(c.x_adv, a.x_adv)


def test_square_counts_queries(sl_model, digits):
    x, y = digits.x_test[:8], digits.y_test[:8]
    r = run_attack("square", sl_model, x, y, Threat("linf", 0.1), n_queries=20,
                   resc_schedule=True)
    # <= 22 queries per example + the initial forwards, and one forward per example that
    # reads the success mask on the returned points (counted: it is real work)
    assert 8 <= r.queries <= 8 * 22 + 16 + 8 and r.bwd_passes == 0


class NoisyLogits(nn.Module):
    """A randomised model: AutoAttack's check_randomized must flag it."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x):
        return self.net(x) + 0.1 * torch.randn(len(x), 10)


def test_autoattack_check_warnings_become_flags(sl_model, batch8):
    x, y = batch8
    # .eval(): a fresh wrapper is in train mode, which run_attack restores -- also on
    # the shared sl_model inside it (dropout would then leak into later tests)
    r = run_attack("autoattack", NoisyLogits(sl_model).eval(), x, y, Threat("linf", 0.05),
                   version="custom", attacks=["apgd-ce"], n_iter=3)
    assert any("randomized" in f for f in r.flags), r.flags


# --- bad input ------------------------------------------------------------------------------
class Probabilities(nn.Module):
    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, x):
        return self.net(x).softmax(1)


def test_parse_eps():
    assert parse_eps("8/255") == pytest.approx(8 / 255)
    assert parse_eps(" 0.5 ") == 0.5 and parse_eps(1) == 1.0 and parse_eps("1e-2") == 0.01
    for bad in ("-1/255", -0.1, "abc", "1/0", "nan", float("inf")):
        with pytest.raises(ValueError):
            parse_eps(bad)


def test_norm_aliases_and_unknown():
    assert Norm.parse("linf") is Norm.parse("Linf") is Norm.LINF
    assert Norm.parse("L2") is Norm.parse("l2") is Norm.L2
    with pytest.raises(ValueError, match="known norms"):
        Norm.parse("l1")
    with pytest.raises(ValueError, match="known norms"):
        Threat("lp", 0.1)


def test_bad_inputs_fail_before_work(sl_model, tiny_model, batch8):
    x, y = batch8
    with pytest.raises(UnknownNameError, match="known attacks: .*pgd"):
        run_attack("pgdx", sl_model, x, y, Threat("linf", 0.1))
    with pytest.raises(ValueError, match=">= 0"):
        Threat("linf", -0.1)
    with pytest.raises(ValueError, match="sorted"):
        parse_eps_grid([0, 8 / 255, 4 / 255])
    with pytest.raises(ValueError, match="sorted"):
        pgd_curve(sl_model, x, y, "linf", ["0", "8/255", "4/255"])
    with pytest.raises(AttackInputError, match="probabilities"):
        run_attack("pgd", Probabilities(tiny_model), x, y, Threat("linf", 0.1))
    with pytest.raises(AttackInputError, match=r"\[0, 1\]"):
        run_attack("pgd", sl_model, x * 255, y, Threat("linf", 0.1))
    with pytest.raises(AttackInputError, match="no parameter"):
        run_attack("pgd", sl_model, x, y, Threat("linf", 0.1), stepz=3)
    with pytest.raises(AttackInputError, match="needs"):
        run_attack("transfer", sl_model, x, y, Threat("linf", 0.1))
    with pytest.raises(ValueError, match="steps"):
        run_attack("pgd", sl_model, x, y, Threat("linf", 0.1), steps=0)
    with pytest.raises(UnknownNameError, match="known attack losss: ce, dlr, margin"):
        run_attack("pgd", sl_model, x, y, Threat("linf", 0.1), loss="hinge")
    with pytest.raises(ValueError, match="custom"):
        run_attack("autoattack", sl_model, x, y, Threat("linf", 0.1), attacks=["apgd-ce"])


# --- the one-loop many-budget PGD -----------------------------------------------------------
def _running_min(separate):
    broken = torch.zeros(len(separate[0].success), dtype=torch.bool)
    out = []
    for s in separate:
        broken = broken | s.success
        out.append(broken)
    return out


def test_row_threat_ops_match_scalar_ones_bit_for_bit(digits):
    from aerl_ray.attacks.threat import project_rows, random_start_rows

    x = digits.x_test[:12]
    ids = torch.arange(12) * 5
    noisy = (x + 0.4 * torch.randn(x.shape, generator=torch.Generator().manual_seed(0)))
    for norm, eps in [("linf", 2 / 255), ("linf", 0.3), ("l2", 1 / 3), ("l2", 2.0)]:
        t = Threat(norm, eps)
        e = torch.full((12,), t.eps, dtype=torch.float64)
        assert torch.equal(t.project(noisy, x), project_rows(t.norm, noisy, x, e))
        assert torch.equal(t.random_start(x, ids, 1, 7),
                           random_start_rows(t.norm, x, ids, 1, 7, e))


@pytest.mark.parametrize("norm,grid,params", [
    ("linf", [0.05, 0.1, 0.1, 0.3], dict(steps=6, restarts=3, seed=1, loss="margin",
                                          batch_size=40)),
    ("l2", [0, 0.5, 1.0, 2.5], dict(steps=6, restarts=2, loss="dlr")),
    ("linf", [0, 0.05, 0.2], dict(steps=5, restarts=2, early_stop=False, batch_size=25)),
    ("l2", [0.3, 1.0, 3.0], dict(steps=4, step_size=0.5, random_start=False)),
])
def test_pgd_one_loop_equals_separate_runs_and_the_budget_loop(norm, grid, params,
                                                               sl_model, digits):
    from aerl_ray.passes import PassCounter

    x, y = digits.x_test[40:100], digits.y_test[40:100]
    params = {**params, "curve": "exact"}
    with PassCounter(sl_model) as pc:
        curve = pgd_curve(sl_model, x, y, norm, grid, **params)
    loop = robustness_curve("pgd", sl_model, x, y, norm, grid, one_loop=False, **params)
    separate = [run_attack("pgd", sl_model, x, y, Threat(norm, e), **params) for e in grid]
    for e, c, l, s, want in zip(grid, curve, loop, separate, _running_min(separate)):
        assert torch.equal(c.success, want) and torch.equal(l.success, want)
        assert torch.equal(c.success, predict(sl_model, c.x_adv) != y)
        assert Threat(norm, e).contains(c.x_adv, x)
        # up to float noise of batch-size-dependent kernels (L2 steps amplify it to ~1e-5):
        rob = ~c.success  # still-robust examples: the separate run's own best point
        assert torch.allclose(c.x_adv[rob], s.x_adv[rob], atol=1e-4)
        assert torch.allclose(c.best_loss[rob], s.best_loss[rob], rtol=1e-4, atol=1e-4,
                              equal_nan=True)
        # broken examples: the point of the smallest breaking budget, as the budget loop
        assert torch.allclose(c.x_adv[c.success], l.x_adv[l.success], atol=1e-4)
    # per-budget costs are a split of the hook-counted total (none lost, none invented)
    assert sum(c.fwd_passes for c in curve) == pc.fwd - min(len(x), 64)  # - check_logits
    assert sum(c.bwd_passes for c in curve) == pc.bwd
    assert all(c.seconds >= 0 for c in curve)
    assert [c.robust_acc for c in curve] == [c.robust_acc for c in loop]


def test_fgsm_one_loop_equals_separate_runs(sl_model, digits):
    x, y = digits.x_test[:60], digits.y_test[:60]
    grid = [0, 0.05, 0.1, 0.2, 0.3]
    curve = robustness_curve("fgsm", sl_model, x, y, "linf", grid)
    separate = [run_attack("fgsm", sl_model, x, y, Threat("linf", e)) for e in grid]
    for c, want in zip(curve, _running_min(separate)):
        assert torch.equal(c.success, want)


def test_pgd_one_loop_shares_passes_across_budgets(sl_model, digits):
    """With room in the batch (and ``speculate``, the default off the CPU) all budgets of
    an example run at once: far fewer backward passes than the budget-by-budget loop,
    same numbers."""
    from aerl_ray.attacks.pgd import pgd_grid

    x, y = digits.x_test[:48], digits.y_test[:48]
    grid, params = [0, 0.02, 0.05, 0.1, 0.2], dict(steps=8, seed=0, curve="exact")
    grad_calls = []
    handle = sl_model.register_forward_hook(
        lambda m, i, o: grad_calls.append(1) if o.requires_grad else None)
    try:
        one = pgd_grid(sl_model, x, y, "linf", grid, speculate=True, **params)
        n_one = len(grad_calls)
        grad_calls.clear()
        loop = robustness_curve("pgd", sl_model, x, y, "linf", grid, one_loop=False,
                                **params)
        n_loop = len(grad_calls)
        lean = pgd_grid(sl_model, x, y, "linf", grid, speculate=False, **params)
    finally:
        handle.remove()
    for o, l, c in zip(one, loop, lean):
        assert torch.equal(o.success, l.success) and torch.equal(c.success, l.success)
    assert n_one < 0.5 * n_loop, (n_one, n_loop)
    # without speculation: exactly the pairs (and backward passes) of the budget loop
    assert [c.extra["attacked"] for c in lean] == [c.extra["attacked"] for c in loop]
    assert sum(c.bwd_passes for c in lean) == sum(c.bwd_passes for c in loop)
