"""FGSM and PGD (Madry et al. 2018) with the evaluation-grade choices.

- Sum-reduced per-example losses: an example's gradient does not shrink with the batch
  size (the paper's mean-reduced CE scales it by 1/B).
- The L2 step is ``g / (||g|| + 1e-12)`` (never cleverhans' ``g / sqrt(max(1e-12,
  sum g^2))``, which stalls on tiny gradients); L-inf uses ``sign(g)``.
- Losses: ``ce``, ``margin`` (Carlini-Wagner, max_{j!=y} z_j - z_y) and ``dlr``
  (Croce & Hein 2020; scale-invariant, so saturated logits cannot hide the gradient).
- The returned point is the *best* per example: the first iterate (over steps and
  restarts) that fooled the model, else the highest-loss iterate; always clipped to
  [0, 1].  With ``early_stop`` a fooled example leaves the batch.
- Random starts are per-example reproducible (:func:`Threat.random_start`), which makes
  :func:`pgd_curve` -- many budgets in one pass -- equal separate runs.
"""
from __future__ import annotations

from typing import Protocol, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from aerl_ray.attacks.base import AttackResult, register_attack, robustness_curve
from aerl_ray.attacks.threat import Norm, Threat
from aerl_ray.registry import Registry

LOSSES: Registry = Registry("attack loss")


@LOSSES.register("ce")
def ce_loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-example cross-entropy (to maximise); summed, never averaged, over the batch."""
    return F.cross_entropy(logits, y, reduction="none")


@LOSSES.register("margin")
def margin_loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """CW margin: max_{j != y} z_j - z_y (positive iff misclassified)."""
    z_y = logits.gather(1, y[:, None]).squeeze(1)
    other = logits.clone()
    other.scatter_(1, y[:, None], float("-inf"))
    return other.amax(1) - z_y


@LOSSES.register("dlr")
def dlr_loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Difference of logits ratio: -(z_y - max_{j!=y} z_j) / (z_pi1 - z_pi3 + 1e-12)."""
    if logits.shape[1] < 3:
        raise ValueError("the dlr loss needs at least 3 classes")
    top = logits.sort(1, descending=True).values
    return margin_loss(logits, y) / (top[:, 0] - top[:, 2] + 1e-12)


class GradRecorder(Protocol):
    """Receives the loss input-gradient of every PGD step (see aerl_ray.indicators)."""

    def start_batch(self, n: int) -> None: ...

    def record(self, step: int, grad: torch.Tensor) -> None: ...

    def end_batch(self) -> None: ...


def _check(steps: int, restarts: int, step_size: float | None, loss: str) -> None:
    if steps < 1:
        raise ValueError(f"steps={steps} must be >= 1")
    if restarts < 1:
        raise ValueError(f"restarts={restarts} must be >= 1")
    if step_size is not None and not step_size > 0:
        raise ValueError(f"step_size={step_size} must be > 0 (a fraction of eps)")
    LOSSES.get(loss)


