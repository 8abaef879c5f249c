"""Recording a sweep: a Tune callback in the driver that writes each trial's rows to the
run dir as results arrive (so a crash loses nothing already finished), and the Pareto set.

All writes happen in the driver process: trials on other nodes send their evaluation
rows inside their final Tune result, so the run dir needs no shared filesystem.
"""
from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path

import pandas as pd

from aerl_ray import results as R
from aerl_ray.space import SweepSpec

logger = logging.getLogger(__name__)


def results_callback(run: R.RunDir, run_id: str, spec: SweepSpec):
    from ray import tune

    from aerl_ray.trial import ERROR_KEY, FINAL_KEY

    names = [o.name for o in spec.objectives]
    searched = {p.name for p in spec.params}

    def trial_row(trial, status: str, result: dict, error: str = "") -> dict:
        params = {k: v for k, v in (trial.config or {}).items() if k in searched}
        row = {"run_id": run_id, "trial_id": trial.trial_id, "status": status, "error": error,
               "regime": params.get("regime", spec.fixed.get("regime", "")),
               "params": json.dumps(params, sort_keys=True, default=str),
               "config": result.get("config_json", ""),
               "config_hash": R.config_hash(json.loads(result["config_json"]))
               if result.get("config_json") else "",
               "epochs_run": int(result.get("epochs_run", result.get("training_iteration", 0))),
               "val_acc": float(result.get("best_val_acc", result.get("val_acc", float("nan")))),
               "clean_acc": float(result.get("clean_acc", float("nan"))),
               "train_fwd_passes": int(result.get("train_fwd_passes", result.get("fwd_passes", 0))),
               "train_bwd_passes": int(result.get("train_bwd_passes", result.get("bwd_passes", 0))),
               "train_seconds": float(result.get("train_seconds", float("nan"))),
               "eval_seconds": float(result.get("eval_seconds", float("nan"))),
               "eval_compute_seconds": float(result.get("eval_compute_seconds", float("nan"))),
               "trial_seconds": float(result.get("trial_seconds", float("nan"))),
               "checkpoint": str(result.get("checkpoint_path") or getattr(
                   getattr(trial, "checkpoint", None), "path", "") or ""),
               "masking_suspected": bool(result.get("masking_suspected", False)),
               "diagnostics": result.get("diagnostics_json", "{}"),
               "diagnostics_level": result.get("diagnostics_level", ""),
               "finished_at": time.time()}
        row.update({f"obj_{n}": float(result.get(n, float("nan"))) for n in names})
        row.update({f"p_{k}": v for k, v in params.items()})
        return row

    class ResultsWriter(tune.Callback):
        """Driver-side: writes trial/eval/indicator rows to the run dir as they arrive."""

        def on_trial_result(self, iteration, trials, trial, result, **info):
            if not result.get(FINAL_KEY):
                return
            row = trial_row(trial, "COMPLETE", result)
            evals = json.loads(result.get("eval_rows_json", "[]"))
            for r in evals:
                r["checkpoint"] = row["checkpoint"] or r.get("checkpoint", "")
            R.append_rows(run.evals, evals)
            R.append_rows(run.indicators, json.loads(result.get("indicator_rows_json", "[]")))
            if result.get(ERROR_KEY):  # diverged: final, not retried
                row["status"], row["error"] = "FAILED", str(result[ERROR_KEY])[:500]
            elif not all(math.isfinite(row[f"obj_{n}"]) for n in names):
                row["status"], row["error"] = "PRUNED", "an objective is NaN (not evaluated)"
            R.append_rows(run.trials, [row])
            if row["status"] == "FAILED":
                logger.warning("trial %s FAILED: %s", trial.trial_id, row["error"])
                return
            logger.info("trial %s done: %s", trial.trial_id,
                        {n: round(row[f"obj_{n}"], 4) for n in names})

        def on_trial_complete(self, iteration, trials, trial, **info):
            last = trial.last_result or {}
            if not last.get(FINAL_KEY):  # stopped before its evaluation (e.g. ASHA)
                R.append_rows(run.trials, [trial_row(trial, "PRUNED", last,
                                                     "stopped early by the scheduler")])

        def on_trial_error(self, iteration, trials, trial, **info):
            err = ""
            try:
                err = Path(trial.error_file).read_text()[-2000:] if trial.error_file else ""
            except OSError:
                pass
            reason = next((ln for ln in reversed(err.splitlines()) if "Error" in ln), err[-300:])
            R.append_rows(run.trials, [trial_row(trial, "FAILED", trial.last_result or {},
                                                 reason.strip()[:500])])

    return ResultsWriter()


def pareto_front(df: pd.DataFrame, objectives: list[dict]) -> pd.DataFrame:
    """Non-dominated COMPLETE trials (NaN objectives never on the front)."""
    if df.empty:
        return df
    cols = [f"obj_{o['name']}" for o in objectives]
    if any(c not in df.columns for c in cols):
        return df.iloc[0:0]
    ok = df[(df["status"] == "COMPLETE")]
    signs = [1 if o.get("direction", "max") == "max" else -1 for o in objectives]
    keep = R.pareto_mask(ok[cols].to_numpy(dtype=float) * signs)
    return ok[keep].sort_values(cols[0], ascending=False)


def final_diagnostics(run: R.RunDir, dispatcher, front: pd.DataFrame, level: str,
                      run_id: str) -> pd.DataFrame:
    """Re-evaluate the Pareto trials with the ``level`` diagnostics (search used the cheap
    ones) and write their updated rows; returns the updated front."""
    import ray
    from ray.train import Checkpoint

    from aerl_ray.checkpoint import load_checkpoint

    rows = []
    for _, row in front.iterrows():
        if not row.get("checkpoint"):
            logger.warning("trial %s has no checkpoint path; keeping its search-time "
                           "diagnostics", row["trial_id"])
            continue
        try:
            with Checkpoint(row["checkpoint"]).as_directory() as d:
                ckpt = load_checkpoint(Path(d) / "best.pt")
            res = ray.get(dispatcher.evaluate.remote(
                [ray.put(ckpt)], {"run_id": run_id, "trial_id": row["trial_id"],
                                  "checkpoint": row["checkpoint"], "diagnostics": level}))
        except Exception as e:  # noqa: BLE001 - the search's results stay valid
            logger.warning("could not re-evaluate trial %s with %s diagnostics: %s",
                           row["trial_id"], level, e)
            continue
        # the evaluation rows are the search's again (same seeds): only diagnostics change
        new = {k: (None if isinstance(v, float) and math.isnan(v) else v)
               for k, v in row.items()}
        new.update(masking_suspected=bool(res["masking_suspected"]),
                   diagnostics=json.dumps(res["diagnostics"], default=str),
                   diagnostics_level=level, finished_at=time.time())
        rows.append(new)
        logger.info("trial %s: %s diagnostics, masking suspected: %s", row["trial_id"], level,
                    new["masking_suspected"])
    R.append_rows(run.trials, rows)
    return pd.DataFrame(rows) if rows else front
