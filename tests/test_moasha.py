"""MOASHA: the issue's properties (hypothesis), promote mode, records/restart, errors.

Properties, as made precise in aerl_ray/moasha.py's docstring:
- a trial that dominates every trial at its rung is never stopped there;
- with one metric, decisions equal Ray's ASHA on the same stream of results;
- decisions of trials arriving at the same time (one batch) do not depend on their order,
  and a decision depends on the set of earlier values at the rung, not on their order;
- a continuing trial is among the top ceil(n/eta) of the n trials at its rung then, so a
  batch of n arrivals on an empty rung lets at most ceil(n/eta) continue (stop mode).
"""
from __future__ import annotations

import copy
import json
import math
import warnings

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from ray.tune.experiment import Trial
from ray.tune.schedulers import AsyncHyperBandScheduler

from aerl_ray.moasha import MOASHA, DecisionLog
from tests.moasha_fixtures import FakeController, FakeTrial, result

SETTINGS = settings(max_examples=80, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow])
acc = st.floats(0.0, 1.0, allow_nan=False).map(lambda v: round(v, 2))  # ties are common
etas = st.sampled_from([2, 3, 4, 1.5])


def decide(sched, values_by_trial, t=1, metrics=("a", "b")):
    """Stream ``values_by_trial`` (list of tuples) to one rung; returns the actions."""
    out = []
    for i, vals in enumerate(values_by_trial):
        out.append(sched.on_trial_result(None, FakeTrial(i), result(t, dict(zip(metrics, vals)))))
    return out


def dominates(a, b):
    return all(x >= y for x, y in zip(a, b)) and any(x > y for x, y in zip(a, b))


# --- with one metric: Ray's ASHA ------------------------------------------------------------
@st.composite
def streams(draw):
    n = draw(st.integers(1, 10))
    events = draw(st.lists(st.tuples(st.integers(0, n - 1), st.sampled_from([1, 1, 1, 2]),
                                     acc, st.booleans()), min_size=1, max_size=60))
    return dict(eta=draw(etas), grace=draw(st.sampled_from([1, 2, 3])),
                max_t=draw(st.integers(3, 30)), mode=draw(st.sampled_from(["max", "min"])),
                n=n, events=events)


@SETTINGS
@given(streams())
def test_one_metric_decisions_equal_ray_asha(s):
    ray_s = AsyncHyperBandScheduler(metric="m", mode=s["mode"], grace_period=s["grace"],
                                    reduction_factor=s["eta"], max_t=s["max_t"])
    mo = MOASHA(["m"], [s["mode"]], grace_period=s["grace"], reduction_factor=s["eta"],
                max_t=s["max_t"])
    trials = [FakeTrial(i) for i in range(s["n"])]
    for t in trials:
        ray_s.on_trial_add(None, t)
        mo.on_trial_add(None, t)
    it, done = [0] * s["n"], set()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        for i, step, value, ends in s["events"]:
            if i in done:
                continue
            it[i] += step
            r = result(it[i], {"m": value})
            a = ray_s.on_trial_result(None, trials[i], dict(r))
            assert mo.on_trial_result(None, trials[i], dict(r)) == a, (i, r)
            if a == "STOP" or ends:
                ray_s.on_trial_complete(None, trials[i], dict(r))
                mo.on_trial_complete(None, trials[i], dict(r))
                done.add(i)
    ray_rungs = [{k: v for k, v in rec.items()} for _, rec in ray_s._brackets[0]._rungs]
    op = 1.0 if s["mode"] == "max" else -1.0
    mo_rungs = [{k: op * o.values[0] for k, o in rec.items()} for _, rec in mo._rungs]
    assert mo_rungs == ray_rungs


