"""Robustness evaluation of a checkpoint: attacks x norms x budget grid -> result rows.

:class:`~aerl_ray.evalplan.EvalPlan` (re-exported here) says what to run and is validated
when built, so bad requests (unknown attack or norm, negative or unsorted budgets, a
transfer attack without a source) fail before any model is loaded.
:func:`evaluate_checkpoint` then checks what needs the
model and data (n larger than the test set, another architecture than expected, a model
returning probabilities) before the first attack, runs every attack over each budget
grid in one pass (:func:`~aerl_ray.attacks.base.robustness_curve`), and returns rows in
the schemas of :mod:`aerl_ray.results` (``EVAL_COLUMNS``, ``INDICATOR_COLUMNS``).

With ``plan.diagnostics`` (``cheap``/``full``) :func:`run_evaluation` also runs the
gradient-masking diagnostics of :mod:`aerl_ray.diagnostics`; the CLI's
``--diagnostics cheap|full`` prints them and writes ``OUT/diagnostics.parquet`` (one row
per check, ``DIAGNOSTIC_COLUMNS``) and ``OUT/diagnostics.json`` next to the evals.

The sweep's evaluator actors wrap :class:`Evaluator` (no global state; it only holds the
transfer cache and loaded data/sources).  ``python -m aerl_ray.evaluate CKPT ...`` is a
thin CLI over the same functions.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from torch import nn

from aerl_ray.attacks import (ATTACKS, Norm, Threat, TransferCache, check_images, check_logits,
                              parse_eps, predict, robustness_curve)
from aerl_ray.attacks.base import params_json
from aerl_ray.attacks.transfer import load_source
from aerl_ray.checkpoint import CheckpointError, load_checkpoint, model_from_checkpoint
from aerl_ray.diagnostics import DiagnosticsReport, run_diagnostics
from aerl_ray.evalplan import DEFAULT_GRIDS, EvalPlan, EvalPlanError
from aerl_ray.results import EVALS, INDICATORS, append_rows, config_hash, wilson_interval
from aerl_ray.train import resolve_device

logger = logging.getLogger(__name__)


# --- loading --------------------------------------------------------------------------------
@dataclass
class Target:
    """The model under evaluation and what the rows say about it."""

    model: nn.Module
    label: str
    model_name: str = ""
    dataset: str = ""
    regime: str = ""
    config_hash: str = ""
    config: dict = field(default_factory=dict)
    train_seed: int | None = None
    ckpt_epoch: int | None = None
    ckpt_regime: str = ""
    ckpt_reason: str = ""

    def row_base(self) -> dict[str, Any]:
        """The columns every results row of this checkpoint carries."""
        from aerl_ray.plugins import code_hash

        return {"checkpoint": self.label, "model": self.model_name, "dataset": self.dataset,
                "regime": self.regime, "config_hash": self.config_hash,
                "code_hash": code_hash(),
                "train_seed": self.train_seed, "ckpt_epoch": self.ckpt_epoch,
                "ckpt_regime": self.ckpt_regime, "ckpt_reason": self.ckpt_reason}


def load_target(target: "str | os.PathLike | dict | nn.Module", expected_model: str = ""
                ) -> Target:
    """A checkpoint path / dict (rebuilt in eval mode) or a model object."""
    if isinstance(target, nn.Module):
        return Target(target.eval(), label="<in-memory model>")
    label = str(target) if not isinstance(target, dict) else "<checkpoint dict>"
    ckpt = target if isinstance(target, dict) else load_checkpoint(target)
    model, info = model_from_checkpoint(ckpt, expected_model or None)
    cfg = dict(ckpt.get("config", {}))
    sel = dict(ckpt.get("selection") or {})
    return Target(model, label, cfg.get("model", ""), cfg.get("dataset", info.name),
                  str(cfg.get("regime", "")), config_hash(cfg), cfg,
                  train_seed=int(ckpt.get("seed", cfg.get("seed", 0))),
                  ckpt_epoch=int(ckpt.get("epoch", -1)),
                  ckpt_regime=str((ckpt.get("metrics") or {}).get("regime_active", "")),
                  ckpt_reason=str(sel.get("reason", "")))


def load_eval_data(config: Mapping[str, Any], split: str = "test"
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``split`` (val or test) of the dataset a checkpoint was trained on: the same
    split the training loop made (:func:`aerl_ray.data.load_splits` with the checkpoint's
    data settings)."""
    from aerl_ray.data import load_splits, split_config

    splits = load_splits(split_config(config))
    if split == "val":
        return splits.x_val, splits.y_val
    if split == "test":
        return splits.x_test, splits.y_test
    raise EvalPlanError(f"split={split!r}; evaluate on val or test")


