"""Paper-ready outputs of the confirmation stage: ``table.{md,csv,tex}`` and one
RobustBench-style JSON per confirmed model.

The table is regime x attack x budget of the *confirmed* numbers (test split, new seeds):
mean ± half the 95% t-interval across seeds, the mean within-seed Wilson half-width, n and
the number of seeds -- every cell says how far it can be trusted.  All numbers come from
:func:`aerl_ray.confirm.confirmed_table`, the function the sweep's printout uses too.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Mapping

import pandas as pd

from aerl_ray.confirm import fmt_interval

TABLE_COLUMNS = ["regime", "config_id", "attack", "norm", "eps", "eps_str", "n", "seeds",
                 "robust_mean", "robust_low", "robust_high", "wilson_half", "clean_mean",
                 "clean_low", "clean_high", "masking_suspected", "why"]


def paper_table(confirmed: pd.DataFrame) -> pd.DataFrame:
    """The confirmed table, sorted regime x configuration x attack x budget."""
    if confirmed.empty:
        return pd.DataFrame(columns=TABLE_COLUMNS)
    t = confirmed[[c for c in TABLE_COLUMNS if c in confirmed.columns]]
    return t.sort_values(["regime", "config_id", "norm", "attack", "eps"]).reset_index(drop=True)


def _cell(r: Mapping[str, Any]) -> str:
    return fmt_interval(r["robust_mean"], r["robust_low"], r["robust_high"])


def to_markdown(t: pd.DataFrame) -> str:
    if t.empty:
        return "(no confirmed configuration)"
    lines = ["| regime | config | attack | norm | ε | robust acc (mean ± 95% CI over seeds) "
             "| ± Wilson (per seed) | clean acc | n | seeds |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for _, r in t.iterrows():
        lines.append(f"| {r['regime']} | {r['config_id']} | {r['attack']} | {r['norm']} | "
                     f"{r['eps_str']} | {_cell(r)} | {r['wilson_half']:.3f} | "
                     f"{fmt_interval(r['clean_mean'], r['clean_low'], r['clean_high'])} | "
                     f"{int(r['n'])} | {int(r['seeds'])} |")
    return "\n".join(lines)


def _tex_escape(s: str) -> str:
    return (str(s).replace("\\", "\\textbackslash{}").replace("_", "\\_").replace("&", "\\&")
            .replace("%", "\\%").replace("#", "\\#"))


def to_latex(t: pd.DataFrame) -> str:
    """A booktabs table (needs \\usepackage{booktabs})."""
    rows = []
    for _, r in t.iterrows():
        if r["robust_low"] is None or not math.isfinite(r["robust_low"]):
            rob = f"{r['robust_mean']:.3f}"
        else:
            rob = f"{r['robust_mean']:.3f} $\\pm$ {(r['robust_high'] - r['robust_low']) / 2:.3f}"
        rows.append(" & ".join([_tex_escape(r["regime"]), _tex_escape(r["config_id"]),
                                _tex_escape(r["attack"]), _tex_escape(r["norm"]),
                                _tex_escape(r["eps_str"]), rob, f"{r['wilson_half']:.3f}",
                                str(int(r["n"])), str(int(r["seeds"]))]) + r" \\")
    return "\n".join([
        r"\begin{tabular}{lllllrrrr}", r"\toprule",
        r"regime & config & attack & norm & $\epsilon$ & robust acc. & Wilson $\pm$ & $n$ & "
        r"seeds \\", r"\midrule", *rows, r"\bottomrule", r"\end{tabular}"])


def write_tables(confirmed: pd.DataFrame, out: Path) -> dict[str, Path]:
    t = paper_table(confirmed)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"table.csv": out / "table.csv", "table.md": out / "table.md",
             "table.tex": out / "table.tex"}
    t.to_csv(paths["table.csv"], index=False)
    paths["table.md"].write_text(to_markdown(t) + "\n", encoding="utf-8")
    paths["table.tex"].write_text(to_latex(t) + "\n", encoding="utf-8")
    return paths


def robustbench_records(confirmed: pd.DataFrame, confirm_rows: pd.DataFrame, spec: dict
                        ) -> dict[str, dict[str, Any]]:
    """One RobustBench-style record per confirmed configuration (model_info JSON fields:
    clean_acc, autoattack_acc, eps, threat_model, plus n, seeds, intervals, the masking
    diagnostics' flags and the command that produced it)."""
    out: dict[str, dict[str, Any]] = {}
    if confirmed.empty:
        return out
    for cid, g in confirmed.groupby("config_id", sort=True):
        aa = g[g["attack"] == "autoattack"].sort_values("eps")
        head = next(({"attack": o.get("attack"), "norm": o.get("norm"), "eps": o.get("eps")}
                     for o in spec.get("objectives") or [] if o.get("attack") == "autoattack"),
                    None)
        row = aa.iloc[-1] if len(aa) else g.iloc[0]
        runs = confirm_rows[confirm_rows["config_id"] == cid] if len(confirm_rows) else \
            confirm_rows
        flags = sorted({k for d in runs.get("diagnostics", pd.Series(dtype=str)).dropna()
                        for k, v in (json.loads(d) if d else {}).items()
                        if isinstance(v, dict) and v.get("flag")})
        out[str(cid)] = {
            "name": f"{spec.get('run_id', '?')}/{cid}", "regime": str(row["regime"]),
            "dataset": _config_value(runs, "dataset"),
            "architecture": _config_value(runs, "model"),
            "threat_model": str(row["norm"]), "eps": str(row["eps_str"]),
            "clean_acc": _pct(row["clean_mean"]), "autoattack_acc": _pct(row["robust_mean"])
            if len(aa) else None,
            "clean_acc_ci95": [_pct(row["clean_low"]), _pct(row["clean_high"])],
            "autoattack_acc_ci95": [_pct(row["robust_low"]), _pct(row["robust_high"])]
            if len(aa) else None,
            "n": int(row["n"]), "seeds": int(row["seeds"]), "split": "test",
            "autoattack_version": json.loads(row["attack_params"] or "{}").get("version")
            if len(aa) else None,
            "headline_objective": head, "masking_flags": flags,
            "masking_suspected": bool(row["masking_suspected"]),
            "params": json.loads(row["params"]) if row.get("params") else {},
            "command": spec.get("command", ""), "reported": None, "additional_data": False,
        }
    return out


def _config_value(runs: pd.DataFrame, key: str) -> str | None:
    if runs.empty or "config" not in runs:
        return None
    try:
        return json.loads(runs["config"].dropna().iloc[0]).get(key)
    except (IndexError, ValueError):
        return None


def _pct(v: Any) -> float | None:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return round(100 * f, 2) if math.isfinite(f) else None


def write_robustbench(records: Mapping[str, dict], out: Path) -> list[Path]:
    d = out / "robustbench"
    d.mkdir(parents=True, exist_ok=True)
    paths = []
    for cid, rec in records.items():
        p = d / f"{cid}.json"
        p.write_text(json.dumps(rec, indent=1), encoding="utf-8")
        paths.append(p)
    return paths
