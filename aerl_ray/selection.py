"""Which epoch's weights a run keeps: checkpoint selection that belongs to the regime.

Rules (``TrainConfig.select``):

- ``last``: the last epoch of the final regime.
- ``clean``: the best clean validation accuracy.
- ``robust``: the best robust validation accuracy -- accuracy under a cheap PGD
  (``select_steps`` steps at ``select_norm``/``select_eps``) on a fixed subset of
  ``select_n`` validation images (:func:`aerl_ray.rungs.robust_val_metrics`: the same
  numbers a multi-objective scheduler ranks trials by; the worst of PGD, FGSM and
  PGD-margin when a cheap masking check fires): the adversarial-training standard (Rice et
  al. 2020, robust overfitting), since the best clean epoch of an adversarial run is often
  a weak one.
- ``auto`` (default): ``robust`` for adversarial and hybrid regimes when a budget is known
  (``select_eps``, or the training budget ``adv_eps`` of an adversarial regime or of a
  hybrid's adversarial phase; a sweep sets ``select_eps`` to its robust objective's
  budget), else ``clean``.

Only epochs in which the trial's *final* regime is active are candidates: a hybrid run is
judged after its switch to RL (and after ``start_adv_epoch`` if it turns adversarial), an
``*_adv`` run after ``start_adv_epoch`` -- a hybrid trial is never scored on a weight of its
SL phase.  The checkpoint records the epoch, the regime that produced it and why it was
kept (:func:`Selector.info`).  Validation only: test images are never read here.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from aerl_ray.regimes.schedule import final_regime_start, regime_for_epoch

logger = logging.getLogger(__name__)

RULES = ("auto", "last", "clean", "robust")


def selection_rule(cfg) -> tuple[str, str, float]:
    """(rule, norm, eps) of a TrainConfig: ``auto`` resolved, the robust budget filled in."""
    r = cfg.regime
    adversarial = r.regime.endswith("_adv") or (r.regime == "hybrid" and r.start_adv_epoch >= 0)
    eps = cfg.select_eps or (r.adv_eps if adversarial else 0.0)
    norm = cfg.select_norm if cfg.select_eps else ("linf" if adversarial else cfg.select_norm)
    rule = cfg.select
    if rule == "auto":
        staged = adversarial or r.regime == "hybrid"
        rule = "robust" if staged and eps > 0 else "clean"
    return rule, norm, float(eps)


@dataclass
class Selector:
    """Tracks the kept epoch across a run (its state goes into ``last.pt``)."""

    rule: str
    norm: str
    eps: float
    steps: int
    n: int
    start: int  # first candidate epoch (the final regime's first epoch)
    final_regime: str
    best_score: float = -1.0
    best_epoch: int = -1
    best_info: dict = field(default_factory=dict)
    n_used: int = 0  # validation images the robust rule actually measured on

    @classmethod
    def of(cls, cfg) -> "Selector":
        rule, norm, eps = selection_rule(cfg)
        start = final_regime_start(cfg.regime, cfg.epochs)
        return cls(rule, norm, eps, cfg.select_steps, cfg.select_n, start,
                   regime_for_epoch(cfg.regime, max(start, cfg.epochs - 1)))

    def candidate(self, epoch: int) -> bool:
        return epoch >= self.start

    def measure(self, model: nn.Module, x_val: torch.Tensor, y_val: torch.Tensor,
                seed: int, batch_size: int, epoch: int, force: bool = False) -> dict[str, Any]:
        """The epoch's robust validation metrics -- for the robust rule at a candidate
        epoch, or (``force``) for a scheduler's rung -- by
        :func:`aerl_ray.rungs.robust_val_metrics`: PGD on a fixed validation subset, the
        worst attack when a cheap masking check fires.  ``seed`` picks the subset: the
        same images for every trial of a sweep."""
        out: dict[str, Any] = {"val_robust_acc": None, "val_robust_n": 0, "select_fwd": 0,
                               "select_bwd": 0, "val_masking": None}
        if not ((self.rule == "robust" and self.candidate(epoch)) or force):
            return out
        if self.eps <= 0:
            raise ValueError("a robust validation metric needs a budget: set select_eps")
        from aerl_ray.rungs import robust_val_metrics

        r = robust_val_metrics(model, x_val, y_val, norm=self.norm, eps=self.eps,
                               steps=self.steps, n=self.n or len(y_val), seed=seed,
                               batch_size=batch_size, checks=True)
        self.n_used = int(r["n"])
        out.update(val_robust_acc=float(r["robust_acc"]), val_robust_n=int(r["n"]),
                   select_fwd=int(r["fwd_passes"]), select_bwd=int(r["bwd_passes"]),
                   val_masking=bool(r["masking"]))
        return out

    def offer(self, epoch: int, regime_active: str, val_acc: float,
              val_robust_acc: float | None, last_epoch: bool) -> bool:
        """Consider ``epoch``; True if it becomes the kept one.

        Outside the final regime nothing is kept -- except that a run which never reaches
        its final regime (e.g. stopped by a pass budget) keeps its last epoch, and says so."""
        if not self.candidate(epoch):
            if last_epoch and self.best_epoch < 0:
                self._keep(epoch, regime_active, val_acc, val_robust_acc, fallback=True)
                return True
            return False
        score = {"last": float(epoch), "clean": val_acc,
                 "robust": val_robust_acc if val_robust_acc is not None else -1.0}[self.rule]
        if score > self.best_score or self.best_epoch < self.start:
            self._keep(epoch, regime_active, val_acc, val_robust_acc, score=score)
            return True
        return False

    def _keep(self, epoch: int, regime: str, val_acc: float, val_robust: float | None,
              score: float = -1.0, fallback: bool = False) -> None:
        self.best_score, self.best_epoch = score, epoch
        self.best_info = {"epoch": epoch, "regime": regime, "val_acc": val_acc,
                          "val_robust_acc": val_robust, "fallback": fallback}

    def info(self, last_epoch: int) -> dict[str, Any]:
        """What the checkpoint records: rule, metric, value, candidates and the reason."""
        b = self.best_info
        span = f"epochs {self.start}-{last_epoch}" if last_epoch > self.start else \
            f"epoch {self.start}"
        where = f"among {span} (final regime {self.final_regime})"
        if b.get("fallback"):
            reason = (f"the final regime {self.final_regime} (from epoch {self.start}) was "
                      f"never reached; kept the last epoch {b['epoch']} ({b['regime']})")
        elif self.rule == "robust":
            reason = (f"best robust val acc {b['val_robust_acc']:.4f} (PGD-{self.steps} "
                      f"{self.norm} eps={self.eps:g} on {self.n_used} val images) {where}")
        elif self.rule == "clean":
            reason = f"best clean val acc {b['val_acc']:.4f} {where}"
        else:
            reason = f"last epoch {where}"
        return {"rule": self.rule, "norm": self.norm, "eps": self.eps, "steps": self.steps,
                "n": self.n_used, "candidates": [self.start, last_epoch], **b,
                "reason": reason}

    def state(self) -> dict[str, Any]:
        return {"best_score": self.best_score, "best_epoch": self.best_epoch,
                "best_info": dict(self.best_info), "n_used": self.n_used}

    def load_state(self, st: dict[str, Any]) -> None:
        self.best_score = float(st["best_score"])
        self.best_epoch = int(st["best_epoch"])
        self.best_info = dict(st.get("best_info") or {})
        self.n_used = int(st.get("n_used", 0))
