"""Gradient-masking diagnostics: planted masking is flagged by the right checks, clean
SL and PGD-AT models are not; integration into run_evaluation, the CLI, the sweep's
evaluator and the report's flag column.

Planted models (on top of the session's trained SL cnn4, digits):
- ``saturated``: logits x 1000 -- the softmax saturates, CE input-gradients vanish
  exactly, so CE-PGD "fails" while margin/DLR, temperature-scaled CE and Square succeed.
- ``quantised``: inputs rounded to 4 grey levels (torch.round, zero gradient) -- every
  gradient attack is blind; Square and the unbounded attack expose it.
"""
from __future__ import annotations

import json

import pandas as pd
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from aerl_ray.checkpoint import make_checkpoint
from aerl_ray.config import TrainConfig
from aerl_ray.diagnostics import (DIAGNOSTIC_COLUMNS, LogitScale, delta, run_diagnostics)
from aerl_ray.evalplan import EvalPlan, EvalPlanError
from aerl_ray.evaluate import main, run_evaluation
from aerl_ray.results import read_table, wilson_interval
from tests.attack_fixtures import *  # noqa: F401,F403  (fixtures)

GRID = {"linf": ["0", "0.05", "0.1", "0.2"]}  # headline (middle non-zero) budget 0.1
N = 64




class Quantise(nn.Module):
    """Rounds inputs to ``levels`` grey levels before the model: zero input-gradient."""

    def __init__(self, model: nn.Module, levels: int = 4):
        super().__init__()
        self.model, self.k = model, levels - 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(torch.round(x * self.k) / self.k)


def plan(**kw) -> EvalPlan:
    base = dict(attacks=("pgd",), grids=GRID, n=N, batch_size=N,
                attack_params={"pgd": {"steps": 20}}, diagnostics="cheap")
    return EvalPlan(**{**base, **kw})


@pytest.fixture(scope="module")
def pgd_at_model(digits, tmp_path_factory):
    """PGD adversarial training (sl_adv, 3-step PGD at eps 0.1), 4 epochs, ~6 s."""
    from aerl_ray.train import fit

    cfg = TrainConfig().replace(dataset="digits", model="cnn4", epochs=4, lr=3e-3, seed=0,
                                regime="sl_adv", adv_attack="pgd", adv_eps=0.1, adv_steps=3,
                                adv_step_size=2.5 / 3, device="cpu")
    res = fit(cfg, tmp_path_factory.mktemp("pgdat"), splits=digits)
    return res.model.eval()


@pytest.fixture(scope="module")
def reports(digits, sl_model, pgd_at_model):
    x, y = digits.x_test[:N], digits.y_test[:N]
    models = {"sl": sl_model, "pgd_at": pgd_at_model,
              "saturated": LogitScale(sl_model, 1e-3), "quantised": Quantise(sl_model)}
    return {k: run_diagnostics(m.eval(), x, y, plan(), level="cheap")
            for k, m in models.items()}


def flagged(rep) -> set[str]:
    return {k.split("/")[0] for k in rep.flagged}


def test_delta_is_half_point_or_wilson_half_width():
    lo, hi = wilson_interval(32, 64)
    assert delta((0.5, 64)) == pytest.approx((hi - lo) / 2)
    assert delta((0.5, 64), (1.0, 64)) == pytest.approx((hi - lo) / 2)  # the larger one
    assert delta((0.5, 10**7)) == 0.005


@pytest.mark.parametrize("name", ["sl", "pgd_at"])
def test_clean_models_are_not_flagged(reports, name):
    rep = reports[name]
    assert not rep.masking_suspected, rep.format_table()
    # the checks actually ran, with real numbers
    c = rep.checks
    assert c["unbounded_not_broken/Linf"]["value"] == 1.0
    assert c["vanishing_gradients/Linf"]["value"] <= c["vanishing_gradients/Linf"]["delta"]
    assert set(c) >= {f"{k}/Linf" for k in (
        "one_step_beats_iterative", "black_box_beats_white_box", "unbounded_not_broken",
        "non_monotone_eps", "attack_not_converged", "loss_choice_matters",
        "temperature_sensitive", "vanishing_gradients")} | {"attack_flags"}


def _diag_acc(rep, key: str, eps: float) -> float:
    return next(r["robust_acc"] for r in rep.attack_rows
                if r["attack"] == f"diag:{key}" and r["eps"] == eps)


