"""Result rows, their schemas, the run-dir layout and atomic Parquet I/O.

Everything a run writes lives under one run dir; ``analysis/`` reads only these files.

Run-dir layout (:class:`RunDir`)::

    RUN/
      sweep.json            the resolved sweep spec + run id (identifies the sweep)
      optuna.db             the Optuna study (SQLite default; any SQLAlchemy URL instead)
      trials.parquet/       one row per trial            (TRIAL_COLUMNS)
      evals.parquet/        one row per (checkpoint, attack, norm, eps)   (EVAL_COLUMNS)
      indicators.parquet/   gradient indicators, long format   (INDICATOR_COLUMNS)
      tune/                 Ray Tune experiment: per-trial TensorBoard events, checkpoints

Each ``*.parquet`` is a directory of part files.  Every part is written to a temp file and
renamed into place, so a crash leaves either a whole part or none; ``pandas.read_parquet``
reads the directory as one table.  Rows carry keys (:data:`EVAL_KEY`, :data:`TRIAL_KEY`);
readers keep the last row per key, so a retried evaluation never counts twice.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any, Iterable, Mapping

import numpy as np
import pandas as pd

logger = logging.getLogger(__name__)

# --- schemas ------------------------------------------------------------------------------
# Every number says what it is: attack, norm, eps, n, seed, interval.
EVAL_COLUMNS: dict[str, str] = {
    "run_id": "sweep run id ('' for a standalone evaluation)",
    "trial_id": "Tune trial id ('' for a standalone evaluation)",
    "checkpoint": "path of the evaluated checkpoint",
    "model": "architecture name",
    "dataset": "dataset name",
    "regime": "training regime of the checkpoint",
    "config_hash": "sha1 (12 hex) of the checkpoint's resolved training config",
    "attack": "attack name (registry name, e.g. pgd, autoattack, square, transfer:SOURCE)",
    "norm": "Linf or L2",
    "eps": "perturbation budget (float, pixels in [0,1])",
    "eps_str": "the budget as written by the user (e.g. '8/255')",
    "n": "number of test examples evaluated",
    "clean_acc": "clean accuracy on those n examples",
    "robust_acc": "robust accuracy (fraction still correct under the attack; per example "
                  "the worst case over the grid's budgets <= eps)",
    "ci_low": "95% Wilson interval, lower bound of robust_acc",
    "ci_high": "95% Wilson interval, upper bound of robust_acc",
    "seed": "attack seed",
    "fwd_passes": "forward example-passes the attack used at this budget (pgd/fgsm run "
                  "the whole grid in one batched loop: each shared pass is split over the "
                  "budgets by the rows each had in it, the clean pass charged to the first "
                  "budget; other attacks: the incremental cost of this budget; transfer: "
                  "incl. crafting on the source, 0 when cached)",
    "bwd_passes": "backward example-passes the attack used at this budget (as fwd_passes)",
    "queries": "model queries (query-based attacks; else forward passes)",
    "seconds": "wall time of the attack at this budget (split like fwd_passes)",
    "params": "JSON of the attack parameters (steps, restarts, loss, ...)",
    "flags": "JSON list of warnings/diagnostic flags raised by this attack",
}
EVAL_KEY = ["run_id", "trial_id", "checkpoint", "attack", "norm", "eps"]

INDICATOR_COLUMNS: dict[str, str] = {
    "run_id": "sweep run id", "trial_id": "Tune trial id", "checkpoint": "checkpoint path",
    "norm": "Linf or L2", "eps": "budget of the PGD run the indicator was measured on",
    "indicator": "name (agn, cos_prev, sign_consistency, dispersion, mean_dir_dispersion, "
                 "frac_small_grad (per step), frac_small_grad_clean / _start (random "
                 "start) / _path (small at every step), frac_nonfinite_grad, "
                 "entropy_clean, entropy_adv, pgd_success; see aerl_ray.indicators)",
    "step": "PGD step (-1 = aggregate over the trajectory)",
    "value": "value, aggregated over all batches",
}
INDICATOR_KEY = ["run_id", "trial_id", "checkpoint", "norm", "eps", "indicator", "step"]

TRIAL_COLUMNS: dict[str, str] = {
    "run_id": "sweep run id",
    "trial_id": "Tune trial id",
    "status": "COMPLETE, FAILED or PRUNED",
    "error": "why a trial failed or was pruned ('' otherwise)",
    "regime": "training regime",
    "params": "JSON of the searched parameters",
    "config": "JSON of the resolved training config",
    "config_hash": "sha1 (12 hex) of the resolved training config",
    "epochs_run": "epochs actually trained",
    "val_acc": "best clean validation accuracy",
    "clean_acc": "clean test accuracy of the evaluated (best) checkpoint",
    "train_fwd_passes": "forward example-passes of training",
    "train_bwd_passes": "backward example-passes of training",
    "train_seconds": "training wall time",
    "eval_seconds": "evaluation wall time seen by the trial (includes waiting for an evaluator)",
    "eval_compute_seconds": "time the evaluator spent on this trial",
    "trial_seconds": "wall time of the whole trial (training, evaluation, reporting)",
    "checkpoint": "path of the evaluated checkpoint",
    "masking_suspected": "True if any gradient-masking diagnostic fired",
    "diagnostics": "JSON: check -> {value, reference, delta, flag, detail} (aerl_ray.diagnostics)",
    "diagnostics_level": "cheap (during the search) or full (re-evaluated: Pareto trials)",
    "finished_at": "unix time the row was written",
}
TRIAL_KEY = ["run_id", "trial_id"]
# Objective values go in extra columns named ``obj_<metric>``; searched parameters are
# also flattened into ``p_<name>`` columns for convenient filtering.


def config_hash(config: Mapping[str, Any]) -> str:
    blob = json.dumps(dict(config), sort_keys=True, default=str).encode()
    return hashlib.sha1(blob).hexdigest()[:12]


def wilson_interval(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval of a binomial proportion k/n."""
    if n <= 0:
        return (float("nan"), float("nan"))
    p = k / n
    den = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / den
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / den
    return (max(0.0, centre - half), min(1.0, centre + half))


