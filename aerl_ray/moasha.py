"""MOASHA: multi-objective asynchronous successive halving, as a Ray Tune scheduler.

Every Ray Tune scheduler takes one metric.  :class:`MOASHA` takes several: at each rung
(``time_attr`` = r, r*eta, r*eta^2, ...: the rungs of Ray's ASHA with one bracket) it ranks
the trials that reached the rung by non-dominated sorting and, within a front, an eps-net
order that keeps the front spread (:mod:`aerl_ray.pareto_rank` says why an eps-net and not
hypervolume contributions).  So it keeps the robust-but-less-accurate trials that an ASHA
on clean accuracy stops.

Decisions (``stop`` mode, the default)
    Asynchronous, like ASHA: a trial is decided when it reaches a rung, against the m
    trials recorded there so far; the first trial at a rung continues.  With one metric the
    rule *is* Ray's: continue iff value >= ``np.nanpercentile(recorded, (1 - 1/eta) * 100)``
    (values on a line can be interpolated).  With several metrics positions of incomparable
    trials cannot be interpolated, so the rank version of that quantile is used, rounded to
    the conservative side: continue iff fewer than ``ceil(m / eta)`` trials rank strictly
    above.  So a trial that dominates every trial at its rung is never stopped there, and a
    continuing trial is among the top ``ceil(n / eta)`` of the n = m + 1 trials at the rung
    at that moment.  No asynchronous rule can bound the *final* share of continuing trials
    (on an increasing stream every arrival is the best so far), and Ray's interpolated
    quantile itself lets 2 of 3 continue at eta=3 (0, 10, then 7 >= 6.67): with one metric
    MOASHA equals Ray, so it inherits that.

Same time
    Trials reach a rung "at the same time" when their results are passed in one call of
    :meth:`MOASHA.on_trial_results` (a lock-step driver, a replay).  Each is decided as if
    it had arrived last -- against the rung's earlier trials plus the rest of the batch --
    so decisions do not depend on the order within the batch.  Tune hands results over one
    at a time (one controller event each), so there every arrival is its own batch.  Ties
    are decided by values only, never by arrival order or trial ids.

``promote`` mode
    ASHA's promotions: a trial reaching a rung continues at once if it is among the top
    ``floor(n / eta)`` there, else it is PAUSED; :meth:`choose_trial_to_run` resumes a
    paused trial once enough trials have arrived to put it in the top ``floor(n / eta)``
    (highest rung first, before new trials).  Ray 2.60 pauses a trial by saving it and
    resumes it from that checkpoint with its ``training_iteration``; for a *function*
    trainable the save is the last checkpoint it reported, so a trial is paused only if its
    rung result carries one (``tune.report(..., checkpoint=...)``), else it is decided as in
    stop mode (logged).  When nothing runs or waits to start and the searcher is finished,
    the lowest rung with paused trials is closed: its top ``ceil(n / eta)`` are promoted,
    the other paused trials there stopped.  If nothing runs but the searcher is not
    finished (a concurrency limit counts paused trials as live), the best paused trial of
    the lowest rung is promoted, so the sweep cannot hang.

Missing values
    A result with none of the metrics is not a rung observation (as in Ray: CONTINUE; the
    trial is decided at its next result that has them), but it is stopped at ``max_t``
    (Ray's ASHA lets it run on), so rung metrics need only be reported at rungs.  A
    result missing one of the metrics, or with a NaN, ranks below every trial with
    complete values (Ray's ASHA lets a NaN trial pass).

Noise awareness (``noise_aware=True``)
    A result may carry ``<metric>_n``, the examples a proportion was measured on; a trial
    then ranks below another only if dominated beyond the 95% Wilson intervals (its rank
    is that domination count, no eps-net tie-break), so more trials continue than
    ``ceil(n / eta)``: a difference the rung's sample size cannot resolve stops nobody.

Records and restarts
    Every decision is a JSON-safe dict (format: :mod:`aerl_ray.moasha_config`), returned by
    :meth:`records` and passed to ``on_decision`` as it happens.  The state is a function of
    the records: :meth:`load_records` / :meth:`from_records` rebuild it, so a driver killed
    mid-sweep loses no rung decision.  ``trial_key(trial)`` (default the Tune trial id)
    names trials in the records, so a trial re-run under a new Tune id keeps its history: it
    is not decided again at a rung it has a record at, and a stopped key is stopped again
    at its next result.  :meth:`save` / :meth:`restore` write and read the records.
"""
from __future__ import annotations