def test_pgd_at_is_more_robust_than_sl(reports):
    acc = lambda r: _diag_acc(r, "pgd-80x1", 0.1)  # noqa: E731  (the converged PGD)
    assert acc(reports["pgd_at"]) > acc(reports["sl"]) + 0.2


def test_saturated_logits_are_flagged(reports):
    rep = reports["saturated"]
    assert rep.masking_suspected
    f = flagged(rep)
    # CE saturation: margin/DLR and logits/T succeed where CE fails; gradients vanish;
    # the unbounded CE attack is stuck; Square (margin loss, no gradients) beats PGD
    assert {"loss_choice_matters", "temperature_sensitive", "vanishing_gradients",
            "unbounded_not_broken", "black_box_beats_white_box"} <= f, rep.format_table()
    assert "one_step_beats_iterative" not in f  # FGSM is just as blind
    c = rep.checks
    assert c["temperature_sensitive/Linf"]["value"] < 0.7 < c["temperature_sensitive/Linf"][
        "reference"]


def test_quantised_inputs_are_flagged(reports):
    rep = reports["quantised"]
    f = flagged(rep)
    assert {"vanishing_gradients", "unbounded_not_broken",
            "black_box_beats_white_box"} <= f, rep.format_table()
    # zero gradients for every loss and temperature: those checks cannot see it
    assert not f & {"loss_choice_matters", "temperature_sensitive"}
    assert rep.checks["vanishing_gradients/Linf"]["value"] > 0.9


def test_deterministic(digits, sl_model, reports):
    again = run_diagnostics(sl_model, digits.x_test[:N], digits.y_test[:N], plan())
    assert again.to_dict() == reports["sl"].to_dict()


def test_l2_clean_vs_saturated(digits, sl_model):
    p = plan(grids={"l2": ["0", "0.5", "1.0", "2.0"]})
    x, y = digits.x_test[:32], digits.y_test[:32]
    clean = run_diagnostics(sl_model, x, y, p)
    sat = run_diagnostics(LogitScale(sl_model, 1e-3), x, y, p)
    assert not clean.masking_suspected, clean.format_table()
    assert {"loss_choice_matters", "unbounded_not_broken"} <= flagged(sat)
    assert all(k.endswith("/L2") for k in sat.checks if k != "attack_flags")


def test_eval_rows_are_reused_and_attack_flags_count(digits, tiny_model):
    x, y = digits.x_test[:8], digits.y_test[:8]
    rows = [{"attack": a, "norm": "Linf", "eps": e, "robust_acc": r, "clean_acc": 0.5,
             "n": 8, "flags": json.dumps(f)}
            for a, e, r, f in [("pgd", 0.0, 0.5, []), ("fgsm", 0.0, 0.5, []),
                               ("pgd", 0.1, 0.5, []), ("fgsm", 0.1, 0.4, []),
                               ("transfer:ref", 0.1, 0.5, []),
                               ("autoattack", 0.0, 0.25, ["square beat apgd"])]]
    rep = run_diagnostics(tiny_model, x, y, plan(), eval_rows=rows, n=8)
    c = rep.checks
    assert "eval rows" in c["one_step_beats_iterative/Linf"]["detail"]
    assert c["one_step_beats_iterative/Linf"]["value"] == 0.4
    assert "transfer:ref" in c["black_box_beats_white_box/Linf"]["detail"]
    # eps = 0 is measured by the attacks' own pipelines, not read from (short-cut) rows
    assert not c["eps0_not_clean/Linf"]["flag"]
    assert c["attack_flags"]["flag"] and "square beat apgd" in c["attack_flags"]["detail"]


def test_plan_levels_validated():
    with pytest.raises(EvalPlanError, match="diagnostics"):
        plan(diagnostics="sometimes")
    with pytest.raises(EvalPlanError, match="diagnostics_n"):
        plan(diagnostics_n=-1)
    assert EvalPlan().diagnostics == "off"  # standalone default; the sweep's is cheap
    from aerl_ray.evalpool import plan_from_spec

    assert plan_from_spec({"attacks": ["pgd"]}, False).diagnostics == "cheap"
    assert plan_from_spec({"diagnostics": "off"}, False).diagnostics == "off"


