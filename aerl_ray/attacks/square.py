"""Square Attack (Andriushchenko et al. 2020): a score-based black-box attack.

It uses only the model's outputs, never its gradients, so it is immune to gradient
masking: Square beating the white-box attacks is the classic masking sign (AutoAttack's
``check_square_sr``; Athalye et al. 2018).  We run the reference implementation shipped
with AutoAttack and count queries with forward hooks (``AttackResult.queries``).
"""
from __future__ import annotations

import importlib

import torch
from torch import nn

from aerl_ray.attacks.base import AttackResult, predict, register_attack
from aerl_ray.attacks.threat import Threat


def _square_class():
    for mod in ("pyautoattack.square", "autoattack.square"):
        try:
            return importlib.import_module(mod).SquareAttack
        except ImportError:
            continue
    raise ImportError("the Square attack comes with AutoAttack: `pip install pyautoattack`")


@register_attack("square", kind="black-box",
                 fast_params={"n_queries": 100, "resc_schedule": True})
def square(model: nn.Module, x: torch.Tensor, y: torch.Tensor, threat: Threat, *,
           n_queries: int = 5000, p_init: float = 0.8, restarts: int = 1, seed: int = 0,
           loss: str = "margin", resc_schedule: bool = False,
           batch_size: int = 500) -> AttackResult:
    """Untargeted Square attack with a budget of ``n_queries`` per example and restart.

    Args:
        n_queries: query budget (AutoAttack standard: 5000).
        p_init: initial fraction of pixels changed per square.
        restarts: restarts (each re-attacks the still-robust points).
        seed: the attack's seed.
        loss: ``margin`` or ``ce``.
        resc_schedule: rescale the square-size schedule to ``n_queries`` (AutoAttack
            uses False with 5000 queries; use True for short budgets).
        batch_size: examples per call.
    """
    if n_queries < 1:
        raise ValueError(f"n_queries={n_queries} must be >= 1")
    if loss not in ("margin", "ce"):
        raise ValueError(f"unknown square loss {loss!r}; known: margin, ce")
    cls = _square_class()
    atk = cls(model, norm=threat.norm.value, n_queries=n_queries, eps=threat.eps,
              p_init=p_init, n_restarts=restarts, seed=seed, verbose=False, loss=loss,
              resc_schedule=resc_schedule, device=x.device)
    out = []
    with torch.random.fork_rng(devices=[x.device] if x.device.type == "cuda" else []), \
            torch.no_grad():
        for b in range(0, len(x), batch_size):
            out.append(atk.perturb(x[b:b + batch_size], y[b:b + batch_size]))
    x_adv = torch.cat(out)
    success = (predict(model, x_adv, batch_size) != y).cpu()
    return AttackResult(x_adv, success, torch.full((len(x),), float("nan")),
                        extra={"query_budget": n_queries * restarts})
