"""Reliability under faults (issue 8): killed Train workers and evaluators, diverging
trials, crashes mid-write, tampered checkpoints, evaluator memory over many jobs.

A SIGKILLed sweep driver resuming with ``--resume`` is covered by
``tests/test_sweep.py::test_killed_and_interrupted_sweep_resumes_exactly``.
Processes are killed from outside (``os.kill`` on pids found through the State API or an
actor's ``info()``), so the library has no test-only hooks.
"""
from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import optuna
import pandas as pd
import pytest
import torch

from aerl_ray import results as R
from aerl_ray.front import search_front
from aerl_ray.sweep import run_sweep

ROOT = Path(__file__).resolve().parent.parent
QUICK = ROOT / "search_spaces" / "quickstart.yaml"
NO_CONFIRM = {"confirm": {"enabled": False}}
pytestmark = [pytest.mark.faults, pytest.mark.ray]


def _process_named(pid: int, word: str) -> bool:
    """Only ever kill a process of this Ray whose command line names ``word``."""
    import ray  # noqa: F401 - ray ships psutil on sys.path
    import psutil

    try:
        return word in " ".join(psutil.Process(pid).cmdline())
    except psutil.Error:
        return False


class Killer(threading.Thread):
    """Runs ``step`` (returns True when done) every ``period`` s in the background;
    keeps the first exception so the test can re-raise it."""

    def __init__(self, step, timeout: float = 240, period: float = 0.1):
        super().__init__(daemon=True)
        self.step, self.timeout, self.period = step, timeout, period
        self.done, self.error, self.info = False, None, {}
        self.stop = threading.Event()

    def run(self):
        t0 = time.time()
        try:
            while not self.stop.is_set() and time.time() - t0 < self.timeout:
                if self.step(self.info):
                    self.done = True
                    return
                time.sleep(self.period)
        except Exception as e:  # noqa: BLE001 - reported by the test
            self.error = e

    def finish(self):
        self.stop.set()
        self.join(30)
        if self.error:
            raise self.error
        assert self.done, f"the fault was never injected: {self.info}"


# --- 1. a Ray Train worker killed mid-trial ----------------------------------------------
def checkpoint_dirs(train_dirs) -> list[Path]:
    """Ray Train's persisted checkpoints (``checkpoint_<date>`` dirs), oldest first."""
    return sorted(p for d in train_dirs for p in Path(d).glob("checkpoint_*") if p.is_dir())


def test_killed_train_worker_resumes_from_last_checkpoint(ray_session, tmp_path):
    from ray._private.worker import get_dashboard_url
    from ray.util.state import list_actors

    epochs, run_dir = 8, tmp_path / "run"
    # this session's Ray (other local Ray instances make address auto-detection fail)
    dashboard = f"http://{get_dashboard_url()}"

    def kill_worker(info):
        if "pid" not in info:
            alive = list_actors(address=dashboard, detail=True, filters=[
                ("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE")])
            if alive and _process_named(alive[0].pid, "RayTrainWorker"):
                info["pid"] = alive[0].pid
            return False
        ckpts = checkpoint_dirs(run_dir.glob("tune/train/train-*"))
        if not ckpts:  # kill once the first epoch is checkpointed
            return False
        os.kill(info["pid"], signal.SIGKILL)
        info["checkpoints_at_kill"] = {p.name for p in ckpts}
        info["train_dir"] = ckpts[0].parent
        return True

    killer = Killer(kill_worker)
    killer.start()
    t0 = time.time()
    res = run_sweep(QUICK, run_dir, smoke=True, verbose=0, overrides={
        "resources": {"mode": "ray_train"}, "num_samples": 1, "fixed": {"epochs": epochs},
        "points_to_evaluate": [{"regime": "sl", "lr": 1.0e-3}], **NO_CONFIRM})
    killer.finish()
    row = res.trials.iloc[0]
    assert len(res.trials) == 1 and row["status"] == "COMPLETE", res.trials[["status", "error"]]
    # killed mid-trial: training went on and checkpointed later epochs after the kill
    train_dir = killer.info["train_dir"]
    later = {p.name for p in checkpoint_dirs([train_dir])} - killer.info["checkpoints_at_kill"]
    assert later, "the worker was killed after its last checkpoint"
    # resumed, not restarted: each epoch reported to Tune exactly once, in order
    results = [json.loads(ln) for ln in
               (run_dir / "tune" / "search-0" / f"trial_{row['trial_id']}" / "result.json")
               .read_text().splitlines()]
    reported = [r["epoch"] for r in results if not r.get("aerl_final")]
    assert reported == list(range(epochs)), reported
    latest = checkpoint_dirs([train_dir])[-1]
    from aerl_ray.train import read_metrics

    assert [m["epoch"] for m in read_metrics(latest / "metrics.jsonl")] == list(range(epochs))
    # the final report has the schema and values of a clean run
    assert set(R.TRIAL_COLUMNS) <= set(res.trials.columns)
    assert int(row["epochs_run"]) == epochs and row["error"] == ""
    assert math.isfinite(row["obj_clean_acc"]) and math.isfinite(row["obj_robust_aa"])
    evals = R.read_table(R.RunDir(run_dir).evals)
    assert not evals.duplicated(R.EVAL_KEY).any()
    plain = evals[evals.attack != "worst_case+diag"]  # (+ the cheap diagnostics' worst case)
    assert len(plain) == 5 * 4 - 3  # AA: 1 budget
    print(f"\nkilled Train worker pid {killer.info['pid']}; trial finished in "
          f"{time.time() - t0:.0f} s")