def pareto_mask(points) -> np.ndarray:
    """Boolean mask of the non-dominated rows of an (n, k) array, every column maximised.

    Rows with a NaN/inf value are never on the front; identical points are all kept."""
    p = np.asarray(points, dtype=float)
    p = p.reshape(len(p), -1) if p.size else p.reshape(0, 1)
    finite = np.isfinite(p).all(axis=1)
    mask = finite.copy()
    q = p[finite]
    for j, i in enumerate(np.flatnonzero(finite)):
        if (((q >= q[j]).all(axis=1)) & ((q > q[j]).any(axis=1))).any():
            mask[i] = False
    return mask


# --- run dir --------------------------------------------------------------------------------
class RunDir:
    """Paths of one run dir (see the module docstring)."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root).expanduser().resolve()

    spec = property(lambda self: self.root / "sweep.json")
    optuna_db = property(lambda self: self.root / "optuna.db")
    trials = property(lambda self: self.root / "trials.parquet")
    evals = property(lambda self: self.root / "evals.parquet")
    indicators = property(lambda self: self.root / "indicators.parquet")
    tune = property(lambda self: self.root / "tune")

    def is_run_dir(self) -> bool:
        return self.spec.is_file()


# --- atomic Parquet parts -------------------------------------------------------------------
def append_rows(table_dir: str | os.PathLike, rows: Iterable[Mapping[str, Any]]) -> Path | None:
    """Write ``rows`` as one new part file of the table directory, atomically."""
    rows = [dict(r) for r in rows]
    if not rows:
        return None
    d = Path(table_dir)
    d.mkdir(parents=True, exist_ok=True)
    name = f"part-{time.time_ns()}-{uuid.uuid4().hex[:8]}.parquet"
    fd, tmp = tempfile.mkstemp(dir=d, prefix=".", suffix=".tmp")
    os.close(fd)
    try:
        pd.DataFrame(rows).to_parquet(tmp, index=False)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, d / name)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return d / name


def repair_table(table_dir: str | os.PathLike) -> list[Path]:
    """Remove temp files and unreadable (truncated) parts left by a crash; returns them."""
    d = Path(table_dir)
    removed: list[Path] = []
    if not d.is_dir():
        return removed
    for p in sorted(d.iterdir()):
        bad = p.name.startswith(".") and p.name.endswith(".tmp")
        if not bad and p.suffix == ".parquet":
            try:
                pd.read_parquet(p)
            except Exception:  # noqa: BLE001 - any read failure means a damaged part
                bad = True
        if bad:
            logger.warning("removing damaged result part %s", p)
            p.unlink()
            removed.append(p)
    return removed


def read_table(table_dir: str | os.PathLike, key: list[str] | None = None) -> pd.DataFrame:
    """Read all parts (in write order); keep the last row per ``key`` if given."""
    d = Path(table_dir)
    parts = sorted(p for p in d.glob("part-*.parquet")) if d.is_dir() else []
    if not parts:
        return pd.DataFrame()
    df = pd.concat([pd.read_parquet(p) for p in parts], ignore_index=True)
    if key:
        present = [k for k in key if k in df.columns]
        df = df.drop_duplicates(subset=present, keep="last").reset_index(drop=True)
    return df
