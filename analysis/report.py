"""``write_report(run_dir) -> ReportResult``: figures, pareto.csv and one self-contained HTML page.

The page embeds its figures as base64 PNG and its CSS inline: no scripts, no external
resources, readable offline.  Inputs are validated (AnalysisError) before anything is drawn.
"""
from __future__ import annotations

import base64
import datetime as _dt
import html
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd

from analysis import plots
from analysis.importance import param_importances
from aerl_ray.confirm import confirmed_table
from aerl_ray.front import FRONT, TIED, search_front
from analysis.pareto import (DEFAULT_REF, Headline, RunData, attacks_at, choose_headline,
                             hypervolume_2d, load_run, markdown_table, metric_table,
                             require_completed)
from analysis.tables import robustbench_records, write_robustbench, write_tables

logger = logging.getLogger(__name__)

FIGURES = ("pareto.png", "curves.png", "indicators.png", "importance.png", "compute.png")
_FRONT_TAIL = ["front_status", "tied_with", "dominated_by", "val_acc", "ckpt_epoch",
               "ckpt_regime", "ckpt_reason", "masking_suspected", "epochs_run",
               "train_fwd_passes", "train_bwd_passes", "train_seconds", "checkpoint"]
_BASE_COLS = ["trial_id", "regime", "clean_acc", "robust_acc", "ci_low", "ci_high", "n",
              "attack", "norm", "eps", "eps_str"]
_HTML_SKIP = {"attack", "norm", "eps", "eps_str", "checkpoint", "eval_seconds"}  # in the heading
_TAIL_COLS = ["masking_suspected", "flags", "epochs_run", "train_fwd_passes",
              "train_bwd_passes", "train_seconds", "eval_seconds", "checkpoint"]


@dataclass
class ReportResult:
    out_dir: Path
    paths: dict[str, Path]            # file name -> path (figures, pareto.csv, report.html)
    pareto: pd.DataFrame              # the search front (pareto.csv): aerl_ray.front
    markdown: str                     # the terminal summary
    headline: Headline
    hypervolume: float
    ref: tuple[float, float]
    table: pd.DataFrame = field(repr=False, default_factory=pd.DataFrame)  # all trials
    confirmed: pd.DataFrame = field(repr=False, default_factory=pd.DataFrame)


def front_columns(table: pd.DataFrame, param_cols: Sequence[str]) -> list[str]:
    return [c for c in [*_BASE_COLS, *param_cols, *_TAIL_COLS] if c in table.columns]


def search_front_table(data: RunData) -> pd.DataFrame:
    """The search front and the trials tied with it within noise: ``pareto.csv``, the
    report's Pareto section and the sweep's printout (one function: aerl_ray.front)."""
    f = search_front(data.trials, data.objectives)
    if f.empty:
        return f
    f = f[f["front_status"].isin([FRONT, TIED])]
    obj = [c for o in data.objectives for c in (f"obj_{o['name']}", f"obj_{o['name']}_low",
                                                f"obj_{o['name']}_high", f"obj_{o['name']}_n")]
    cols = ["trial_id", "regime", "on_front", *obj, *data.param_columns, *_FRONT_TAIL]
    return f[[c for c in dict.fromkeys(cols) if c in f.columns]].reset_index(drop=True)


