import json

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings, strategies as st

from aerl_ray import results as R
from aerl_ray.front import search_front
from aerl_ray.stats import DOMINATED, FRONT, TIED, front_status, pareto_mask, seed_interval


def test_pareto_mask_any_number_of_objectives():
    pts = np.array([[0.9, 0.1, 0.5], [0.8, 0.2, 0.5], [0.7, 0.1, 0.4],  # 3rd dominated by 1st
                    [0.9, 0.1, 0.5], [np.nan, 1.0, 1.0], [0.1, 0.9, 0.9]])
    assert R.pareto_mask(pts).tolist() == [True, True, False, True, False, True]
    assert R.pareto_mask(np.zeros((0, 2))).tolist() == []


def test_search_front_respects_directions_and_status():
    df = pd.DataFrame({"trial_id": list("abcd"), "status": ["COMPLETE", "COMPLETE", "FAILED",
                                                           "COMPLETE"],
                       "regime": ["sl"] * 4,
                       "obj_acc": [0.9, 0.8, 0.99, 0.85], "obj_cost": [10.0, 5.0, 1.0, 20.0]})
    front = search_front(df, [{"name": "acc", "direction": "max"},
                              {"name": "cost", "direction": "min"}])
    assert set(front[front["on_front"]]["trial_id"]) == {"a", "b"}  # c failed; d dominated
    assert "c" not in set(front["trial_id"])
    assert search_front(df[df.status == "FAILED"], [{"name": "acc"}, {"name": "cost"}]).empty


def test_front_status_reads_intervals():
    # b is dominated by a on the point estimates, but only within the noise: tied
    # c is dominated by a beyond the noise; d trades off with a beyond the noise
    pts = [[0.90, 0.50], [0.88, 0.49], [0.60, 0.20], [0.50, 0.90]]
    half = [[0.03, 0.05], [0.03, 0.05], [0.03, 0.05], [0.03, 0.05]]
    status, dom, ties = front_status(pts, half)
    assert status == [FRONT, TIED, DOMINATED, FRONT]
    assert ties[1] == [0] and dom[2] == [0, 1]
    # without noise, b is simply dominated
    assert front_status(pts)[0][1] == DOMINATED


def test_two_front_members_inside_each_others_noise_are_tied():
    status, _, ties = front_status([[0.90, 0.50], [0.89, 0.51]], [[0.05, 0.05]] * 2)
    assert status == [TIED, TIED] and ties == [[1], [0]]


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.floats(0, 1), st.floats(0, 1)), min_size=1, max_size=12),
       st.floats(0, 0.2))
def test_front_status_properties(points, h):
    pts = np.array(points)
    half = np.full_like(pts, h)
    status, dom, ties = front_status(pts, half)
    on = pareto_mask(pts)
    for i, s in enumerate(status):
        # a point-front member is never shown as dominated; a dominated one never as front
        assert not (on[i] and s == DOMINATED)
        assert not (not on[i] and s == FRONT)
        # "dominated" is backed by a dominator that beats it beyond the noise
        for j in dom[i]:
            d = pts[j] - pts[i]
            assert (d >= 0).all() and (d > np.sqrt(2) * h).any()
    # zero noise: the statuses are exactly the point front
    s0, _, _ = front_status(pts)
    assert [x != DOMINATED for x in s0] == [bool(v) for v in on] or len(set(map(tuple, pts))) < len(pts)


def test_seed_interval():
    m, lo, hi = seed_interval([0.5, 0.6, 0.7])
    assert m == pytest.approx(0.6) and lo < 0.6 < hi
    assert hi - lo == pytest.approx(2 * 4.302653 * 0.1 / np.sqrt(3), rel=1e-5)
    m1, lo1, _ = seed_interval([0.5])
    assert m1 == 0.5 and np.isnan(lo1)


def test_append_and_read_dedupes_by_key_and_compacts(tmp_path):
    t = tmp_path / "evals.parquet"
    row = {"run_id": "r", "trial_id": "1", "checkpoint": "c", "split": "val", "attack": "pgd",
           "norm": "Linf", "eps": 0.1, "robust_acc": 0.5}
    R.append_rows(t, [row], R.EVALS)
    R.append_rows(t, [{**row, "robust_acc": 0.4}], R.EVALS)  # a retried evaluation
    df = R.read_table(t, key=R.EVAL_KEY)
    assert len(df) == 1 and df["robust_acc"].iloc[0] == 0.4
    assert len(pd.read_parquet(t)) == 2  # the directory reads as one table
    assert R.compact_table(t, R.EVALS) == 1
    raw = pd.read_parquet(t)
    assert len(raw) == 1 and raw["robust_acc"].iloc[0] == 0.4
    assert len(list(t.glob("part-*.parquet"))) == 1


def test_every_part_has_the_full_schema(tmp_path):
    """A column that only a later part fills (p_explore_eps of an RL trial) must be in the
    table a plain pandas.read_parquet returns, however the parts are ordered."""
    table = R.trials_table(["clean_acc"], {"regime": R.STR, "explore_eps": R.F64})
    d = tmp_path / "trials.parquet"
    R.append_rows(d, [{"run_id": "r", "trial_id": "t0", "status": "COMPLETE",
                       "p_regime": "sl"}], table)
    R.append_rows(d, [{"run_id": "r", "trial_id": "t1", "status": "COMPLETE",
                       "p_regime": "rl", "p_explore_eps": 0.1}], table)
    raw = pd.read_parquet(d)
    assert "p_explore_eps" in raw and raw["p_explore_eps"].tolist()[1] == 0.1
    assert set(table.columns) == set(raw.columns)
    with pytest.raises(ValueError, match="schema lacks"):
        R.append_rows(d, [{"run_id": "r", "trial_id": "t2", "typo_column": 1}], table)


def test_compact_keeps_filtered_rows_and_is_crash_safe(tmp_path):
    d = tmp_path / "epochs.parquet"
    for e in range(3):
        R.append_rows(d, [{"run_id": "r", "trial_id": "t0", "epoch": e, "val_acc": e / 10}],
                      R.EPOCHS)
    R.compact_table(d, R.EPOCHS, keep=lambda df: df["epoch"] <= 1)
    assert sorted(pd.read_parquet(d)["epoch"]) == [0, 1]


def test_wilson_interval():
    lo, hi = R.wilson_interval(50, 100)
    assert 0.40 < lo < 0.41 and 0.59 < hi < 0.60
    assert R.wilson_interval(0, 10)[0] == 0.0


def test_write_json_atomic(tmp_path):
    p = tmp_path / "x.json"
    R.write_json_atomic(p, {"a": 1})
    assert json.loads(p.read_text()) == {"a": 1}
    assert not list(tmp_path.glob(".*.tmp"))


def test_read_while_a_compaction_removes_parts(tmp_path, monkeypatch):
    """A reader racing a compaction (a part listed, then removed before it is read) reads
    again instead of failing."""
    d = tmp_path / "t.parquet"
    R.append_rows(d, [{"trial_id": "t0", "x": 1}])
    R.append_rows(d, [{"trial_id": "t1", "x": 2}])
    real, calls = pd.read_parquet, []

    def flaky(path, *a, **k):
        calls.append(path)
        if len(calls) == 1:
            raise FileNotFoundError(path)
        return real(path, *a, **k)

    monkeypatch.setattr(pd, "read_parquet", flaky)
    assert sorted(R.read_table(d)["trial_id"]) == ["t0", "t1"] and len(calls) == 3