def pgd_core(model: nn.Module, x: torch.Tensor, y: torch.Tensor, threat: Threat, *,
             steps: int, step_size: float | None = None, restarts: int = 1, loss: str = "ce",
             random_start: bool = True, seed: int = 0,
             example_ids: torch.Tensor | None = None, early_stop: bool = True,
             batch_size: int = 500, recorder: GradRecorder | None = None,
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The PGD loop; returns (x_best, fooled, best_loss), all (N, ...).

    ``step_size`` is a fraction of ``threat.eps`` (default 2.5 / steps, Madry et al.).
    A ``recorder`` sees every step of every example, so it disables ``early_stop``.
    """
    _check(steps, restarts, step_size, loss)
    loss_fn = LOSSES.get(loss)
    alpha = (step_size if step_size is not None else 2.5 / steps) * threat.eps
    ids = torch.arange(len(x)) if example_ids is None else example_ids.cpu()
    early_stop = early_stop and recorder is None
    xs_best, fooled_all, loss_all = [], [], []
    for b in range(0, len(x), batch_size):
        xc, yc, idc = x[b:b + batch_size], y[b:b + batch_size], ids[b:b + batch_size]
        with torch.no_grad():
            logits = model(xc)
        fooled = logits.argmax(1) != yc
        best_loss = loss_fn(logits, yc).detach()
        x_best = xc.clone()
        for r in range(restarts):
            act = (~fooled).nonzero().view(-1) if early_stop else torch.arange(len(xc),
                                                                            device=xc.device)
            if len(act) == 0:
                break
            xa, ya = xc[act], yc[act]
            xadv = (threat.random_start(xa, idc[act.cpu()], r, seed) if random_start
                    else xa.clone())
            live = torch.arange(len(act), device=xc.device)
            if recorder is not None:
                recorder.start_batch(len(act))
            for t in range(steps + 1):
                xin = xadv[live].detach().requires_grad_(t < steps)
                with torch.enable_grad():
                    logits = model(xin)
                    lv = loss_fn(logits, ya[live])
                pos = act[live]
                now = logits.argmax(1) != ya[live]
                before = fooled[pos]
                better = (now & ~before) | ((now == before) & (lv.detach() > best_loss[pos]))
                x_best[pos[better]] = xin.detach()[better]
                best_loss[pos[better]] = lv.detach()[better]
                fooled[pos] = before | now
                if t == steps:
                    break
                grad, = torch.autograd.grad(lv.sum(), xin)
                if recorder is not None:
                    recorder.record(t, grad)
                xadv[live] = threat.project(xin.detach() + alpha * threat.direction(grad),
                                            xa[live])
                if early_stop:
                    live = live[~now]
                    if len(live) == 0:
                        break
            if recorder is not None:
                recorder.end_batch()
        xs_best.append(x_best)
        fooled_all.append(fooled)
        loss_all.append(best_loss)
    if not xs_best:
        return x.clone(), torch.zeros(0, dtype=torch.bool), torch.zeros(0)
    return torch.cat(xs_best), torch.cat(fooled_all).cpu(), torch.cat(loss_all).cpu()


@register_attack("pgd", kind="white-box", per_example_rng=True,
                 fast_params={"steps": 10, "restarts": 1})
def pgd(model: nn.Module, x: torch.Tensor, y: torch.Tensor, threat: Threat, *,
        steps: int = 50, step_size: float | None = None, restarts: int = 1,
        loss: str = "ce", random_start: bool = True, seed: int = 0,
        early_stop: bool = True, batch_size: int = 500,
        example_ids: torch.Tensor | None = None) -> AttackResult:
    """Untargeted PGD in ``threat``'s ball.

    Args:
        steps: ascent steps per restart.
        step_size: step as a fraction of eps (default 2.5 / steps, Madry et al.).
        restarts: random restarts; each attacks only the examples not yet fooled.
        loss: ``ce``, ``margin`` or ``dlr``.
        random_start: start uniformly in the ball (else at x).
        seed: seed of the per-example random starts.
        early_stop: stop attacking an example once fooled (the result is the same).
        batch_size: examples per forward pass.
        example_ids: ids of the rows, keys of the per-example random streams.
    """
    xb, fooled, best = pgd_core(model, x, y, threat, steps=steps, step_size=step_size,
                                restarts=restarts, loss=loss, random_start=random_start,
                                seed=seed, example_ids=example_ids, early_stop=early_stop,
                                batch_size=batch_size)
    return AttackResult(xb, fooled, best)


@register_attack("fgsm", kind="white-box", per_example_rng=True)
def fgsm(model: nn.Module, x: torch.Tensor, y: torch.Tensor, threat: Threat, *,
         loss: str = "ce", batch_size: int = 500) -> AttackResult:
    """One full-size step from the clean point (Goodfellow et al. 2015): ``x + eps *
    sign(g)`` (L-inf) or ``x + eps * g / ||g||`` (L2).  A one-step attack that beats PGD
    is a gradient-masking sign (Athalye et al. 2018)."""
    xb, fooled, best = pgd_core(model, x, y, threat, steps=1, step_size=1.0, restarts=1,
                                loss=loss, random_start=False, early_stop=True,
                                batch_size=batch_size)
    return AttackResult(xb, fooled, best)


def pgd_curve(model: nn.Module, x: torch.Tensor, y: torch.Tensor, norm: "str | Norm",
              eps_grid: Sequence["str | float"], **params) -> list[AttackResult]:
    """PGD robust accuracy for every budget of a sorted grid in one pass.

    An example broken at a budget stays broken at every larger budget (same
    perturbation); only the still-robust examples are attacked at the next budget, each
    with its own early exit.  Because random starts depend only on (seed, example id,
    restart), the per-example outcome at budget k equals that of a separate
    ``pgd`` run at budget k whenever the example survived all smaller budgets: the curve
    is the per-example running minimum of separate runs (identical numbers whenever the
    separate runs are monotone, as they are for a working attack).
    Takes the parameters of :func:`pgd`.
    """
    return robustness_curve("pgd", model, x, y, norm, eps_grid, **params)