def write_report(run_dir: str | Path, out_dir: str | Path | None = None, attack: str | None = None,
                 norm: str | None = None, eps: str | float | None = None,
                 ref: Sequence[float] = DEFAULT_REF, command: str | None = None) -> ReportResult:
    """Analyse ``run_dir`` and write figures, pareto.csv, the confirmed tables and
    report.html to ``out_dir`` (default RUN/report).  Raises AnalysisError on bad input
    before writing anything."""
    data = load_run(run_dir)
    require_completed(data)
    head = choose_headline(data, attack=attack, norm=norm, eps=eps)
    ref = (float(ref[0]), float(ref[1]))
    if command is None:
        command = (f"analysis.report.write_report({str(data.run.root)!r}, attack={attack!r}, "
                   f"norm={norm!r}, eps={eps!r}, ref={ref})")
    out = Path(out_dir) if out_dir else data.run.root / "report"
    out.mkdir(parents=True, exist_ok=True)

    attacks = attacks_at(data, head.norm, head.eps)
    attacks = [head.attack] + [a for a in attacks if a != head.attack]
    tables = {a: metric_table(data, a, head.norm, head.eps) for a in attacks}
    table = tables[head.attack]
    hv = {a: hypervolume_2d(t.loc[t["on_front"], ["clean_acc", "robust_acc"]], ref)
          for a, t in tables.items()}
    params = data.param_columns
    front = search_front_table(data)
    paths: dict[str, Path] = {}
    paths["pareto.csv"] = out / "pareto.csv"
    front.to_csv(paths["pareto.csv"], index=False)

    colors = plots.regime_colors(data.trials.get("regime", pd.Series(["?"])).fillna("?").astype(str))
    paths["pareto.png"] = plots.plot_pareto(tables, head, hv, ref, colors, out / "pareto.png")
    paths["curves.png"] = plots.plot_curves(data.search_evals, table, head, colors,
                                            out / "curves.png")
    paths["indicators.png"] = plots.plot_indicators(data.indicators, table, head, colors,
                                                    out / "indicators.png")
    paths["importance.png"] = plots.plot_importance(param_importances(data), table, params, head,
                                                    colors, out / "importance.png")
    paths["compute.png"] = plots.plot_compute(table, head, colors, out / "compute.png")
    sched = ((data.spec.get("space") or {}).get("scheduler") or {}).get("type", "none")
    if sched != "none":
        paths["search_efficiency.png"] = plots.plot_search_efficiency(
            data.trials, data.objectives, sched, out / "search_efficiency.png")

    confirmed = confirmed_table(data.confirm, data.evals)
    if not confirmed.empty:
        paths.update(write_tables(confirmed, out))
        for p in write_robustbench(robustbench_records(confirmed, data.confirm, data.spec), out):
            paths[f"robustbench/{p.name}"] = p
    md = summary_markdown(data, head, front, hv[head.attack], ref, params, confirmed,
                          _pending(table))
    paths["report.html"] = out / "report.html"
    paths["report.html"].write_text(render_html(data, head, table, front, hv, ref, params,
                                                command, {k: paths[k] for k in FIGURES
                                                          + ("search_efficiency.png",)
                                                          if k in paths}, md,
                                                confirmed),
                                    encoding="utf-8")
    logger.info("report written to %s", paths["report.html"])
    return ReportResult(out, paths, front, md, head, hv[head.attack], ref, table, confirmed)


# --- summaries -----------------------------------------------------------------------------------
def _status_counts(data: RunData) -> str:
    if data.trials.empty or "status" not in data.trials:
        return "no trials"
    return ", ".join(f"{k} {v}" for k, v in data.trials["status"].value_counts().items())


def _pending(table: pd.DataFrame) -> int:
    c = table[table["status"] == "COMPLETE"]
    return int((~np.isfinite(c["robust_acc"])).sum())


def summary_markdown(data: RunData, head: Headline, front: pd.DataFrame, hv: float,
                     ref: tuple[float, float], params: Sequence[str],
                     confirmed: pd.DataFrame | None = None, pending: int = 0) -> str:
    show = front.copy()
    if "masking_suspected" in show:
        show["masking_suspected"] = show["masking_suspected"].map({True: "YES", False: ""})
    names = [o["name"] for o in data.objectives]
    cols = ["trial_id", "regime", *[f"obj_{n}" for n in names],
            *[f"obj_{n}_{b}" for n in names for b in ("low", "high")], "front_status",
            "masking_suspected", "ckpt_epoch", *params]
    lines = [f"## Search front — run {data.spec.get('run_id', '?')} (validation split)",
             f"objectives: {', '.join(names)} (95% Wilson intervals); trials: "
             f"{_status_counts(data)}; on the front: {int(front['on_front'].sum()) if len(front) else 0}"
             f", tied within noise: {int((front.get('front_status', pd.Series(dtype=str)) == TIED).sum())}",
             f"headline panel: {head.label}; hypervolume {hv:.4f} vs ref ({ref[0]:g}, {ref[1]:g})"
             + (f"; {pending} COMPLETE trial(s) without this eval yet" if pending else ""),
             "", markdown_table(show, cols) if len(show) else "(no trial on the front yet)"]
    if confirmed is not None and not confirmed.empty:
        from analysis.tables import paper_table, to_markdown

        lines += ["", "## Confirmed on the test split (new seeds)", "",
                  to_markdown(paper_table(confirmed))]
    return "\n".join(lines)


