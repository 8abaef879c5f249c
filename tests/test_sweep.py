"""The sweep end to end through real Ray, Optuna (SQLite) and the evaluator pool."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pandas as pd
import pytest
import yaml

from aerl_ray import results as R
from aerl_ray.sweep import SweepError, format_pareto, run_sweep

ROOT = Path(__file__).resolve().parent.parent
QUICK = ROOT / "search_spaces" / "quickstart.yaml"
pytestmark = [pytest.mark.ray, pytest.mark.slow]


def test_quickstart_smoke_end_to_end(study_of, ray_session, tmp_path):
    res = run_sweep(QUICK, tmp_path / "run", smoke=True, verbose=0)
    run = R.RunDir(res.run_dir)
    trials = pd.read_parquet(run.trials)  # plain pandas: one row per trial
    assert list(trials["status"]) == ["COMPLETE", "COMPLETE"]
    assert list(trials["trial_id"]) == ["t0000", "t0001"]
    assert set(trials["regime"]) == {"sl", "rl"}  # the two points_to_evaluate
    assert (trials["split"] == "val").all()
    # evaluation rows: search on validation, confirmation on test; every attack, one n
    evals = pd.read_parquet(run.evals)
    assert not evals.duplicated(R.EVAL_KEY).any()
    search = evals[evals["phase"] == "search"]
    assert (search["split"] == "val").all() and set(search["trial_id"]) == {"t0000", "t0001"}
    assert set(search["attack"]) == {"pgd", "fgsm", "autoattack", "transfer:sl_reference",
                                     "worst_case", "worst_case+diag"}  # + cheap diagnostics'
    plain = search[search.attack != "worst_case+diag"]
    assert len(plain) == 2 * (4 * 4 + 1)  # 3 attacks x 4 budgets + worst case, AA at 0.1
    assert search.groupby("trial_id")["n"].nunique().eq(1).all()  # same images everywhere
    assert set(R.EVAL_COLUMNS) <= set(evals.columns)
    assert ((evals["ci_low"] <= evals["robust_acc"]) & (evals["robust_acc"] <= evals["ci_high"])).all()
    ind = pd.read_parquet(run.indicators)
    assert {"agn", "entropy_clean"} <= set(ind["indicator"]) and set(ind["split"]) <= {"val", "test"}
    # the study holds the same objective values, COMPLETE, with named objectives
    study = study_of(res.run_dir)
    assert study.metric_names == ["clean_acc", "robust_aa"]
    done = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert len(done) == 2
    by_id = {t.user_attrs["aerl_trial_id"]: t.values for t in done}
    for _, row in trials.iterrows():
        assert by_id[row["trial_id"]] == pytest.approx([row["obj_clean_acc"], row["obj_robust_aa"]])
        aa = search[(search.trial_id == row["trial_id"]) & (search.attack == "autoattack")]
        assert float(aa["robust_acc"].iloc[0]) == pytest.approx(row["obj_robust_aa"])
        assert row["obj_robust_aa_low"] <= row["obj_robust_aa"] <= row["obj_robust_aa_high"]
        assert int(row["obj_robust_aa_n"]) == 32
        assert row["ckpt_reason"] and row["ckpt_regime"] == row["regime"]
    # one front everywhere: printout == pareto.csv == report == study.best_trials
    best = {t.user_attrs["aerl_trial_id"] for t in study.best_trials}
    assert set(res.pareto[res.pareto["on_front"]]["trial_id"]) == best
    from analysis.report import write_report

    rep = write_report(run.root)
    csv = pd.read_csv(rep.paths["pareto.csv"])
    assert set(csv[csv["on_front"]]["trial_id"]) == best
    text = format_pareto(res)
    assert all(t in text for t in best) and "[" in text  # with intervals
    html = rep.paths["report.html"].read_text()
    assert all(f">{t}<" in html for t in best)
    # the confirmation stage: the front + best of each regime, retrained with new seeds
    confirm = pd.read_parquet(run.confirm)
    plan = json.loads(run.confirm_plan.read_text())["jobs"]
    assert len(confirm) == len(plan) >= 2 and (confirm["status"] == "COMPLETE").all()
    assert set(confirm["config_id"]) >= {"t0000", "t0001"}  # best sl, best rl
    assert not set(confirm["train_seed"]) & set(trials["train_seed"])
    cev = evals[evals["phase"] == "confirm"]
    assert (cev["split"] == "test").all() and set(cev["trial_id"]) == set(confirm["trial_id"])
    assert (cev[cev.attack == "autoattack"]["eps"] == 0.1).all()
    assert not res.confirmed.empty and {"robust_mean", "robust_low", "seeds"} <= set(res.confirmed)
    assert {"table.md", "table.csv", "table.tex"} <= set(rep.paths)
    assert any(k.startswith("robustbench/") for k in rep.paths)
    # TensorBoard: one run per trial with its training curves, robustness curves under the
    # results tables' attack names, and HParams listing every parameter it used
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import plugin_data_pb2

    ea = EventAccumulator(str(run.root / "tensorboard" / "search" / "t0001"))
    ea.Reload()
    tags = set(ea.Tags()["scalars"])
    assert {"val/acc", "train/train_loss", "eval/val/transfer:sl_reference/Linf",
            "eval/val/worst_case/Linf", "obj/clean_acc", "obj/robust_aa"} <= tags
    assert not any(t.startswith(("ray/", "aerl")) or "_trial" in t for t in tags)
    assert [e.step for e in ea.Scalars("eval/val/pgd/Linf")] == [0, 50, 100, 200]
    hp = plugin_data_pb2.HParamsPluginData.FromString(
        ea.PluginTagToContent("hparams")["_hparams_/session_start_info"])
    assert set(hp.session_start_info.hparams) == {"regime", "lr", "explore_eps", "phase"}
    # every epoch once, with the checkpoint it can resume from
    epochs = pd.read_parquet(run.epochs)
    assert not epochs.duplicated(R.EPOCH_KEY).any()
    assert sorted(epochs[epochs.trial_id == "t0000"]["epoch"]) == [0, 1, 2]


def test_bad_inputs_fail_before_ray_and_leave_no_run_dir(tmp_path, monkeypatch):
    import numpy as np

    def check(match, **kw):
        run = tmp_path / f"r{len(list(tmp_path.iterdir()))}"
        with pytest.raises(SweepError, match=match):
            run_sweep(QUICK, run, smoke=True, **kw)
        assert not run.exists(), f"{run} left behind"

    check("cannot open the Optuna storage", optuna_storage="postgresql://nobody@127.0.0.1:1/none")
    check("cannot reach the Ray cluster", address="127.0.0.1:1")
    check("cannot write there", storage="/proc/aerl-cannot-write")
    bad = tmp_path / "bad.npz"
    x = np.zeros((50, 8, 8, 1), np.uint8)
    np.savez(bad, X_train=x, y_train=np.array([0, 2] * 25), X_test=x[:5], y_test=np.zeros(5, int))
    check(r"classes \[1\] have no training image",
          overrides={"fixed": {"dataset": f"npz:{bad}"}})
    check("exceeds the validation split", overrides={"evaluation": {"n": 5000}})
    check("confirm.n=4000 exceeds the test split", overrides={"confirm": {"n": 4000}})
    check("leaves a class out", overrides={"fixed": {"val_size": 3}})
    import socket

    def offline(*a, **k):
        raise OSError("network is unreachable")

    monkeypatch.setattr(socket, "create_connection", offline)
    t0 = time.time()
    check("could not download cifar10", overrides={"fixed": {
        "dataset": "cifar10", "cache_dir": str(tmp_path / "empty-cache")}})
    assert time.time() - t0 < 30


def test_resume_refuses_other_flags_and_foreign_dirs(tmp_path):
    with pytest.raises(SweepError, match="not a sweep run dir"):
        run_sweep(resume=tmp_path)
    run = tmp_path / "c"
    run.mkdir()
    (run / "sweep.json").write_text(json.dumps({
        "run_id": "x", "study_name": "x", "optuna_storage": "sqlite://",
        "space_file": str(QUICK), "space": yaml.safe_load(QUICK.read_text()),
        "flags": {"space": str(QUICK), "smoke": True, "num_samples": None, "overrides": None,
                  "storage": None, "optuna_storage": None}}))
    with pytest.raises(SweepError, match="belongs to another sweep"):
        run_sweep(ROOT / "search_spaces" / "masking_audit.yaml", resume=run)
    with pytest.raises(SweepError, match=r"--num-samples 5 \(the run was started with None\)"):
        run_sweep(resume=run, num_samples=5)
    with pytest.raises(SweepError, match="--storage"):
        run_sweep(resume=run, storage=str(tmp_path / "elsewhere"))


def test_sweep_cli_bad_input_exits_2_with_one_line(tmp_path):
    p = subprocess.run([sys.executable, "-m", "aerl_ray.sweep", "--smoke", "--run-dir",
                        str(tmp_path / "r"), "--address", "127.0.0.1:1"], cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and "Traceback" not in p.stderr
    assert p.stderr.strip().splitlines()[-1].startswith(
        "python -m aerl_ray.sweep: error: cannot reach the Ray cluster")
    assert not (tmp_path / "r").exists()


# --- faults: SIGKILL and SIGINT at several moments, resumed -------------------------------
def _chain_space(tmp_path: Path) -> Path:
    """6 trials (every regime first), cnn4 for a few seconds of training each, 2 at a time;
    the confirmation stage retrains 1 seed of each confirmed configuration."""
    raw = yaml.safe_load(QUICK.read_text())
    raw["smoke"] = {
        "fixed": {"epochs": 4, "model": "cnn4", "val_size": 100},
        "parameters": {"switch_epoch": {"low": 1, "high": 2}},
        "num_samples": 6, "reference": {"epochs": 1},
        "evaluation": {"n": 32, "batch_size": 32, "attack_params": {"pgd": {"steps": 5}},
                       "indicator_steps": 3},
        "confirm": {"seeds": 1, "n": 32, "configs": "front",
                    "evaluation": {"autoattack_version": "custom",
                                   "autoattack_attacks": ["apgd-ce"], "diagnostics": "off"}},
        "points_to_evaluate": [{"regime": "sl", "lr": 1.0e-3},
                               {"regime": "rl", "lr": 2.0e-3, "explore_eps": 0.1},
                               {"regime": "rl_adv", "lr": 2.0e-3, "explore_eps": 0.1,
                                "adv_eps": 0.05},
                               {"regime": "hybrid", "lr": 2.0e-3, "explore_eps": 0.1,
                                "switch_epoch": 2}]}
    path = tmp_path / "chain.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


class Sweep:
    """A sweep driver in its own process group (as a terminal would run it)."""

    def __init__(self, args, log: Path):
        self.log = log
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "aerl_ray.sweep", *args, "--no-report", "--num-cpus", "2"],
            cwd=ROOT, env={**os.environ, "PYTHONUNBUFFERED": "1"}, stdout=open(log, "w"),
            stderr=subprocess.STDOUT, start_new_session=True)

    def output(self) -> str:
        return self.log.read_text()

    def wait_for(self, what: str, cond, timeout: float = 240) -> None:
        t0 = time.time()
        while time.time() - t0 < timeout:
            if cond():
                return
            assert self.proc.poll() is None, f"ended before {what}:\n{self.output()[-3000:]}"
            time.sleep(0.1)
        raise AssertionError(f"timed out waiting for {what}:\n{self.output()[-3000:]}")

    def signal(self, sig: int) -> None:
        os.killpg(self.proc.pid, sig)


def _rows(run: Path, table: str) -> pd.DataFrame:
    path = run / f"{table}.parquet"
    return R.read_table(path) if path.is_dir() else pd.DataFrame()


def _running(run: Path) -> set:
    """Trials with epochs recorded but not committed."""
    ep, tr = _rows(run, "epochs"), _rows(run, "trials")
    started = set(ep["trial_id"]) if len(ep) else set()
    return started - (set(tr["trial_id"]) if len(tr) else set())


def test_killed_and_interrupted_sweep_resumes_exactly(study_of, ray_session, tmp_path):
    """SIGKILL while two trials train, SIGKILL while a trial is evaluated, Ctrl-C (SIGINT
    to the process group) right after a trial finished, Ctrl-C twice while trials train:
    each time --resume continues; at
    the end exactly the asked trials exist once, in the study and in plain pandas reads,
    with every epoch and evaluation row once and the compute of an uninterrupted run."""
    space, run = _chain_space(tmp_path), tmp_path / "run"
    logs = tmp_path / "logs"
    logs.mkdir()
    # 1. SIGKILL during training of concurrent trials
    s = Sweep(["--space", str(space), "--smoke", "--run-dir", str(run)], logs / "1.log")
    s.wait_for("two trials training", lambda: len(_running(run)) >= 2)
    s.signal(signal.SIGKILL)
    s.proc.wait()
    # 2. resume; SIGKILL while a trial is being evaluated (trained, not committed)
    s = Sweep(["--resume", str(run)], logs / "2.log")

    def evaluating():  # by this driver (the run dir may hold such a trial from step 1)
        if " started (" not in s.output():
            return False
        ep = _rows(run, "epochs")
        done = ep[ep["epoch"] == 3]["trial_id"] if len(ep) else []
        return bool(set(done) & _running(run))

    s.wait_for("a trial in evaluation", evaluating)
    time.sleep(0.3)
    s.signal(signal.SIGKILL)
    s.proc.wait()
    # 3. resume; Ctrl-C right after a trial was committed
    before = len(_rows(run, "trials"))
    s = Sweep(["--resume", str(run)], logs / "3.log")
    s.wait_for("a committed trial", lambda: len(_rows(run, "trials")) > before)
    s.signal(signal.SIGINT)
    assert s.proc.wait(timeout=180) == 130, s.output()[-3000:]
    out = s.output()
    assert f"interrupted; resume with python -m aerl_ray.sweep --resume {run.resolve()}" in out
    assert "Traceback" not in out, out[-3000:]
    # 4. resume; Ctrl-C twice while trials train: stops at once, still resumable
    s = Sweep(["--resume", str(run)], logs / "4.log")
    # a trial this driver started (not one left uncommitted by step 3: a signal before the
    # driver's own handler is installed is Python's default KeyboardInterrupt)
    s.wait_for("a trial training", lambda: " started (" in s.output() and bool(_running(run)))
    s.signal(signal.SIGINT)
    time.sleep(1.0)
    s.signal(signal.SIGINT)
    assert s.proc.wait(timeout=120) == 130, s.output()[-3000:]
    assert "interrupted; resume with" in s.output() and "Traceback" not in s.output()
    # 5. resume to the end (in this process)
    res = run_sweep(resume=run, verbose=0)

    trials = pd.read_parquet(run / "trials.parquet")
    assert sorted(trials["trial_id"]) == [f"t{i:04d}" for i in range(6)]
    assert (trials["status"] == "COMPLETE").all(), trials[["trial_id", "status", "error"]]
    study = study_of(run)
    assert [t.state for t in study.trials] == [optuna.trial.TrialState.COMPLETE] * 6
    assert sorted(t.user_attrs["aerl_trial_id"] for t in study.trials) == sorted(trials["trial_id"])
    for t in study.trials:
        row = trials.set_index("trial_id").loc[t.user_attrs["aerl_trial_id"]]
        assert t.values == pytest.approx([row["obj_clean_acc"], row["obj_robust_aa"]])
    epochs = pd.read_parquet(run / "epochs.parquet")
    assert not epochs.duplicated(R.EPOCH_KEY).any()
    for tid in trials["trial_id"]:
        assert sorted(epochs[epochs.trial_id == tid]["epoch"]) == [0, 1, 2, 3], tid
    evals = pd.read_parquet(run / "evals.parquet")
    assert not evals.duplicated(R.EVAL_KEY).any()
    plan_rows = evals[(evals.phase == "search") & (evals.attack != "worst_case+diag")]
    per_trial = plan_rows.groupby("trial_id").size()
    assert set(per_trial.index) == set(trials["trial_id"]) and per_trial.nunique() == 1
    confirm = pd.read_parquet(run / "confirm.parquet")
    assert (confirm["status"] == "COMPLETE").all() and confirm["trial_id"].is_unique
    # the compute of an uninterrupted run: every epoch's passes counted once (a re-done
    # epoch is not counted twice, an epoch done before a kill is not lost)
    from aerl_ray.config import DataConfig
    from aerl_ray.data import load_splits

    n_train = len(load_splits(DataConfig(dataset="digits", val_size=100)).y_train)
    for _, row in trials.iterrows():
        flat = json.loads(row["config"])
        per_epoch = 2 if flat["regime"] == "rl_adv" else 1  # the fused FGSM step: 2 + 2
        assert row["train_fwd_passes"] == 4 * per_epoch * n_train, row["trial_id"]
        # a training backward costs 2 forward-equivalents (aerl_ray.passes)
        assert row["train_bwd_passes"] == 2 * 4 * per_epoch * n_train, row["trial_id"]
        assert row["train_seconds"] > 0
    assert len(res.trials) == 6


def test_two_sweeps_share_one_storage(tmp_path):
    """The cluster case: two sweeps on one --storage at the same time, each under its own
    run id, both complete with their own results and TensorBoard dirs."""
    storage = tmp_path / "shared"
    procs = [Sweep(["--smoke", "--run-dir", str(tmp_path / f"run{i}"), "--storage",
                    str(storage), "--num-samples", "1"], tmp_path / f"{i}.log")
             for i in (0, 1)]
    for p in procs:
        assert p.proc.wait(timeout=420) == 0, p.output()[-3000:]
    ids = []
    for i, p in enumerate(procs):
        spec = json.loads((tmp_path / f"run{i}" / "sweep.json").read_text())
        ids.append(spec["run_id"])
        assert f"tensorboard --logdir {storage}/{spec['run_id']}" in p.output()
        trials = pd.read_parquet(tmp_path / f"run{i}" / "trials.parquet")
        assert list(trials["status"]) == ["COMPLETE"] and (trials["run_id"] == spec["run_id"]).all()
        assert list((storage / spec["run_id"] / "search-0").glob("trial_t0000"))
    assert ids[0] != ids[1] and sorted(p.name for p in storage.iterdir()) == sorted(ids)


# quickstart runs in test_quickstart_smoke_end_to_end, quickstart_moasha (to its end, after a
# kill) in test_moasha_sweep_killed_mid_search_loses_no_rung_decision
OTHER_SPACES = sorted(p for p in (ROOT / "search_spaces").glob("*.yaml")
                      if p.stem not in ("quickstart", "quickstart_moasha"))


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
    assert (res.trials["status"] == "COMPLETE").any(), res.trials[["status", "error"]]
    assert res.trials["status"].isin(["COMPLETE", "PRUNED"]).all(), res.trials[["status", "error"]]
    evals = R.read_table(R.RunDir(res.run_dir).evals, key=R.EVAL_KEY)
    assert set(R.EVAL_COLUMNS) <= set(evals.columns) and len(evals) > 0
    assert set(evals["split"]) == {"val", "test"}  # search + confirmation


def test_address_auto_refuses_someone_elses_ray(tmp_path, monkeypatch):
    from aerl_ray.preflight import PreflightError, check_auto_address

    monkeypatch.setenv("RAY_TMPDIR", str(tmp_path))
    with pytest.raises(PreflightError, match="no Ray cluster runs on this machine"):
        check_auto_address("auto")
    session = tmp_path / "ray" / "session_2026-01-01"
    session.mkdir(parents=True)
    (tmp_path / "ray" / "session_latest").symlink_to(session)
    check_auto_address("auto")  # mine: fine
    check_auto_address("10.0.0.1:6379")  # an explicit address is always taken as given
    if os.getuid() != 0:
        pytest.skip("needs root to give the session dir to another user")
    os.chown(session, 1, 1)
    with pytest.raises(PreflightError, match="would attach to a Ray cluster started by"):
        check_auto_address("auto")


def test_moasha_sweep_killed_mid_search_loses_no_rung_decision(study_of, ray_session, tmp_path):
    """MOASHA through real Ray + Optuna: the driver is SIGKILLed after a rung decision while
    trials run; --resume rebuilds the scheduler from rungs.jsonl: no decision is lost or
    taken twice, stopped trials stay stopped and enter the study as PRUNED with their rung
    values, and the report draws hypervolume vs compute."""
    from aerl_ray.moasha_config import DecisionLog

    run = tmp_path / "run"
    space = ROOT / "search_spaces" / "quickstart_moasha.yaml"
    s = Sweep(["--space", str(space), "--smoke", "--run-dir", str(run)], tmp_path / "1.log")
    log = DecisionLog(run / "rungs.jsonl")
    s.wait_for("a stop decision while trials run",
               lambda: any(r["decision"] == "stop" for r in log.read()) and bool(_running(run)))
    s.signal(signal.SIGKILL)
    s.proc.wait()
    before = log.read()
    res = run_sweep(resume=run, verbose=0)
    after = log.read()
    assert after[:len(before)] == before  # kept as written
    decided = [(r["key"], r["rung"]) for r in after if r["decision"] in ("continue", "stop")]
    assert len(decided) == len(set(decided))  # never decided twice at a rung
    trials = pd.read_parquet(run / "trials.parquet").set_index("trial_id")
    assert len(trials) == 4 and set(trials["status"]) <= {"COMPLETE", "PRUNED"}
    stopped = {r["key"]: r for r in after if r["decision"] == "stop"}
    assert stopped and set(stopped) == set(trials.index[trials["status"] == "PRUNED"])
    epochs = pd.read_parquet(run / "epochs.parquet")
    for key, rec in stopped.items():
        assert trials.loc[key, "stopped_at_rung"] == rec["rung"]
        assert f"stopped at epochs_done={rec['rung']}" in trials.loc[key, "error"]
        assert epochs[epochs.trial_id == key]["epoch"].max() == rec["rung"] - 1  # no more
    study = study_of(run)
    pruned = [t for t in study.trials if t.state == optuna.trial.TrialState.PRUNED]
    assert len(pruned) == len(stopped) and len(study.trials) == 4
    assert all(t.user_attrs["rung_values"] and "stopped_at_rung" in t.user_attrs for t in pruned)
    from analysis.report import write_report

    rep = write_report(run)
    assert rep.paths["search_efficiency.png"].stat().st_size > 5000
    assert len(res.trials) == 4
