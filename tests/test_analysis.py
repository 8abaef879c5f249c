"""analysis/: dominance, hypervolume, metric choice, loading, bad input, report files."""
from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from aerl_ray import results
from analysis.pareto import (AnalysisError, choose_headline, hypervolume_2d, load_run, main,
                             metric_table, normalize_norm, pareto_mask, parse_eps)
from analysis_fixtures import (EPS8, EXPECTED_FRONT, EXPECTED_HV, RUN_ID, _eval_row, _trial_row,
                               make_run_dir)

ROOT = Path(__file__).resolve().parents[1]
PNG = b"\x89PNG\r\n\x1a\n"


# --- dominance / hypervolume on constructed data ----------------------------------------------
def test_pareto_mask_ties_nans_duplicates():
    pts = [(0.9, 0.1), (0.9, 0.05),      # tie in x: the second is dominated
           (0.8, 0.4), (0.8, 0.4),       # identical: both kept
           (0.75, 0.45), (0.7, 0.3),     # front / dominated
           (np.nan, 0.99), (0.99, np.nan), (np.inf, 1.0),  # never on the front, dominate nothing
           (0.95, 0.0)]
    assert pareto_mask(pts).tolist() == [True, False, True, True, True, False,
                                         False, False, False, True]
    assert pareto_mask(np.empty((0, 2))).tolist() == []
    assert pareto_mask([(0.5, 0.5)]).tolist() == [True]
    assert pareto_mask([(0.5, 0.5), (0.5, 0.5), (0.5, 0.5)]).all()


def test_hypervolume_hand_computed():
    front = [(0.95, 0.0), (0.9, 0.1), (0.8, 0.4), (0.8, 0.4), (0.75, 0.45)]
    assert hypervolume_2d(front) == pytest.approx(0.9 * 0.1 + 0.8 * 0.3 + 0.75 * 0.05)
    assert hypervolume_2d(front, ref=(0.5, 0.2)) == pytest.approx(0.3 * 0.2 + 0.25 * 0.05)
    # dominated and NaN points add nothing; points not beyond the reference add nothing
    assert hypervolume_2d(front + [(0.7, 0.3), (np.nan, 1.0)]) == pytest.approx(0.3675)
    assert hypervolume_2d([(0.4, 0.9)], ref=(0.5, 0.0)) == 0.0
    assert hypervolume_2d([]) == 0.0
    assert hypervolume_2d([(1.0, 1.0)]) == pytest.approx(1.0)


def test_parse_eps_and_norm():
    assert parse_eps("8/255") == pytest.approx(8 / 255)
    assert parse_eps("0.5") == 0.5 and parse_eps(None) is None
    assert normalize_norm("linf") == "Linf" and normalize_norm("L2") == "L2"
    with pytest.raises(AnalysisError):
        parse_eps("eight")
    with pytest.raises(AnalysisError, match="Linf or L2"):
        normalize_norm("l1")


# --- a synthetic run dir ---------------------------------------------------------------------
@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    return make_run_dir(tmp_path_factory.mktemp("analysis") / "run")


@pytest.fixture(scope="module")
def report(run_dir, tmp_path_factory):
    from analysis.report import write_report

    return write_report(run_dir)


def test_load_dedupes_resumed_trials(run_dir):
    data = load_run(run_dir)
    assert data.trials["trial_id"].is_unique and len(data.trials) == 11
    t01 = data.trials.set_index("trial_id").loc["t01"]
    assert t01["clean_acc"] == 0.8  # the resumed (second) write wins
    assert data.evals.duplicated(results.EVAL_KEY).sum() == 0


def test_headline_default_and_filters(run_dir):
    data = load_run(run_dir)
    h = choose_headline(data)  # sweep.json's robust objective (eps 0.0313725 ~ 8/255)
    assert (h.attack, h.norm, h.eps_str, h.n) == ("autoattack", "Linf", "8/255", "200")
    assert h.eps == pytest.approx(EPS8)
    assert choose_headline(data, attack="pgd", norm="l2").eps == 0.5
    h4 = choose_headline(data, eps="4/255")
    assert (h4.attack, h4.eps_str) == ("autoattack", "4/255")
    data.spec["objectives"] = data.spec["objectives"][:1]  # no robust objective
    assert choose_headline(data).eps_str == "8/255"  # largest-eps autoattack
    data.evals = data.evals[data.evals["attack"] != "autoattack"]
    assert choose_headline(data).attack == "pgd"


