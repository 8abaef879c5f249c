"""The sweep end to end through real Ray, Optuna (SQLite) and the evaluator pool."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest

from aerl_ray import results as R
from aerl_ray.sweep import SweepError, format_pareto, run_sweep

ROOT = Path(__file__).resolve().parent.parent
QUICK = ROOT / "search_spaces" / "quickstart.yaml"
pytestmark = [pytest.mark.ray, pytest.mark.slow]


def test_quickstart_smoke_end_to_end(study_of, ray_session, tmp_path):
    res = run_sweep(QUICK, tmp_path / "run", smoke=True, verbose=0)
    run = R.RunDir(res.run_dir)
    trials = R.read_table(run.trials, key=R.TRIAL_KEY)
    assert list(trials["status"]) == ["COMPLETE", "COMPLETE"]
    assert set(trials["regime"]) == {"sl", "rl"}  # the two points_to_evaluate
    # evaluation rows: every trial x attack x eps, with intervals and pass counts
    evals = R.read_table(run.evals, key=R.EVAL_KEY)
    assert set(evals["attack"]) == {"pgd", "fgsm", "autoattack", "transfer:sl_reference"}
    assert len(evals) == 2 * 4 * 4
    assert set(R.EVAL_COLUMNS) <= set(evals.columns)
    assert ((evals["ci_low"] <= evals["robust_acc"]) & (evals["robust_acc"] <= evals["ci_high"])).all()
    assert (evals[evals["eps"] > 0]["fwd_passes"] > 0).all()
    ind = R.read_table(run.indicators)
    assert {"agn", "entropy_clean"} <= set(ind["indicator"])
    # the Optuna study holds the same objective values, COMPLETE
    study = study_of(res.run_dir)
    done = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert len(done) == 2
    by_id = {t.user_attrs["tune_trial_id"]: t.values for t in done}
    for _, row in trials.iterrows():
        assert by_id[row["trial_id"]] == pytest.approx([row["obj_clean_acc"], row["obj_robust_aa"]])
        aa = evals[(evals.trial_id == row["trial_id"]) & (evals.attack == "autoattack")
                   & (evals.eps == 0.1)]
        assert float(aa["robust_acc"].iloc[0]) == pytest.approx(row["obj_robust_aa"])
    # TensorBoard event files per trial are readable and hold the training curves
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = list((run.tune).rglob("events.out.tfevents.*"))
    assert len(events) >= 2
    ea = EventAccumulator(str(events[0].parent))
    ea.Reload()
    assert "ray/tune/val_acc" in ea.Tags()["scalars"]
    assert len(ea.Scalars("ray/tune/val_acc")) >= 3
    # every trial carries masking diagnostics; the Pareto trials were re-evaluated in full
    assert set(trials["diagnostics_level"]) <= {"cheap", "full"}
    front_ids = set(res.pareto["trial_id"])
    assert front_ids and all(
        trials.set_index("trial_id").loc[t, "diagnostics_level"] == "full" for t in front_ids)
    diag = json.loads(trials["diagnostics"].iloc[0])
    assert any(k.startswith("one_step") or "fgsm" in k for k in diag), diag.keys()
    assert all({"value", "flag"} <= set(v) for v in diag.values())
    # the Pareto set is printed
    text = format_pareto(res)
    assert "obj_clean_acc" in text and len(res.pareto) >= 1


def test_bad_inputs_fail_before_trials(tmp_path):
    with pytest.raises(SweepError, match="cannot open the Optuna storage"):
        run_sweep(QUICK, tmp_path / "a", smoke=True,
                  optuna_storage="postgresql://nobody@127.0.0.1:1/none")
    with pytest.raises(SweepError, match="cannot reach the Ray cluster"):
        run_sweep(QUICK, tmp_path / "b", smoke=True, address="127.0.0.1:1")
    with pytest.raises(SweepError, match="not a sweep run dir"):
        run_sweep(resume=tmp_path)
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "sweep.json").write_text(json.dumps({
        "run_id": "x", "study_name": "x", "optuna_storage": "sqlite://",
        "space_file": str(ROOT / "search_spaces" / "other.yaml"), "space": {}}))
    with pytest.raises(SweepError, match="belongs to another sweep"):
        run_sweep(QUICK, resume=tmp_path / "c")


def _wait_for_rows(table: Path, n: int, timeout: float, proc) -> None:
    t0 = time.time()
    while time.time() - t0 < timeout:
        if table.is_dir() and len(R.read_table(table, key=R.TRIAL_KEY)) >= n:
            return
        assert proc.poll() is None, proc.stdout.read().decode()[-3000:]
        time.sleep(0.5)
    raise AssertionError(f"no trial finished within {timeout}s")


def test_killed_driver_resumes_without_losing_or_repeating_trials(study_of, ray_session, tmp_path):
    run_dir = tmp_path / "run"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "aerl_ray.sweep", "--smoke", "--num-samples", "3", "--run-dir",
         str(run_dir), "--no-report", "--num-cpus", "2"],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        start_new_session=True)
    try:
        _wait_for_rows(run_dir / "trials.parquet", 1, 240, proc)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the driver and the Ray it started
        proc.wait()
    before = R.read_table(run_dir / "trials.parquet", key=R.TRIAL_KEY)
    assert 1 <= len(before) < 3
    res = run_sweep(resume=run_dir, verbose=0)
    after = R.read_table(run_dir / "trials.parquet")
    done = after[after.status == "COMPLETE"]
    assert done["trial_id"].nunique() == 3  # none lost ...
    assert set(before["trial_id"]) <= set(done["trial_id"])  # ... finished ones kept ...
    assert len(res.trials) == 3  # ... and none repeated
    study = study_of(run_dir)
    states = [t.state for t in study.trials]
    assert optuna.trial.TrialState.RUNNING not in states  # stale rows closed
    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    # the study may hold re-issued duplicates, but never as COMPLETE
    params = [json.dumps(t.params, sort_keys=True) for t in complete]
    assert len(params) == len(set(params)) == 3


OTHER_SPACES = sorted(p for p in (ROOT / "search_spaces").glob("*.yaml") if p.stem != "quickstart")


@pytest.fixture(scope="module")
def cifar_shaped_npz(tmp_path_factory):
    """Synthetic CIFAR-shaped data (32x32x3, 10 classes): no download needed."""
    import numpy as np

    rng = np.random.default_rng(0)
    path = tmp_path_factory.mktemp("data") / "cifar_like.npz"
    y_tr, y_te = np.arange(300) % 10, np.arange(40) % 10
    # class-dependent mean colour so a model can learn something
    def imgs(y):
        base = (y[:, None, None, None] * 23 % 256).astype(np.int16)
        return np.clip(base + rng.integers(-40, 40, (len(y), 32, 32, 3)), 0, 255).astype(np.uint8)
    np.savez(path, X_train=imgs(y_tr), y_train=y_tr, X_test=imgs(y_te), y_test=y_te)
    return path


@pytest.mark.parametrize("space", OTHER_SPACES, ids=[p.stem for p in OTHER_SPACES])
def test_every_space_runs_in_smoke_mode(ray_session, tmp_path, space, cifar_shaped_npz):
    res = run_sweep(space, tmp_path / "run", smoke=True, verbose=0,
                    overrides={"fixed": {"dataset": f"npz:{cifar_shaped_npz}"}})
    assert len(res.trials) >= 1
    assert (res.trials["status"] == "COMPLETE").all(), res.trials[["status", "error"]]
    evals = R.read_table(R.RunDir(res.run_dir).evals, key=R.EVAL_KEY)
    assert set(R.EVAL_COLUMNS) <= set(evals.columns) and len(evals) > 0