def test_run_evaluation_reuses_rows(digits, sl_model):
    ev = run_evaluation(LogitScale(sl_model, 1e-3), plan(attacks=("pgd", "fgsm"), n=N),
                        data=(digits.x_test, digits.y_test))
    assert ev.rows and ev.diagnostics is not None
    c = ev.diagnostics.checks
    assert "eval rows" in c["one_step_beats_iterative/Linf"]["detail"]
    assert ev.diagnostics.masking_suspected
    assert not c["eps0_not_clean/Linf"]["flag"]
    # the worst case over the plan's *and* the diagnostics' attacks on their subset (here
    # all N examples): never above the plan's worst case, and on this masked model the
    # diagnostics' attacks (other losses, temperatures, ...) break much more
    rows = pd.DataFrame(ev.rows)
    both = rows[rows.attack == "worst_case+diag"].set_index("eps_str")
    plain = rows[rows.attack == "worst_case"].set_index("eps_str")
    assert len(both) and (both["n"] == N).all()
    assert (both["robust_acc"] <= plain.loc[both.index, "robust_acc"] + 1e-12).all()
    assert (both["robust_acc"] < plain.loc[both.index, "robust_acc"] - 0.05).any()


def test_transfer_source_named_by_a_label_as_in_a_sweep(digits, sl_model, tiny_model):
    """A sweep's plan names its transfer source by a label ("sl_reference") and hands the
    loaded model to the evaluation: the diagnostics' eps = 0 run of the transfer attack
    uses that model (it used to load the label as a path and fail the trial)."""
    p = plan(attacks=("pgd", "transfer"), transfer_source="sl_reference",
             grids={"linf": ["0", "0.1"]})
    ev = run_evaluation(tiny_model, p, data=(digits.x_test, digits.y_test), source=sl_model,
                        source_label="sl_reference")
    c = ev.diagnostics.checks["eps0_not_clean/Linf"]
    assert "transfer" not in c["detail"] or "not loadable" not in c["detail"], c["detail"]
    assert not c["flag"]
    assert any(r["attack"] == "transfer:sl_reference" for r in ev.rows)


def test_cli_writes_diagnostics(sl_checkpoint, tmp_path, capsys):
    out = tmp_path / "ev"
    rc = main([str(sl_checkpoint), "--attacks", "pgd,fgsm", "--eps", "0,0.05,0.1,0.2",
               "--n", "32", "--steps", "10", "--diagnostics", "cheap", "--diagnostics-n",
               "32", "--no-indicators", "--out", str(out)])
    assert rc == 0
    text = capsys.readouterr().out
    assert "masking suspected: no" in text and "unbounded_not_broken/Linf" in text
    df = read_table(out / "diagnostics.parquet")
    assert set(DIAGNOSTIC_COLUMNS) <= set(df.columns)
    assert not df["flag"].any() and "vanishing_gradients" in set(df["check"])
    js = json.loads((out / "diagnostics.json").read_text())
    assert js["masking_suspected"] is False and js["diagnostics"]["attack_flags"]["level"]


def test_sweep_evaluator_returns_diagnostics(sl_model, digits):
    from analysis.pareto import _json_true_keys
    from aerl_ray.evalpool import SweepEvaluator

    cfg = TrainConfig().replace(model="cnn4", dataset="digits").to_flat()
    ckpt = make_checkpoint(sl_model, cfg, digits.info, epoch=1, metrics={})
    spec = {"attacks": ["pgd"], "grids": GRID, "n": 32, "batch_size": 32,
            "attack_params": {"pgd": {"steps": 10}}, "indicators": False}
    res = SweepEvaluator({"search": spec}, None, 0).evaluate(ckpt, {"trial_id": "t0"})
    diag = res["diagnostics"]
    assert res["masking_suspected"] is False
    assert diag["unbounded_not_broken/Linf"]["level"] == "cheap"
    # the report's flag column lists only checks that fired
    assert _json_true_keys(json.dumps(diag)) == []
    diag["loss_choice_matters/Linf"]["flag"] = True
    assert _json_true_keys(json.dumps(diag)) == ["loss_choice_matters/Linf"]
    off = SweepEvaluator({"search": spec}, None, 0).evaluate(ckpt, {"diagnostics": "off"})
    assert list(off["diagnostics"]) == ["attack_flags"] and not off["masking_suspected"]


