"""Optuna through Ray Tune: samplers, RDB storage and the ledger-backed searcher.

:class:`LedgerSearcher` is a real ``ray.tune.search.Searcher``: Tune asks it for configs,
it answers from the :class:`~aerl_ray.ledger.Ledger` -- first the tickets it was given
(trials to re-run after a crash, confirmation runs), then new trials ``study.ask()``-ed
from the Optuna study (define-by-run, so conditional parameters are only suggested when
active).  It never tells the study anything: results are committed by the driver's
results callback (:mod:`aerl_ray.recorder`), rows first, so the study and the tables
cannot disagree about a trial that finished.
"""
from __future__ import annotations

import collections
import logging
from typing import Iterable

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
    from ray.tune.search import Searcher

    class LedgerSearcher(Searcher):
        """Hands Tune the ledger's tickets, then new study trials, then FINISHED.

        After an interrupt it returns FINISHED at once: no new trial starts while the
        running ones finish their epoch."""

        def __init__(self, ledger, tickets: Iterable = (), new_trials: bool = True):
            super().__init__()
            self.ledger = ledger
            self.queue = collections.deque(tickets)
            self.new_trials = new_trials

        def set_search_properties(self, metric, mode, config, **spec) -> bool:
            return True  # the space is the ledger's (define-by-run); nothing to set

        def suggest(self, trial_id: str):
            if self.ledger.interrupted.is_set():
                return Searcher.FINISHED
            ticket = self.queue.popleft() if self.queue else (
                self.ledger.ask() if self.new_trials else None)
            if ticket is None:
                return Searcher.FINISHED
            logger.debug("Tune trial %s runs %s", trial_id, ticket.key)
            return ticket.config()

        def on_trial_complete(self, trial_id: str, result=None, error: bool = False) -> None:
            pass  # the results callback commits (rows first, then the study)

        def save(self, checkpoint_path: str) -> None:
            pass  # the state is the study and the run dir (the ledger), never a pickle

        def restore(self, checkpoint_path: str) -> None:
            pass

    return LedgerSearcher