def load_test_data(config: Mapping[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
    """The test split of the dataset a checkpoint was trained on."""
    return load_eval_data(config, "test")


# --- the evaluation -------------------------------------------------------------------------
@dataclass
class Evaluation:
    """What :func:`run_evaluation` returns."""

    rows: list[dict]  # EVAL_COLUMNS
    indicators: list[dict]  # INDICATOR_COLUMNS
    diagnostics: DiagnosticsReport | None = None  # None when the level is "off"


def evaluate_checkpoint(target: "str | os.PathLike | dict | nn.Module", plan: EvalPlan, *,
                        data: tuple[torch.Tensor, torch.Tensor] | None = None,
                        run_id: str = "", trial_id: str = "",
                        cache: TransferCache | None = None,
                        source: "nn.Module | str | None" = None,
                        device: str | torch.device | None = "cpu",
                        landscape_dir: str | os.PathLike | None = None,
                        label: str | None = None, source_label: str | None = None,
                        ) -> tuple[list[dict], list[dict]]:
    """Evaluate one checkpoint; returns (eval_rows, indicator_rows).

    The masking diagnostics are not run here (whatever ``plan.diagnostics`` says); use
    :func:`run_evaluation` for rows + diagnostics.  Arguments as :func:`run_evaluation`.
    """
    ev = run_evaluation(target, plan, data=data, run_id=run_id, trial_id=trial_id,
                        cache=cache, source=source, device=device,
                        landscape_dir=landscape_dir, label=label, source_label=source_label,
                        diagnostics="off")
    return ev.rows, ev.indicators


def run_evaluation(target: "str | os.PathLike | dict | nn.Module", plan: EvalPlan, *,
                   data: tuple[torch.Tensor, torch.Tensor] | None = None,
                   run_id: str = "", trial_id: str = "",
                   cache: TransferCache | None = None,
                   source: "nn.Module | str | None" = None,
                   device: str | torch.device | None = "cpu",
                   landscape_dir: str | os.PathLike | None = None,
                   label: str | None = None, source_label: str | None = None,
                   diagnostics: str | None = None, phase: str = "evaluate") -> Evaluation:
    """Evaluate one checkpoint: eval rows, indicator rows and masking diagnostics.

    Args:
        target: checkpoint path, loaded checkpoint dict, or a model (then ``data`` is
            required).
        plan: the :class:`EvalPlan`.
        data: (x, y) of ``plan.split`` to use instead of loading the checkpoint's dataset.
        run_id, trial_id: identifiers copied into every row.
        phase: the rows' ``phase`` (search, confirm or evaluate).
        cache: transfer cache shared across calls (see :class:`Evaluator`).
        source: a transfer source model overriding ``plan.transfer_source``.
        device: where to run (``auto`` picks CUDA when available).
        landscape_dir: if given, write a 1-D loss-landscape slice (JSON + PNG) per norm.
        label: the ``checkpoint`` value of the rows (default: the path).
        source_label: names the transfer source in the attack column (default: derived
            from ``plan.transfer_source``).
        diagnostics: level of the masking diagnostics (default ``plan.diagnostics``); they
            reuse the rows at every budget (see :mod:`aerl_ray.diagnostics`).

    Raises:
        EvalPlanError, CheckpointError, AttackInputError: before any attack runs.
    """
    dev = resolve_device(device)
    tgt = load_target(target, plan.model)
    if label is not None:
        tgt.label = label
    if isinstance(target, nn.Module) and data is None:
        raise EvalPlanError("evaluating a model object needs data=(x, y) of its split")
    x_all, y_all = data if data is not None else load_eval_data(tgt.config, plan.split)
    check_images(x_all, y_all)
    n = plan.n or len(x_all)
    if n > len(x_all):
        raise EvalPlanError(f"n={plan.n} is larger than the {plan.split} split ({len(x_all)} "
                            f"images of {tgt.dataset or 'the data'}); use n <= {len(x_all)} "
                            "or 0 = all")
    model = tgt.model.to(dev)
    x, y = x_all[:n].to(dev), y_all[:n].to(dev)
    check_logits(model, x)
    src = None
    if "transfer" in plan.attacks:
        src_given = source if source is not None else (plan.params_for("transfer").get("source")
                                                       or plan.transfer_source)
        try:
            src, _ = load_source(src_given)
        except CheckpointError as e:
            raise EvalPlanError(f"transfer source: {e}") from e
        src = src.to(dev)
        check_logits(src, x, num_classes=int(model(x[:1]).shape[1]))
    cache = cache if cache is not None else TransferCache()
    src_label = source_label or _source_label(source, plan)
    clean_ok = (predict(model, x, plan.batch_size) == y).cpu()
    clean_acc = int(clean_ok.sum()) / n
    ids = torch.arange(n)
    base = {"run_id": run_id, "trial_id": trial_id, "phase": phase, "split": plan.split,
            **tgt.row_base(), "seed": plan.seed}
    eval_rows: list[dict] = []
    ind_rows: list[dict] = []
    eta = _Eta(plan, n)
    broken_by_norm: dict[str, dict[str, dict[float, torch.Tensor]]] = {}
    for norm, grid in plan.grids:
        broken: dict[str, dict[float, torch.Tensor]] = {}  # attack -> eps -> success (N,)
        broken_by_norm[norm] = broken
        for name in plan.attacks:
            params = plan.params_for(name)
            attack_label = name
            if name == "transfer":
                params["source"], params["cache"] = src, cache
                attack_label = f"transfer:{src_label}"
            sub = plan.eps_grid(norm, name)
            logger.info("[%d/%d] %s %s eps %s on %d %s images of %s%s", eta.done + 1,
                        eta.jobs, attack_label, norm, ",".join(sub), n, plan.split, tgt.label,
                        eta.text())
            results = robustness_curve(name, model, x, y, norm, sub, example_ids=ids, **params)
            eta.finished(name, len(sub))
            logger.info("      %s %s: %s (%.1f s)", attack_label, norm, ", ".join(
                f"eps {e} {1 - float(r.success.float().mean()):.3f}" for e, r in
                zip(sub, results)), sum(r.seconds for r in results))
            shown = {k: v for k, v in params.items() if k not in ("cache",)}
            if name == "transfer":
                shown["source"] = src_label
            for eps_str, r in zip(sub, results):
                broken.setdefault(attack_label, {})[parse_eps(eps_str)] = r.success
                row = _row(base, attack_label, norm, eps_str, r.success, clean_acc,
                           fwd=r.fwd_passes, bwd=r.bwd_passes, queries=r.queries,
                           seconds=r.seconds,
                           params=params_json({**shown, "multi_budget": True}),
                           flags=r.flags)
                row["curve_disagreement"] = curve_disagreement(r)
                eval_rows.append(row)
        if len(broken) > 1:
            eval_rows += _worst_case_rows(base, norm, grid, broken, clean_acc)
        if plan.indicators or landscape_dir:
            ind_rows += _indicators(model, x, y, norm, plan, base, landscape_dir)
    level = plan.diagnostics if diagnostics is None else diagnostics
    report = None
    if level != "off":
        report = run_diagnostics(model, x, y, plan, level=level, eval_rows=eval_rows,
                                 n=plan.diagnostics_n, source=src)
        eval_rows += _worst_case_with_diagnostics(base, plan, broken_by_norm, report,
                                                  clean_acc)
    return Evaluation(eval_rows, ind_rows, report)


class _Eta:
    """Progress of an evaluation: jobs (attack x norm) done and an ETA from the time spent
    so far, weighted by a rough cost per job (PGD steps x restarts x budgets, AutoAttack
    standard ~ 30x an APGD run, Square's queries, ...)."""

    def __init__(self, plan: EvalPlan, n: int):
        self.plan, self.t0, self.done = plan, time.perf_counter(), 0
        self.jobs = len(plan.grids) * len(plan.attacks)
        self.total = sum(self.cost(a, len(plan.eps_grid(norm, a)))
                         for norm, _ in plan.grids for a in plan.attacks)
        self.spent = 0.0

    def cost(self, attack: str, budgets: int) -> float:
        p = self.plan.params_for(attack)
        per = {"pgd": p.get("steps", 50) * p.get("restarts", 1), "fgsm": 1,
               "square": p.get("n_queries", 5000) / 10, "transfer": p.get("steps", 50),
               "autoattack": (3000 if self.plan.autoattack_version != "custom"
                              else 100 * (1 + 3 * len(self.plan.autoattack_attacks)))}
        return float(per.get(attack, 50)) * max(1, budgets)

    def finished(self, attack: str, budgets: int) -> None:
        self.done += 1
        self.spent += self.cost(attack, budgets)

    def text(self) -> str:
        if not self.spent:
            return ""
        elapsed = time.perf_counter() - self.t0
        left = elapsed * (self.total - self.spent) / self.spent
        return f" (elapsed {elapsed:.0f} s, ETA {left:.0f} s)"


def _row(base: dict, attack: str, norm: str, eps_str: str, success: torch.Tensor,
         clean_acc: float, *, fwd: int = 0, bwd: int = 0, queries: int = 0,
         seconds: float = 0.0, params: str = "{}", flags: Sequence[str] = ()) -> dict:
    m = int(success.numel())
    k = int((~success).sum())
    lo, hi = wilson_interval(k, m)
    return {**base, "attack": attack, "norm": norm, "eps": parse_eps(eps_str),
            "eps_str": str(eps_str), "n": m, "clean_acc": clean_acc, "robust_acc": k / m,
            "ci_low": lo, "ci_high": hi, "fwd_passes": int(fwd), "bwd_passes": int(bwd),
            "queries": int(queries), "seconds": float(seconds), "params": params,
            "flags": json.dumps(list(flags)), "curve_disagreement": float("nan")}


def curve_disagreement(r) -> float:
    """The curve's disagreement column: a searched PGD curve's audited upper bound, 0 for
    an exact curve (true by construction), NaN where the attack reports none."""
    extra = getattr(r, "extra", None) or {}
    v = extra.get("disagreement_upper")
    if v is None:
        return 0.0 if extra.get("curve") == "exact" else float("nan")
    return float(v)


def worst_case(broken: Mapping[str, Mapping[float, torch.Tensor]], eps: float
               ) -> tuple[torch.Tensor, list[str]] | None:
    """Per example: broken at ``eps`` if any attack broke it at a budget <= eps (each
    attack's own curve is already cumulative).  Returns (success, attacks used) or None
    when no attack ran at or below ``eps``."""
    out, used = None, []
    for attack, curve in broken.items():
        below = [e for e in curve if e <= eps + 1e-12]
        if not below:
            continue
        s = curve[max(below)]
        out = s.clone() if out is None else (out | s)
        used.append(attack)
    return (out, used) if out is not None else None


def _worst_case_rows(base: dict, norm: str, grid: Sequence[str],
                     broken: Mapping[str, Mapping[float, torch.Tensor]],
                     clean_acc: float) -> list[dict]:
    """One ``worst_case`` row per budget: robust only if no attack broke the example (the
    number RobustBench reports), computed per example, not as a minimum of accuracies."""
    rows = []
    for eps_str in grid:
        wc = worst_case(broken, parse_eps(eps_str))
        if wc is None:
            continue
        success, used = wc
        rows.append(_row(base, "worst_case", norm, eps_str, success, clean_acc,
                         params=json.dumps({"attacks": sorted(used)})))
    return rows


WORST_WITH_DIAGNOSTICS = "worst_case+diag"


def _worst_case_with_diagnostics(base: dict, plan: EvalPlan,
                                 broken_by_norm: Mapping[str, Mapping[str, Mapping]],
                                 report: DiagnosticsReport, clean_acc: float) -> list[dict]:
    """``worst_case+diag`` rows: the per-example worst case of the plan's attacks *and*
    the diagnostics' own (a converged many-step PGD, other losses, Square, ...) on the
    diagnostic subset (the first ``n`` examples; the row's ``n`` says how many).  Where
    the default attack has not converged this is the robust number to trust; a diagnostic
    attack run at a budget e counts as broken at every grid budget >= e (ball inclusion)."""
    rows = []
    for norm, grid in plan.grids:
        diag = {}
        for (label, nv, eps_str), (ids, success) in report.success.items():
            if nv == norm:
                diag.setdefault(label, {})[parse_eps(eps_str)] = (ids, success)
        if not diag:
            continue
        sub_ids = next(iter(next(iter(diag.values())).values()))[0].long()
        merged = {a: {e: s.cpu()[sub_ids] for e, s in curve.items()}
                  for a, curve in broken_by_norm.get(norm, {}).items()}
        for label, curve in diag.items():
            merged[label] = {e: s.cpu() for e, (ids, s) in curve.items()
                             if torch.equal(ids.long(), sub_ids)}
        for row in _worst_case_rows(base, norm, grid, merged, clean_acc):
            row["attack"] = WORST_WITH_DIAGNOSTICS
            row["params"] = json.dumps({**json.loads(row["params"]), "subset": "first n"})
            rows.append(row)
    return rows


def _source_label(source: Any, plan: EvalPlan) -> str:
    if isinstance(source, nn.Module) or not (source or plan.transfer_source):
        return "model"
    p = Path(str(source or plan.transfer_source))
    return f"{p.parent.name}/{p.stem}" if p.parent.name else p.stem


def _indicators(model: nn.Module, x: torch.Tensor, y: torch.Tensor, norm: str, plan: EvalPlan,
                base: dict, landscape_dir: str | os.PathLike | None) -> list[dict]:
    from aerl_ray.indicators import (adversarial_landscape, measure_indicators,
                                     save_landscape_png)

    eps = plan.indicator_budget(norm)
    if eps is None:
        return []
    t0 = time.perf_counter()
    rep = measure_indicators(model, x, y, Threat(norm, eps), steps=plan.indicator_steps,
                             seed=plan.seed, batch_size=plan.batch_size)
    logger.info("indicators %s eps=%s in %.1f s", norm, eps, time.perf_counter() - t0)
    keep = ("run_id", "trial_id", "checkpoint", "phase", "split")
    rows = [{**{k: base[k] for k in keep}, **r} for r in rep.rows()] if plan.indicators else []
    if landscape_dir:
        k = min(len(x), 64)
        data = adversarial_landscape(model, x[:k], y[:k], rep.x_adv[:k])
        out = Path(landscape_dir)
        out.mkdir(parents=True, exist_ok=True)
        stem = f"landscape_{norm}_{str(eps).replace('/', '_')}"
        (out / f"{stem}.json").write_text(json.dumps(data))
        save_landscape_png(data, out / f"{stem}.png", title=f"{norm} eps={eps}")
    return rows


class Evaluator:
    """Evaluates checkpoints; a Ray actor can wrap it as is.

    Holds state worth keeping between checkpoints and nothing global: the transfer cache
    (crafted sets are shared by every target with the same source), evaluation data per
    (dataset, split) and loaded transfer sources.
    """

    def __init__(self, cache_dir: str | os.PathLike | None = None, device: str = "cpu"):
        self.cache = TransferCache(cache_dir)
        self.device = device
        self._data: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}
        self._sources: dict[str, nn.Module] = {}

    def eval_data(self, config: Mapping[str, Any], split: str = "test"
                  ) -> tuple[torch.Tensor, torch.Tensor]:
        """A split of a checkpoint's dataset, loaded once per (data settings, split)."""
        from aerl_ray.data import split_config

        key = (tuple(sorted((k, str(v)) for k, v in vars(split_config(config)).items())),
               split)
        if key not in self._data:
            self._data[key] = load_eval_data(config, split)
        return self._data[key]

    def evaluate(self, target: "str | os.PathLike | dict", plan: EvalPlan, *,
                 run_id: str = "", trial_id: str = "") -> tuple[list[dict], list[dict]]:
        ckpt = target if isinstance(target, dict) else load_checkpoint(target)
        data = self.eval_data(ckpt.get("config", {}), plan.split)
        source = None
        if "transfer" in plan.attacks and plan.transfer_source:
            if plan.transfer_source not in self._sources:
                self._sources[plan.transfer_source] = load_source(plan.transfer_source)[0]
            source = self._sources[plan.transfer_source]
        return evaluate_checkpoint(
            ckpt, plan, data=data, run_id=run_id, trial_id=trial_id,
            cache=self.cache, source=source, device=self.device,
            label=None if isinstance(target, dict) else str(target),
            source_label=_source_label(None, plan) if source is not None else None)


# --- CLI ------------------------------------------------------------------------------------
def format_table(rows: Sequence[dict]) -> str:
    """attack x eps -> robust accuracy [95% interval], one block per norm."""
    lines = []
    for norm in dict.fromkeys(r["norm"] for r in rows):
        rs = [r for r in rows if r["norm"] == norm]
        eps_cols = list(dict.fromkeys(r["eps_str"] for r in rs))
        attacks = list(dict.fromkeys(r["attack"] for r in rs))
        width = 22
        lines.append(f"{norm}  (n={rs[0]['n']}, clean acc {rs[0]['clean_acc']:.3f})")
        lines.append(f"{'attack':<24}" + "".join(f"{'eps=' + e:>{width}}" for e in eps_cols))
        for a in attacks:
            cells = []
            for e in eps_cols:
                r = next((r for r in rs if r["attack"] == a and r["eps_str"] == e), None)
                cells.append(f"{r['robust_acc']:.3f} [{r['ci_low']:.3f},{r['ci_high']:.3f}]"
                             if r else "-")
            lines.append(f"{a:<24}" + "".join(f"{c:>{width}}" for c in cells))
        flags = sorted({f for r in rs for f in json.loads(r["flags"])})
        lines += [f"  flag: {f}" for f in flags]
        for a in attacks:
            dis = [float(r.get("curve_disagreement", float("nan"))) for r in rs
                   if r["attack"] == a]
            dis = [d for d in dis if d == d]
            if dis and max(dis) > 0:
                lines.append(f"  {a}: curve by search; audited disagreement with separate "
                             f"runs <= {100 * max(dis):.2f}% of (example, budget) pairs")
        lines.append("")
    return "\n".join(lines)


def _parse_value(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m aerl_ray.evaluate",
        description="Robust accuracy of a checkpoint for attacks x norms x budgets; prints a "
                    "table and writes OUT/evals.parquet and OUT/indicators.parquet.")
    p.add_argument("checkpoint", help="checkpoint written by aerl_ray.train (e.g. RUN/best.pt)")
    p.add_argument("--attacks", default="pgd",
                   help=f"comma list of: {', '.join(ATTACKS.names())} (default pgd)")
    p.add_argument("--norm", default="linf", help="comma list of norms: linf, l2")
    p.add_argument("--eps", action="append", default=None,
                   help="sorted budget grid, e.g. 0,1/255,8/255; with several norms give "
                        "it per norm: --eps linf:0,8/255 --eps l2:0,0.5 (default: "
                        "linf 0..16/255, l2 0..2.0)")
    p.add_argument("--n", type=int, default=1000,
                   help="first n images of the --split (0 = all; default 1000)")
    p.add_argument("--batch-size", type=int, default=500)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=None, help="PGD steps (default 50)")
    p.add_argument("--restarts", type=int, default=None, help="PGD restarts (default 1)")
    p.add_argument("--loss", default=None, help="PGD loss: ce, margin or dlr (default ce)")
    p.add_argument("--square-queries", type=int, default=None, help="Square query budget")
    p.add_argument("--aa-version", default="standard", help="standard, plus, rand or custom")
    p.add_argument("--aa-attacks", default="",
                   help="AutoAttack sub-attacks (implies custom), e.g. apgd-ce,apgd-t")
    p.add_argument("--aa-eps", default="",
                   help="run AutoAttack only at these budgets of the grid (comma list, e.g. "
                        "8/255; default: every budget); the other attacks run the whole grid")
    p.add_argument("--split", default="test", choices=("test", "val"),
                   help="data split to evaluate on (default test; a sweep's search uses val)")
    p.add_argument("--transfer-source", default="",
                   help="checkpoint the transfer attack crafts on (e.g. an SL run's best.pt)")
    p.add_argument("--param", action="append", default=[], metavar="ATTACK.KEY=VALUE",
                   help="any attack parameter, e.g. pgd.step_size=0.1 (repeatable)")
    p.add_argument("--model", default="", help="expected architecture (error if different)")
    p.add_argument("--no-indicators", action="store_true")
    p.add_argument("--indicator-steps", type=int, default=20)
    p.add_argument("--diagnostics", default="off", choices=("off", "cheap", "full"),
                   help="gradient-masking diagnostics (aerl_ray.diagnostics): prints a table "
                        "and writes OUT/diagnostics.parquet (one row per check) and "
                        "OUT/diagnostics.json (default off)")
    p.add_argument("--diagnostics-n", type=int, default=0,
                   help="examples of the diagnostics' extra attacks (0 = 64 cheap, 256 full)")
    p.add_argument("--landscape", action="store_true",
                   help="write 1-D loss-landscape slices (JSON + PNG) under --out")
    p.add_argument("--out", default="", help="output dir for evals.parquet/indicators.parquet")
    p.add_argument("--device", default="cpu", help="cpu, cuda[:N] or auto")
    p.add_argument("--plugin", action="append", default=[], metavar="MODULE_OR_PATH",
                   help="import your own attacks/models/regimes/datasets first (a module "
                        "name, a .py file or a package dir; repeatable)")
    p.add_argument("--run-id", default="")
    p.add_argument("--trial-id", default="")
    return p


