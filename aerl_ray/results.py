"""Result rows, their schemas, the run-dir layout and atomic Parquet I/O.

Everything a run writes lives under one run dir; ``analysis/`` reads only these files.

Run-dir layout (:class:`RunDir`)::

    RUN/
      sweep.json            the resolved sweep spec, run id and the flags it was started with
      optuna.db             the Optuna study (SQLite default; any SQLAlchemy URL instead)
      trials.parquet/       one row per search trial                     (TRIAL_COLUMNS)
      epochs.parquet/       one row per (trial, epoch), search and confirmation (EPOCH_COLUMNS)
      evals.parquet/        one row per (trial, split, attack, norm, eps) (EVAL_COLUMNS)
      indicators.parquet/   gradient indicators, long format              (INDICATOR_COLUMNS)
      confirm.parquet/      one row per confirmation run (config x seed)  (CONFIRM_COLUMNS)
      confirm_plan.json     which configurations are confirmed, with which seeds
      rungs.jsonl           a scheduler's (MOASHA) decisions, one JSON line each
      tune/                 Ray Tune experiments (one per attempt: search-0, confirm-0, ...),
                            per-trial TensorBoard events and checkpoints, unless --storage
                            puts them under STORAGE/<run_id>/
      report/               figures, pareto.csv, table.{md,csv,tex}, robustbench/*.json, html

Each ``*.parquet`` is a directory of part files.  Every part is written to a temp file and
renamed into place, so a crash leaves either a whole part or none.  Every part of a table is
written with the table's full schema (:class:`Table`: every column, nullable, from the first
part on), so a plain ``pandas.read_parquet(dir)`` sees every column.  Rows carry keys;
:func:`compact_table` (run at the end of a sweep and before a resume) rewrites a table with
one row per key, and :func:`read_table` keeps the last row per key in between.
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
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from aerl_ray.atomic import atomic_write
from aerl_ray.stats import pareto_mask, wilson_interval  # noqa: F401  (re-exported)

logger = logging.getLogger(__name__)

STR, F64, I64, BOOL = pa.string(), pa.float64(), pa.int64(), pa.bool_()
SPLITS = ("train", "val", "test")  # every results row says which split it was measured on
PHASES = ("search", "confirm", "evaluate")

# --- schemas ------------------------------------------------------------------------------
# Every number says what it is: attack, norm, eps, n, split, seed, interval.
_CKPT_COLUMNS: dict[str, tuple[pa.DataType, str]] = {
    "ckpt_epoch": (I64, "epoch (0-based) of the evaluated checkpoint"),
    "ckpt_regime": (STR, "regime active in that epoch (a hybrid trial's is its final regime)"),
    "ckpt_reason": (STR, "why that epoch was kept (selection rule, metric, candidate epochs)"),
}
EVAL_SCHEMA: dict[str, tuple[pa.DataType, str]] = {
    "run_id": (STR, "sweep run id ('' for a standalone evaluation)"),
    "trial_id": (STR, "trial id (search: t<number>; confirmation: t<number>-s<k>; '' alone)"),
    "phase": (STR, "search (objectives, on validation), confirm (on test) or evaluate (CLI)"),
    "split": (STR, "data split the examples come from: val or test"),
    "checkpoint": (STR, "path of the evaluated checkpoint"),
    "model": (STR, "architecture name"),
    "dataset": (STR, "dataset name"),
    "regime": (STR, "training regime of the checkpoint"),
    "config_hash": (STR, "sha1 (12 hex) of the checkpoint's resolved training config"),
    "train_seed": (I64, "seed the checkpoint was trained with"),
    **_CKPT_COLUMNS,
    "code_hash": (STR, "which code evaluated it: git revision (+ the plugins' source hash)"),
    "attack": (STR, "attack name (registry name, e.g. pgd, autoattack, square, "
                    "transfer:SOURCE; worst_case = per example, broken by any attack)"),
    "norm": (STR, "Linf or L2"),
    "eps": (F64, "perturbation budget (float, pixels in [0,1])"),
    "eps_str": (STR, "the budget as written by the user (e.g. '8/255')"),
    "n": (I64, "number of examples evaluated (the same images for every attack of an "
               "evaluation: the first n of the split)"),
    "clean_acc": (F64, "clean accuracy on those n examples"),
    "robust_acc": (F64, "robust accuracy (fraction still correct under the attack; per "
                        "example the worst case over the grid's budgets <= eps)"),
    "ci_low": (F64, "95% Wilson interval, lower bound of robust_acc"),
    "ci_high": (F64, "95% Wilson interval, upper bound of robust_acc"),
    "seed": (I64, "attack seed"),
    "fwd_passes": (I64, "forward example-passes the attack used at this budget (pgd/fgsm run "
                        "the whole grid in one batched loop: each shared pass is split over "
                        "the budgets by the rows each had in it, the clean pass charged to "
                        "the first budget; other attacks: the incremental cost of this "
                        "budget; transfer: incl. crafting on the source, 0 when cached)"),
    "bwd_passes": (I64, "backward example-passes the attack used at this budget "
                        "(as fwd_passes)"),
    "queries": (I64, "model queries (query-based attacks; else forward passes)"),
    "seconds": (F64, "wall time of the attack at this budget (split like fwd_passes)"),
    "params": (STR, "JSON of the attack parameters (steps, restarts, loss, ...; worst_case: "
                    "the attacks combined)"),
    "flags": (STR, "JSON list of warnings/diagnostic flags raised by this attack"),
    "curve_disagreement": (F64, "PGD curve by search (curve=search): estimated upper bound "
                                "(95% Wilson, from the seeded audit against separate runs) "
                                "of the fraction of (example, budget) pairs a separate run "
                                "would break that the curve counts robust; 0 for an exact "
                                "curve; NaN for other attacks"),
}
EVAL_KEY = ["run_id", "trial_id", "checkpoint", "split", "attack", "norm", "eps"]

INDICATOR_SCHEMA: dict[str, tuple[pa.DataType, str]] = {
    "run_id": (STR, "sweep run id"), "trial_id": (STR, "trial id"),
    "phase": (STR, "search, confirm or evaluate"), "split": (STR, "val or test"),
    "checkpoint": (STR, "checkpoint path"),
    "norm": (STR, "Linf or L2"),
    "eps": (F64, "budget of the PGD run the indicator was measured on"),
    "indicator": (STR, "name (agn, cos_prev, sign_consistency, dispersion, "
                       "mean_dir_dispersion, frac_small_grad (per step), frac_small_grad_clean "
                       "/ _start (random start) / _path (small at every step), "
                       "frac_nonfinite_grad, entropy_clean, entropy_adv, pgd_success; see "
                       "aerl_ray.indicators)"),
    "step": (I64, "PGD step (-1 = aggregate over the trajectory)"),
    "value": (F64, "value, aggregated over all batches"),
}
INDICATOR_KEY = ["run_id", "trial_id", "checkpoint", "split", "norm", "eps", "indicator",
                 "step"]

_COMPUTE_COLUMNS: dict[str, tuple[pa.DataType, str]] = {
    "train_fwd_passes": (I64, "forward example-passes of training (all attempts; a resumed "
                              "trial continues the counts saved in its checkpoint)"),
    "train_bwd_passes": (I64, "backward example-passes of training"),
    "select_fwd_passes": (I64, "forward example-passes of per-epoch validation for "
                               "checkpoint selection (robust selection runs PGD)"),
    "select_bwd_passes": (I64, "backward example-passes of that validation"),
    "train_seconds": (F64, "training wall time (all attempts, from the checkpoint's clock)"),
    "eval_seconds": (F64, "evaluation wall time seen by the trial (includes waiting for an "
                          "evaluator)"),
    "eval_compute_seconds": (F64, "time the evaluator spent on this trial"),
    "eval_fwd_passes": (I64, "forward example-passes of the evaluation (all attacks)"),
    "eval_bwd_passes": (I64, "backward example-passes of the evaluation (all attacks)"),
    "trial_seconds": (F64, "wall time of the trial's last attempt"),
}
TRIAL_SCHEMA: dict[str, tuple[pa.DataType, str]] = {
    "run_id": (STR, "sweep run id"),
    "trial_id": (STR, "trial id t<number> (the Optuna trial number; stable across resumes)"),
    "number": (I64, "Optuna trial number"),
    "tune_trial_id": (STR, "Ray Tune trial id of the attempt that finished the trial"),
    "status": (STR, "COMPLETE, FAILED or PRUNED"),
    "error": (STR, "why a trial failed or was pruned ('' otherwise)"),
    "split": (STR, "split of the objective values: val (the search never reads test)"),
    "regime": (STR, "training regime"),
    "train_seed": (I64, "training seed of the trial"),
    "params": (STR, "JSON of the searched parameters"),
    "config": (STR, "JSON of the resolved training config"),
    "config_hash": (STR, "sha1 (12 hex) of the resolved training config"),
    "code_hash": (STR, "which code trained it: git revision (+ the plugins' source hash)"),
    "epochs_run": (I64, "epochs actually trained"),
    **_CKPT_COLUMNS,
    "val_acc": (F64, "clean validation accuracy of the selected checkpoint (whole val split)"),
    "val_robust_acc": (F64, "robust validation accuracy of the selected checkpoint (the "
                            "selection's cheap PGD, NaN when not measured)"),
    "clean_acc": (F64, "clean accuracy of the evaluated checkpoint on the evaluation's n "
                       "validation images"),
    **_COMPUTE_COLUMNS,
    "checkpoint": (STR, "path of the Tune checkpoint holding the evaluated model (best.pt)"),
    "masking_suspected": (BOOL, "True if a gradient-masking diagnostic fired"),
    "diagnostics": (STR, "JSON: check -> {value, reference, delta, flag, detail} "
                         "(aerl_ray.diagnostics)"),
    "diagnostics_level": (STR, "cheap (search) or full (confirmation)"),
    "stopped_at_rung": (F64, "PRUNED by a scheduler: the rung (epochs) it was stopped at"),
    "dominated_by": (STR, "PRUNED by MOASHA: the trials that outranked it there"),
    "finished_at": (F64, "unix time the row was written"),
}
TRIAL_KEY = ["run_id", "trial_id"]
# Objective values go in ``obj_<metric>`` columns (with ``_low``/``_high`` interval bounds and
# ``_n``); searched parameters in ``p_<name>`` columns (NULL where a trial did not use them).

EPOCH_SCHEMA: dict[str, tuple[pa.DataType, str]] = {
    "run_id": (STR, "sweep run id"), "trial_id": (STR, "trial id"),
    "phase": (STR, "search or confirm"), "epoch": (I64, "epoch (0-based)"),
    "regime_active": (STR, "regime used in this epoch"),
    "split": (STR, "split of val_acc / val_robust_acc: val"),
    "train_loss": (F64, "mean training loss"),
    "val_acc": (F64, "clean accuracy on the whole validation split"),
    "val_robust_acc": (F64, "robust validation accuracy (selection / rung PGD; NaN if not "
                            "measured this epoch)"),
    "selected": (BOOL, "this epoch is the trial's selected checkpoint so far"),
    "fwd_passes": (I64, "training forward example-passes so far"),
    "bwd_passes": (I64, "training backward example-passes so far"),
    "wall_seconds": (F64, "training wall time so far"),
    "checkpoint": (STR, "Tune checkpoint holding this epoch's last.pt (resume point)"),
    "metrics": (STR, "JSON of every metric the training loop reported for the epoch"),
}
EPOCH_KEY = ["run_id", "trial_id", "epoch"]

CONFIRM_SCHEMA: dict[str, tuple[pa.DataType, str]] = {
    "run_id": (STR, "sweep run id"),
    "trial_id": (STR, "confirmation run id t<number>-s<k>"),
    "config_id": (STR, "the search trial whose configuration is retrained"),
    "why": (STR, "why it is confirmed: front, tied within noise, best of regime R"),
    "seed_index": (I64, "k: the k-th confirmation seed"),
    "train_seed": (I64, "training seed (never one the search used)"),
    "status": (STR, "COMPLETE or FAILED"),
    "error": (STR, "why it failed ('' otherwise)"),
    "split": (STR, "split of the numbers: test"),
    "regime": (STR, "training regime"), "params": (STR, "JSON of the searched parameters"),
    "config": (STR, "JSON of the resolved training config"),
    "config_hash": (STR, "sha1 (12 hex) of the resolved training config"),
    "code_hash": (STR, "which code trained it: git revision (+ the plugins' source hash)"),
    "epochs_run": (I64, "epochs trained"), **_CKPT_COLUMNS,
    "val_acc": (F64, "clean validation accuracy of the selected checkpoint"),
    "val_robust_acc": (F64, "robust validation accuracy of the selected checkpoint"),
    "clean_acc": (F64, "clean test accuracy on the confirmation's n test images"),
    **_COMPUTE_COLUMNS,
    "checkpoint": (STR, "Tune checkpoint holding the confirmed model (best.pt)"),
    "masking_suspected": (BOOL, "True if a gradient-masking diagnostic fired"),
    "diagnostics": (STR, "JSON of the (full) masking diagnostics"),
    "diagnostics_level": (STR, "diagnostics level of the confirmation plan"),
    "finished_at": (F64, "unix time the row was written"),
}
CONFIRM_KEY = ["run_id", "trial_id"]

# description-only views (documentation, tests)
EVAL_COLUMNS = {k: d for k, (_, d) in EVAL_SCHEMA.items()}
INDICATOR_COLUMNS = {k: d for k, (_, d) in INDICATOR_SCHEMA.items()}
TRIAL_COLUMNS = {k: d for k, (_, d) in TRIAL_SCHEMA.items()}
EPOCH_COLUMNS = {k: d for k, (_, d) in EPOCH_SCHEMA.items()}
CONFIRM_COLUMNS = {k: d for k, (_, d) in CONFIRM_SCHEMA.items()}


@dataclass(frozen=True)
class Table:
    """A results table: its directory name, typed columns (all nullable) and key."""

    name: str
    columns: Mapping[str, tuple[pa.DataType, str]]
    key: tuple[str, ...]

    def schema(self) -> pa.Schema:
        return pa.schema([pa.field(k, t, nullable=True) for k, (t, _) in self.columns.items()])

    def with_columns(self, extra: Mapping[str, tuple[pa.DataType, str]]) -> "Table":
        return Table(self.name, {**self.columns, **extra}, self.key)


EVALS = Table("evals.parquet", EVAL_SCHEMA, tuple(EVAL_KEY))
INDICATORS = Table("indicators.parquet", INDICATOR_SCHEMA, tuple(INDICATOR_KEY))
EPOCHS = Table("epochs.parquet", EPOCH_SCHEMA, tuple(EPOCH_KEY))
_TRIALS_BASE = Table("trials.parquet", TRIAL_SCHEMA, tuple(TRIAL_KEY))
_CONFIRM_BASE = Table("confirm.parquet", CONFIRM_SCHEMA, tuple(CONFIRM_KEY))


def objective_columns(objective_names: Sequence[str]) -> dict[str, tuple[pa.DataType, str]]:
    out: dict[str, tuple[pa.DataType, str]] = {}
    for n in objective_names:
        out[f"obj_{n}"] = (F64, f"objective {n} (the value told to the Optuna study)")
        out[f"obj_{n}_low"] = (F64, f"95% interval of obj_{n}, lower bound")
        out[f"obj_{n}_high"] = (F64, f"95% interval of obj_{n}, upper bound")
        out[f"obj_{n}_n"] = (I64, f"examples obj_{n} was measured on")
    return out


def param_type(values: Sequence[Any] | None, kind: str) -> pa.DataType:
    """Arrow type of a searched parameter's ``p_<name>`` column."""
    if kind == "float":
        return F64
    if kind == "int":
        return I64
    vals = list(values or [])
    if vals and all(isinstance(v, bool) for v in vals):
        return BOOL
    if vals and all(isinstance(v, int) and not isinstance(v, bool) for v in vals):
        return I64
    if vals and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in vals):
        return F64
    return STR