def test_front_of_synthetic_run(run_dir):
    data = load_run(run_dir)
    t = metric_table(data, "autoattack", "Linf", EPS8).set_index("trial_id")
    assert set(t.index[t["on_front"]]) == EXPECTED_FRONT
    assert not t.loc["t08", "on_front"]          # FAILED, although (0.99, 0.99)
    assert math.isnan(t.loc["t07", "robust_acc"]) and not t.loc["t07", "on_front"]
    assert math.isnan(t.loc["t10", "robust_acc"])  # partial: no eval rows yet
    assert t.loc["t02", "masking_suspected"] and "pgd_aa_gap" in t.loc["t02", "flags"]
    assert t.loc["t01", "robust_acc"] == 0.4     # the retried eval row wins
    pgd = metric_table(data, "pgd", "Linf", EPS8).set_index("trial_id")
    assert set(pgd.index[pgd["on_front"]]) == {"t00", "t02"}


def test_report_files(report, run_dir):
    out = Path(run_dir) / "report"
    assert report.out_dir == out
    for name in ("pareto.png", "curves.png", "indicators.png", "importance.png", "compute.png"):
        p = report.paths[name]
        assert p.parent == out and p.stat().st_size > 5000 and p.read_bytes()[:8] == PNG, name
    assert report.hypervolume == pytest.approx(EXPECTED_HV)
    assert report.ref == (0.0, 0.0)
    csv = pd.read_csv(report.paths["pareto.csv"])
    # the search front on the objectives (the values told to the study), one function
    assert set(csv["trial_id"]) == EXPECTED_FRONT and len(csv) == 5
    assert {"p_lr", "p_explore_eps", "masking_suspected", "obj_clean_acc", "obj_robust_aa",
            "front_status"} <= set(csv.columns)
    status = dict(zip(csv["trial_id"], csv["front_status"]))
    assert status == {"t00": "front", "t02": "front", "t03": "front",  # identical points:
                      "t01": "tied within noise", "t05": "tied within noise"}  # tied
    front = csv[csv["front_status"] == "front"]
    assert list(front["obj_clean_acc"]) == sorted(front["obj_clean_acc"], reverse=True)
    md = report.markdown
    assert "autoattack Linf ε=8/255 (n=200)" in md and "0.3675" in md
    assert md.count("\n| t0") == 5 and "YES" in md
    html = report.paths["report.html"].read_text()
    assert html.count("data:image/png;base64,") == 5
    assert "<script" not in html and "http://" not in html and "https://" not in html
    assert "aerl-sweep search_spaces/quickstart.yaml" in html and "write_report(" in html


def test_importance_dedupes_study(run_dir):
    from analysis.importance import completed_trials, param_importances

    data = load_run(run_dir)
    trials, dirs, note = completed_trials(data)
    assert note == "" and dirs == ["maximize", "maximize"]
    ids = [t.user_attrs["tune_trial_id"] for t in trials]
    assert sorted(ids) == ["t00", "t01", "t02", "t03", "t04", "t05", "t06"]  # t01 re-told once
    imps = param_importances(data)
    assert [n for n, _ in imps] == ["clean_acc", "robust_aa"]
    assert all(isinstance(v, dict) and v for _, v in imps)
    assert sum(imps[1][1].values()) == pytest.approx(1.0)


