"""Recording a sweep: a Tune callback in the driver that commits each trial through the
:class:`~aerl_ray.ledger.Ledger` as results arrive (so a crash loses nothing finished).

All writes happen in the driver process: trials on other nodes send their rows inside their
final Tune result, so the run dir needs no shared filesystem.

- every epoch report's registered checkpoint -> one ``epochs.parquet`` row (the resume point);
- a final report -> the trial's evaluation/indicator rows, its row, then the study's tell;
- a trial stopped before its evaluation (by a scheduler) -> PRUNED;
- a trial that errored after its retries -> FAILED, with the last error line;
- after an interrupt (Ctrl-C, SIGTERM) stopped or errored trials are *not* committed: they
  stay RUNNING in the study and ``--resume`` re-runs them from their last checkpoint.
"""
from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path
from typing import Any

from aerl_ray.ledger import CONFIRM, FAILED, PRUNED, SEARCH, Ledger, Ticket

logger = logging.getLogger(__name__)

_EPOCH_COLS = ("epoch", "regime_active", "train_loss", "val_acc", "val_robust_acc", "selected",
               "fwd_passes", "bwd_passes", "wall_seconds")


def _clean(v: Any) -> Any:
    return None if isinstance(v, float) and not math.isfinite(v) else v


def results_callback(ledger: Ledger):
    from ray import tune

    from aerl_ray.trial import ERROR_KEY, FINAL_KEY, ROW_KEY

    names = [o.name for o in ledger.spec.objectives]

    def ticket_of(trial) -> Ticket:
        return Ticket.of(trial.config)

    def checkpoint_path(trial, result: dict) -> str:
        ck = getattr(trial, "checkpoint", None)
        return str(result.get("checkpoint_path") or getattr(ck, "path", "") or "")

    def epoch_row(trial, result: dict, checkpoint: str) -> dict:
        t = ticket_of(trial)
        metrics = {k: _clean(v) for k, v in result.items()
                   if isinstance(v, (int, float, str, bool)) and not k.startswith("aerl")
                   and k not in names}
        row = {"run_id": ledger.run_id, "trial_id": t.key, "phase": t.phase, "split": "val",
               "checkpoint": checkpoint, "metrics": json.dumps(metrics, default=str)}
        row.update({k: _clean(result.get(k)) for k in _EPOCH_COLS})
        return row

    def fallback_row(trial, status: str, error: str) -> dict:
        """The row of a trial that ended without a final report (pruned, errored)."""
        t = ticket_of(trial)
        last = trial.last_result or {}
        row = {"run_id": ledger.run_id, "trial_id": t.key, "status": status,
               "error": error[:500], "regime": t.params.get("regime",
                                                            ledger.spec.fixed.get("regime", "")),
               "train_seed": t.seed, "tune_trial_id": trial.trial_id,
               "params": json.dumps(dict(t.params), sort_keys=True, default=str),
               "epochs_run": int(last.get("epoch", -1)) + 1,
               "val_acc": _clean(last.get("val_acc")),
               "val_robust_acc": _clean(last.get("val_robust_acc")),
               "train_fwd_passes": last.get("fwd_passes"),
               "train_bwd_passes": last.get("bwd_passes"),
               "select_fwd_passes": last.get("select_fwd_passes"),
               "select_bwd_passes": last.get("select_bwd_passes"),
               "train_seconds": _clean(last.get("wall_seconds")),
               "checkpoint": checkpoint_path(trial, last), "finished_at": time.time(),
               **{f"p_{k}": v for k, v in t.params.items()},
               **{f"obj_{n}": float("nan") for n in names}}
        if t.phase == SEARCH:
            row.update(number=t.number, split="val")
        else:
            row.update(config_id=t.config_id, seed_index=t.seed_index, why=t.why,
                       split="test")
            row.pop("tune_trial_id")
            row.pop("number", None)
        return row

    class ResultsWriter(tune.Callback):
        """Driver-side: commits trials and records epochs through the ledger."""

        def on_checkpoint(self, iteration, trials, trial, checkpoint, **info):
            result = trial.last_result or {}
            if result.get(FINAL_KEY) or "epoch" not in result:
                return
            ledger.record_epoch(epoch_row(trial, result, str(checkpoint.path)))

        def on_trial_result(self, iteration, trials, trial, result, **info):
            t = ticket_of(trial)
            if not result.get(FINAL_KEY):
                if result.get("checkpoint_path") and "epoch" in result:  # Ray Train trials
                    ledger.record_epoch(epoch_row(trial, result, str(result["checkpoint_path"])))
                return
            row = json.loads(result[ROW_KEY])
            row["checkpoint"] = row.get("checkpoint") or checkpoint_path(trial, result)
            if t.phase == SEARCH:
                row["tune_trial_id"] = trial.trial_id
            else:
                row.pop("number", None)
            evals = json.loads(result.get("eval_rows_json", "[]"))
            for r in evals:
                r["checkpoint"] = row["checkpoint"] or r.get("checkpoint", "")
            ind = json.loads(result.get("indicator_rows_json", "[]"))
            if ledger.commit(t.phase, row, evals, ind):
                self._log(t, row, result)

        def _log(self, t: Ticket, row: dict, result: dict) -> None:
            if row["status"] == FAILED:
                logger.warning("trial %s FAILED: %s", t.key, row["error"])
            elif t.phase == CONFIRM:
                logger.info("confirmation %s (config %s, seed %d) done: %s", t.key,
                            t.config_id, t.seed, {n: round(row[f"obj_{n}"], 4) for n in names})
            else:
                logger.info("trial %s %s: %s", t.key, row["status"],
                            {n: round(row[f"obj_{n}"], 4) for n in names
                             if row.get(f"obj_{n}") is not None})

        def on_trial_complete(self, iteration, trials, trial, **info):
            t = ticket_of(trial)
            if ledger.is_committed(t.phase, t.key) or ledger.interrupted.is_set():
                return  # committed, or interrupted: re-run by --resume
            row = fallback_row(trial, PRUNED, "stopped early by the scheduler")
            rung = ledger.last_rung(t.key)
            if rung is not None and rung.get("decision") == "stop":
                row.update(error=f"stopped at {rung.get('time_attr', 'epochs_done')}="
                                 f"{rung.get('rung')}: {rung.get('reason', '')}"[:500],
                           stopped_at_rung=rung.get("rung"),
                           dominated_by=",".join(map(str, rung.get("dominated_by") or [])))
            ledger.commit(t.phase, row)
            logger.info("trial %s PRUNED: %s", t.key, row["error"])

        def on_trial_error(self, iteration, trials, trial, **info):
            t = ticket_of(trial)
            if ledger.is_committed(t.phase, t.key) or ledger.interrupted.is_set():
                return
            err = ""
            try:
                err = Path(trial.error_file).read_text()[-2000:] if trial.error_file else ""
            except OSError:
                pass
            reason = next((ln for ln in reversed(err.splitlines()) if "Error" in ln), err[-300:])
            ledger.commit(t.phase, fallback_row(trial, FAILED, reason.strip()))

    return ResultsWriter()
