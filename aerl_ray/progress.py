"""A sweep you can watch: one compact table of the trials, updated in place.

:class:`Progress` is a Ray Tune callback in the driver.  It keeps one :class:`TrialView`
per ledger ticket (trial id, regime, the searched parameters under short names,
epoch/total, validation clean and robust accuracy, the scheduler's last rung decision,
status, objectives when done) and renders them with :func:`render` under a header line
(done / running / pruned / failed, elapsed time, ETA).  Internal ``_aerl``/``_trial`` keys
are never shown.

Modes: ``table`` (a TTY: the table redrawn in place with ``rich.live``), ``lines`` (not a
TTY -- CI, ``ray job submit`` logs: one plain log line per epoch and per finished trial),
``quiet`` (only the header line when a trial finishes).  Tune's own trial boxes are turned
off while it runs (``verbose=0``).
"""
from __future__ import annotations

import logging
import math
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping, Sequence

from aerl_ray.stats import finite_or_none

logger = logging.getLogger(__name__)

MODES = ("auto", "table", "lines", "quiet")
_SHORT = {"regime": None, "lr": "lr", "explore_eps": "xeps", "explore_mode": "xmode",
          "switch_epoch": "switch", "adv_eps": "adv_eps", "adv_attack": "adv",
          "start_adv_epoch": "adv_from", "reg_lambda": "lambda", "epochs": "ep",
          "pass_budget": "budget", "trades_beta": "beta", "model": "model"}


def short_name(param: str) -> str:
    """A parameter's column name in the live table (``explore_eps`` -> ``xeps``)."""
    return _SHORT.get(param) or param


def _fmt(v: Any) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "-"
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 1e-2 or abs(v) >= 1e3 else f"{v:.3f}"
    return str(v)


@dataclass
class TrialView:
    key: str
    phase: str
    regime: str
    params: dict
    epochs: int
    epoch: int = -1
    val_acc: float | None = None
    val_robust: float | None = None
    rung: str = ""
    status: str = "PENDING"
    objectives: dict = field(default_factory=dict)
    started: float | None = None
    finished: float | None = None


@dataclass
class Board:
    """Everything the table shows (filled by :class:`Progress`; tests build it directly)."""

    name: str
    total: int
    concurrency: int
    objectives: list[str]
    trials: dict[str, TrialView] = field(default_factory=dict)
    started: float = field(default_factory=time.time)

    def counts(self) -> dict[str, int]:
        c = {"done": 0, "running": 0, "pruned": 0, "failed": 0}
        for t in self.trials.values():
            if t.status == "COMPLETE":
                c["done"] += 1
            elif t.status == "PRUNED":
                c["pruned"] += 1
            elif t.status == "FAILED":
                c["failed"] += 1
            elif t.status in ("RUNNING", "EVALUATING"):
                c["running"] += 1
        return c

    def eta_seconds(self, now: float | None = None) -> float | None:
        """(trials left) x (mean seconds of a finished trial) / concurrency."""
        done = [t.finished - t.started for t in self.trials.values()
                if t.finished is not None and t.started is not None]
        c = self.counts()
        left = self.total - c["done"] - c["pruned"] - c["failed"]
        if not done or left <= 0:
            return None if left > 0 else 0.0
        return left * (sum(done) / len(done)) / max(1, self.concurrency)


def _clock(s: float | None) -> str:
    if s is None:
        return "?"
    s = int(s)
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}" if s >= 3600 else \
        f"{s // 60}:{s % 60:02d}"


def header(board: Board, now: float | None = None) -> str:
    now = time.time() if now is None else now
    c = board.counts()
    return (f"{board.name}: {c['done']} done, {c['running']} running, {c['pruned']} pruned, "
            f"{c['failed']} failed of {board.total} | elapsed {_clock(now - board.started)} "
            f"| ETA {_clock(board.eta_seconds(now))}")


def rows(board: Board) -> tuple[list[str], list[list[str]]]:
    """The table: column names and one row of strings per trial (internal keys never)."""
    params = sorted({k for t in board.trials.values() for k in t.params
                     if not k.startswith("_") and k != "regime"})
    cols = ["trial", "regime", *[short_name(p) for p in params], "epoch", "val", "val_rob",
            "rung", "status", *board.objectives]
    out = []
    for t in sorted(board.trials.values(), key=lambda t: t.key):
        out.append([t.key, t.regime, *[_fmt(t.params.get(p)) for p in params],
                    f"{t.epoch + 1}/{t.epochs}" if t.epoch >= 0 else f"-/{t.epochs}",
                    _fmt(t.val_acc), _fmt(t.val_robust), t.rung or "", t.status,
                    *[_fmt(t.objectives.get(o)) for o in board.objectives]])
    return cols, out


def render(board: Board, now: float | None = None) -> str:
    """The header and the table as plain text (what non-rich terminals and tests see)."""
    cols, body = rows(board)
    widths = [max(len(c), *(len(r[i]) for r in body)) if body else len(c)
              for i, c in enumerate(cols)]
    lines = [header(board, now), "  ".join(c.ljust(w) for c, w in zip(cols, widths))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(r, widths)) for r in body]
    return "\n".join(lines)