def trials_table(objective_names: Sequence[str], params: Mapping[str, pa.DataType]) -> Table:
    """The trials table of a sweep: base columns + objectives + one column per parameter."""
    extra = {**objective_columns(objective_names),
             **{f"p_{k}": (t, f"searched parameter {k} (NULL when not used)")
                for k, t in params.items()}}
    return _TRIALS_BASE.with_columns(extra)


def confirm_table(objective_names: Sequence[str], params: Mapping[str, pa.DataType]) -> Table:
    extra = {**objective_columns(objective_names),
             **{f"p_{k}": (t, f"parameter {k}") for k, t in params.items()}}
    return _CONFIRM_BASE.with_columns(extra)


def config_hash(config: Mapping[str, Any]) -> str:
    blob = json.dumps(dict(config), sort_keys=True, default=str).encode()
    return hashlib.sha1(blob).hexdigest()[:12]


# --- run dir --------------------------------------------------------------------------------
class RunDir:
    """Paths of one run dir (see the module docstring)."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root).expanduser().resolve()

    spec = property(lambda self: self.root / "sweep.json")
    optuna_db = property(lambda self: self.root / "optuna.db")
    trials = property(lambda self: self.root / "trials.parquet")
    epochs = property(lambda self: self.root / "epochs.parquet")
    evals = property(lambda self: self.root / "evals.parquet")
    indicators = property(lambda self: self.root / "indicators.parquet")
    confirm = property(lambda self: self.root / "confirm.parquet")
    confirm_plan = property(lambda self: self.root / "confirm_plan.json")
    rungs = property(lambda self: self.root / "rungs.jsonl")
    tune = property(lambda self: self.root / "tune")
    report = property(lambda self: self.root / "report")

    def table(self, t: Table) -> Path:
        return self.root / t.name

    def is_run_dir(self) -> bool:
        return self.spec.is_file()


def write_json_atomic(path: Path, obj: Any) -> None:
    """Temp file + fsync + rename: a crash leaves the old file or the new one."""
    atomic_write(path, lambda f: json.dump(obj, f, indent=1, default=str))


# --- atomic Parquet parts -------------------------------------------------------------------
def _cell(v: Any, typ: pa.DataType) -> Any:
    if v is None or v is pd.NA:
        return None
    if isinstance(v, float) and math.isnan(v) and not pa.types.is_floating(typ):
        return None
    if pa.types.is_string(typ) and not isinstance(v, str):
        return v if isinstance(v, str) else (json.dumps(v) if isinstance(v, (dict, list))
                                             else str(v))
    if pa.types.is_integer(typ):
        return int(v)
    if pa.types.is_floating(typ):
        return float(v)
    if pa.types.is_boolean(typ):
        return bool(v)
    return v


def _arrow_table(rows: Sequence[Mapping[str, Any]], table: Table | None) -> pa.Table:
    if table is None:
        return pa.Table.from_pandas(pd.DataFrame(rows), preserve_index=False)
    cols = table.columns
    unknown = sorted({k for r in rows for k in r} - set(cols))
    if unknown:
        raise ValueError(f"{table.name}: rows have columns {unknown} that the table's schema "
                         f"lacks (known: {', '.join(cols)})")
    data = {k: [_cell(r.get(k), t) for r in rows] for k, (t, _) in cols.items()}
    return pa.Table.from_pydict(data, schema=table.schema())


def append_rows(table_dir: str | os.PathLike, rows: Iterable[Mapping[str, Any]],
                table: Table | None = None) -> Path | None:
    """Write ``rows`` as one new part file of the table directory, atomically.

    With ``table`` every part gets the table's full schema (missing values NULL), so
    plain ``pandas.read_parquet(dir)`` sees every column of every part."""
    rows = [dict(r) for r in rows]
    if not rows:
        return None
    return _write_part(Path(table_dir), _arrow_table(rows, table))


def _write_part(d: Path, t: pa.Table) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    name = f"part-{time.time_ns():020d}-{uuid.uuid4().hex[:8]}.parquet"
    fd, tmp = tempfile.mkstemp(dir=d, prefix=".", suffix=".tmp")
    os.close(fd)
    try:
        pq.write_table(t, tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, d / name)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return d / name


def _parts(d: Path) -> list[Path]:
    return sorted(d.glob("part-*.parquet")) if d.is_dir() else []


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


def read_table(table_dir: str | os.PathLike, key: Sequence[str] | None = None) -> pd.DataFrame:
    """Read all parts (in write order); keep the last row per ``key`` if given.

    Safe while a sweep writes: a part that a compaction removes between listing and
    reading (its rows are already in the newer part) makes the read start again."""
    for attempt in range(5):
        parts = _parts(Path(table_dir))
        if not parts:
            return pd.DataFrame()
        try:
            frames = [pd.read_parquet(p) for p in parts]
            break
        except FileNotFoundError:
            if attempt == 4:
                raise
            time.sleep(0.05)
    frames = [f for f in frames if len(f)] or frames[:1]
    df = pd.concat(frames, ignore_index=True) if len(frames) > 1 else frames[0]
    if key:
        present = [k for k in key if k in df.columns]
        df = df.drop_duplicates(subset=present, keep="last").reset_index(drop=True)
    return df


def compact_table(table_dir: str | os.PathLike, table: Table,
                  keep: Callable[[pd.DataFrame], "pd.Series | np.ndarray"] | None = None
                  ) -> int:
    """Rewrite a table as one part with one row per key (the last written), sorted by the
    key (trial t0000 before t0001, whatever order they finished in), optionally dropping
    rows (``keep(df)`` is a boolean mask of rows to keep); returns the row count.

    Crash-safe: the new part is written (atomically) before the old parts are removed, and
    it sorts after them, so a reader that dedups by key sees the same rows at any moment."""
    d = Path(table_dir)
    old = _parts(d)
    if not old:
        return 0
    df = read_table(d, key=list(table.key))
    if keep is not None and len(df):
        df = df[np.asarray(keep(df), dtype=bool)]
    key = [k for k in table.key if k in df.columns]
    if key and len(df):
        df = df.sort_values(key, kind="stable", na_position="last")
    if len(old) == 1 and len(df) == len(pd.read_parquet(old[0])) and keep is None \
            and pq.read_schema(old[0]).equals(table.schema(), check_metadata=False) \
            and df.index.is_monotonic_increasing:
        return len(df)  # already compact (and in key order)
    rows = df.to_dict("records")
    t = _arrow_table([{k: v for k, v in r.items() if k in table.columns} for r in rows],
                     table) if rows else table.schema().empty_table()
    new = _write_part(d, t)
    for p in old:
        if p != new:
            p.unlink(missing_ok=True)
    return len(df)
