"""Fast Minimum-Norm attack (FMN; Pintor et al. 2021), L-inf and L2.

A minimum-norm attack looks for the *smallest* perturbation that fools the model instead
of the strongest one inside a fixed ball, so one run gives every example's breaking
budget and with it a whole robustness curve (broken at eps iff the smallest adversarial
found has norm <= eps).  FMN does this by PGD-like steps on the logit margin inside an
adaptive ball: the radius shrinks by (1 - gamma) while the point is adversarial, grows
(by the first-order distance to the boundary, |margin| / ||grad||_dual, until an
adversarial point was found, then by (1 + gamma)) while it is not; step size and gamma
follow cosine annealing.  The steps are L2-normalised gradient steps of length alpha
for both norms, as in the reference implementation.

It serves two purposes here: a registered attack (``fmn``, with a one-run curve), and
the optional *bracket* of :func:`aerl_ray.attacks.pgd.pgd_grid`'s search curve, which
starts each example's search just below its FMN budget.
"""
from __future__ import annotations

import logging
import math
import time
from typing import Sequence

import torch
from torch import nn

from aerl_ray.attacks.base import AttackResult, predict, register_attack
from aerl_ray.attacks.threat import Norm, Threat, parse_eps
from aerl_ray.passes import PassCounter

logger = logging.getLogger(__name__)


def _norm_of(t: torch.Tensor, p: float) -> torch.Tensor:
    return t.flatten(1).norm(p=p, dim=1)


