"""Matplotlib figures of a run (Agg backend).  Every figure states the headline metric.

Each ``plot_*`` function takes already-selected data, writes one PNG and returns its path;
missing data gives a figure with a note rather than an exception.
"""
from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Mapping, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from analysis.pareto import Headline, eps_close, eps_mask, fmt_eps  # noqa: E402

logger = logging.getLogger(__name__)

DPI = 110
_GREY = "#9a9a9a"


def regime_colors(regimes: Sequence[str]) -> dict[str, tuple]:
    cmap = plt.get_cmap("tab10")
    return {r: cmap(i % 10) for i, r in enumerate(sorted(set(map(str, regimes))))}


def _note(ax, text: str) -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, fontsize=10,
            color="#555", wrap=True)
    ax.set_xticks([])
    ax.set_yticks([])


def _save(fig, path: Path, headline: Headline, title: str) -> Path:
    fig.suptitle(f"{title}\nheadline: {headline.label}", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    logger.info("wrote %s", path)
    return path


def _complete(t: pd.DataFrame) -> pd.DataFrame:
    return t[t["status"] == "COMPLETE"] if "status" in t else t


def _regime_scatter(ax, t: pd.DataFrame, x: str, y: str, colors: Mapping[str, tuple]) -> None:
    c = _complete(t)
    for reg, g in c.groupby("regime"):
        ax.scatter(g[x], g[y], s=28, color=colors.get(reg, _GREY), label=reg, alpha=0.85,
                   edgecolors="none", zorder=3)
    m = c[c["masking_suspected"].astype(bool)] if "masking_suspected" in c else c.iloc[0:0]
    if len(m):
        ax.scatter(m[x], m[y], s=110, facecolors="none", edgecolors="red", linewidths=1.2,
                   label="masking suspected", zorder=4)


# --- pareto --------------------------------------------------------------------------------
def plot_pareto(tables: Mapping[str, pd.DataFrame], headline: Headline, hv: Mapping[str, float],
                ref: Sequence[float], colors: Mapping[str, tuple], path: Path) -> Path:
    """One panel per attack at the headline (norm, eps): trials, front as a step line."""
    attacks = list(tables) or [headline.attack]
    fig, axes = plt.subplots(1, len(attacks), figsize=(5.2 * len(attacks), 4.8), squeeze=False,
                             sharex=True, sharey=True)
    for ax, attack in zip(axes[0], attacks):
        t = tables.get(attack, pd.DataFrame())
        pts = t[np.isfinite(t["robust_acc"]) & np.isfinite(t["clean_acc"])] if len(t) else t
        if pts.empty:
            _note(ax, f"no {attack} results yet")
            ax.set_title(attack)
            continue
        other = pts[pts["status"] != "COMPLETE"]
        if len(other):
            ax.scatter(other["clean_acc"], other["robust_acc"], marker="x", color=_GREY,
                       alpha=0.6, label="failed/pruned", zorder=2)
        _regime_scatter(ax, pts, "clean_acc", "robust_acc", colors)
        front = pts[pts["on_front"]].sort_values(["clean_acc", "robust_acc"])
        if len(front):
            xs = [ref[0], *front["clean_acc"], front["clean_acc"].iloc[-1]]
            ys = [front["robust_acc"].iloc[0], *front["robust_acc"], ref[1]]
            ax.step(xs, ys, where="pre", color="black", lw=1.3, label="Pareto front", zorder=5)
            ax.scatter(front["clean_acc"], front["robust_acc"], s=46, facecolors="none",
                       edgecolors="black", linewidths=1.2, zorder=6)
            for (x, y), g in front.groupby(["clean_acc", "robust_acc"]):  # duplicates: one label
                ax.annotate(", ".join(map(str, g["trial_id"])), (x, y), fontsize=7,
                            xytext=(4, 4), textcoords="offset points")
        n = t["n"].dropna().astype(int) if "n" in t else pd.Series([], dtype=int)
        nlab = "?" if n.empty else (f"{n.min()}" if n.min() == n.max() else f"{n.min()}–{n.max()}")
        star = " ★" if attack == headline.attack else ""
        ax.set_title(f"{attack} {headline.norm} ε={headline.eps_str} (n={nlab}){star}\n"
                     f"hypervolume {hv.get(attack, float('nan')):.4f} vs ref ({ref[0]:g}, {ref[1]:g})",
                     fontsize=9)
        ax.set_xlabel("clean accuracy")
        ax.set_ylabel("robust accuracy")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="best")
    return _save(fig, path, headline, "Pareto front: clean vs robust accuracy (both maximised)")