def test_masking_audit_space_loads():
    from pathlib import Path

    from aerl_ray.evalpool import plan_from_spec
    from aerl_ray.space import load_space

    path = Path(__file__).parents[1] / "search_spaces" / "masking_audit.yaml"
    for smoke in (False, True):
        sp = load_space(path, smoke=smoke)
        p = plan_from_spec(sp.evaluation, True)
        assert p.diagnostics == "cheap"
    regimes = set(next(p for p in load_space(path).params if p.name == "regime").choices)
    assert regimes == {"sl", "rl", "rl_adv", "sl_rl_loss", "igr"}


# --- issue 11: comparisons over the whole grid, eps = 0 measured, attack findings ----------
@pytest.fixture(scope="module")
def rl_model(digits, tmp_path_factory):
    """RL (per-sample eps-greedy 0.1, 0/1 reward) cnn4 on digits, 20 epochs (~94%)."""
    from aerl_ray.train import fit

    cfg = TrainConfig().replace(dataset="digits", model="cnn4", epochs=20, lr=1e-3, seed=0,
                                regime="rl", explore_eps=0.1, device="cpu")
    return fit(cfg, tmp_path_factory.mktemp("rl"), splits=digits).model.eval()


@pytest.fixture(scope="module")
def x10_report(digits, sl_model):
    x, y = digits.x_test[:N], digits.y_test[:N]
    return run_diagnostics(LogitScale(sl_model, 0.1), x, y, plan(), level="cheap")


def test_logits_x10_flags_at_the_budget_where_it_hides_most(x10_report):
    """logits x 10: CE-PGD overstates robustness most at the grid's largest budget, not
    at the headline 0.1; the comparative checks look at every informative budget and say
    where (the old checks only ran at the headline)."""
    rep = x10_report
    assert rep.masking_suspected, rep.format_table()
    for check in ("loss_choice_matters", "temperature_sensitive"):
        c = rep.checks[f"{check}/Linf"]
        assert c["flag"] and c["eps"] == 0.2, rep.format_table()
        assert "eps 0.1:" in c["detail"] and "eps 0.2:" in c["detail"]
        assert c["reference"] - c["value"] > 0.3  # tens of points hidden at 0.2


@pytest.mark.parametrize("which", ["sl", "rl"])
def test_plain_sl_and_rl_models_are_not_flagged_at_any_budget(which, digits, reports,
                                                               request):
    rep = reports["sl"] if which == "sl" else run_diagnostics(
        request.getfixturevalue("rl_model"), digits.x_test[:N], digits.y_test[:N], plan(),
        level="cheap")
    assert not rep.masking_suspected, rep.format_table()
    assert {r["attack"] for r in rep.attack_rows} >= {"diag:pgd-margin", "diag:pgd-T10"}


def test_informative_budgets_and_their_choice():
    from aerl_ray.diagnostics import _informative, _pick_budgets

    pgd = {0.01: 0.95, 0.05: 0.94, 0.1: 0.6, 0.2: 0.3, 0.3: 0.0}
    assert _informative(pgd, 0.95, 256) == [0.1, 0.2]  # broke some, left some
    masked = {0.05: 0.95, 0.1: 0.95, 0.2: 0.95}  # CE-PGD breaks nothing anywhere
    assert _informative(masked, 0.95, 256) == [0.2]
    assert _informative({0.1: 0.0}, 0.9, 256) == []


@settings(deadline=None, max_examples=80)
@given(budgets=st.lists(st.floats(1e-3, 10.0), min_size=1, max_size=8, unique=True),
       headline=st.floats(1e-3, 10.0), cap=st.integers(0, 5))
def test_pick_budgets_keeps_the_largest_and_the_headline(budgets, headline, cap):
    from aerl_ray.diagnostics import _pick_budgets

    budgets = sorted(budgets)
    got = _pick_budgets(budgets, headline, cap)
    assert got == sorted(got) and set(got) <= set(budgets)
    assert len(got) == (len(budgets) if not cap else min(cap, len(budgets)))
    if cap >= 1:
        assert budgets[-1] in got
    if cap >= 2:
        assert min(budgets, key=lambda e: abs(e - headline)) in got


class Noisy(nn.Module):
    """A randomised model (Gaussian input noise at every call, in any mode)."""

    def __init__(self, model: nn.Module, sigma: float = 0.3):
        super().__init__()
        self.model, self.sigma = model, sigma

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x + self.sigma * torch.randn_like(x))


