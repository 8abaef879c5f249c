"""The live view, driven by recorded Tune events (no Ray run needed)."""
from __future__ import annotations

import io
import logging
from types import SimpleNamespace

import pytest

from aerl_ray.ledger import Ticket
from aerl_ray.progress import Board, board_from_rows, progress_callback, render, resolve_mode

META = {"fixed": {"epochs": 3, "regime": "sl"}, "run_id": "r"}


def _trial(key, params, tid):
    t = Ticket(key, "search", int(key[1:]), params, 7)
    return SimpleNamespace(trial_id=tid, config={**params, "_trial": t.config()["_trial"],
                                                 "_aerl": META})


RECORDED = [  # (event, trial, result)
    ("start", "t0000", None),
    ("result", "t0000", {"epoch": 0, "val_acc": 0.7, "val_robust_acc": 0.3}),
    ("start", "t0001", None),
    ("result", "t0001", {"epoch": 0, "val_acc": 0.4, "val_robust_acc": float("nan")}),
    ("result", "t0000", {"epoch": 1, "val_acc": 0.8, "val_robust_acc": float("nan")}),
    ("result", "t0000", {"epoch": 2, "val_acc": 0.9}),
    ("result", "t0000", {"aerl_final": 1, "clean_acc": 0.88, "robust_aa": 0.41}),
    ("complete", "t0000", None),
    ("error", "t0001", None),
]


class FakeLedger:
    def __init__(self):
        self.rungs = {"t0001": {"decision": "stop", "rung": 1}}

    def last_rung(self, key):
        return self.rungs.get(key)

    def committed(self, phase):
        return {"t0000": "COMPLETE"}


def _drive(cb):
    trials = {"t0000": _trial("t0000", {"regime": "sl", "lr": 0.001}, "a1"),
              "t0001": _trial("t0001", {"regime": "rl", "lr": 0.002, "explore_eps": 0.1},
                              "b2")}
    cb.setup()
    for event, key, result in RECORDED:
        t = trials[key]
        if event == "start":
            cb.on_trial_start(0, [], t)
        elif event == "result":
            cb.on_trial_result(0, [], t, dict(result))
        elif event == "complete":
            cb.on_trial_complete(0, [], t)
        else:
            cb.on_trial_error(0, [], t)
    cb.on_experiment_end([])


def test_plain_lines_without_a_tty(caplog):
    board = Board("search r", 2, 2, ["clean_acc", "robust_aa"])
    with caplog.at_level(logging.INFO, logger="aerl_ray.progress"):
        _drive(progress_callback(board, "lines", FakeLedger()))
    lines = [r.getMessage() for r in caplog.records]
    assert any("t0000 epoch 2/3 val 0.800 val_rob 0.300" in m for m in lines)  # last robust kept
    assert any("t0001 epoch 1/3" in m and "rung stop@1" in m for m in lines)
    assert any(m.startswith("t0000 COMPLETE clean_acc 0.880 robust_aa 0.410") for m in lines)
    assert "1 done, 0 running, 0 pruned, 1 failed of 2" in lines[-1]
    assert not any("_aerl" in m or "_trial" in m for m in lines)


def test_table_redrawn_in_place_on_a_tty():
    from rich.console import Console

    out = io.StringIO()
    board = Board("search r", 2, 2, ["clean_acc", "robust_aa"])
    _drive(progress_callback(board, "table", FakeLedger(),
                             console=Console(file=out, force_terminal=True, width=140)))
    text = out.getvalue()
    assert "\x1b[" in text  # cursor control: the live table redraws in place
    final = render(board)
    assert final.splitlines()[1].split() == ["trial", "regime", "xeps", "lr", "epoch", "val",
                                             "val_rob", "rung", "status", "clean_acc",
                                             "robust_aa"]
    assert "xeps" in final and "explore_eps" not in final  # short names
    assert "_aerl" not in text and "_trial" not in text
    row = next(ln for ln in final.splitlines() if ln.startswith("t0000"))
    assert "3/3" in row and "COMPLETE" in row and "0.880" in row and "0.410" in row


def test_header_counts_and_eta():
    b = board_from_rows("search r", 4, 2, ["clean_acc"], [
        dict(key="t0000", phase="search", regime="sl", params={}, epochs=3, status="COMPLETE",
             started=0.0, finished=10.0),
        dict(key="t0001", phase="search", regime="rl", params={}, epochs=3, status="PRUNED",
             started=0.0, finished=4.0),
        dict(key="t0002", phase="search", regime="rl", params={}, epochs=3, status="RUNNING",
             started=5.0)])
    b.started = 0.0
    assert b.eta_seconds() == pytest.approx(2 * 7.0 / 2)  # 2 left, 7 s mean, 2 at a time
    assert render(b, now=65.0).splitlines()[0].startswith(
        "search r: 1 done, 1 running, 1 pruned, 0 failed of 4 | elapsed 1:05 | ETA 0:07")


def test_mode_follows_the_terminal():
    assert resolve_mode("auto", io.StringIO()) == "lines"
    tty = io.StringIO()
    tty.isatty = lambda: True
    assert resolve_mode("auto", tty) == "table" and resolve_mode("quiet") == "quiet"
    with pytest.raises(ValueError, match="progress mode"):
        resolve_mode("fancy")