def test_one_metric_inherits_rays_interpolated_cutoff_and_two_metrics_do_not():
    """eta=3: 0, 10, then 7 >= 6.67 continues under Ray's rule; rank rule: 7 is 2nd of 3."""
    one = MOASHA(["a"], ["max"], reduction_factor=3, max_t=9)
    assert decide(one, [(0,), (10,), (7,)], metrics=("a",)) == ["CONTINUE"] * 3
    two = MOASHA(["a", "b"], ["max", "max"], reduction_factor=3, max_t=9)
    assert decide(two, [(0, 0), (10, 10), (7, 7)]) == ["CONTINUE", "CONTINUE", "STOP"]


# --- dominators -----------------------------------------------------------------------------
@st.composite
def rung_streams(draw, dims=(2, 3)):
    d = draw(st.sampled_from(dims))
    vals = draw(st.lists(st.tuples(*[acc] * d), min_size=1, max_size=14))
    return d, vals, draw(etas), draw(st.booleans())


@SETTINGS
@given(rung_streams())
def test_a_trial_dominating_its_rung_is_never_stopped_there(s):
    d, vals, eta, noise = s
    metrics = tuple("abc"[:d])
    for mode in ("stop", "promote"):
        sched = MOASHA(metrics, ["max"] * d, reduction_factor=eta, max_t=10, mode=mode,
                       noise_aware=noise)
        for i, v in enumerate(vals):
            r = result(1, dict(zip(metrics, v)), checkpoint=True,
                       **({f"{m}_n": 50 for m in metrics} if noise else {}))
            a = sched.on_trial_result(None, FakeTrial(i), r)
            if all(dominates(v, w) for w in vals[:i]):
                assert a != "STOP", (mode, i, v, vals[:i])


# --- at most ceil(n/eta) continue -----------------------------------------------------------
@SETTINGS
@given(rung_streams())
def test_a_continuing_trial_is_in_the_top_ceil_n_over_eta_of_its_rung(s):
    d, vals, eta, _ = s
    metrics = tuple("abc"[:d])
    sched = MOASHA(metrics, ["max"] * d, reduction_factor=eta, max_t=10)
    for i, (v, a) in enumerate(zip(vals, decide(sched, vals, metrics=metrics))):
        n = i + 1
        if a == "CONTINUE" and i > 0:
            assert sched.records()[i]["rank"] <= math.ceil(n / eta)
            # independent of the ranking code: fewer than ceil(n/eta) trials dominate it
            assert sum(dominates(w, v) for w in vals[:i]) < math.ceil(n / eta)


@SETTINGS
@given(st.lists(st.tuples(acc, acc), min_size=1, max_size=14, unique=True), etas)
def test_a_batch_on_an_empty_rung_lets_at_most_ceil_n_over_eta_continue(vals, eta):
    sched = MOASHA(["a", "b"], ["max", "max"], reduction_factor=eta, max_t=10)
    items = [(FakeTrial(i), result(1, {"a": a, "b": b})) for i, (a, b) in enumerate(vals)]
    actions = sched.on_trial_results(None, items)
    assert actions.count("CONTINUE") <= max(1, math.ceil(len(vals) / eta))


@SETTINGS
@given(st.lists(acc, min_size=2, max_size=14, unique=True))
def test_one_metric_eta_2_bound_holds_per_decision(vals):
    sched = MOASHA(["a"], ["max"], reduction_factor=2, max_t=10)
    for i, a in enumerate(decide(sched, [(v,) for v in vals], metrics=("a",))):
        if a == "CONTINUE":
            assert sum(w > vals[i] for w in vals[:i]) < math.ceil((i + 1) / 2)


# --- order independence ---------------------------------------------------------------------
@SETTINGS
@given(st.sampled_from([1, 2, 3]), st.lists(st.tuples(acc, acc, acc), max_size=6),
       st.lists(st.tuples(acc, acc, acc), min_size=1, max_size=8), etas, st.booleans(),
       st.randoms(use_true_random=False))