def test_eps0_is_measured_by_each_attacks_own_pipeline(digits, sl_model, reports,
                                                       monkeypatch):
    """A deterministic model and sound attacks: no flag.  An attack that ignores its
    budget (a fixed 0.1 step whatever eps) and a randomised model: flagged, although the
    evaluation's eps = 0 rows (short-cut to the clean point) look perfect.  The old check
    only compared those rows, so it could not fire on a deterministic model."""
    from aerl_ray.attacks import ATTACKS, AttackResult, Norm
    from aerl_ray.attacks.base import AttackSpec
    from aerl_ray.diagnostics import LEVEL_SETTINGS, _eps0_check

    def budget_blind(model, x, y, threat, *, seed: int = 0):
        x_adv = (x + 0.1).clamp(0, 1)
        with torch.no_grad():
            success = model(x_adv).argmax(1) != y
        return AttackResult(x_adv, success, torch.full((len(x),), float("nan")))

    monkeypatch.setitem(ATTACKS._items, "budget_blind",
                        AttackSpec("budget_blind", budget_blind, "white-box"))
    x, y = digits.x_test[:16], digits.y_test[:16]
    ids, cheap = torch.arange(16), LEVEL_SETTINGS["cheap"]

    def check(model, attacks):
        return _eps0_check(model, x, y, ids, Norm.LINF, plan(attacks=attacks), cheap)

    assert "every attack's own pipeline" in reports["sl"].checks["eps0_not_clean/Linf"][
        "detail"] and not reports["sl"].checks["eps0_not_clean/Linf"]["flag"]
    assert not check(sl_model, ("pgd", "fgsm", "square"))["flag"]
    bad = check(sl_model, ("pgd", "budget_blind"))
    assert bad["flag"] and "['budget_blind']" in bad["detail"]
    torch.manual_seed(0)
    assert check(Noisy(sl_model), ("pgd",))["flag"]


def test_a_weak_attack_is_an_attack_finding_not_masking(digits, sl_model):
    """PGD of 3 short steps is not converged on a plain SL model: reported as
    attack_not_converged (with the budget and the steps that converge), kept out of
    masking_suspected, and the stronger attack's rows and per-example masks are there
    for the evaluation (the old report folded it into masking_suspected)."""
    x, y = digits.x_test[:N], digits.y_test[:N]
    p = plan(grids={"linf": ["0", "0.1"]}, attack_params={"pgd": {"steps": 3,
                                                                   "step_size": 0.2}})
    rep = run_diagnostics(sl_model, x, y, p, level="cheap")
    c = rep.checks["attack_not_converged/Linf"]
    assert c["flag"] and c["kind"] == "attack" and rep.attack_not_converged
    assert "attack not converged at budget eps 0.1 (use >= 12 steps x 1 restarts" in c["detail"]
    masking = [k for k in rep.flagged if rep.checks[k]["kind"] == "masking"]
    assert rep.masking_suspected == bool(masking)
    assert "attack_not_converged/Linf" not in masking
    row = next(r for r in rep.attack_rows if r["attack"] == "diag:pgd-12x1")
    assert row["eps"] == 0.1 and row["robust_acc"] == c["value"] < c["reference"]
    ids, success = rep.success[("diag:pgd-12x1", "Linf", "0.1")]
    assert torch.equal(ids, torch.arange(N)) and success.float().mean() == 1 - row["robust_acc"]
    assert {r["kind"] for r in rep.rows()} == {"masking", "attack"}


def test_estimate_and_progress_are_logged_before_and_during(digits, sl_model, caplog):
    import logging

    x, y = digits.x_test[:16], digits.y_test[:16]
    with caplog.at_level(logging.INFO, logger="aerl_ray.diagnostics"):
        rep = run_diagnostics(sl_model, x, y, plan(grids={"linf": ["0", "0.1"]}), n=16)
    lines = [r.getMessage() for r in caplog.records if r.name == "aerl_ray.diagnostics"]
    assert "example-passes" in lines[0] and "estimated" in lines[0]
    progress = [m for m in lines if " done; " in m]
    assert len(progress) >= 8 and progress[-1].startswith("diagnostics (cheap) ")
    assert rep.estimate_seconds > 0
