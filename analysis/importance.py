"""Hyperparameter importance from the sweep's Optuna study (fANOVA, seed 0).

The study is read from ``sweep.json``'s ``optuna_storage`` (falling back to ``RUN/optuna.db``
when the run dir was moved).  Only COMPLETE trials with finite values count; trials with
identical parameters (a resumed sweep re-telling a trial, stale duplicates after a crash)
are deduplicated, keeping the latest.  Problems give a note string instead of numbers.
"""
from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import optuna

from analysis.pareto import RunData

logger = logging.getLogger(__name__)


def _storage_url(data: RunData) -> str | None:
    url = data.spec.get("optuna_storage")
    local = data.run.optuna_db
    if isinstance(url, str) and url.startswith("sqlite:///"):
        if Path(url[len("sqlite:///"):]).is_file():
            return url
        return f"sqlite:///{local}" if local.is_file() else None
    if url:
        return str(url)
    return f"sqlite:///{local}" if local.is_file() else None


def completed_trials(data: RunData) -> tuple[list[optuna.trial.FrozenTrial], list[str], str]:
    """(deduplicated COMPLETE trials, study directions, note) of the run's study."""
    url = _storage_url(data)
    name = data.spec.get("study_name")
    if url is None:
        return [], [], "no Optuna storage found (sweep.json optuna_storage / optuna.db)"
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        if not name:
            names = optuna.get_all_study_names(storage=url)
            if len(names) != 1:
                return [], [], f"sweep.json has no study_name and the storage holds {names}"
            name = names[0]
        study = optuna.load_study(study_name=name, storage=url)
        trials = study.get_trials(deepcopy=False,
                                  states=(optuna.trial.TrialState.COMPLETE,))
        dirs = [d.name.lower() for d in study.directions]
    except Exception as e:  # noqa: BLE001 - a broken/locked study must not stop the report
        logger.warning("cannot read the Optuna study %s at %s: %s", name, url, e)
        return [], [], f"cannot read the Optuna study: {type(e).__name__}: {e}"
    by_params: dict[str, optuna.trial.FrozenTrial] = {}
    for t in sorted(trials, key=lambda t: t.number):
        if t.values is None or not all(math.isfinite(v) for v in t.values):
            continue
        by_params[json.dumps(t.params, sort_keys=True, default=str)] = t
    kept = sorted(by_params.values(), key=lambda t: t.number)
    logger.info("study %s: %d COMPLETE trials, %d after dedup", name, len(trials), len(kept))
    return kept, dirs, ""


def param_importances(data: RunData) -> list[tuple[str, dict | str]]:
    """[(objective name, {param: importance} or a note)] in the study's objective order."""
    objectives = [o.get("name", f"objective {i}") for i, o in
                  enumerate(data.spec.get("objectives") or []) if isinstance(o, dict)]
    trials, dirs, note = completed_trials(data)
    if not objectives:
        objectives = [f"objective {i}" for i in range(len(dirs))] or ["objective"]
    if note:
        return [(o, note) for o in objectives]
    if len(trials) < 2:
        return [(o, f"too few COMPLETE trials for fANOVA ({len(trials)} < 2)") for o in objectives]
    varying = {p for t in trials for p in t.params
               if len({json.dumps(u.params.get(p), default=str) for u in trials}) > 1}
    if not varying:
        return [(o, "no parameter varies across the COMPLETE trials") for o in objectives]
    study = optuna.create_study(directions=dirs or ["maximize"] * len(objectives))
    study.add_trials(trials)
    out: list[tuple[str, dict | str]] = []
    for i, o in enumerate(objectives):
        try:
            imp = optuna.importance.get_param_importances(
                study, target=lambda t, i=i: t.values[i],
                evaluator=optuna.importance.FanovaImportanceEvaluator(seed=0))
            out.append((o, {k: float(v) for k, v in imp.items()} if imp
                        else "no parameter common to all COMPLETE trials"))
        except Exception as e:  # noqa: BLE001 - degrade to a note in the figure
            logger.warning("fANOVA failed for %s: %s", o, e)
            out.append((o, f"fANOVA failed: {type(e).__name__}: {e}"))
    return out