def plan_from_args(args: argparse.Namespace) -> EvalPlan:
    norms = [s.strip() for s in args.norm.split(",") if s.strip()]
    grids: dict[str, list[str]] = {}
    for spec in args.eps or []:
        if ":" in spec:
            nrm, vals = spec.split(":", 1)
        elif len(norms) == 1:
            nrm, vals = norms[0], spec
        else:
            raise EvalPlanError("with several norms write --eps NORM:GRID for each")
        grids[nrm.strip()] = [v.strip() for v in vals.split(",") if v.strip()]
    for nrm in norms:
        key = next((k for k in grids if Norm.parse(k) == Norm.parse(nrm)), None)
        if key is None:
            grids[nrm] = list(DEFAULT_GRIDS["linf" if Norm.parse(nrm) is Norm.LINF else "l2"])
    extra = [k for k in grids if all(Norm.parse(k) != Norm.parse(n) for n in norms)]
    if extra:
        raise EvalPlanError(f"--eps given for {extra}, which is not in --norm {args.norm}")
    attacks = [a.strip() for a in args.attacks.split(",") if a.strip()]
    params: dict[str, dict[str, Any]] = {}
    for a, key, val in (("pgd", "steps", args.steps), ("pgd", "restarts", args.restarts),
                        ("pgd", "loss", args.loss), ("square", "n_queries",
                                                     args.square_queries)):
        if val is not None and a in attacks:
            params.setdefault(a, {})[key] = val
    for item in args.param:
        if "=" not in item or "." not in item.split("=", 1)[0]:
            raise EvalPlanError(f"--param {item!r}: write ATTACK.KEY=VALUE")
        lhs, val = item.split("=", 1)
        a, key = lhs.split(".", 1)
        params.setdefault(a, {})[key] = _parse_value(val)
    return EvalPlan(attacks=tuple(attacks), grids=grids, n=args.n, batch_size=args.batch_size,
                    seed=args.seed, attack_params=params, autoattack_version=args.aa_version,
                    autoattack_attacks=tuple(a.strip() for a in args.aa_attacks.split(",")
                                             if a.strip()),
                    attack_grids=_aa_grids(args, grids, attacks), split=args.split,
                    transfer_source=args.transfer_source,
                    model=args.model, indicators=not args.no_indicators,
                    indicator_steps=args.indicator_steps, diagnostics=args.diagnostics,
                    diagnostics_n=args.diagnostics_n)