def _margin(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """max_{j != y} z_j - z_y: positive iff misclassified (differentiable)."""
    z_y = logits.gather(1, y[:, None]).squeeze(1)
    other = logits.masked_fill(nn.functional.one_hot(y, logits.shape[1]).bool(), -math.inf)
    return other.amax(1) - z_y


def fmn_core(model: nn.Module, x: torch.Tensor, y: torch.Tensor, norm: "str | Norm", *,
             steps: int = 100, alpha_init: float = 1.0, alpha_final: float | None = None,
             gamma_init: float = 0.05, gamma_final: float = 0.001, batch_size: int = 500,
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """FMN on every example; returns (x_best, best_norm).

    ``x_best`` is the smallest-norm adversarial point found (in [0, 1]), ``best_norm``
    its norm; examples never fooled get ``x`` and ``inf``.  Examples misclassified
    clean get norm 0."""
    if steps < 1:
        raise ValueError(f"steps={steps} must be >= 1")
    norm = Norm.parse(norm)
    p, dual = (math.inf, 1.0) if norm is Norm.LINF else (2.0, 2.0)
    a_final = alpha_init / 100 if alpha_final is None else alpha_final
    xs, ns = [], []
    for b in range(0, len(x), batch_size):
        xc, yc = x[b:b + batch_size], y[b:b + batch_size]
        m = len(xc)
        view = (m, *([1] * (xc.dim() - 1)))
        delta = torch.zeros_like(xc)
        eps = torch.full((m,), math.inf, device=xc.device)
        worst = _norm_of(torch.maximum(xc, 1 - xc), p)
        best_norm = torch.full((m,), math.inf, device=xc.device)
        best = xc.clone()
        found = torch.zeros(m, dtype=torch.bool, device=xc.device)
        for i in range(steps + 1):
            xin = (xc + delta).detach().requires_grad_(i < steps)
            with torch.set_grad_enabled(i < steps):
                logits = model(xin)
                margin = _margin(logits, yc)
            adv = logits.argmax(1) != yc
            d_norm = _norm_of(delta, p)
            better = adv & (d_norm < best_norm)
            best_norm = torch.where(better, d_norm, best_norm)
            best[better] = xin.detach()[better]
            found |= adv
            if i == steps:
                break
            grad, = torch.autograd.grad(margin.sum(), xin)
            # only directions that stay in the box: a step that clipping undoes is lost
            # length (most digit pixels sit at 0 or 1)
            xd = xin.detach()
            grad = grad.masked_fill(((xd <= 0) & (grad < 0)) | ((xd >= 1) & (grad > 0)), 0.0)
            cosine = (1 + math.cos(math.pi * i / steps)) / 2
            alpha = a_final + (alpha_init - a_final) * cosine
            gamma = gamma_final + (gamma_init - gamma_final) * cosine
            to_boundary = margin.detach().abs() / _norm_of(grad, dual).clamp_min(1e-12)
            eps = torch.where(adv, torch.minimum(eps * (1 - gamma), best_norm),
                              torch.where(found, eps * (1 + gamma), d_norm + to_boundary))
            eps = torch.minimum(eps, worst)
            g2 = _norm_of(grad, 2.0).clamp_min(1e-12).view(view)
            delta = delta + alpha * grad / g2
            if norm is Norm.LINF:
                delta = torch.maximum(torch.minimum(delta, eps.view(view)), -eps.view(view))
            else:
                dn = _norm_of(delta, 2.0).view(view)
                delta = delta * torch.clamp(eps.view(view) / (dn + 1e-12), max=1.0)
            delta = (xc + delta).clamp(0.0, 1.0) - xc
        xs.append(best)
        ns.append(best_norm)
    if not xs:
        return x.clone(), torch.zeros(0)
    return torch.cat(xs), torch.cat(ns).cpu()


def fmn_grid(model: nn.Module, x: torch.Tensor, y: torch.Tensor, norm: "str | Norm",
             eps_grid: Sequence["str | float"], *, steps: int = 100, batch_size: int = 500,
             example_ids: torch.Tensor | None = None) -> list[AttackResult]:
    """The whole curve from one FMN run: at each budget, the smallest adversarial point
    found, projected into the ball, counts as broken if a fresh forward pass says so
    (as :func:`run_attack` decides).  Per example the result is monotone: a point in a
    ball lies in every larger one.  The run's passes are charged to the first budget."""
    t0 = time.perf_counter()
    norm = Norm.parse(norm)
    grid = [parse_eps(e) for e in eps_grid]
    with PassCounter(model) as pc:
        x_best, best_norm = fmn_core(model, x, y, norm, steps=steps, batch_size=batch_size)
        fwd, bwd = pc.fwd, pc.bwd
        out: list[AttackResult] = []
        broken = torch.zeros(len(x), dtype=torch.bool)
        first = x.clone()  # per example: the point of its smallest breaking budget
        for g, e in enumerate(grid):
            pts = Threat(norm, e).project(x_best, x)
            f0 = pc.fwd
            with torch.no_grad():
                hit = torch.cat([model(pts[b:b + batch_size]).argmax(1) != y[b:b + batch_size]
                                 for b in range(0, len(x), batch_size)]).cpu() \
                    if len(x) else torch.zeros(0, dtype=torch.bool)
            new = (hit & ~broken).to(x.device)
            first[new] = pts[new]
            broken |= hit
            res = torch.where(broken.to(x.device).view(-1, *([1] * (x.dim() - 1))), first, pts)
            f = pc.fwd - f0 + (fwd if g == 0 else 0)
            out.append(AttackResult(res, broken.clone(), torch.full((len(x),), float("nan")),
                                    f, bwd if g == 0 else 0, f, 0.0, [],
                                    {"min_norm": best_norm.clone()}))
    wall = time.perf_counter() - t0
    total = sum(r.fwd_passes + r.bwd_passes for r in out) or 1
    for r in out:
        r.seconds = wall * (r.fwd_passes + r.bwd_passes) / total
    return out


@register_attack("fmn", kind="white-box", per_example_rng=True,
                 fast_params={"steps": 10}, curve=fmn_grid)
def fmn(model: nn.Module, x: torch.Tensor, y: torch.Tensor, threat: Threat, *,
        steps: int = 100, batch_size: int = 500) -> AttackResult:
    """FMN at one budget: the smallest adversarial point found, projected into the
    ball (adversarial iff its norm was within the budget, or the projection still
    fools the model).

    Args:
        steps: FMN iterations (each one forward + one backward pass).
        batch_size: examples per forward pass.
    """
    x_best, best_norm = fmn_core(model, x, y, threat.norm, steps=steps, batch_size=batch_size)
    x_adv = threat.project(x_best, x)
    with torch.no_grad():  # the true mask on the returned points (a projection may fool)
        success = (predict(model, x_adv, batch_size) != y).cpu()
    return AttackResult(x_adv, success, torch.full((len(x),), float("nan")),
                        extra={"min_norm": best_norm})