def test_decisions_do_not_depend_on_the_order_of_a_batch(d, before, batch, eta, noise, rnd):
    metrics = ("a", "b", "c")[:d]

    def run(order):
        sched = MOASHA(metrics, ["max"] * d, reduction_factor=eta, max_t=10,
                       noise_aware=noise)
        decide(sched, [v[:d] for v in before], metrics=metrics)
        items = [(FakeTrial(f"b{i}"), result(1, dict(zip(metrics, batch[i][:d])),
                                             **{f"{m}_n": 40 for m in metrics}))
                 for i in order]
        acts = dict(zip((f"b{i}" for i in order), sched.on_trial_results(None, items)))
        recs = [{k: v for k, v in r.items() if k != "seq"} for r in sched.records()]
        return acts, recs

    order = list(range(len(batch)))
    shuffled = order[:]
    rnd.shuffle(shuffled)
    assert run(order) == run(shuffled)


@pytest.mark.parametrize("metrics", [("a",), ("a", "b")])
def test_a_batch_is_decided_as_if_each_arrived_last(metrics):
    def run(vals):
        sched = MOASHA(metrics, ["max"] * len(metrics), reduction_factor=2, max_t=10)
        items = [(FakeTrial(f"x{v}"), result(1, {m: v for m in metrics})) for v in vals]
        return dict(zip((t.trial_id for t, _ in items), sched.on_trial_results(None, items)))

    assert run([0.1, 0.9]) == run([0.9, 0.1]) == {"x0.1": "STOP", "x0.9": "CONTINUE"}


@SETTINGS
@given(st.lists(st.tuples(acc, acc), min_size=1, max_size=8), st.tuples(acc, acc), etas,
       st.randoms(use_true_random=False))
def test_a_decision_depends_on_the_earlier_values_not_their_order(before, last, eta, rnd):
    def run(vals):
        sched = MOASHA(["a", "b"], ["max", "max"], reduction_factor=eta, max_t=10)
        decide(sched, vals)
        return sched.on_trial_result(None, FakeTrial("last"), result(1, dict(zip("ab", last))))

    shuffled = before[:]
    rnd.shuffle(shuffled)
    assert run(before) == run(shuffled)


# --- records, restart, trial keys -----------------------------------------------------------
@SETTINGS
@given(st.lists(st.tuples(st.integers(0, 5), st.tuples(acc, acc)), min_size=2, max_size=40),
       st.integers(1, 39))
def test_rebuilding_from_records_loses_no_decision(events, cut):
    kw = dict(metrics=["a", "b"], modes=["max", "min"], reduction_factor=2, max_t=8)
    live = MOASHA(**kw)
    it = [0] * 6

    def feed(sched, i, vals, t):
        return sched.on_trial_result(None, FakeTrial(i), result(t, dict(zip("ab", vals))))

    for i, vals in events[:cut]:
        it[i] += 1
        feed(live, i, vals, it[i])
    saved = json.loads(json.dumps(live.records()))
    rebuilt = MOASHA.from_records(saved, **kw)
    assert rebuilt.records() == saved
    for i, vals in events[cut:]:
        it[i] += 1
        assert feed(rebuilt, i, vals, it[i]) == feed(live, i, vals, it[i])


def test_a_rerun_under_a_new_trial_id_keeps_its_history(tmp_path):
    log = DecisionLog(tmp_path / "moasha.jsonl")

    def key(t):  # "t001-retry" -> "t001"
        return t.trial_id.split("-")[0]

    kw = dict(metrics=["a", "b"], modes=["max", "max"], max_t=8, trial_key=key)
    s = MOASHA(on_decision=log, **kw)
    assert decide(s, [(0.9, 0.9), (0.1, 0.1)]) == ["CONTINUE", "STOP"]
    with open(log.path, "a") as f:
        f.write('{"torn": ')  # a crash mid-write
    s2 = MOASHA.from_records(log.read(), **kw)
    stopped, passed = FakeTrial("t001-retry"), FakeTrial("t000-retry")
    assert s2.on_trial_result(None, stopped, result(1, {"a": 1.0, "b": 1.0})) == "STOP"
    assert s2.on_trial_result(None, passed, result(1, {"a": 0.0, "b": 0.0})) == "CONTINUE"
    assert len(s2.records()) == 2  # nothing decided twice


