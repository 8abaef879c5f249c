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
    # the searched PGD curve says how far it may be from separate runs, FGSM's exact curve
    # 0, an attack without a curve nothing
    assert all(0.0 <= r["curve_disagreement"] <= 0.2 for r in pgd_rows.values()), pgd_rows
    assert all(r["curve_disagreement"] == 0.0 for r in rows if r["attack"] == "fgsm")
    assert all(r["curve_disagreement"] != r["curve_disagreement"]  # NaN
               for r in rows if r["attack"] == "square")
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


def test_cli_refuses_files_that_are_not_checkpoints(tmp_path, capsys, sl_checkpoint):
    """Exit 2 with a message naming the problem, never a raw KeyError/IndexError."""
    import os

    (tmp_path / "random.pt").write_bytes(os.urandom(4096))
    torch.save({"weights": torch.zeros(3)}, tmp_path / "foreign.pt")  # a valid archive
    torch.save({"format": "aerl_ray.checkpoint/1", "config": {}}, tmp_path / "partial.pt")
    cases = {"random.pt": "could not load", "foreign.pt": "is not an aerl_ray checkpoint",
             "partial.pt": "damaged aerl_ray checkpoint"}
    for name, match in cases.items():
        assert main([str(tmp_path / name), "--n", "8"]) == 2, name
        err = capsys.readouterr().err
        assert match in err and "Traceback" not in err, (name, err)
    assert main([str(tmp_path), "--n", "8"]) == 2
    assert "is a directory, not a checkpoint file" in capsys.readouterr().err


def test_every_attack_of_a_table_on_the_same_images_and_worst_case(sl_checkpoint):
    """AutoAttack runs on the same n images as PGD (at its own budgets only), and the
    worst-case row counts an example robust only if no attack broke it."""
    from aerl_ray.evaluate import worst_case

    plan = small_plan(attacks=("pgd", "fgsm", "autoattack"), n=24,
                      autoattack_version="custom", autoattack_attacks=("apgd-ce",),
                      attack_grids={"autoattack": {"linf": ["0.1"]}})
    import dataclasses

    assert dataclasses.replace(plan, seed=3).attack_grids == plan.attack_grids  # re-validated
    rows, _ = evaluate_checkpoint(sl_checkpoint, plan)
    assert {r["n"] for r in rows} == {24}
    aa = [r for r in rows if r["attack"] == "autoattack"]
    assert [r["eps_str"] for r in aa] == ["0.1"]
    wc = {r["eps_str"]: r for r in rows if r["attack"] == "worst_case"}
    for e, r in wc.items():
        at = [x["robust_acc"] for x in rows if x["eps_str"] == e and x["attack"] != "worst_case"]
        assert r["robust_acc"] <= min(at)
    assert json.loads(wc["0.1"]["params"])["attacks"] == ["autoattack", "fgsm", "pgd"]
    # per example, not a minimum of accuracies: two attacks breaking different examples
    a = torch.tensor([True, False, False, False])
    b = torch.tensor([False, True, False, False])
    s, used = worst_case({"x": {0.1: a}, "y": {0.1: b}}, 0.1)
    assert s.tolist() == [True, True, False, False] and sorted(used) == ["x", "y"]
    # an attack's break at a smaller budget counts at every larger one
    s, _ = worst_case({"x": {0.05: a, 0.1: a}, "y": {0.2: b}}, 0.2)
    assert s.tolist() == [True, True, False, False]
    assert worst_case({"y": {0.2: b}}, 0.1) is None
