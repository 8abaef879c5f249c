"""The trial ledger: one source of truth for which trials exist and in what state.

A sweep's trials live in the Optuna study (the RDB storage) and in the run dir's tables.
The ledger keeps the two consistent with one rule: **a trial is finished when its row is
committed** -- its evaluation rows, then its ``trials.parquet`` (or ``confirm.parquet``)
row, then (search trials) the study's ``tell``, all written by the driver in that order.
Ray Tune only executes what the ledger hands it; its own experiment state is never
restored (no pickled searcher snapshot that disagrees with the study).

On ``--resume``, :meth:`Ledger.reconcile` runs before anything else:

- a study trial still RUNNING whose row was committed (the driver died between the two
  writes) is told its committed state;
- a study trial still RUNNING without a committed row (it was running when the driver
  died) is re-run, exactly once, under its own trial id, from the last checkpoint the
  driver recorded for it (``epochs.parquet``), or from scratch if it had none;
- evaluation rows of uncommitted trials and epoch rows past their resume point are
  dropped (they will be written again), and every table is compacted (one row per key);
- finished trials (COMPLETE, PRUNED, FAIL) are never re-run.

New trials are asked from the study (``study.ask()``; points to evaluate are enqueued in
the study when it is created) until the study holds ``num_samples`` trials.
"""
from __future__ import annotations

import logging
import threading
import time
import warnings
from dataclasses import asdict, dataclass, field
from typing import Any, Iterable, Mapping

import pandas as pd

from aerl_ray import results as R
from aerl_ray.stats import finite_or_none

logger = logging.getLogger(__name__)

SEARCH, CONFIRM = "search", "confirm"
COMPLETE, PRUNED, FAILED = "COMPLETE", "PRUNED", "FAILED"


def search_key(number: int) -> str:
    """The stable id of search trial ``number`` (the Optuna trial number)."""
    return f"t{number:04d}"


def confirm_key(config_id: str, k: int) -> str:
    """The id of the k-th confirmation run of search trial ``config_id``."""
    return f"{config_id}-s{k}"


def search_seed(base_seed: int, number: int) -> int:
    return int(base_seed) * 100003 + int(number)


@dataclass(frozen=True)
class Ticket:
    """One unit of work handed to Ray Tune: a search trial or a confirmation run."""

    key: str
    phase: str
    number: int
    params: Mapping[str, Any]
    seed: int
    resume_from: str | None = None  # a Tune checkpoint (path or URI) to continue from
    resume_epoch: int = -1
    config_id: str = ""  # confirmation: the search trial whose configuration it retrains
    seed_index: int = 0
    why: str = ""

    def config(self) -> dict:
        """The Tune config: the searched parameters plus the ticket under ``_trial``."""
        return {**dict(self.params), "_trial": asdict(self)}

    @staticmethod
    def of(config: Mapping[str, Any]) -> "Ticket":
        d = dict(config["_trial"])
        d["params"] = dict(d.get("params") or {})
        return Ticket(**d)


@dataclass
class ReconcileReport:
    told: dict[str, str] = field(default_factory=dict)  # key -> state told to the study
    reruns: list[Ticket] = field(default_factory=list)
    dropped_rows: dict[str, int] = field(default_factory=dict)

    def summary(self) -> str:
        parts = []
        if self.reruns:
            parts.append("re-running " + ", ".join(
                f"{t.key} (from epoch {t.resume_epoch + 1})" if t.resume_from
                else f"{t.key} (from scratch)" for t in self.reruns))
        if self.told:
            parts.append("recorded in the study: " + ", ".join(f"{k} {s}"
                                                              for k, s in self.told.items()))
        dropped = {k: v for k, v in self.dropped_rows.items() if v}
        if dropped:
            parts.append("dropped uncommitted rows: " + ", ".join(f"{v} in {k}"
                                                                  for k, v in dropped.items()))
        return "; ".join(parts) or "nothing to repair"