# --- 2. an evaluator actor killed mid-evaluation -----------------------------------------
def test_killed_evaluator_is_replaced_and_job_retried(ray_session, tmp_path):
    import ray

    run_dir = tmp_path / "run"

    def kill_evaluator(info):
        if "dispatcher" not in info:
            if not (run_dir / "sweep.json").is_file():
                return False
            run_id = json.loads((run_dir / "sweep.json").read_text())["run_id"]
            try:
                info["dispatcher"] = ray.get_actor(f"eval-{run_id}", namespace="aerl")
            except ValueError:
                return False
            (actor,) = ray.get(info["dispatcher"].actor_handles.remote())
            info["pid"] = ray.get(actor.info.remote())["pid"]  # idle: answers at once
            return False
        d = info["dispatcher"]
        if "killed_at" not in info:
            if ray.get(d.stats.remote())["idle"] > 0:  # no evaluation running yet
                return False
            time.sleep(0.2)  # the evaluation is under way
            assert _process_named(info["pid"], "EvaluatorActor")
            os.kill(info["pid"], signal.SIGKILL)
            info["killed_at"] = time.time()
            return False
        info["stats"] = ray.get(d.stats.remote())
        return info["stats"]["retries"] >= 1

    killer = Killer(kill_evaluator, period=0.05)
    killer.start()
    res = run_sweep(QUICK, run_dir, smoke=True, verbose=0, overrides=NO_CONFIRM)
    killer.finish()
    assert killer.info["stats"]["retries"] == 1, killer.info["stats"]
    assert list(res.trials["status"]) == ["COMPLETE", "COMPLETE"], res.trials[["status", "error"]]
    evals = pd.read_parquet(R.RunDir(run_dir).evals)  # every row ever written, no dedupe
    assert not evals.duplicated(R.EVAL_KEY).any()
    plain = evals[evals.attack != "worst_case+diag"]  # (+ the cheap diagnostics' worst case)
    assert len(plain) == 2 * 17 and plain.groupby("trial_id").size().tolist() == [17, 17]
    assert res.trials["eval_compute_seconds"].notna().all()