# --- robust accuracy vs eps ------------------------------------------------------------------
def plot_curves(evals: pd.DataFrame, table: pd.DataFrame, headline: Headline,
                colors: Mapping[str, tuple], path: Path) -> Path:
    """Robust accuracy vs eps per regime: the regime's best trial at the headline metric."""
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    c = _complete(table)
    c = c[np.isfinite(c["robust_acc"])] if len(c) else c
    ev = evals[(evals["norm"] == headline.norm)] if len(evals) else evals
    if c.empty or ev.empty:
        _note(ax, "no evaluated COMPLETE trials yet")
        return _save(fig, path, headline, "Robust accuracy vs ε")
    best = c.sort_values(["robust_acc", "clean_acc"]).groupby("regime").tail(1)
    ticks: dict[float, str] = {0.0: "0"}
    other = "pgd" if headline.attack != "pgd" else None
    for r in best.itertuples():
        col = colors.get(r.regime, _GREY)
        for attack, style in ((headline.attack, "-"), (other, "--")):
            if attack is None:
                continue
            g = ev[(ev["trial_id"] == r.trial_id) & (ev["attack"] == attack)]
            g = g.sort_values("eps").drop_duplicates("eps", keep="last")
            if g.empty:
                continue
            x = np.r_[0.0, g["eps"].to_numpy(float)]
            y = np.r_[r.clean_acc, g["robust_acc"].to_numpy(float)]
            lo = np.r_[0.0, (g["robust_acc"] - g["ci_low"]).to_numpy(float)]
            hi = np.r_[0.0, (g["ci_high"] - g["robust_acc"]).to_numpy(float)]
            ax.errorbar(x, y, yerr=np.nan_to_num(np.vstack([lo, hi])), fmt=style + "o", ms=4,
                        color=col, capsize=3, alpha=1.0 if style == "-" else 0.55,
                        label=f"{r.regime} ({r.trial_id}) {attack}")
            for e, s in zip(g["eps"], g.get("eps_str", g["eps"])):
                ticks[float(e)] = fmt_eps(e, s if isinstance(s, str) else None)
    xs = sorted(ticks)
    ax.set_xticks(xs, [ticks[x] for x in xs], fontsize=8)
    ax.set_xlabel(f"ε ({headline.norm}); ε=0 is clean accuracy")
    ax.set_ylabel("accuracy (95% Wilson interval)")
    ax.set_ylim(-0.02, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper right")
    return _save(fig, path, headline, f"Robust accuracy vs ε, best trial per regime "
                                      f"(solid {headline.attack}, dashed {other or '-'})")


# --- gradient indicators ---------------------------------------------------------------------
INSTABILITY = ("cos_prev", "dispersion", "mean_dir_dispersion", "sign_consistency")


def indicator_frame(indicators: pd.DataFrame, table: pd.DataFrame,
                    headline: Headline) -> tuple[pd.DataFrame, str]:
    """Aggregate (step -1) indicators per trial at the headline norm and nearest eps."""
    ind = indicators
    if ind.empty or not {"indicator", "value", "trial_id"} <= set(ind.columns):
        return pd.DataFrame(), ""
    if "step" in ind:
        ind = ind[ind["step"] == -1]
    if "norm" in ind:
        ind = ind[ind["norm"] == headline.norm]
    if ind.empty:
        return pd.DataFrame(), ""
    epss = ind["eps"].astype(float).unique()
    e = min(epss, key=lambda v: (not eps_close(v, headline.eps), abs(v - headline.eps)))
    ind = ind[eps_mask(ind["eps"], e)]
    wide = ind.pivot_table(index="trial_id", columns="indicator", values="value", aggfunc="last")
    return table.merge(wide, left_on="trial_id", right_index=True, how="inner"), fmt_eps(e)


def plot_indicators(indicators: pd.DataFrame, table: pd.DataFrame, headline: Headline,
                    colors: Mapping[str, tuple], path: Path) -> Path:
    df, eps_lab = indicator_frame(indicators, table, headline)
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.6), squeeze=False)
    inst = next((i for i in INSTABILITY if i in df.columns), None)
    for ax, name in zip(axes[0], ("agn", inst)):
        if df.empty or name is None or name not in df or not np.isfinite(df[name]).any():
            _note(ax, f"no {name or 'direction-instability'} indicator rows "
                      f"(step -1, {headline.norm}) yet")
            continue
        _regime_scatter(ax, df, name, "robust_acc", colors)
        v = _complete(df)[name].dropna()
        if len(v) and (v > 0).all() and v.max() / max(v.min(), 1e-12) > 50:
            ax.set_xscale("log")
        ax.set_xlabel(f"{name} (aggregate over the PGD trajectory, {headline.norm} ε={eps_lab})")
        ax.set_ylabel(f"robust accuracy ({headline.attack})")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    return _save(fig, path, headline,
                 "Gradient indicators vs robust accuracy (input-gradient norm, direction instability)")