# --- HTML ------------------------------------------------------------------------------------------
_CSS = """
body{font-family:-apple-system,"Segoe UI",Helvetica,Arial,sans-serif;margin:24px;color:#222;max-width:1400px}
h1{font-size:22px;margin-bottom:4px} h2{font-size:17px;margin-top:28px;border-bottom:1px solid #ddd}
.meta td{padding:2px 10px 2px 0;vertical-align:top} code,pre{background:#f4f4f4;padding:2px 4px}
pre{padding:8px;white-space:pre-wrap;word-break:break-all}
table.data{border-collapse:collapse;font-size:12px;margin:8px 0}
table.data th,table.data td{border:1px solid #ccc;padding:3px 6px;text-align:right}
table.data th{background:#f0f0f0} table.data td.t{text-align:left}
tr.masking td{background:#fde2e2} tr.nonfront td{color:#888} tr.tied td{background:#fff6d6}
.warn{color:#b00;font-weight:bold} figure{margin:12px 0} figure img{max-width:100%;border:1px solid #eee}
figcaption{font-size:12px;color:#555} .scroll{overflow-x:auto;max-width:100%}
"""
_CAPTIONS = {
    "pareto.png": "Non-dominated trials in (clean, robust) accuracy; one panel per attack at the "
                  "headline norm/ε (a PGD panel above the AutoAttack one suggests masking).",
    "curves.png": "Robust accuracy vs ε for the best trial of each regime, 95% Wilson intervals.",
    "indicators.png": "Input-gradient norm and direction instability vs robust accuracy.",
    "importance.png": "Hyperparameter importance per objective (fANOVA) and parallel coordinates.",
    "compute.png": "Robust accuracy vs training compute.",
    "search_efficiency.png": "Hypervolume of the validation front vs cumulative compute "
                             "(training, rung/selection validation and evaluation, pruned "
                             "trials included), in finishing order.",
}


def _fmt(v: Any) -> str:
    if v is None or v is pd.NA:
        return ""
    if isinstance(v, (bool, np.bool_)):
        return "yes" if v else ""
    if isinstance(v, (float, np.floating)):
        return "" if math.isnan(v) else f"{v:.4g}"
    return str(v)


def _html_table(df: pd.DataFrame, cols: Sequence[str], cls: str = "data",
                row_class=lambda r: "") -> str:
    cols = [c for c in cols if c in df.columns]
    head = "".join(f"<th>{html.escape(c)}</th>" for c in cols)
    rows = []
    for _, r in df.iterrows():
        cells = []
        for c in cols:
            v = r[c]
            text = "⚠ yes" if c == "masking_suspected" and bool(v) else _fmt(v)
            num = isinstance(v, (int, float, np.number)) and not isinstance(v, (bool, np.bool_))
            cells.append(f'<td{"" if num else " class=t"}>{html.escape(text)}</td>')
        rc = row_class(r)
        rows.append(f"<tr{f' class={rc!r}' if rc else ''}>{''.join(cells)}</tr>")
    return (f'<div class="scroll"><table class="{cls}"><thead><tr>{head}</tr></thead>'
            f'<tbody>{"".join(rows)}</tbody></table></div>')


def _img(path: Path) -> str:
    b64 = base64.b64encode(path.read_bytes()).decode("ascii")
    return (f'<figure id="fig-{path.stem}"><img alt="{path.stem}" src="data:image/png;base64,{b64}">'
            f"<figcaption>{html.escape(_CAPTIONS.get(path.name, ''))}</figcaption></figure>")