# --- partial / resumed / moved runs ---------------------------------------------------------------
def test_partial_run_without_study_or_indicators(tmp_path):
    from analysis.report import write_report

    run = tmp_path / "run"
    run.mkdir()
    (run / "sweep.json").write_text(json.dumps({
        "run_id": RUN_ID, "study_name": "x", "optuna_storage": "sqlite:////nonexistent/o.db",
        "objectives": [{"name": "clean_acc", "direction": "max"},
                       {"name": "robust_pgd", "attack": "pgd", "norm": "Linf", "eps": "8/255",
                        "direction": "max"}]}))
    rows = [_trial_row("a", "sl", "COMPLETE", 0.9, False, dict(lr=0.1)),
            _trial_row("b", "rl", "COMPLETE", 0.8, False, dict(lr=0.01)),
            _trial_row("c", "rl", "PRUNED", 0.1, False, dict(lr=0.2))]
    for r, v in zip(rows, (0.1, float("nan"), float("nan"))):
        r["obj_robust_pgd"] = v
    results.append_rows(run / "trials.parquet", rows)
    results.append_rows(run / "evals.parquet", [
        _eval_row("a", "sl", "pgd", "Linf", EPS8, "8/255", 0.9, 0.1)])  # b not evaluated yet
    res = write_report(run, out_dir=tmp_path / "out")
    assert list(res.pareto["trial_id"]) == ["a"]
    assert res.headline.attack == "pgd"
    assert all(p.stat().st_size > 0 for p in res.paths.values())
    assert "without this eval yet" in res.markdown


def test_study_found_after_run_dir_moved(tmp_path, run_dir):
    import shutil

    from analysis.importance import completed_trials

    moved = tmp_path / "moved"
    shutil.copytree(run_dir, moved)
    spec = json.loads((moved / "sweep.json").read_text())
    spec["optuna_storage"] = "sqlite:////nowhere/optuna.db"
    (moved / "sweep.json").write_text(json.dumps(spec))
    trials, _, note = completed_trials(load_run(moved))
    assert note == "" and len(trials) == 7


# --- bad input: clear errors before any plotting --------------------------------------------------
def test_errors(tmp_path, run_dir, capsys):
    with pytest.raises(AnalysisError, match="does not exist"):
        load_run(tmp_path / "nope")
    with pytest.raises(AnalysisError, match="not a run dir"):
        load_run(tmp_path)
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "sweep.json").write_text("{}")
    results.append_rows(empty / "trials.parquet",
                        [_trial_row("f", "sl", "FAILED", 0.1, False, dict(lr=0.1))])
    assert main([str(empty), "--out", str(tmp_path / "o1")]) == 2
    assert "no COMPLETE trials" in capsys.readouterr().err
    assert not (tmp_path / "o1").exists()
    for args, msg in ((["--attack", "cw"], "attack=cw"), (["--eps", "16/255"], "eps=16/255"),
                      (["--norm", "l2", "--attack", "autoattack"], "norm=l2")):
        assert main([str(run_dir), "--out", str(tmp_path / "o2"), *args]) == 2
        err = capsys.readouterr().err
        assert msg in err and "--attack autoattack --norm Linf --eps 8/255" in err, err
        assert "--attack pgd --norm L2 --eps 0.5" in err
    assert main([str(run_dir), "--norm", "l1"]) == 2
    assert not (tmp_path / "o2").exists()


def test_cli_subprocess(run_dir, tmp_path):
    out = tmp_path / "rep"
    r = subprocess.run([sys.executable, "-m", "analysis.pareto", str(run_dir), "--attack", "pgd",
                        "--norm", "linf", "--eps", "8/255", "--out", str(out), "--ref", "0.5,0"],
                       capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "pgd Linf ε=8/255 (n=200)" in r.stdout and "| t02 |" in r.stdout
    assert "ref (0.5, 0)" in r.stdout and "Warning" not in r.stderr
    assert (out / "report.html").stat().st_size > 0
    bad = subprocess.run([sys.executable, "-m", "analysis.pareto", str(tmp_path)],
                         capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert bad.returncode == 2 and "not a run dir" in bad.stderr


def test_parallel_coordinates_leave_unused_parameters_out():
    """A parameter a trial did not use (switch_epoch of an SL trial) is a gap in its line,
    never drawn at the axis' middle -- also when only one trial used it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from analysis.plots import _parallel

    c = pd.DataFrame({"p_lr": [1e-3, 2e-3], "p_switch_epoch": [None, 4.0],
                      "clean_acc": [0.9, 0.8], "robust_acc": [0.1, 0.3],
                      "regime": ["sl", "hybrid"], "on_front": [True, True]})
    fig, ax = plt.subplots()
    _parallel(ax, c, ["p_lr", "p_switch_epoch", "clean_acc", "robust_acc"], {})
    sl, hybrid = (line.get_ydata() for line in ax.lines[:2])
    assert math.isnan(sl[1]) and hybrid[1] == 0.5
    plt.close(fig)
