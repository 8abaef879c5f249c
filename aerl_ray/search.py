"""Optuna through Ray Tune: samplers, RDB storage, a Pareto-safe searcher, stale rows.

Facts this module works around (Ray 2.60 + Optuna 5, see the project's Ray notes):
OptunaSearch tells Optuna the *last* reported values, so a trial stopped early would enter
the multi-objective study as COMPLETE with early-epoch values; ``tell`` rejects NaN and
leaves the trial RUNNING; and a searcher restored after a driver crash is an older
snapshot that re-issues configs and does not know the newest trials.
"""
from __future__ import annotations

import logging
import math

from aerl_ray.space import SweepSpec

logger = logging.getLogger(__name__)


class StorageConnectError(RuntimeError):
    """The Optuna storage URL does not connect."""


def make_sampler(spec: SweepSpec):
    import optuna

    s = dict(spec.sampler)
    kind = s.pop("type")
    seed = int(s.pop("seed", spec.seed))
    if kind == "tpe":
        return optuna.samplers.TPESampler(seed=seed, **s)
    if kind == "nsga2":
        return optuna.samplers.NSGAIISampler(seed=seed, **s)
    if kind == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    return optuna.samplers.GridSampler({p.name: p.grid_values() for p in spec.params}, seed=seed)


def open_storage(url: str):
    """An Optuna RDB storage; fails clearly (before any trial) if it does not connect."""
    import optuna

    try:
        return optuna.storages.RDBStorage(url)
    except Exception as e:  # noqa: BLE001 - sqlalchemy/driver errors of many kinds
        raise StorageConnectError(f"cannot open the Optuna storage {url!r} ({type(e).__name__}: "
                         f"{str(e).splitlines()[0][:200]}). Check the URL, that the database "
                         "server is reachable and its driver is installed (postgresql needs "
                         "psycopg2), or omit --optuna-storage for a SQLite file in the run dir."
                         ) from e


def searcher_class():
    import optuna
    from ray.tune.search.optuna import OptunaSearch

    from aerl_ray.trial import ERROR_KEY

    class ParetoSafeOptunaSearch(OptunaSearch):
        """OptunaSearch that never records truncated trials as COMPLETE.

        A trial whose last result lacks finite objective values (stopped early by ASHA,
        or NaN objectives) becomes PRUNED; errors and diverged trials (``ERROR_KEY``)
        become FAIL.
        Each study trial is tagged with its Tune trial id (dedupe after a restore)."""

        def suggest(self, trial_id: str):
            # A searcher restored from an older snapshot re-issues configs (e.g. its
            # points_to_evaluate) that already finished before the driver died: skip those.
            for _ in range(20):
                cfg = super().suggest(trial_id)
                if not isinstance(cfg, dict) or trial_id not in self._ot_trials:
                    return cfg
                ot = self._ot_trials[trial_id]
                if ot.params not in self._finished_params(exclude=ot.number):
                    ot.set_user_attr("tune_trial_id", trial_id)
                    return {**cfg, "_number": ot.number}
                ot.set_user_attr("duplicate", True)
                self._ot_study.tell(ot, state=optuna.trial.TrialState.FAIL)
                del self._ot_trials[trial_id]
            return cfg

        def _finished_params(self, exclude: int) -> list[dict]:
            return [t.params for t in self._ot_study.get_trials(
                deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)) if t.number != exclude]

        def _adopt(self, trial_id: str) -> None:
            """After a restore, a trial suggested after the last searcher snapshot is
            unknown to the restored searcher: find its RUNNING study trial by tag."""
            running = self._ot_study.get_trials(deepcopy=False,
                                                states=(optuna.trial.TrialState.RUNNING,))
            for t in running:
                if t.user_attrs.get("tune_trial_id") == trial_id:
                    self._ot_trials[trial_id] = optuna.trial.Trial(self._ot_study, t._trial_id)
                    return

        def on_trial_complete(self, trial_id: str, result: dict | None = None,
                              error: bool = False) -> None:
            if trial_id not in self._ot_trials:
                self._adopt(trial_id)
            ms = self.metric if isinstance(self.metric, list) else [self.metric]
            vals = [(result or {}).get(m) for m in ms]
            bad = any(v is None or (isinstance(v, float) and not math.isfinite(v)) for v in vals)
            if not error and bad:
                if trial_id in self._ot_trials and trial_id not in self._completed_trials:
                    ot, reason = self._ot_trials[trial_id], (result or {}).get(ERROR_KEY)
                    if reason:  # diverged: FAIL, with the reason
                        ot.set_user_attr("error", str(reason)[:500])
                    self._ot_study.tell(ot, state=optuna.trial.TrialState.FAIL if reason
                                        else optuna.trial.TrialState.PRUNED)
                    self._completed_trials.add(trial_id)
                return
            super().on_trial_complete(trial_id, result=result, error=error)

    return ParetoSafeOptunaSearch


def close_stale_trials(storage_url: str, study_name: str) -> int:
    """Mark RUNNING study trials left by a killed driver as FAIL (after the sweep ends)."""
    import optuna

    study = optuna.load_study(study_name=study_name, storage=storage_url)
    n = 0
    for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        study._storage.set_trial_user_attr(t._trial_id, "stale", True)
        study.tell(t.number, state=optuna.trial.TrialState.FAIL)
        n += 1
    return n