# --- 4. a diverging trial (and 5: resuming a finished sweep after a crash mid-write) ------
@pytest.fixture(scope="module")
def diverged_run(ray_session, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("diverged") / "run"
    t0 = time.time()
    res = run_sweep(QUICK, run_dir, smoke=True, verbose=0, overrides={
        "points_to_evaluate": [{"regime": "sl", "lr": 1.0e30},
                               {"regime": "rl", "lr": 2.0e-3, "explore_eps": 0.1}],
        **NO_CONFIRM})
    return res, run_dir, time.time() - t0


def test_diverging_trial_fails_once_with_reason_and_stays_off_the_front(study_of, diverged_run):
    res, run_dir, _ = diverged_run
    rows = R.read_table(R.RunDir(run_dir).trials)  # all rows: a retry would add one
    assert int((rows["p_lr"] > 1).sum()) == 1
    trials = R.read_table(R.RunDir(run_dir).trials, key=R.TRIAL_KEY)
    assert len(trials) == 2
    bad = trials[trials["p_lr"] > 1]
    good = trials[trials["p_lr"] < 1]
    assert list(bad["status"]) == ["FAILED"] and list(good["status"]) == ["COMPLETE"]
    reason = bad["error"].iloc[0]
    assert reason.startswith("training loss became nan in epoch 0") or \
        reason.startswith("training loss became inf in epoch 0"), reason
    assert "lower the learning rate" in reason
    assert int(bad["epochs_run"].iloc[0]) == 0 and bad["obj_clean_acc"].isna().all()
    # not retried: one Tune iteration (the final report), no second attempt
    tid = bad["trial_id"].iloc[0]
    lines = (run_dir / "tune" / "search-0" / f"trial_{tid}" / "result.json").read_text()
    assert len(lines.splitlines()) == 1
    assert not (run_dir / "tune" / "search-0" / f"trial_{tid}" / "error.txt").exists()
    # off the Pareto front (driver and analysis), no evaluation rows
    assert tid not in set(res.pareto["trial_id"])
    assert tid not in set(search_front(trials, res.objectives)["trial_id"])
    assert tid not in set(R.read_table(R.RunDir(run_dir).evals)["trial_id"])
    from analysis.pareto import front_of, load_run, metric_table

    table = metric_table(load_run(run_dir), "autoattack", "Linf", 0.1)
    assert set(table["trial_id"]) == set(trials["trial_id"])  # shown, but ...
    assert tid not in set(front_of(table)["trial_id"])  # ... never on the analysis front
    assert len(front_of(table)) == 1
    # the study: FAIL with the reason, the other COMPLETE, nothing left RUNNING
    study = study_of(run_dir)
    by_tid = {t.user_attrs["aerl_trial_id"]: t for t in study.trials}
    assert by_tid[tid].state == optuna.trial.TrialState.FAIL
    assert by_tid[tid].user_attrs["error"] == reason
    assert by_tid[good["trial_id"].iloc[0]].state == optuna.trial.TrialState.COMPLETE
    assert len(study.trials) == 2


def test_diverging_torchtrainer_trial_is_not_retried(study_of, ray_session, tmp_path):
    """TorchTrainer mode: the worker reports the divergence instead of raising (Ray Train
    would restart the worker group, Tune the trial); a sweep with no COMPLETE trial ends."""
    run_dir = tmp_path / "run"
    res = run_sweep(QUICK, run_dir, smoke=True, verbose=0, overrides={
        "resources": {"mode": "ray_train"}, "num_samples": 1,
        "points_to_evaluate": [{"regime": "sl", "lr": 1.0e30}], **NO_CONFIRM})
    trials = R.read_table(R.RunDir(run_dir).trials)
    assert list(trials["status"]) == ["FAILED"] and res.pareto.empty
    assert trials["error"].iloc[0].startswith("training loss became nan in epoch 0")
    assert [t.state for t in study_of(run_dir).trials] == [optuna.trial.TrialState.FAIL]
    train_runs = list((run_dir / "tune" / "train").glob("train-*"))
    assert len(train_runs) == 1  # one Train run, one marker checkpoint, no restart
    (ck,) = checkpoint_dirs(train_runs)
    assert json.loads((ck / "diverged.json").read_text())["epoch"] == 0


def test_search_front_without_completed_trials():
    objectives = [{"name": "a", "direction": "max"}, {"name": "b", "direction": "max"}]
    df = pd.DataFrame({"trial_id": ["x", "y"], "status": ["FAILED", "PRUNED"],
                       "regime": ["sl", "rl"],
                       "obj_a": [float("nan"), 0.5], "obj_b": [float("nan"), 0.5]})
    assert search_front(df, objectives).empty
    df.loc[1, "status"] = "COMPLETE"
    assert list(search_front(df, objectives)["trial_id"]) == ["y"]


def _damage(table: Path) -> None:
    part = sorted(table.glob("part-*.parquet"))[0]
    (table / "part-9999999999999999999-deadbeef.parquet").write_bytes(
        part.read_bytes()[: part.stat().st_size // 2])  # a part cut off by a crash
    (table / ".x.tmp").write_bytes(b"PAR1 half a row")  # a temp file never renamed


def test_truncated_part_is_repaired_and_finished_sweep_resumes_quickly(study_of, diverged_run):
    res, run_dir, first_seconds = diverged_run
    run = R.RunDir(run_dir)
    before = {t: R.read_table(getattr(run, t)) for t in ("trials", "evals", "indicators")}
    n_study = len(study_of(run_dir).trials)
    # unit: repair_table removes exactly the damaged part and the temp file
    _damage(run.evals)
    with pytest.raises(Exception):
        R.read_table(run.evals)
    removed = R.repair_table(run.evals)
    assert sorted(p.name for p in removed) == [".x.tmp", "part-9999999999999999999-deadbeef.parquet"]
    pd.testing.assert_frame_equal(R.read_table(run.evals), before["evals"])
    # the resume path repairs too, and a finished sweep resumes without redoing anything
    _damage(run.trials)
    _damage(run.indicators)
    t0 = time.time()
    again = run_sweep(resume=run_dir, verbose=0)
    resume_seconds = time.time() - t0
    for t, df in before.items():
        pd.testing.assert_frame_equal(R.read_table(getattr(run, t)), df)  # no duplicates
    assert not list(run.trials.glob(".*.tmp"))
    assert list(again.trials["status"].sort_values()) == ["COMPLETE", "FAILED"]
    study = study_of(run_dir)
    assert len(study.trials) == n_study  # no trial re-issued or re-enqueued (WAITING)
    assert {t.state for t in study.trials} == {optuna.trial.TrialState.COMPLETE,
                                               optuna.trial.TrialState.FAIL}
    assert resume_seconds < 15, (resume_seconds, first_seconds)
    print(f"\nfirst run {first_seconds:.0f} s, resume of the finished sweep {resume_seconds:.0f} s")


def test_writes_are_atomic_on_failure(tmp_path, monkeypatch, tiny_model, digits_info):
    from aerl_ray.checkpoint import atomic_torch_save, load_checkpoint, make_checkpoint
    from aerl_ray.train import _append_jsonl, read_metrics

    table = tmp_path / "t.parquet"
    R.append_rows(table, [{"a": 1}])

    def crash(t, path, **kw):
        Path(path).write_bytes(b"PAR1 partial")
        raise OSError("disk full")

    monkeypatch.setattr(R.pq, "write_table", crash)
    with pytest.raises(OSError, match="disk full"):
        R.append_rows(table, [{"a": 2}])
    monkeypatch.undo()
    assert sorted(p.name for p in table.iterdir() if not p.name.startswith("part-")) == []
    assert R.read_table(table)["a"].tolist() == [1]

    path = tmp_path / "best.pt"
    ck = make_checkpoint(tiny_model, {"model": "tiny"}, digits_info, 0, {})
    atomic_torch_save(ck, path)
    real_save = torch.save

    def crash_save(obj, f, *a, **kw):
        real_save(obj, f, *a, **kw)
        raise OSError("killed mid-write")

    monkeypatch.setattr(torch, "save", crash_save)
    with pytest.raises(OSError, match="killed mid-write"):
        atomic_torch_save({**ck, "epoch": 5}, path)
    monkeypatch.undo()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
    assert load_checkpoint(path)["epoch"] == 0  # the old checkpoint is intact

    metrics = tmp_path / "metrics.jsonl"
    _append_jsonl(metrics, {"epoch": 0})
    with open(metrics, "a") as f:
        f.write('{"epoch": 1, "val_')  # torn by a crash
    assert read_metrics(metrics) == [{"epoch": 0}]


# --- 6. tampered checkpoints on the evaluation path --------------------------------------
def test_evaluate_cli_refuses_tampered_checkpoint(tmp_path, tiny_model, digits_info):
    from aerl_ray.checkpoint import FORMAT, atomic_torch_save, make_checkpoint

    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    torch.save({"format": FORMAT, "x": Evil()}, tmp_path / "evil.pt")
    good = tmp_path / "good.pt"
    atomic_torch_save(make_checkpoint(tiny_model, {"model": "tiny", "dataset": "digits"},
                                      digits_info, 0, {}), good)
    (tmp_path / "trunc.pt").write_bytes(good.read_bytes()[:200])
    reasons = {}
    for name in ("evil.pt", "trunc.pt"):
        p = subprocess.run([sys.executable, "-m", "aerl_ray.evaluate", str(tmp_path / name),
                            "--n", "8"], cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert p.returncode == 2, (p.returncode, p.stderr[-2000:])
        assert "Traceback" not in p.stderr, p.stderr
        assert f"could not load {tmp_path / name} safely" in p.stderr
        assert "will not be unpickled" in p.stderr
        assert "\x1b" not in p.stderr and "weights_only" not in p.stderr  # no unsafe advice
        assert p.stdout == ""
        reasons[name] = p.stderr
    assert "(UnpicklingError: Unsupported global: GLOBAL io.open" in reasons["evil.pt"]
    assert "failed reading zip archive" in reasons["trunc.pt"]
    assert not marker.exists()  # the pickled code never ran


# --- 7. evaluator memory over 50 evaluations --------------------------------------------
def test_evaluator_memory_is_flat_over_50_evaluations():
    p = subprocess.run([sys.executable, "bench/memory.py", "--evals", "50", "--warmup", "5",
                        "--json"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    r = json.loads(p.stdout.strip().splitlines()[-1])
    # every evaluation ran in full: pgd, fgsm, transfer and the worst case at both budgets,
    # AutoAttack at the objective's budget only
    assert r["rows"] == 50 * (4 * 2 + 1)
    assert r["growth_mb"] < 25, r
    print(f"\nevaluator RSS: {r}")