# --- importance + parallel coordinates ----------------------------------------------------------
def plot_importance(importances: Sequence[tuple[str, dict | str]], table: pd.DataFrame,
                    param_cols: Sequence[str], headline: Headline, colors: Mapping[str, tuple],
                    path: Path) -> Path:
    """fANOVA importances per objective (or a note) over a parallel-coordinates view."""
    k = max(1, len(importances))
    fig = plt.figure(figsize=(max(10, 4.2 * k), 8.2))
    gs = fig.add_gridspec(2, k, height_ratios=[1, 1.25])
    for i, (name, imp) in enumerate(importances or [("objectives", "no objectives")]):
        ax = fig.add_subplot(gs[0, i])
        ax.set_title(f"importance for {name}", fontsize=9)
        if isinstance(imp, str) or not imp:
            _note(ax, imp if isinstance(imp, str) else "no importances")
            continue
        items = sorted(imp.items(), key=lambda kv: kv[1])
        ax.barh([p for p, _ in items], [v for _, v in items], color="#4c72b0")
        ax.set_xlabel("fANOVA importance (normalised)")
        ax.set_xlim(0, 1)
    ax = fig.add_subplot(gs[1, :])
    c = _complete(table)
    axes_cols = [p for p in param_cols if p in c] + ["clean_acc", "robust_acc"]
    if len(c) < 1 or len(axes_cols) < 2:
        _note(ax, "no completed trials for the parallel-coordinates view")
    else:
        _parallel(ax, c, axes_cols, colors)
    return _save(fig, path, headline, "Hyperparameter importance (Optuna fANOVA, seed 0) "
                                      "and parallel coordinates of COMPLETE trials")


def _parallel(ax, c: pd.DataFrame, cols: Sequence[str], colors: Mapping[str, tuple]) -> None:
    norm = np.full((len(c), len(cols)), np.nan)
    labels = []
    for j, col in enumerate(cols):
        v = c[col]
        num = pd.to_numeric(v, errors="coerce")
        if num.notna().sum() >= max(1, v.notna().sum()):
            lo, hi = np.nanmin(num), np.nanmax(num)
            log = lo > 0 and hi / lo > 100
            a = np.log10(num) if log else num
            alo, ahi = (np.log10(lo), np.log10(hi)) if log else (lo, hi)
            scaled = (a - alo) / (ahi - alo) if ahi > alo else a * 0 + 0.5
            norm[:, j] = np.where(num.notna(), scaled, np.nan)  # unused: a gap, not the middle
            labels.append(f"{col}\n[{lo:.3g}, {hi:.3g}]{' log' if log else ''}")
        else:
            cats = sorted(v.dropna().astype(str).unique())
            pos = {s: (i / (len(cats) - 1) if len(cats) > 1 else 0.5) for i, s in enumerate(cats)}
            norm[:, j] = [pos.get(str(s), np.nan) if pd.notna(s) else np.nan for s in v]
            labels.append(f"{col}\n" + "/".join(cats)[:40])
    front = c["on_front"].to_numpy(bool) if "on_front" in c else np.zeros(len(c), bool)
    seen = set()
    for row, reg, on in zip(norm, c["regime"], front):
        lab = reg if reg not in seen else None
        seen.add(reg)
        ax.plot(np.arange(len(cols)), row, "-o", ms=3, lw=2.2 if on else 1.0,
                alpha=0.95 if on else 0.55, color=colors.get(reg, _GREY), label=lab)
    ax.set_xticks(range(len(cols)), labels, fontsize=7)
    ax.set_yticks([0, 1], ["min", "max"])
    for j in range(len(cols)):
        ax.axvline(j, color="#ccc", lw=0.8, zorder=0)
    ax.set_title("parallel coordinates (thick: on the Pareto front; gaps: parameter not used)",
                 fontsize=9)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))


