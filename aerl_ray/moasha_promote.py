"""MOASHA's promote mode: pausing at a rung, promoting, closing rungs (see aerl_ray.moasha).

ASHA's promotions in Ray 2.60 terms: a trial that is not in the top ``floor(n / eta)`` of
its rung is PAUSED (Tune saves it; a function trainable's save is the checkpoint it last
reported), and :meth:`PromoteMixin.choose_trial_to_run` hands a paused trial back to Tune
once it is promotable; Tune restores it from that checkpoint with its
``training_iteration``.  The mixin works on :class:`aerl_ray.moasha.MOASHA`'s state.
"""
from __future__ import annotations

import logging
import math
from typing import Optional

from ray.tune.experiment import Trial
from ray.tune.schedulers.trial_scheduler import FIFOScheduler, TrialScheduler

from aerl_ray.pareto_rank import rank

logger = logging.getLogger(__name__)
CONTINUE, PAUSE = TrialScheduler.CONTINUE, TrialScheduler.PAUSE


class PromoteMixin:
    """Promote-mode decisions of :class:`aerl_ray.moasha.MOASHA`."""

    def _promote_rule(self, i, keys, ix, ranking, obs) -> tuple[str, str, dict]:
        ranking = ranking or rank(obs, self.config.modes, self.config.noise_aware)
        n, above = len(keys), ranking.above[ix]
        k = math.floor(n / self.config.reduction_factor)
        extra = {"n_at_rung": n, "rank": above + 1, "front": ranking.front[ix],
                 "threshold": k, "dominated_by": sorted({keys[d] for d in
                                                         ranking.dominators[ix]})}
        at = f"{self.config.time_attr}={self._rungs[i][0]:g}"
        if above < k:
            return "continue", f"rank {above + 1} of {n} at {at}: in the top floor(n/eta)={k}", \
                extra
        return "pause", (f"rank {above + 1} of {n} at {at}: not in the top floor(n/eta)={k}; "
                         "waits for promotion"), extra

    def _resumed_unpromoted(self, key: str, trial: Trial, result: dict) -> str:
        i = [j for j, (m, _) in enumerate(self._rungs) if m == self._paused[key]][0]
        if self._promotable(i, key, closing=False):
            self._promote(key, trial, i, "resumed outside the scheduler and now promotable")
            return CONTINUE
        return PAUSE if self._can_pause(trial, result) else CONTINUE

    # --- promote mode: choosing the trial to run -----------------------------------------
    def choose_trial_to_run(self, tune_controller) -> Optional[Trial]:
        if self.config.mode == "stop":
            return FIFOScheduler.choose_trial_to_run(self, tune_controller)
        trials = list(tune_controller.get_trials())
        by_key = {self._key(t): t for t in trials}
        for t in trials:  # promoted at a closed rung, not yet restarted
            k = self._key(t)
            if t.status == Trial.PAUSED and k in self._promoted and k not in self._paused \
                    and k not in self._stopped:
                return t
        waiting = {k: r for k, r in self._paused.items()
                   if k in by_key and by_key[k].status == Trial.PAUSED}
        for i, (milestone, _) in enumerate(self._rungs):  # highest rung first
            for key in self._by_rank(i, [k for k, r in waiting.items() if r == milestone]):
                if self._promotable(i, key, closing=False):
                    self._promote(key, by_key[key], i, "now in the top floor(n/eta)")
                    return by_key[key]
        for t in trials:
            if t.status == Trial.PENDING:
                return t
        if not waiting or any(t.status == Trial.RUNNING for t in trials):
            return None if waiting else FIFOScheduler.choose_trial_to_run(self, tune_controller)
        low = min(waiting.values())
        i = [j for j, (m, _) in enumerate(self._rungs) if m == low][0]
        ranked = self._by_rank(i, [k for k, r in waiting.items() if r == low])
        search = getattr(tune_controller, "search_alg", None)
        if search is not None and not search.is_finished():
            self._promote(ranked[0], by_key[ranked[0]], i, "nothing runs and the searcher "
                          "offers no trial now (a concurrency limit counts paused trials): "
                          "the best waiting trial of the lowest rung is promoted")
            return by_key[ranked[0]]
        chosen = None
        for key in ranked:  # close the rung: no trial can reach it any more
            if self._promotable(i, key, closing=True):
                self._promote(key, by_key[key], i, "rung closed (no trial can still reach "
                              "it): in the top ceil(n/eta)")
                chosen = chosen or by_key[key]
            else:
                obs = self._rungs[i][1][key]
                self._emit(self._record(key, by_key[key], i, None, obs, "stop",
                                        "rung closed (no trial can still reach it): not in "
                                        "the top ceil(n/eta)"))
                tune_controller.stop_trial(by_key[key])
        return chosen

    def _by_rank(self, i: int, keys: list[str]) -> list[str]:
        recorded = self._rungs[i][1]
        all_keys = list(recorded)
        r = rank(list(recorded.values()), self.config.modes, self.config.noise_aware)
        pos = {k: r.above[all_keys.index(k)] for k in keys}
        return sorted(keys, key=lambda k: (pos[k], k))

    def _promotable(self, i: int, key: str, closing: bool) -> bool:
        recorded = self._rungs[i][1]
        r = rank(list(recorded.values()), self.config.modes, self.config.noise_aware)
        n, eta = len(recorded), self.config.reduction_factor
        limit = math.ceil(n / eta) if closing else math.floor(n / eta)
        return r.above[list(recorded).index(key)] < limit

    def _promote(self, key: str, trial: Trial, i: int, why: str) -> None:
        obs = self._rungs[i][1][key]
        self._emit(self._record(key, trial, i, None, obs, "promote", why))

    @staticmethod
    def _can_pause(trial: Trial, result: dict) -> bool:
        """Resuming restores the rung's checkpoint (function trainables: the reported one)."""
        if result.get("should_checkpoint"):
            return True
        from ray.tune.trainable.function_trainable import FunctionTrainable

        try:
            cls = trial.get_trainable_cls()
        except Exception:  # noqa: BLE001  (fake or stub trials: no trainable class)
            return False
        return isinstance(cls, type) and not issubclass(cls, FunctionTrainable)