def test_save_restore_round_trip_and_config_mismatch(tmp_path):
    s = MOASHA(["a", "b"], ["max", "max"], max_t=8)
    decide(s, [(0.5, 0.5), (0.2, 0.9), (0.1, 0.1)])
    s.save(str(tmp_path / "s.pkl"))
    s2 = MOASHA(["a", "b"], ["max", "max"], max_t=8)
    s2.restore(str(tmp_path / "s.pkl"))
    assert s2.records() == s.records()
    with pytest.raises(ValueError, match="same arguments"):
        MOASHA(["a", "b"], ["max", "max"], max_t=16).restore(str(tmp_path / "s.pkl"))


def test_records_say_who_dominates_and_why():
    s = MOASHA(["clean", "robust"], ["max", "max"], max_t=8)
    decide(s, [(0.9, 0.5), (0.8, 0.4)], metrics=("clean", "robust"))
    rec = s.records()[-1]
    assert rec["decision"] == "stop" and rec["dominated_by"] == ["t000"]
    assert rec["values"] == {"clean": 0.8, "robust": 0.4} and rec["rung"] == 1
    assert "rank 2 of 2" in rec["reason"] and "t000" in rec["reason"]
    json.dumps(s.records())


# --- missing values, noise ------------------------------------------------------------------
def test_nan_or_missing_metric_ranks_worst_and_no_metric_is_no_observation():
    s = MOASHA(["a", "b"], ["max", "max"], max_t=8)
    assert decide(s, [(0.1, 0.1), (0.9, float("nan"))]) == ["CONTINUE", "STOP"]
    assert s.on_trial_result(None, FakeTrial(5), result(1, {"a": 0.95})) == "STOP"
    assert s.on_trial_result(None, FakeTrial(6), result(1, {"loss": 3})) == "CONTINUE"
    assert s.on_trial_result(None, FakeTrial(6), result(8, {})) == "STOP"  # max_t
    assert len(s.records()) == 3


def test_noise_aware_stops_only_beyond_the_wilson_intervals():
    vals = [(0.60, 0.60), (0.50, 0.55)]
    plain = MOASHA(["a", "b"], ["max", "max"], max_t=8)
    assert decide(plain, vals) == ["CONTINUE", "STOP"]
    for n, expected in ((20, "CONTINUE"), (5000, "STOP")):
        noisy = MOASHA(["a", "b"], ["max", "max"], max_t=8, noise_aware=True)
        acts = [noisy.on_trial_result(None, FakeTrial(i),
                                      result(1, dict(zip("ab", v)), a_n=n, b_n=n))
                for i, v in enumerate(vals)]
        assert acts == ["CONTINUE", expected], n


# --- promote mode ---------------------------------------------------------------------------
def _promote_run(values, eta=2, checkpoint=True, finished=True):
    trials = [FakeTrial(i, Trial.PENDING) for i in range(len(values))]
    ctl = FakeController(trials, finished=finished)
    s = MOASHA(["a", "b"], ["max", "max"], max_t=4, reduction_factor=eta, mode="promote")
    ctl.scheduler = s
    acts = {}
    for t, v in zip(trials, values):
        t.status = Trial.RUNNING
        acts[t.trial_id] = s.on_trial_result(ctl, t, result(1, dict(zip("ab", v)),
                                                            checkpoint=checkpoint))
        t.status = {"PAUSE": Trial.PAUSED, "STOP": Trial.TERMINATED}.get(
            acts[t.trial_id], Trial.RUNNING)
    return s, ctl, trials, acts