class Ledger:
    """The driver's view of a sweep's trials (study + run-dir tables); see the module doc."""

    def __init__(self, run: R.RunDir, spec, run_id: str, study_name: str, storage,
                 trials_table: R.Table, confirm_table: R.Table):
        self.run, self.spec, self.run_id = run, spec, run_id
        self.study_name, self.storage = study_name, storage
        self.trials_table, self.confirm_table = trials_table, confirm_table
        self.names = [o.name for o in spec.objectives]
        self.interrupted = threading.Event()
        self._committed: dict[tuple[str, str], str] = {}  # (phase, key) -> status
        self._rungs: dict[str, dict] = {}  # key -> the scheduler's last decision
        self._rungs_read = -1  # size of rungs.jsonl when last read (it is append-only)
        self._study = None
        for t in (R.EVALS, R.INDICATORS, R.EPOCHS, trials_table, confirm_table):
            R.repair_table(run.table(t))  # a crash mid-write: drop half-written parts first
        self._load_committed()

    def __getstate__(self) -> dict:
        # Ray Tune pickles its searcher and callbacks into tuner.pkl (for Tuner.restore,
        # which the sweep never uses); a pickled ledger carries no live handles
        return {**self.__dict__, "interrupted": None, "_study": None, "storage": None}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self.interrupted = threading.Event()

    # -- the study --------------------------------------------------------------------------
    @property
    def study(self):
        if self._study is None:
            import optuna

            from aerl_ray.search import make_sampler

            self._study = optuna.load_study(study_name=self.study_name, storage=self.storage,
                                            sampler=make_sampler(self.spec))
        return self._study

    def create_study(self) -> None:
        """Create the study (objective names, directions, points to evaluate enqueued)."""
        import optuna

        from aerl_ray.search import make_sampler

        study = optuna.create_study(
            study_name=self.study_name, storage=self.storage, sampler=make_sampler(self.spec),
            directions=["maximize" if o.direction == "max" else "minimize"
                        for o in self.spec.objectives])
        with warnings.catch_warnings():  # "experimental" since optuna 3.2; its dashboard uses it
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            study.set_metric_names(self.names)
        study.set_user_attr("run_id", self.run_id)
        for point in self.spec.points_to_evaluate:
            study.enqueue_trial(dict(point))
        self._study = study

    def asked(self) -> int:
        """Study trials that have been handed out (not WAITING)."""
        import optuna

        return sum(t.state != optuna.trial.TrialState.WAITING
                   for t in self.study.get_trials(deepcopy=False))

    def ask(self) -> Ticket | None:
        """A new search trial from the study, or None when it holds ``num_samples``."""
        if self.asked() >= self.spec.num_samples:
            return None
        trial = self.study.ask()
        values: dict[str, Any] = {}
        for p in self.spec.params:
            if p.active(values):
                values[p.name] = p.suggest(trial)
        key, seed = search_key(trial.number), search_seed(self.spec.seed, trial.number)
        trial.set_user_attr("aerl_trial_id", key)
        trial.set_user_attr("seed", seed)
        trial.set_user_attr("asked_at", time.time())
        return Ticket(key, SEARCH, trial.number, values, seed)

    # -- committed rows -----------------------------------------------------------------------
    def _load_committed(self) -> None:
        for phase, path, key in ((SEARCH, self.run.trials, R.TRIAL_KEY),
                                 (CONFIRM, self.run.confirm, R.CONFIRM_KEY)):
            df = R.read_table(path, key=key)
            for _, r in df.iterrows():
                if r.get("run_id") == self.run_id:
                    self._committed[(phase, str(r["trial_id"]))] = str(r["status"])

    def is_committed(self, phase: str, key: str) -> bool:
        return (phase, key) in self._committed

    def committed(self, phase: str = SEARCH) -> dict[str, str]:
        return {k: s for (p, k), s in self._committed.items() if p == phase}

    # -- scheduler decisions ------------------------------------------------------------
    def record_rung(self, record: dict) -> None:
        """A scheduler decision (:mod:`aerl_ray.moasha`): appended to ``rungs.jsonl``
        (fsynced) as it is made, so a restarted driver rebuilds the scheduler from it."""
        from aerl_ray.moasha_config import DecisionLog

        DecisionLog(self.run.rungs)(record)
        self._rungs[str(record["key"])] = dict(record)

    def rung_records(self) -> list[dict]:
        from aerl_ray.moasha_config import DecisionLog

        records = DecisionLog(self.run.rungs).read()
        for r in records:
            self._rungs[str(r["key"])] = r
        return records

    def last_rung(self, key: str) -> dict | None:
        """The scheduler's last decision on ``key``, read back from ``rungs.jsonl`` (the
        scheduler may hold a copy of this ledger, e.g. after Tune pickles it); the file is
        read again only when it has grown (this runs on every trial result)."""
        try:
            size = self.run.rungs.stat().st_size
        except FileNotFoundError:
            size = 0
        if size != self._rungs_read:
            self.rung_records()
            self._rungs_read = size
        return self._rungs.get(key)

    def record_epoch(self, row: Mapping[str, Any]) -> None:
        """One epoch of a trial (written when its checkpoint is registered)."""
        R.append_rows(self.run.epochs, [row], R.EPOCHS)

    def commit(self, phase: str, row: Mapping[str, Any], evals: Iterable[Mapping] = (),
               indicators: Iterable[Mapping] = ()) -> bool:
        """Commit a finished trial: its evaluation rows, then its row, then (search) the
        study's ``tell``.  A second commit of the same trial is ignored (returns False)."""
        key, status = str(row["trial_id"]), str(row["status"])
        if self.is_committed(phase, key):
            logger.info("trial %s is already committed; ignoring a repeated result", key)
            return False
        R.append_rows(self.run.evals, list(evals), R.EVALS)
        R.append_rows(self.run.indicators, list(indicators), R.INDICATORS)
        table = self.trials_table if phase == SEARCH else self.confirm_table
        R.append_rows(self.run.table(table), [row], table)
        self._committed[(phase, key)] = status
        if phase == SEARCH:
            self._tell(int(row["number"]), status, row)
        return True

    def _tell(self, number: int, status: str, row: Mapping[str, Any]) -> None:
        import optuna

        study = self.study
        trial = study.get_trials(deepcopy=False)[number] if number < len(
            study.get_trials(deepcopy=False)) else None
        if trial is None or trial.number != number:
            trial = next(t for t in study.get_trials(deepcopy=False) if t.number == number)
        if trial.state.is_finished():
            return
        attrs = {"status": status, "error": str(row.get("error") or "")[:500],
                 "val_acc": finite_or_none(row.get("val_acc")), "epochs_run": row.get("epochs_run"),
                 "ckpt_epoch": row.get("ckpt_epoch"), "ckpt_regime": row.get("ckpt_regime")}
        rung = self.last_rung(str(row["trial_id"]))
        if status == PRUNED and rung is not None:  # the rung values it was stopped on
            attrs.update(stopped_at_rung=rung.get("rung"), rung_values=rung.get("values"),
                         dominated_by=rung.get("dominated_by"))
        for k, v in attrs.items():
            if v is not None and v != "":
                study._storage.set_trial_user_attr(trial._trial_id, k, v)
        if status == COMPLETE:
            study.tell(number, [float(row[f"obj_{n}"]) for n in self.names])
        elif status == PRUNED:
            study.tell(number, state=optuna.trial.TrialState.PRUNED)
        else:
            study.tell(number, state=optuna.trial.TrialState.FAIL)

    # -- resume -----------------------------------------------------------------------------
    def latest_checkpoints(self) -> dict[str, tuple[int, str]]:
        """key -> (epoch, checkpoint) of the newest epoch row with a checkpoint."""
        df = R.read_table(self.run.epochs, key=R.EPOCH_KEY)
        out: dict[str, tuple[int, str]] = {}
        if df.empty:
            return out
        df = df[(df["run_id"] == self.run_id) & df["checkpoint"].notna()
                & (df["checkpoint"] != "")]
        for key, g in df.groupby("trial_id"):
            r = g.sort_values("epoch").iloc[-1]
            out[str(key)] = (int(r["epoch"]), str(r["checkpoint"]))
        return out

    def reconcile(self, confirm_jobs: Iterable[Ticket] = ()) -> ReconcileReport:
        """Make the study and the tables agree before anything runs (see the module doc).

        ``confirm_jobs``: the confirmation plan's tickets (pending ones are returned as
        re-runs with their resume points)."""
        import optuna

        rep = ReconcileReport()
        self._committed.clear()
        self._load_committed()
        trials = R.read_table(self.run.trials, key=R.TRIAL_KEY)
        rows = {str(r["trial_id"]): r for _, r in trials.iterrows()
                if r.get("run_id") == self.run_id}
        ckpts = self.latest_checkpoints()
        running = optuna.trial.TrialState.RUNNING
        for t in self.study.get_trials(deepcopy=False):
            key = t.user_attrs.get("aerl_trial_id") or search_key(t.number)
            if t.state != running:
                continue
            if key in rows:
                self._tell(t.number, str(rows[key]["status"]), rows[key])
                rep.told[key] = str(rows[key]["status"])
                continue
            epoch, ck = ckpts.get(key, (-1, None))
            seed = int(t.user_attrs.get("seed", search_seed(self.spec.seed, t.number)))
            rep.reruns.append(Ticket(key, SEARCH, t.number, dict(t.params), seed, ck, epoch))
        for job in confirm_jobs:
            if not self.is_committed(CONFIRM, job.key):
                epoch, ck = ckpts.get(job.key, (-1, None))
                rep.reruns.append(Ticket(**{**asdict(job), "resume_from": ck,
                                            "resume_epoch": epoch}))
        keep_ids = {k for (_, k) in self._committed}
        resume_epoch = {t.key: t.resume_epoch for t in rep.reruns}
        mine = lambda df: df["run_id"] == self.run_id  # noqa: E731
        for t in (R.EVALS, R.INDICATORS):
            rep.dropped_rows[t.name] = self._drop(
                t, lambda df: ~mine(df) | df["trial_id"].isin(keep_ids))
        rep.dropped_rows[R.EPOCHS.name] = self._drop(R.EPOCHS, lambda df: ~mine(df) | (
            df["trial_id"].isin(keep_ids)) | (df["epoch"] <= df["trial_id"].map(
                resume_epoch).fillna(-1)))
        for t in (self.trials_table, self.confirm_table):
            R.compact_table(self.run.table(t), t)
        return rep

    def _drop(self, table: R.Table, keep) -> int:
        path = self.run.table(table)
        before = len(R.read_table(path, key=list(table.key)))
        after = R.compact_table(path, table, keep)
        return before - after if before else 0

    def compact(self) -> None:
        """One row per key in every table (the end of a sweep)."""
        for t in (R.EVALS, R.INDICATORS, R.EPOCHS, self.trials_table, self.confirm_table):
            R.compact_table(self.run.table(t), t)



def study_frame(ledger: Ledger) -> pd.DataFrame:
    """The study as a table (number, key, state, values): for tests and the report."""
    rows = []
    for t in ledger.study.get_trials(deepcopy=False):
        rows.append({"number": t.number, "trial_id": t.user_attrs.get("aerl_trial_id", ""),
                     "state": t.state.name, **{f"obj_{n}": (t.values[i] if t.values else None)
                                               for i, n in enumerate(ledger.names)}})
    return pd.DataFrame(rows)
