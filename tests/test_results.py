import numpy as np
import pandas as pd

from aerl_ray import results as R
from aerl_ray.recorder import pareto_front


def test_pareto_mask_any_number_of_objectives():
    pts = np.array([[0.9, 0.1, 0.5], [0.8, 0.2, 0.5], [0.7, 0.1, 0.4],  # 3rd dominated by 1st
                    [0.9, 0.1, 0.5], [np.nan, 1.0, 1.0], [0.1, 0.9, 0.9]])
    assert R.pareto_mask(pts).tolist() == [True, True, False, True, False, True]
    assert R.pareto_mask(np.zeros((0, 2))).tolist() == []


def test_pareto_front_respects_directions_and_status():
    df = pd.DataFrame({"trial_id": list("abcd"), "status": ["COMPLETE", "COMPLETE", "FAILED",
                                                           "COMPLETE"],
                       "obj_acc": [0.9, 0.8, 0.99, 0.85], "obj_cost": [10.0, 5.0, 1.0, 20.0]})
    front = pareto_front(df, [{"name": "acc", "direction": "max"},
                              {"name": "cost", "direction": "min"}])
    assert list(front["trial_id"]) == ["a", "b"]  # c failed; d dominated by a


def test_append_and_read_dedupes_by_key(tmp_path):
    t = tmp_path / "evals.parquet"
    R.append_rows(t, [{"run_id": "r", "trial_id": "1", "checkpoint": "c", "attack": "pgd",
                       "norm": "Linf", "eps": 0.1, "robust_acc": 0.5}])
    R.append_rows(t, [{"run_id": "r", "trial_id": "1", "checkpoint": "c", "attack": "pgd",
                       "norm": "Linf", "eps": 0.1, "robust_acc": 0.4}])  # a retried evaluation
    df = R.read_table(t, key=R.EVAL_KEY)
    assert len(df) == 1 and df["robust_acc"].iloc[0] == 0.4
    assert len(pd.read_parquet(t)) == 2  # the directory reads as one table


def test_wilson_interval():
    lo, hi = R.wilson_interval(50, 100)
    assert 0.40 < lo < 0.41 and 0.59 < hi < 0.60
    assert R.wilson_interval(0, 10)[0] == 0.0