def test_promote_mode_pauses_then_promotes_when_in_the_top_floor_n_over_eta():
    s, ctl, trials, acts = _promote_run([(0.3, 0.3), (0.1, 0.1), (0.2, 0.2), (0.05, 0.05)])
    assert acts == {"t000": "PAUSE", "t001": "PAUSE", "t002": "PAUSE", "t003": "PAUSE"}
    # n=4, floor(4/2)=2: the two best (t000, t002) are promoted, best first
    assert s.choose_trial_to_run(ctl) is trials[0]
    trials[0].status = Trial.PENDING  # the controller stages it
    assert s.choose_trial_to_run(ctl) is trials[2]
    trials[2].status = Trial.PENDING
    assert s.choose_trial_to_run(ctl) is trials[0]  # pending: nothing else promotable
    decisions = [(r["key"], r["decision"]) for r in s.records()]
    assert decisions[-2:] == [("t000", "promote"), ("t002", "promote")]


def test_promote_mode_closes_a_rung_when_nothing_can_reach_it():
    s2, ctl2, trials2, acts = _promote_run([(0.3, 0.3), (0.1, 0.1)], eta=3)
    assert set(acts.values()) == {"PAUSE"}
    # floor(2/3)=0: nobody promotable; nothing runs and the searcher is done: close
    chosen = s2.choose_trial_to_run(ctl2)
    assert chosen is trials2[0] and ctl2.stopped == ["t001"]
    assert [r["decision"] for r in s2.records()][-2:] == ["promote", "stop"]


def test_promote_mode_never_hangs_when_the_searcher_is_blocked():
    s, ctl, trials, _ = _promote_run([(0.3, 0.3), (0.1, 0.1)], eta=3, finished=False)
    assert s.choose_trial_to_run(ctl) is trials[0] and ctl.stopped == []


def test_promote_mode_without_a_checkpoint_falls_back_to_stop_mode():
    s, ctl, trials, acts = _promote_run([(0.3, 0.3), (0.1, 0.1)], checkpoint=False)
    assert acts == {"t000": "CONTINUE", "t001": "STOP"}
    assert "decided as in stop mode" in s.records()[-1]["reason"]


# --- configuration errors -------------------------------------------------------------------
@pytest.mark.parametrize("kw, match", [
    (dict(metrics=["a", "b"], modes=["max"]), "1 entries for 2 metrics"),
    (dict(metrics="a", modes=["max"]), "list of result keys"),
    (dict(metrics=[], modes=[]), "at least one"),
    (dict(metrics=["a"], modes=["up"]), "use 'max' or 'min'"),
    (dict(metrics=["a"], modes=["max"], reduction_factor=1), "must be > 1"),
    (dict(metrics=["a"], modes=["max"], grace_period=4, max_t=2), "must be >= grace_period"),
    (dict(metrics=["a"], modes=["max"], mode="halve"), "'stop'"),
    (dict(metrics=["a", "a"], modes=["max", "max"]), "duplicates"),
])
def test_bad_configuration_names_the_problem_and_the_fix(kw, match):
    with pytest.raises(ValueError, match=match):
        MOASHA(**kw)


def test_tune_config_metric_conflicts_and_rungs_match_ray():
    s = MOASHA(["a", "b"], ["max", "max"], grace_period=1, reduction_factor=2, max_t=20)
    assert s.set_search_properties(None, None) and not s.set_search_properties("a", "max")
    ray_s = AsyncHyperBandScheduler(metric="a", mode="max", grace_period=1,
                                    reduction_factor=2, max_t=20)
    assert [m for m, _ in s._rungs] == [m for m, _ in ray_s._brackets[0]._rungs]
    assert s.metric is None  # Tune's strict metric check must not demand a rung metric
    assert "MOASHA" in s.debug_string()
    copy.deepcopy(s)
    assert np.isclose(s.config.milestones()[-1], 1)


