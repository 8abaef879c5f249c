"""evaluate_checkpoint / EvalPlan / CLI: rows follow the schemas, errors come early."""
from __future__ import annotations

import json

import pytest
import torch

from aerl_ray.attacks import AttackInputError
from aerl_ray.checkpoint import CheckpointError
from aerl_ray.evaluate import EvalPlan, EvalPlanError, Evaluator, evaluate_checkpoint, main
from aerl_ray.results import EVAL_COLUMNS, INDICATOR_COLUMNS, read_table
from tests.attack_fixtures import *  # noqa: F401,F403  (fixtures)

GRID = {"linf": ["0", "4/255", "0.1", "0.3"]}




def small_plan(**kw) -> EvalPlan:
    base = dict(attacks=("pgd", "fgsm"), grids=GRID, n=40, indicator_steps=5,
                attack_params={"pgd": {"steps": 10}})
    return EvalPlan(**{**base, **kw})


def test_rows_follow_the_schema(sl_checkpoint, sl_checkpoint_b):
    plan = small_plan(attacks=("pgd", "fgsm", "transfer", "square"),
                      transfer_source=str(sl_checkpoint_b),
                      attack_params={"pgd": {"steps": 10}, "transfer": {"steps": 5},
                                     "square": {"n_queries": 30, "resc_schedule": True}})
    rows, ind = evaluate_checkpoint(sl_checkpoint, plan, run_id="r1", trial_id="t1")
    assert len(rows) == 5 * len(GRID["linf"])  # 4 attacks + the per-example worst case
    assert {r["split"] for r in rows} == {"test"} and {r["phase"] for r in rows} == {"evaluate"}
    for r in rows:
        assert set(r) == set(EVAL_COLUMNS)
        assert r["ci_low"] <= r["robust_acc"] <= r["ci_high"]
        assert r["n"] == 40 and r["model"] == "cnn4" and r["dataset"] == "digits"
        assert isinstance(json.loads(r["flags"]), list)
    for attack in {r["attack"] for r in rows}:
        accs = [r["robust_acc"] for r in rows if r["attack"] == attack]
        assert accs == sorted(accs, reverse=True)
        assert accs[0] == rows[0]["clean_acc"]
    assert {r["attack"] for r in rows} >= {"pgd", "fgsm", "square"}
    assert any(r["attack"].startswith("transfer:") for r in rows)
    pgd_rows = {r["eps_str"]: r for r in rows if r["attack"] == "pgd"}
    assert pgd_rows["0.3"]["robust_acc"] <= 0.05  # an SL model falls at a large budget
    assert ind and all(set(r) == set(INDICATOR_COLUMNS) for r in ind)
    names = {r["indicator"] for r in ind if r["step"] == -1}
    assert {"agn", "cos_prev", "sign_consistency", "dispersion", "mean_dir_dispersion",
            "frac_small_grad_start", "frac_nonfinite_grad", "entropy_clean",
            "entropy_adv"} <= names


def test_cli_prints_table_and_writes_parquet(sl_checkpoint, tmp_path, capsys):
    out = tmp_path / "eval"
    rc = main([str(sl_checkpoint), "--attacks", "pgd", "--norm", "linf", "--eps",
               "0,2/255,0.2", "--n", "30", "--steps", "5", "--out", str(out),
               "--indicator-steps", "3", "--landscape"])
    assert rc == 0
    text = capsys.readouterr().out
    assert "eps=2/255" in text and "pgd" in text and "[" in text
    df = read_table(out / "evals.parquet")
    assert len(df) == 3 and list(df["eps_str"]) == ["0", "2/255", "0.2"]
    assert len(read_table(out / "indicators.parquet")) > 0
    assert list(out.glob("landscape_*.png"))


def test_evaluator_shares_the_transfer_cache(sl_checkpoint, sl_checkpoint_b):
    ev = Evaluator()
    plan = small_plan(attacks=("transfer",), transfer_source=str(sl_checkpoint_b),
                      attack_params={"transfer": {"steps": 3}}, indicators=False, n=20)
    rows1, _ = ev.evaluate(str(sl_checkpoint), plan)
    misses = ev.cache.misses
    rows2, _ = ev.evaluate(str(sl_checkpoint_b), plan)  # another target, same source
    assert ev.cache.misses == misses and ev.cache.hits >= misses
    assert rows1[0]["attack"] == rows2[0]["attack"] == f"transfer:{sl_checkpoint_b.parent.name}/best"
    assert rows2[-1]["checkpoint"] == str(sl_checkpoint_b)


# --- bad input ------------------------------------------------------------------------------
@pytest.mark.parametrize("kw,match", [
    (dict(attacks=("pgd", "nope")), "known attacks: .*autoattack"),
    (dict(grids={"l1": ["0"]}), "known norms"),
    (dict(grids={"linf": ["0", "-1/255"]}), ">= 0"),
    (dict(grids={"linf": ["0", "8/255", "2/255"]}), "sorted"),
    (dict(attacks=("transfer",)), "--transfer-source"),
    (dict(attack_params={"pgd": {"stepz": 1}}), "no parameter"),
    (dict(attacks=("autoattack",), autoattack_version="custom"), "attack list"),
    (dict(n=-1), "n=-1"),
])
def test_plan_validation(kw, match):
    with pytest.raises(EvalPlanError, match=match):
        small_plan(**kw)


def test_errors_before_attacking(sl_checkpoint, tiny_model, digits, tmp_path, capsys):
    with pytest.raises(EvalPlanError, match="larger than the test split"):
        evaluate_checkpoint(sl_checkpoint, small_plan(n=10_000))
    with pytest.raises(CheckpointError, match="cnn4.*not 'cnn6'"):
        evaluate_checkpoint(sl_checkpoint, small_plan(model="cnn6"))

    class Probs(torch.nn.Module):
        def forward(self, x):
            return tiny_model(x).softmax(1)

    with pytest.raises(AttackInputError, match="probabilities"):
        evaluate_checkpoint(Probs(), small_plan(), data=(digits.x_test, digits.y_test))
    with pytest.raises(EvalPlanError, match="transfer source"):
        evaluate_checkpoint(sl_checkpoint, small_plan(attacks=("transfer",),
                                                      transfer_source=str(tmp_path / "x.pt")))
    assert main([str(sl_checkpoint), "--attacks", "pgd,bogus"]) == 2
    assert "known attacks" in capsys.readouterr().err
    assert main([str(sl_checkpoint), "--attacks", "transfer"]) == 2
    assert "--transfer-source" in capsys.readouterr().err
