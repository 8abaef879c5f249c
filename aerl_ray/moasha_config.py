"""MOASHA's validated configuration and its decision-record log.

:class:`MOASHAConfig` is what a space file's ``scheduler:`` block turns into (the
scheduler's constructor builds one); :class:`DecisionLog` is the ``on_decision`` callback
that makes a sweep's rung decisions survive a driver crash.

A decision record (one per decision, JSON-safe) looks like::

    {"seq": 7, "key": "trial_0003", "trial_id": "a1b2_00003", "rung": 2,
     "time": 2, "time_attr": "training_iteration", "decision": "stop",
     "values": {"clean_acc": 0.81, "robust_acc": 0.12}, "n": {"robust_acc": 144},
     "dominated_by": ["trial_0001"], "n_at_rung": 5, "rank": 4, "front": 2,
     "threshold": 2, "reason": "rank 4 of 5 at training_iteration=2 (front 2); ..."}

``decision`` is one of :data:`DECISIONS`: ``continue``/``stop`` (decided at the rung),
``pause`` (promote mode: waits at the rung), ``promote`` (a paused trial resumes),
``complete`` (the trial ended by itself at the rung; its values are recorded so later
arrivals are compared with it).  ``n`` appears only for noise-aware rankings; ``cutoff``
replaces ``rank``/``front``/``threshold`` with one metric (Ray's quantile rule).
"""
from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

logger = logging.getLogger(__name__)

DECISIONS = ("continue", "stop", "pause", "promote", "complete")
SCHEDULER_MODES = ("stop", "promote")


def _bad(msg: str) -> None:
    raise ValueError(msg)


@dataclass(frozen=True)
class MOASHAConfig:
    """Validated settings of :class:`aerl_ray.moasha.MOASHA` (see its docstring)."""

    metrics: tuple[str, ...]
    modes: tuple[str, ...]
    time_attr: str = "training_iteration"
    grace_period: float = 1
    reduction_factor: float = 2
    max_t: float = 100
    mode: str = "stop"
    noise_aware: bool = False
    stop_last_trials: bool = True

    def __post_init__(self) -> None:
        m, modes = self.metrics, self.modes
        if isinstance(m, str):
            _bad(f"metrics must be a list of result keys, e.g. ['clean_acc', 'robust_acc'], "
                 f"not the string {m!r}")
        if isinstance(modes, str):
            _bad(f"modes must be a list with one 'max' or 'min' per metric, not the string "
                 f"{modes!r}")
        if not m:
            _bad("metrics is empty; give at least one result key to rank trials by")
        if not all(isinstance(x, str) and x for x in m):
            _bad(f"metrics must be non-empty strings (result keys), got {list(m)}")
        if len(set(m)) != len(m):
            _bad(f"metrics {list(m)} has duplicates; list each result key once")
        if len(modes) != len(m):
            _bad(f"modes has {len(modes)} entries for {len(m)} metrics {list(m)}; give one "
                 "'max' or 'min' per metric, in the same order")
        for name, mode in zip(m, modes):
            if mode not in ("max", "min"):
                _bad(f"mode {mode!r} for metric {name!r}; use 'max' or 'min'")
        if not isinstance(self.time_attr, str) or not self.time_attr:
            _bad(f"time_attr={self.time_attr!r} must be a result key such as "
                 "'training_iteration'")
        eta, r, max_t = self.reduction_factor, self.grace_period, self.max_t
        for name, v in (("reduction_factor", eta), ("grace_period", r), ("max_t", max_t)):
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                _bad(f"{name}={v!r} must be a finite number")
        if not eta > 1:
            _bad(f"reduction_factor={eta!r} must be > 1: about 1/reduction_factor of the "
                 "trials continue from each rung (2 to 4 are usual)")
        if not r > 0:
            _bad(f"grace_period={r!r} must be > 0 (the first rung, in {self.time_attr})")
        if not max_t >= r:
            _bad(f"max_t={max_t!r} must be >= grace_period={r!r} (the first rung); raise "
                 "max_t or lower grace_period")
        if self.mode not in SCHEDULER_MODES:
            _bad(f"mode={self.mode!r}; use 'stop' (asynchronous early stopping) or 'promote' "
                 "(pause at a rung, resume from the checkpoint when promoted)")
        for name in ("noise_aware", "stop_last_trials"):
            if not isinstance(getattr(self, name), bool):
                _bad(f"{name}={getattr(self, name)!r} must be True or False")

    def milestones(self) -> list[float]:
        """The rungs, highest first -- exactly those of Ray's ASHA with one bracket."""
        n = int(np.log(self.max_t / self.grace_period) / np.log(self.reduction_factor) + 1)
        return [self.grace_period * self.reduction_factor ** k for k in reversed(range(n))]


class DecisionLog:
    """``on_decision`` callback appending each record to a JSONL file (fsync'd).

    ``MOASHA.from_records(DecisionLog(path).read(), ...)`` rebuilds the scheduler after a
    restart; a torn last line (a crash mid-write) is skipped."""

    def __init__(self, path: "str | os.PathLike"):
        self.path = Path(path)

    def __call__(self, record: dict) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a") as f:
            f.write(json.dumps(record, sort_keys=True) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def read(self) -> list[dict]:
        if not self.path.exists():
            return []
        out = []
        for line in self.path.read_text().splitlines():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                logger.warning("ignoring a torn line in %s", self.path)
        return out