# --- end to end: a real Tuner, promote mode -------------------------------------------------
@pytest.mark.ray
def test_moasha_in_a_real_tuner_pauses_and_resumes_trials_from_their_checkpoints(
        ray_session, tmp_path):
    from ray import tune

    final = [(0.9, 0.1), (0.1, 0.9), (0.5, 0.5), (0.3, 0.3), (0.2, 0.2), (0.4, 0.1)]

    def _two_metric_trainable(config):
        """Reports clean/robust per epoch with a checkpoint; resumes from its checkpoint.

        Nested, so it is pickled by value: Ray workers cannot import test modules."""
        import os
        import tempfile

        from ray import tune

        start = 0
        ckpt = tune.get_checkpoint()
        if ckpt is not None:
            with ckpt.as_directory() as d:
                start = json.loads(open(os.path.join(d, "state.json")).read())["epoch"]
        c, r = final[config["key"]]
        for epoch in range(start + 1, 7):
            with open(config["log"], "a") as f:
                f.write(json.dumps({"key": config["key"], "epoch": epoch, "from": start}) + "\n")
            with tempfile.TemporaryDirectory() as d:
                with open(os.path.join(d, "state.json"), "w") as f:
                    json.dump({"epoch": epoch}, f)
                tune.report({"epoch": epoch, "clean": c * epoch / 6, "robust": r * epoch / 6},
                            checkpoint=tune.Checkpoint.from_directory(d))

    records: list[dict] = []
    sched = MOASHA(["clean", "robust"], ["max", "max"], grace_period=1, reduction_factor=2,
                   max_t=6, mode="promote", on_decision=records.append,
                   trial_key=lambda t: f"k{t.config['key']}")
    log = tmp_path / "epochs.jsonl"
    tuner = tune.Tuner(
        tune.with_resources(_two_metric_trainable, {"cpu": 1}),
        param_space={"key": tune.grid_search(list(range(len(final)))), "log": str(log)},
        tune_config=tune.TuneConfig(scheduler=sched, reuse_actors=False),
        run_config=tune.RunConfig(storage_path=str(tmp_path / "tune"), name="moasha",
                                  verbose=0))
    results = tuner.fit()
    assert not results.errors
    decisions = {r["decision"] for r in records}
    assert {"pause", "promote", "stop"} <= decisions, decisions
    rows = [json.loads(line) for line in log.read_text().splitlines()]
    paused_at = {r["key"]: r["rung"] for r in records if r["decision"] == "pause"}
    resumed = set()
    for key in range(len(final)):
        epochs = [r["epoch"] for r in rows if r["key"] == key]
        assert epochs == list(range(1, len(epochs) + 1)), (key, epochs)  # no gap, no rerun
        for r in rows:
            if r["key"] == key and r["from"] > 0:
                resumed.add(key)
                assert r["from"] in {rec["rung"] for rec in records
                                     if rec["key"] == f"k{key}" and rec["decision"] == "pause"}
    assert resumed, (paused_at, rows)
    for res in results:
        df = res.metrics_dataframe
        assert (df["training_iteration"] == df["epoch"]).all()  # the epoch count is intact
    ends = {res.config["key"]: int(res.metrics["epoch"]) for res in results}
    assert ends[0] == 6 and min(ends.values()) < 6  # the best runs to max_t; some stop early
    assert all(r["reason"] for r in records)


# --- the benchmark --------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.ray
def test_benchmark_smoke_runs_all_arms_and_prints_the_targets(ray_session, tmp_path):
    import importlib.util
    import sys
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "bench" / "moasha.py"
    spec = importlib.util.spec_from_file_location("bench_moasha", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules["bench_moasha"] = mod
    spec.loader.exec_module(mod)
    lines = mod.main(["--smoke", "--plot", str(tmp_path / "hv.png")])
    text = "\n".join(lines)
    for arm in ("none", "asha", "moasha"):
        assert f" {arm} " in text
    assert "target 1" in text and "target 2" in text and (tmp_path / "hv.png").stat().st_size