def _rich_table(board: Board):
    """The header line (never wrapped to the table's width) above the table; called on
    every refresh, so elapsed time and ETA move between trial events too."""
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    cols, body = rows(board)
    t = Table(box=None, pad_edge=False, header_style="bold")
    for c in cols:
        t.add_column(c, no_wrap=True)
    style = {"COMPLETE": "green", "PRUNED": "yellow", "FAILED": "red", "RUNNING": "cyan",
             "EVALUATING": "magenta"}
    for r in body:
        status = r[cols.index("status")]
        t.add_row(*r, style=style.get(status))
    return Group(Text(header(board), no_wrap=True, overflow="ellipsis"), t)


def resolve_mode(mode: str, stream=None) -> str:
    if mode not in MODES:
        raise ValueError(f"progress mode {mode!r}; one of {', '.join(MODES)}")
    if mode != "auto":
        return mode
    stream = stream or sys.stdout
    return "table" if getattr(stream, "isatty", lambda: False)() else "lines"


def progress_callback(board: Board, mode: str, ledger=None, console=None):
    """The Tune callback that fills ``board`` and shows it (see the module docstring)."""
    from ray import tune

    from aerl_ray.ledger import Ticket

    class Progress(tune.Callback):
        def __init__(self):
            self.live = None

        def setup(self, **info):
            if mode == "table":
                from rich.console import Console
                from rich.live import Live

                self.live = Live(console=console or Console(), refresh_per_second=2,
                                 transient=False, get_renderable=lambda: _rich_table(board))
                self.live.start()

        def _view(self, trial) -> TrialView:
            t = Ticket.of(trial.config)
            v = board.trials.get(t.key)
            if v is None:
                meta = trial.config.get("_aerl", {})
                v = TrialView(t.key, t.phase, str(t.params.get("regime", meta.get("fixed", {})
                                                                  .get("regime", ""))),
                              dict(t.params), int(t.params.get("epochs", meta.get(
                                  "fixed", {}).get("epochs", 0)) or 0))
                board.trials[t.key] = v
            return v

        def _show(self, line: str | None = None) -> None:
            if self.live is not None:
                self.live.update(_rich_table(board))
            elif mode == "lines" and line:
                logger.info("%s | %s", line, header(board))

        def on_trial_start(self, iteration, trials, trial, **info):
            v = self._view(trial)
            v.status, v.started = "RUNNING", v.started or time.time()
            self._show(f"{v.key} started ({v.regime})")

        def on_trial_result(self, iteration, trials, trial, result, **info):
            v = self._view(trial)
            if result.get("aerl_final"):
                v.objectives = {o: result.get(o) for o in board.objectives}
                return
            if "epoch" in result:
                v.epoch = int(result["epoch"])
                v.val_acc = finite_or_none(result.get("val_acc"))
                rob = finite_or_none(result.get("val_robust_acc"))  # measured at rungs / robust
                v.val_robust = rob if rob is not None else v.val_robust  # selection only
                v.status = "EVALUATING" if v.epoch + 1 >= v.epochs else "RUNNING"
            rung = ledger.last_rung(v.key) if ledger is not None else None
            if rung is not None:
                v.rung = f"{rung['decision']}@{rung['rung']:g}"
            self._show(f"{v.key} epoch {v.epoch + 1}/{v.epochs} val {_fmt(v.val_acc)} "
                       f"val_rob {_fmt(v.val_robust)}" + (f" rung {v.rung}" if v.rung else ""))

        def _end(self, trial, status: str | None = None) -> None:
            v = self._view(trial)
            committed = ledger.committed(v.phase).get(v.key) if ledger is not None else None
            v.status = committed or status or "STOPPED"
            v.finished = time.time()
            self._show(f"{v.key} {v.status} "
                       + " ".join(f"{o} {_fmt(v.objectives.get(o))}" for o in board.objectives))
            if mode == "quiet":
                logger.info("%s", header(board))

        def on_trial_complete(self, iteration, trials, trial, **info):
            self._end(trial)

        def on_trial_error(self, iteration, trials, trial, **info):
            self._end(trial, "FAILED")

        def on_experiment_end(self, trials, **info):
            if self.live is not None:
                self.live.update(_rich_table(board))
                self.live.stop()
                self.live = None

    return Progress()



def board_from_rows(name: str, total: int, concurrency: int, objectives: Sequence[str],
                    trials: Iterable[Mapping[str, Any]]) -> Board:
    """A board built from plain dicts (recorded runs, tests)."""
    b = Board(name, total, concurrency, list(objectives))
    for t in trials:
        b.trials[t["key"]] = TrialView(**t)
    return b
