"""Fakes that drive a Ray Tune scheduler without Ray: trials, a searcher, a controller.

Ray's own scheduler tests (``python/ray/tune/tests/test_trial_scheduler.py``, not in the
wheel) do the same with mock runners: a scheduler only reads ``trial.trial_id`` /
``trial.status`` and calls ``get_trials``, ``search_alg`` and ``stop_trial`` on the
controller it is given.
"""
from __future__ import annotations

from ray.tune.experiment import Trial


class FakeTrial:
    """What a scheduler reads of a Tune trial."""

    def __init__(self, i: int | str, status: str = Trial.RUNNING):
        self.trial_id = i if isinstance(i, str) else f"t{i:03d}"
        self.status = status

    def __repr__(self) -> str:
        return f"FakeTrial({self.trial_id}, {self.status})"


class FakeSearch:
    def __init__(self, finished: bool = True):
        self.finished = finished

    def is_finished(self) -> bool:
        return self.finished


class FakeController:
    """The controller surface schedulers use (TrialRunnerWrapper's whitelist)."""

    def __init__(self, trials=(), finished: bool = True):
        self.trials = list(trials)
        self.search_alg = FakeSearch(finished)
        self.scheduler = None
        self.stopped: list[str] = []

    def get_trials(self):
        return self.trials

    def stop_trial(self, trial) -> None:
        if trial.status in (Trial.PENDING, Trial.PAUSED):
            self.scheduler.on_trial_remove(self, trial)
        trial.status = Trial.TERMINATED
        self.stopped.append(trial.trial_id)


def result(t: int, values: dict, checkpoint: bool = False, **extra) -> dict:
    """A flattened Tune result at ``training_iteration = t``."""
    out = {"training_iteration": t, **values, **extra}
    if checkpoint:
        out["should_checkpoint"] = True
    return out
