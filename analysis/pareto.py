"""Load a run dir, pick the headline metric, compute the Pareto front; the ``aerl-analyze`` CLI.

The front is taken in (clean accuracy, robust accuracy), both maximised, for one
(attack, norm, eps) of the evaluation grid -- the *headline*.

Dominance rules (tested in tests/test_analysis.py):

- ``a`` dominates ``b`` iff ``a >= b`` in both coordinates and ``a > b`` in at least one.
- Points with a NaN (or inf) coordinate are never on the front and dominate nothing.
- Identical points do not dominate each other, so duplicates of a front point are *all*
  kept (two trials reaching the same accuracies are both reported).
- Only COMPLETE trials are candidates; FAILED/PRUNED ones are shown greyed at most.

Hypervolume: area dominated by the front and bounded below by the reference point
(default (0, 0)); points not strictly better than the reference in both coordinates add 0.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import sys
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd

from aerl_ray import results
from aerl_ray.results import RunDir

logger = logging.getLogger(__name__)

DEFAULT_REF = (0.0, 0.0)
_EPS_RTOL, _EPS_ATOL = 1e-4, 1e-7


class AnalysisError(Exception):
    """Bad input to the analysis (not a run dir, nothing to analyse, unknown metric)."""


# --- parsing helpers --------------------------------------------------------------------------
def parse_eps(value: str | float | None) -> float | None:
    """'8/255' -> 0.0313...; '0.5' -> 0.5; None -> None."""
    if value is None or isinstance(value, (int, float)):
        return None if value is None else float(value)
    s = str(value).strip()
    try:
        return float(Fraction(s)) if "/" in s else float(s)
    except (ValueError, ZeroDivisionError):
        raise AnalysisError(f"cannot parse eps {value!r}; write e.g. 8/255 or 0.5") from None


def normalize_norm(value: str | None) -> str | None:
    if value is None:
        return None
    s = str(value).strip().lower().replace("_", "").replace("-", "")
    if s in {"linf", "inf", "l∞", "infinity"}:
        return "Linf"
    if s in {"l2", "2"}:
        return "L2"
    raise AnalysisError(f"unknown norm {value!r}; use Linf or L2")


def eps_close(a: float, b: float) -> bool:
    return math.isclose(float(a), float(b), rel_tol=_EPS_RTOL, abs_tol=_EPS_ATOL)


def eps_mask(values: Any, eps: float) -> np.ndarray:
    """Boolean array: which of ``values`` equal ``eps`` up to rounding."""
    return np.array([eps_close(v, eps) for v in values], dtype=bool)


def fmt_eps(eps: float, eps_str: str | None = None) -> str:
    """The budget as a user writes it: eps_str if known, k/255 when it is one, else %g."""
    if eps_str:
        return str(eps_str)
    k = float(eps) * 255
    if k > 0 and abs(k - round(k)) < 1e-3:
        return f"{round(k)}/255"
    return f"{float(eps):g}"


def _json_list(v: Any) -> list[str]:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return []
    if isinstance(v, (list, tuple, np.ndarray)):
        return [str(x) for x in v]
    try:
        out = json.loads(v)
    except (TypeError, ValueError):
        return [str(v)] if str(v) else []
    return [str(x) for x in out] if isinstance(out, list) else ([str(out)] if out else [])


def _json_true_keys(v: Any) -> list[str]:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return []
    if isinstance(v, str):
        try:
            v = json.loads(v)
        except ValueError:
            return []
    if isinstance(v, dict):  # {name: bool} or aerl_ray.diagnostics' {name: {..., "flag"}}
        return [str(k) for k, on in v.items()
                if bool(on.get("flag") if isinstance(on, dict) else on)]
    return []


# --- dominance / hypervolume -----------------------------------------------------------------
def pareto_mask(points: Any) -> np.ndarray:
    """Boolean mask of the non-dominated rows of an (n, 2) array, both columns maximised.

    NaN/inf rows are never on the front; identical points are all kept (see module doc).
    One implementation for the sweep and the analysis: :func:`aerl_ray.results.pareto_mask`.
    """
    return results.pareto_mask(np.asarray(points, dtype=float).reshape(-1, 2))


def hypervolume_2d(points: Any, ref: Sequence[float] = DEFAULT_REF) -> float:
    """Area dominated by ``points`` (maximised) and bounded below by ``ref``."""
    p = np.asarray(points, dtype=float).reshape(-1, 2)
    p = p[np.isfinite(p).all(axis=1)]
    rx, ry = float(ref[0]), float(ref[1])
    p = p[(p[:, 0] > rx) & (p[:, 1] > ry)]
    if len(p) == 0:
        return 0.0
    p = p[pareto_mask(p)]
    order = np.lexsort((p[:, 1], -p[:, 0]))  # x descending, then y ascending
    area, prev_y = 0.0, ry
    for x, y in p[order]:
        if y > prev_y:
            area += (x - rx) * (y - prev_y)
            prev_y = y
    return float(area)


# --- loading ----------------------------------------------------------------------------------
@dataclass
class RunData:
    """The result files of one run dir (tables may be empty while a sweep is running)."""

    run: RunDir
    spec: dict
    trials: pd.DataFrame
    evals: pd.DataFrame  # every phase and split (see search_evals / confirm_evals)
    indicators: pd.DataFrame
    confirm: pd.DataFrame = field(default_factory=pd.DataFrame)
    epochs: pd.DataFrame = field(default_factory=pd.DataFrame)

    @property
    def objectives(self) -> list[dict]:
        return [o for o in self.spec.get("objectives") or [] if isinstance(o, dict)]

    @property
    def search_evals(self) -> pd.DataFrame:
        """Evaluation rows of the search (validation split; older runs: all rows)."""
        ev = self.evals
        return ev[ev["phase"] != "confirm"] if "phase" in ev else ev

    @property
    def confirm_evals(self) -> pd.DataFrame:
        ev = self.evals
        return ev[ev["phase"] == "confirm"] if "phase" in ev else ev.iloc[0:0]

    @property
    def param_columns(self) -> list[str]:
        return [c for c in self.trials.columns if c.startswith("p_")]

    @property
    def completed(self) -> pd.DataFrame:
        if self.trials.empty or "status" not in self.trials:
            return self.trials.iloc[0:0]
        return self.trials[self.trials["status"] == "COMPLETE"]


def _canon_eps(df: pd.DataFrame) -> pd.DataFrame:
    """Snap eps values that are equal up to rounding to one value per (attack, norm)."""
    if df.empty or "eps" not in df:
        return df
    df = df.copy()
    df["eps"] = df["eps"].astype(float)
    canon: list[float] = []
    mapped = []
    for e in df["eps"]:
        hit = next((c for c in canon if eps_close(c, e)), None)
        if hit is None:
            canon.append(e)
            hit = e
        mapped.append(hit)
    df["eps"] = mapped
    return df


def load_run(run_dir: str | Path) -> RunData:
    """Read sweep.json and the Parquet tables; raise AnalysisError if not a run dir."""
    run = RunDir(run_dir)
    if not run.root.exists():
        raise AnalysisError(f"{run.root} does not exist")
    if not run.is_run_dir():
        raise AnalysisError(f"{run.root} is not a run dir (no sweep.json); pass the directory "
                            "a sweep wrote (it holds sweep.json, trials.parquet, evals.parquet)")
    try:
        spec = json.loads(run.spec.read_text())
    except ValueError as e:
        raise AnalysisError(f"{run.spec} is not valid JSON: {e}") from None
    if not isinstance(spec, dict):
        raise AnalysisError(f"{run.spec} does not hold a JSON object")
    trials = results.read_table(run.trials, key=results.TRIAL_KEY)
    if not trials.empty and "trial_id" in trials:
        trials = trials.drop_duplicates("trial_id", keep="last").reset_index(drop=True)
    evals = _canon_eps(results.read_table(run.evals, key=results.EVAL_KEY))
    inds = _canon_eps(results.read_table(run.indicators, key=results.INDICATOR_KEY))
    confirm = results.read_table(run.confirm, key=results.CONFIRM_KEY)
    epochs = results.read_table(run.epochs, key=results.EPOCH_KEY)
    logger.info("%s: %d trials, %d eval rows, %d indicator rows, %d confirmation runs",
                run.root, len(trials), len(evals), len(inds), len(confirm))
    return RunData(run, spec, trials, evals, inds, confirm, epochs)


# --- headline metric ---------------------------------------------------------------------------
@dataclass(frozen=True)
class Headline:
    attack: str
    norm: str
    eps: float
    eps_str: str
    n: str = "?"

    @property
    def label(self) -> str:
        return f"{self.attack} {self.norm} ε={self.eps_str} (n={self.n})"


def available_metrics(evals: pd.DataFrame) -> pd.DataFrame:
    """Distinct (attack, norm, eps) of the eval rows with eps_str, rows and n range."""
    cols = ["attack", "norm", "eps", "eps_str", "rows", "n"]
    if evals.empty or not {"attack", "norm", "eps"} <= set(evals.columns):
        return pd.DataFrame(columns=cols)
    out = []
    for (a, nm, e), g in evals.groupby(["attack", "norm", "eps"], sort=True):
        es = g["eps_str"].dropna().astype(str) if "eps_str" in g else pd.Series([], dtype=str)
        ns = g["n"].dropna().astype(int) if "n" in g else pd.Series([], dtype=int)
        n = "?" if ns.empty else (str(ns.min()) if ns.min() == ns.max() else f"{ns.min()}–{ns.max()}")
        out.append({"attack": a, "norm": nm, "eps": float(e),
                    "eps_str": fmt_eps(e, es.iloc[-1] if len(es) else None), "rows": len(g), "n": n})
    return pd.DataFrame(out, columns=cols)


def _describe(avail: pd.DataFrame) -> str:
    if avail.empty:
        return "  (none: evals.parquet has no rows yet)"
    return "\n".join(f"  --attack {r.attack} --norm {r.norm} --eps {r.eps_str}   ({r.rows} rows, n={r.n})"
                     for r in avail.itertuples())


def robust_objective(spec: dict) -> dict | None:
    for o in spec.get("objectives") or []:
        if isinstance(o, dict) and o.get("attack"):
            return o
    return None


def choose_headline(data: RunData, attack: str | None = None, norm: str | None = None,
                    eps: str | float | None = None) -> Headline:
    """Pick (attack, norm, eps): the given filters, then the sweep's robust objective, then the
    largest-eps autoattack, then the largest-eps pgd, then the largest eps of anything."""
    norm_n, eps_f = normalize_norm(norm), parse_eps(eps)
    avail = available_metrics(data.search_evals)
    cand = avail
    if attack is not None:
        cand = cand[cand["attack"].str.lower() == str(attack).strip().lower()]
    if norm_n is not None:
        cand = cand[cand["norm"] == norm_n]
    if eps_f is not None:
        cand = cand[eps_mask(cand["eps"], eps_f)]
    if cand.empty:
        asked = ", ".join(f"{k}={v}" for k, v in (("attack", attack), ("norm", norm), ("eps", eps))
                          if v is not None) or "any metric"
        raise AnalysisError(f"no evaluation rows for {asked} in {data.run.evals}; available:\n"
                            + _describe(avail))
    obj = robust_objective(data.spec)
    pick = None
    if obj is not None:
        m = cand[(cand["attack"] == obj.get("attack"))
                 & (cand["norm"] == (normalize_norm(obj.get("norm")) or "Linf"))
                 & eps_mask(cand["eps"], parse_eps(obj.get("eps", obj.get("eps_str"))) or -1)]
        pick = m.iloc[0] if len(m) else None
    for name in ("autoattack", "pgd", None):
        if pick is not None:
            break
        m = cand if name is None else cand[cand["attack"] == name]
        if len(m):
            pick = m.sort_values(["eps", "norm"], ascending=[False, True]).iloc[0]
    return Headline(str(pick["attack"]), str(pick["norm"]), float(pick["eps"]),
                    str(pick["eps_str"]), str(pick["n"]))


# --- per-trial metric table ---------------------------------------------------------------------
def metric_table(data: RunData, attack: str, norm: str, eps: float) -> pd.DataFrame:
    """One row per trial (all statuses) with the metric's clean/robust accuracy and interval.

    Clean accuracy is the eval row's (the same n examples as the robust one), else the trial's.
    Several eval rows for a trial (several checkpoints): the trial's own checkpoint wins, else
    the last written.  Trials without an eval row yet have NaN robust accuracy.
    """
    tr = data.trials.copy()
    if tr.empty:
        return tr
    ev = data.search_evals
    if not ev.empty:
        ev = ev[(ev["attack"] == attack) & (ev["norm"] == norm)
                & eps_mask(ev["eps"], eps)].copy()
    keep = ["trial_id", "checkpoint", "clean_acc", "robust_acc", "ci_low", "ci_high", "n",
            "eps_str", "flags", "seconds", "fwd_passes", "bwd_passes"]
    if ev.empty:
        ev = pd.DataFrame(columns=keep)
    ev = ev[[c for c in keep if c in ev.columns]].copy()
    ev["_order"] = np.arange(len(ev))
    ck = tr.set_index("trial_id")["checkpoint"] if "checkpoint" in tr else pd.Series(dtype=object)
    ev["_own"] = [ck.get(t) == c for t, c in zip(ev["trial_id"], ev.get("checkpoint", [None] * len(ev)))]
    ev = ev.sort_values(["_own", "_order"]).groupby("trial_id").tail(1)
    ev = ev.drop(columns=["_own", "_order", "checkpoint"], errors="ignore")
    ev = ev.rename(columns={"clean_acc": "eval_clean_acc", "seconds": "attack_seconds",
                            "fwd_passes": "attack_fwd_passes", "bwd_passes": "attack_bwd_passes"})
    tr = tr.drop(columns=[c for c in ev.columns if c != "trial_id" and c in tr.columns])
    df = tr.merge(ev, on="trial_id", how="left")
    nan = pd.Series(np.nan, index=df.index)
    trial_clean = pd.to_numeric(df["clean_acc"], errors="coerce") if "clean_acc" in df else nan
    eval_clean = pd.to_numeric(df["eval_clean_acc"], errors="coerce") if "eval_clean_acc" in df else nan
    df["clean_acc"] = eval_clean.fillna(trial_clean)
    for c in ("robust_acc", "ci_low", "ci_high"):
        df[c] = pd.to_numeric(df[c], errors="coerce") if c in df else np.nan
    df["n"] = pd.to_numeric(df["n"], errors="coerce").astype("Int64") if "n" in df else pd.NA
    df["attack"], df["norm"], df["eps"] = attack, norm, float(eps)
    flags = []
    for _, r in df.iterrows():
        f = _json_list(r.get("flags")) + _json_true_keys(r.get("diagnostics"))
        flags.append(", ".join(dict.fromkeys(f)))
    df["flags"] = flags
    df["masking_suspected"] = (df["masking_suspected"].fillna(False).astype(bool)
                               if "masking_suspected" in df else False)
    if "regime" not in df:
        df["regime"] = "?"
    df["regime"] = df["regime"].fillna("?").astype(str)
    if "status" not in df:
        df["status"] = "COMPLETE"
    cand = (df["status"] == "COMPLETE").to_numpy()
    pts = df[["clean_acc", "robust_acc"]].to_numpy(dtype=float)
    pts[~cand] = np.nan
    df["on_front"] = pareto_mask(pts)
    return df


def front_of(table: pd.DataFrame) -> pd.DataFrame:
    """The front rows sorted by clean accuracy (descending)."""
    if table.empty:
        return table
    f = table[table["on_front"]]
    return f.sort_values(["clean_acc", "robust_acc", "trial_id"], ascending=[False, True, True])


def require_completed(data: RunData) -> None:
    if data.completed.empty:
        n = len(data.trials)
        by = (", ".join(f"{k}: {v}" for k, v in data.trials["status"].value_counts().items())
              if n and "status" in data.trials else "no rows")
        raise AnalysisError(f"no COMPLETE trials in {data.run.trials} yet ({by})")


def attacks_at(data: RunData, norm: str, eps: float) -> list[str]:
    """Attacks evaluated at (norm, eps), in a stable order: autoattack, pgd, then the rest."""
    ev = data.search_evals
    if ev.empty:
        return []
    names = set(ev[(ev["norm"] == norm) & eps_mask(ev["eps"], eps)]["attack"])
    prio = {"autoattack": 0, "pgd": 1}
    return sorted(names, key=lambda a: (prio.get(a, 2), a))


# --- markdown --------------------------------------------------------------------------------
def markdown_table(df: pd.DataFrame, columns: Sequence[str]) -> str:
    cols = [c for c in columns if c in df.columns]
    def cell(v: Any) -> str:
        if v is None or v is pd.NA:
            return ""
        if isinstance(v, float):
            return "" if math.isnan(v) else f"{v:.4g}"
        return str(v).replace("|", "\\|")
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in df[cols].itertuples(index=False)]
    return "\n".join(lines)


# --- CLI ---------------------------------------------------------------------------------------
def _parse_ref(s: str) -> tuple[float, float]:
    try:
        x, y = (float(v) for v in s.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError("--ref takes CLEAN,ROBUST, e.g. 0,0") from None
    return x, y


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="aerl-analyze", description=(
        "Pareto front (clean vs robust accuracy), curves, indicators, importance and a "
        "self-contained report.html from a sweep's run dir."))
    p.add_argument("run_dir", help="run dir written by aerl-sweep (holds sweep.json)")
    p.add_argument("--attack", help="headline attack (default: the sweep's robust objective)")
    p.add_argument("--norm", help="Linf or L2")
    p.add_argument("--eps", help="budget, e.g. 8/255 or 0.5")
    p.add_argument("--out", help="output dir (default RUN_DIR/report)")
    p.add_argument("--ref", type=_parse_ref, default=DEFAULT_REF,
                   help="hypervolume reference point CLEAN,ROBUST (default 0,0)")
    p.add_argument("-v", "--verbose", action="store_true")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    from analysis.report import write_report

    cmd = " ".join(["aerl-analyze", *(sys.argv[1:] if argv is None else list(argv))])
    try:
        res = write_report(args.run_dir, out_dir=args.out, attack=args.attack, norm=args.norm,
                           eps=args.eps, ref=args.ref, command=cmd)
    except AnalysisError as e:
        print(f"aerl-analyze: error: {e}", file=sys.stderr)
        return 2
    print(res.markdown)
    print(f"\nreport: {res.paths['report.html']}")
    return 0


if __name__ == "__main__":
    # run the importable module's main so AnalysisError is the class write_report raises
    from analysis.pareto import main as _main

    sys.exit(_main())