def _aa_grids(args: argparse.Namespace, grids: Mapping[str, Any], attacks: list[str]) -> dict:
    budgets = [e.strip() for e in args.aa_eps.split(",") if e.strip()]
    if not budgets:
        return {}
    if "autoattack" not in attacks:
        raise EvalPlanError("--aa-eps restricts AutoAttack, which is not in --attacks")
    return {"autoattack": {norm: budgets for norm in grids}}


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    from aerl_ray.plugins import PluginError, load_plugins

    try:
        load_plugins(args.plugin)
        plan = plan_from_args(args)
        ev = run_evaluation(
            args.checkpoint, plan, run_id=args.run_id, trial_id=args.trial_id,
            device=args.device, landscape_dir=args.out if args.landscape and args.out else None)
    except (EvalPlanError, CheckpointError, ValueError, PluginError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    rows, ind, diag = ev.rows, ev.indicators, ev.diagnostics
    print(format_table(rows))
    if diag is not None:
        print(diag.format_table())
        if diag.attack_rows:  # the diagnostics' own attacks (subset), e.g. a converged PGD
            print("diagnostic attacks (first n examples):")
            print(format_table(diag.eval_rows()))
    if args.out:
        out = Path(args.out)
        append_rows(out / EVALS.name, rows, EVALS)
        append_rows(out / INDICATORS.name, ind, INDICATORS)
        print(f"wrote {len(rows)} rows to {out / 'evals.parquet'} and {len(ind)} to "
              f"{out / 'indicators.parquet'}")
        if diag is not None:
            base = {"run_id": args.run_id, "trial_id": args.trial_id, "split": args.split,
                    "checkpoint": rows[0]["checkpoint"] if rows else args.checkpoint}
            append_rows(out / "diagnostics.parquet", diag.rows(**base))
            (out / "diagnostics.json").write_text(json.dumps(
                {**base, "masking_suspected": diag.masking_suspected,
                 "attack_not_converged": diag.attack_not_converged,
                 "diagnostics": diag.to_dict(),
                 "attack_rows": diag.eval_rows(**base)}, indent=1, default=str))
            print(f"wrote {len(diag.checks)} diagnostics to {out / 'diagnostics.parquet'} "
                  f"and {out / 'diagnostics.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