# --- compute -------------------------------------------------------------------------------------
def plot_compute(table: pd.DataFrame, headline: Headline, colors: Mapping[str, tuple],
                 path: Path) -> Path:
    """Robust accuracy vs training compute (example passes, wall time)."""
    c = _complete(table).copy()
    if len(c):
        c = c[np.isfinite(c["robust_acc"])]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.6), squeeze=False)
    cols = {"passes": ["train_fwd_passes", "train_bwd_passes"], "seconds": ["train_seconds"]}
    for ax, (what, need) in zip(axes[0], cols.items()):
        if c.empty or not all(n in c for n in need):
            _note(ax, f"no {' / '.join(need)} columns or evaluated trials yet")
            continue
        c["xval"] = sum(pd.to_numeric(c[n], errors="coerce") for n in need)
        d = c[np.isfinite(c["xval"]) & (c["xval"] > 0)]
        if d.empty:
            _note(ax, f"no positive {what} values yet")
            continue
        _regime_scatter(ax, d, "xval", "robust_acc", colors)
        if "epochs_run" in d:
            for r in d.itertuples():
                if not (isinstance(r.epochs_run, float) and math.isnan(r.epochs_run)):
                    ax.annotate(f"{int(r.epochs_run)}ep", (r.xval, r.robust_acc), fontsize=6,
                                xytext=(3, -8), textcoords="offset points", color="#555")
        ax.set_xscale("log")
        ax.set_xlabel("training forward + backward example-passes" if what == "passes"
                      else "training wall time [s]")
        ax.set_ylabel(f"robust accuracy ({headline.attack})")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7)
    return _save(fig, path, headline, "Robust accuracy vs training compute (labels: epochs run)")


def search_progress(trials: pd.DataFrame, objectives: Sequence[Mapping]) -> pd.DataFrame:
    """Per finished trial (in finishing order): cumulative compute (training + selection /
    rung validation + evaluation, in example-passes and seconds) and the hypervolume of the
    validation front of the COMPLETE trials so far (2 objectives, reference (0, 0), each
    oriented to be maximised)."""
    from analysis.pareto import hypervolume_2d

    cols = ["finished_at", "passes", "seconds", "hypervolume"]
    names = [o["name"] for o in objectives][:2]
    if trials.empty or len(names) < 2 or any(f"obj_{n}" not in trials for n in names):
        return pd.DataFrame(columns=cols)
    t = trials.sort_values("finished_at").reset_index(drop=True)
    num = lambda c: pd.to_numeric(t[c], errors="coerce").fillna(0) if c in t else 0  # noqa: E731
    passes = sum(num(c) for c in ("train_fwd_passes", "train_bwd_passes", "select_fwd_passes",
                                  "select_bwd_passes", "eval_fwd_passes", "eval_bwd_passes"))
    seconds = num("train_seconds") + num("eval_compute_seconds")
    signs = [1 if o.get("direction", "max") == "max" else -1 for o in objectives[:2]]
    rows = []
    for i in range(len(t)):
        done = t.iloc[: i + 1]
        done = done[done["status"] == "COMPLETE"]
        pts = done[[f"obj_{n}" for n in names]].to_numpy(dtype=float) * signs
        rows.append({"finished_at": t["finished_at"].iloc[i],
                     "passes": float(np.asarray(passes)[: i + 1].sum()),
                     "seconds": float(np.asarray(seconds)[: i + 1].sum()),
                     "hypervolume": hypervolume_2d(pts) if len(pts) else 0.0})
    return pd.DataFrame(rows, columns=cols)


def plot_search_efficiency(trials: pd.DataFrame, objectives: Sequence[Mapping],
                           scheduler: str, path: Path) -> Path:
    """Hypervolume of the validation front vs cumulative compute (passes and seconds)."""
    prog = search_progress(trials, objectives)
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.2), squeeze=False)
    for ax, what in zip(axes[0], ("passes", "seconds")):
        if prog.empty:
            _note(ax, "needs two objectives and finished trials")
            continue
        ax.step(prog[what], prog["hypervolume"], where="post", color="#1f77b4")
        ax.plot(prog[what], prog["hypervolume"], "o", ms=3, color="#1f77b4")
        ax.set_xlabel("cumulative compute: forward + backward example-passes" if what == "passes"
                      else "cumulative compute: trial seconds")
        ax.set_ylabel("hypervolume of the validation front")
        ax.grid(alpha=0.3)
    fig.suptitle(f"Search efficiency (scheduler: {scheduler}); every trial counted, pruned ones "
                 "too", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
