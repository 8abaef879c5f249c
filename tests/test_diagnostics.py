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

import pytest
import torch
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
        "non_monotone_eps", "not_converged", "loss_choice_matters",
        "temperature_sensitive", "vanishing_gradients")} | {"attack_flags"}


def test_pgd_at_is_more_robust_than_sl(reports):
    pgd = lambda r: r.checks["not_converged/Linf"]["reference"]  # noqa: E731
    assert pgd(reports["pgd_at"]) > pgd(reports["sl"]) + 0.2


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
    assert c["eps0_not_clean/Linf"]["flag"]  # autoattack's eps=0 row != clean accuracy
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