import logging
import math
import pickle
from typing import Any, Callable, Iterable, Optional, Sequence

import numpy as np
from ray.tune.experiment import Trial
from ray.tune.schedulers.trial_scheduler import FIFOScheduler, TrialScheduler

from aerl_ray.moasha_config import DECISIONS, DecisionLog, MOASHAConfig
from aerl_ray.moasha_promote import PromoteMixin
from aerl_ray.pareto_rank import Observation, rank

logger = logging.getLogger(__name__)

__all__ = ["MOASHA", "MOASHAConfig", "DecisionLog", "DECISIONS"]
CONTINUE, STOP, PAUSE = TrialScheduler.CONTINUE, TrialScheduler.STOP, TrialScheduler.PAUSE


def _plain(v: Any) -> Any:
    return v.item() if isinstance(v, np.generic) else v


class MOASHA(PromoteMixin, FIFOScheduler):
    """Pareto-aware asynchronous successive halving (see the module docstring).

    Args:
        metrics: result keys to rank by (at least one).
        modes: ``"max"`` or ``"min"`` per metric.
        time_attr: the monotone progress key (``training_iteration``, epochs, passes...).
        grace_period: the first rung (r).
        reduction_factor: eta > 1; about 1/eta of the trials continue from a rung.
        max_t: trials are stopped when ``time_attr`` reaches it.
        mode: ``"stop"`` (asynchronous early stopping) or ``"promote"`` (pause/resume).
        noise_aware: rank by Wilson intervals when results carry ``<metric>_n``.
        trial_key: ``trial -> str``, the trial's name in the records (default trial_id).
        on_decision: called with each decision record (a copy) as it is made.
        stop_last_trials: stop trials at ``max_t`` (as Ray's ASHA).
    """

    def __init__(self, metrics: Sequence[str], modes: Sequence[str], *,
                 time_attr: str = "training_iteration", grace_period: float = 1,
                 reduction_factor: float = 2, max_t: float = 100, mode: str = "stop",
                 noise_aware: bool = False,
                 trial_key: Optional[Callable[[Trial], str]] = None,
                 on_decision: Optional[Callable[[dict], Any]] = None,
                 stop_last_trials: bool = True):
        as_tuple = (lambda v: v if isinstance(v, str) else tuple(v))
        self.config = MOASHAConfig(as_tuple(metrics), as_tuple(modes), time_attr,
                                   grace_period, reduction_factor, max_t, mode, noise_aware,
                                   stop_last_trials)
        for name, fn in (("trial_key", trial_key), ("on_decision", on_decision)):
            if fn is not None and not callable(fn):
                raise TypeError(f"{name} must be callable or None, got {type(fn).__name__}")
        super().__init__()
        self._trial_key = trial_key
        self._on_decision = on_decision
        # one decision per result when pausing (as Ray's HyperBand)
        self._supports_buffered_results = mode == "stop"
        self._ray_rule = len(self.config.metrics) == 1 and not noise_aware
        self._op = 1.0 if self.config.modes[0] == "max" else -1.0
        self._trials: dict[str, Trial] = {}
        self._reset()

    # --- state: a function of the records ------------------------------------------------
    def _reset(self) -> None:
        self._rungs: list[tuple[float, dict[str, Observation]]] = [
            (m, {}) for m in self.config.milestones()]
        self._stopped: dict[str, float] = {}  # key -> rung it was stopped at
        self._paused: dict[str, float] = {}  # key -> rung it waits at (promote mode)
        self._promoted: set[str] = set()  # keys promoted after a pause
        self._records: list[dict] = []
        self._warned: set[str] = set()

    def _apply(self, rec: dict) -> None:
        key, rung, decision = rec["key"], rec["rung"], rec["decision"]
        idx = [i for i, (m, _) in enumerate(self._rungs) if m == rung]
        if not idx:
            raise ValueError(f"record rung {rung!r} is not a rung of this scheduler "
                             f"{[m for m, _ in self._rungs]}; were the records written with "
                             "another grace_period / reduction_factor / max_t?")
        vals = rec["values"]
        self._rungs[idx[0]][1][key] = Observation(
            tuple(math.nan if vals.get(m) is None else float(vals[m])
                  for m in self.config.metrics),
            tuple(rec.get("n", {}).get(m) for m in self.config.metrics))
        if decision == "stop":
            self._stopped[key] = rung
            self._paused.pop(key, None)
        elif decision == "pause":
            self._paused[key] = rung
        elif decision == "promote":
            self._paused.pop(key, None)
            self._promoted.add(key)

    def records(self) -> list[dict]:
        """All decision records so far, oldest first (copies)."""
        return [dict(r) for r in self._records]

    def load_records(self, records: Iterable[dict]) -> None:
        """Rebuild the state from saved records (replaces the current state)."""
        self._reset()
        for rec in records:
            missing = {"key", "rung", "decision", "values"} - set(rec)
            if missing:
                raise ValueError(f"decision record {rec!r} lacks {sorted(missing)}; pass the "
                                 "dicts that MOASHA.records() or on_decision produced")
            if rec["decision"] not in DECISIONS:
                raise ValueError(f"decision record has decision {rec['decision']!r}; known: "
                                 f"{', '.join(DECISIONS)}")
            self._apply(rec)
            self._records.append(dict(rec))

    @classmethod
    def from_records(cls, records: Iterable[dict], *args, **kwargs) -> "MOASHA":
        """A new scheduler (usual constructor arguments) with the records' state."""
        sched = cls(*args, **kwargs)
        sched.load_records(records)
        return sched

    def save(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "wb") as f:
            pickle.dump({"config": self.config, "records": self._records}, f)

    def restore(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "rb") as f:
            state = pickle.load(f)
        if state["config"] != self.config:
            raise ValueError(f"{checkpoint_path} was saved by a MOASHA with {state['config']}; "
                             f"this one has {self.config}: construct it with the same arguments")
        self.load_records(state["records"])

    # --- Tune hooks ----------------------------------------------------------------------
    def set_search_properties(self, metric: Optional[str], mode: Optional[str],
                              **spec) -> bool:
        """MOASHA brings its own metrics: a TuneConfig metric/mode is a conflict."""
        return not (metric or mode)

    def on_trial_add(self, tune_controller, trial: Trial) -> None:
        self._trials[self._key(trial)] = trial

    def on_trial_result(self, tune_controller, trial: Trial, result: dict) -> str:
        return self.on_trial_results(tune_controller, [(trial, result)])[0]

    def on_trial_complete(self, tune_controller, trial: Trial, result: dict) -> None:
        """As Ray's ASHA: the final result is recorded at its rung (the decision is moot)."""
        key = self._key(trial)
        self._paused.pop(key, None)
        obs = self._read(result)
        if self.config.time_attr not in result or obs is None:
            return
        i = self._find_rung(key, result[self.config.time_attr])
        if i is not None:
            self._emit(self._record(key, trial, i, result, obs, "complete",
                                    "the trial ended at this rung; recorded for later arrivals"))

    def on_trial_remove(self, tune_controller, trial: Trial) -> None:
        self._paused.pop(self._key(trial), None)

    def on_trial_error(self, tune_controller, trial: Trial) -> None:
        self._paused.pop(self._key(trial), None)

    def debug_string(self) -> str:
        rungs = ", ".join(f"{m:g}: {len(r)}" for m, r in reversed(self._rungs))
        return (f"Using MOASHA ({self.config.mode} mode, {list(self.config.metrics)} "
                f"{list(self.config.modes)}): num_stopped={len(self._stopped)}, "
                f"paused={len(self._paused)}; trials per rung ({self.config.time_attr}): "
                f"{rungs}")

    # --- deciding ------------------------------------------------------------------------
    def on_trial_results(self, tune_controller, items: Sequence[tuple[Trial, dict]]
                         ) -> list[str]:
        """Decide results that arrive at the same time; one action per ``(trial, result)``.

        Tune calls :meth:`on_trial_result` (a batch of one); a lock-step driver may pass a
        round's results here (see "Same time" in the module docstring)."""
        cfg = self.config
        actions = [CONTINUE] * len(items)
        arrivals: dict[int, list[tuple]] = {}
        seen: set[str] = set()
        for pos, (trial, result) in enumerate(items):
            key = self._key(trial)
            if key in seen:
                raise ValueError(f"trial {key!r} appears twice in one batch of results")
            seen.add(key)
            self._trials[key] = trial
            if key in self._stopped:  # a re-run of a stopped trial (driver restart)
                actions[pos] = STOP
                continue
            if cfg.time_attr not in result:
                continue
            t, obs = result[cfg.time_attr], self._read(result)
            if t >= cfg.max_t and cfg.stop_last_trials:
                actions[pos] = STOP
            elif obs is None:
                continue
            elif key in self._paused:  # resumed without a promotion (e.g. Tuner.restore)
                actions[pos] = self._resumed_unpromoted(key, trial, result)
            else:
                i = self._find_rung(key, t)
                if i is not None:
                    arrivals.setdefault(i, []).append((pos, key, trial, result, obs))
        for i, group in arrivals.items():
            for pos, action in self._decide_rung(i, group):
                actions[pos] = action
        return actions

    def _decide_rung(self, i: int, group: list[tuple]) -> list[tuple[int, str]]:
        milestone, recorded = self._rungs[i]
        keys = list(recorded) + [g[1] for g in group]
        obs = list(recorded.values()) + [g[4] for g in group]
        first = len(recorded)
        ranking = (None if self._ray_rule
                   else rank(obs, self.config.modes, self.config.noise_aware))
        out, recs = [], []
        for j, (pos, key, trial, result, ob) in enumerate(group):
            ix = first + j
            if self.config.mode == "promote":
                decision, reason, extra = self._promote_rule(i, keys, ix, ranking, obs)
                if decision == "pause" and not self._can_pause(trial, result):
                    if "pause" not in self._warned:
                        self._warned.add("pause")
                        logger.warning("MOASHA promote mode: trial %s reported no checkpoint "
                                       "with its rung result, so it cannot be paused; such "
                                       "trials are decided as in stop mode. Report a "
                                       "checkpoint at every rung: tune.report(metrics, "
                                       "checkpoint=...)", key)
                    decision, reason, extra = self._stop_rule(i, keys, ix, ranking, obs)
                    reason = "no checkpoint to pause at, decided as in stop mode: " + reason
            else:
                decision, reason, extra = self._stop_rule(i, keys, ix, ranking, obs)
            if len(group) > 1:
                extra["batch"] = len(group)
            recs.append(self._record(key, trial, i, result, ob, decision, reason, extra))
            out.append((pos, {"continue": CONTINUE, "stop": STOP, "pause": PAUSE}[decision]))
        for rec in sorted(recs, key=lambda r: r["key"]):  # record order: by key, not arrival
            self._emit(rec)
        return out

    def _dominators(self, keys, ix, ranking, obs) -> list[str]:
        if ranking is not None:
            return sorted({keys[d] for d in ranking.dominators[ix]})
        v = self._op * obs[ix].values[0]
        return sorted(k for k, o in zip(keys, obs) if self._op * o.values[0] > v
                      or (math.isnan(v) and not math.isnan(o.values[0])))

    def _stop_rule(self, i, keys, ix, ranking, obs) -> tuple[str, str, dict]:
        """The arrival at ``ix`` against every other observation (see module docstring)."""
        at = f"{self.config.time_attr}={self._rungs[i][0]:g}"
        m, eta = len(keys) - 1, self.config.reduction_factor
        extra = {"n_at_rung": m + 1, "dominated_by": self._dominators(keys, ix, ranking, obs)}
        if m == 0:
            return "continue", f"first trial at {at}", extra
        if ranking is None:  # one metric: Ray's ASHA rule, the same numpy call
            others = [self._op * o.values[0] for j, o in enumerate(obs) if j != ix]
            cur = self._op * obs[ix].values[0]
            q = (1 - 1 / eta) * 100
            finite = [v for v in others if not math.isnan(v)]
            cutoff = float(np.nanpercentile(others, q)) if finite else None
            extra["cutoff"] = None if cutoff is None else self._op * cutoff
            name = self.config.metrics[0]
            if cutoff is None:
                return "continue", f"no {name} recorded at {at} yet", extra
            stop = math.isnan(cur) or cur < cutoff
            return ("stop" if stop else "continue",
                    f"{name}={self._op * cur:.4g} {'<' if stop else '>='} cutoff "
                    f"{self._op * cutoff:.4g}, the {q:g}th percentile of the {m} other "
                    f"trials at {at}", extra)
        k = math.ceil(m / eta)
        above = ranking.above[ix]
        extra.update(rank=above + 1, front=ranking.front[ix], threshold=k)
        stop = above >= k
        text = (f"rank {above + 1} of {m + 1} at {at} (front {ranking.front[ix]} of "
                f"{ranking.n_fronts}); fewer than ceil({m}/{eta:g})={k} may rank above a "
                "continuing trial")
        if stop and extra["dominated_by"]:
            text += f"; dominated by {', '.join(extra['dominated_by'])}"
        return ("stop" if stop else "continue"), text, extra

    # --- helpers -------------------------------------------------------------------------
    def _key(self, trial: Trial) -> str:
        return str(self._trial_key(trial) if self._trial_key else trial.trial_id)

    def _read(self, result: dict) -> Optional[Observation]:
        """The result's rung values, or None if it carries none of the metrics."""
        if not any(m in result for m in self.config.metrics):
            return None
        vals, ns = [], []
        for m in self.config.metrics:
            v = result.get(m)
            ok = isinstance(v, (int, float, np.number)) and not isinstance(v, bool)
            vals.append(float(v) if ok else math.nan)
            n = result.get(f"{m}_n") if self.config.noise_aware else None
            if n is not None and ok and not 0.0 <= float(v) <= 1.0 and m not in self._warned:
                self._warned.add(m)
                logger.warning("MOASHA: %s=%s is not a proportion in [0, 1]; its %s_n is "
                               "ignored (no Wilson interval)", m, v, m)
            ns.append(int(n) if isinstance(n, (int, float, np.number)) and n > 0 else None)
        return Observation(tuple(vals), tuple(ns))

    def _find_rung(self, key: str, t: float) -> Optional[int]:
        """Ray's ``_Bracket.on_result`` loop: the highest rung <= t without this key."""
        for i, (milestone, recorded) in enumerate(self._rungs):
            if t >= milestone and key in recorded and not self.config.stop_last_trials:
                return None
            if t < milestone or key in recorded:
                continue
            return i
        return None

    def _record(self, key: str, trial: Optional[Trial], i: int, result: Optional[dict],
                obs: Observation, decision: str, reason: str, extra: Optional[dict] = None
                ) -> dict:
        milestone = self._rungs[i][0]
        rec = {"key": key, "trial_id": getattr(trial, "trial_id", None), "rung": milestone,
               "time": _plain((result or {}).get(self.config.time_attr, milestone)),
               "time_attr": self.config.time_attr, "decision": decision,
               "values": {m: (None if math.isnan(v) else v)
                          for m, v in zip(self.config.metrics, obs.values)},
               "dominated_by": [], "reason": reason}
        if any(n is not None for n in obs.ns):
            rec["n"] = {m: n for m, n in zip(self.config.metrics, obs.ns) if n is not None}
        rec.update(extra or {})
        return rec

    def _emit(self, rec: dict) -> None:
        rec["seq"] = len(self._records)
        self._apply(rec)
        self._records.append(rec)
        logger.debug("MOASHA %s %s at %s=%s: %s", rec["decision"], rec["key"],
                     rec["time_attr"], rec["rung"], rec["reason"])
        if self._on_decision is not None:
            self._on_decision(dict(rec))