def render_html(data: RunData, head: Headline, table: pd.DataFrame, front: pd.DataFrame,
                hv: dict[str, float], ref: tuple[float, float], params: Sequence[str],
                command: str, figures: dict[str, Path], md: str,
                confirmed: pd.DataFrame | None = None) -> str:
    spec, e = data.spec, html.escape
    created = spec.get("created_at")
    created_s = (_dt.datetime.fromtimestamp(created).isoformat(timespec="seconds")
                 if isinstance(created, (int, float)) else "?")
    masked = int(front["masking_suspected"].astype(bool).sum()) if "masking_suspected" in front else 0
    pending = _pending(table)
    meta = [("run id", spec.get("run_id", "?")), ("study", spec.get("study_name", "?")),
            ("run dir", str(data.run.root)), ("created", created_s),
            ("objectives", ", ".join(f"{o.get('name')} ({o.get('direction', '?')})"
                                     for o in spec.get("objectives") or [] if isinstance(o, dict))),
            ("headline metric", head.label),
            ("hypervolume", "; ".join(f"{a}: {v:.4f}" for a, v in hv.items())
             + f" (reference point clean={ref[0]:g}, robust={ref[1]:g})"),
            ("trials", _status_counts(data)), ("search space", spec.get("space_file", "?"))]
    meta_html = "".join(f"<tr><td><b>{e(k)}</b></td><td>{e(str(v))}</td></tr>" for k, v in meta)
    warn = ""
    if masked:
        warn += f'<p class="warn">⚠ {masked} front trial(s) flagged masking_suspected (red rows).</p>'
    if pending:
        warn += f"<p>{pending} COMPLETE trial(s) have no {e(head.label)} row yet (partial run).</p>"
    all_cols = ["trial_id", "status", "regime", "clean_acc", "robust_acc", "ci_low", "ci_high", "n",
                "on_front", "masking_suspected", "flags", "error", *params]
    ordered = table.sort_values(["on_front", "robust_acc"], ascending=[False, False])
    fr_cls = lambda r: "masking" if bool(r.get("masking_suspected")) else (
        "tied" if r.get("front_status") == TIED else "")
    names = [o["name"] for o in data.objectives]
    front_cols = ["trial_id", "regime", *[f"obj_{n}{b}" for n in names
                                          for b in ("", "_low", "_high", "_n")],
                  "front_status", "tied_with", "masking_suspected", "ckpt_epoch",
                  "ckpt_regime", "ckpt_reason", *params]
    conf_html = ""
    if confirmed is not None and not confirmed.empty:
        from analysis.tables import paper_table

        t = paper_table(confirmed)
        conf_html = (f"<h2 id=\"confirmed\">Confirmed on the test split ({t['config_id'].nunique()} "
                     f"configurations, new seeds)</h2><p>Mean across seeds with its 95% Student-t "
                     f"interval (robust_low/high), the mean within-seed Wilson half-width, n test "
                     f"images per seed; written to table.md/csv/tex and robustbench/*.json.</p>"
                     + _html_table(t, list(t.columns), row_class=lambda r: "masking"
                                   if bool(r.get("masking_suspected")) else ""))
    all_cls = lambda r: "masking" if bool(r.get("masking_suspected")) else (
        "" if bool(r.get("on_front")) else "nonfront")
    figs = "".join(_img(p) for p in figures.values())
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>aerl-ray report — {e(str(spec.get('run_id', '?')))}</title>
<style>{_CSS}</style></head>
<body>
<h1>aerl-ray sweep report — {e(str(spec.get('run_id', '?')))}</h1>
<table class="meta">{meta_html}</table>
{warn}
<h2 id="pareto">Search front ({int(front["on_front"].sum()) if len(front) else 0} trials, validation split; {int((front.get("front_status", pd.Series(dtype=str)) == TIED).sum())} tied within noise)</h2>
<p>Objectives with 95% Wilson intervals: a trial is dominated only when another beats it beyond the intervals; trials whose difference the intervals cannot resolve are marked <i>tied within noise</i>. The same function gives the sweep's printout, pareto.csv and the study's best trials.</p>
{_html_table(front, front_cols, row_class=fr_cls) if len(front) else "<p>No trial on the front yet.</p>"}
{conf_html}
<h2>Figures</h2>
{figs}
<h2>All trials</h2>
{_html_table(ordered, all_cols, row_class=all_cls)}
<h2>Provenance</h2>
<p>Produced by:</p><pre>{e(command)}</pre>
<p>Sweep command:</p><pre>{e(str(spec.get('command', '?')))}</pre>
<p>Generated {e(_dt.datetime.now().isoformat(timespec='seconds'))} from the run dir's result files only
(sweep.json, trials.parquet, evals.parquet, indicators.parquet, confirm.parquet, the Optuna study).</p>
<h2>Terminal summary</h2><pre>{e(md)}</pre>
</body></html>
"""
