"""Baselines that separate "RL" from "a smoother loss" (the reviewer's request).

- ``sl_rl_loss``: deterministic SL on the RL loss's expectation,
  ``(1-eps)(1-p_y) + (eps/K) CE``: the loss shape of RL without its sampling noise.
- ``igr``: input-gradient regularisation by double backpropagation, CE + lambda *
  mean ||grad_x CE||^2 (Ross & Doshi-Velez 2018, AAAI, "Improving the adversarial
  robustness and interpretability of deep neural networks by regularizing their input
  gradients").
- ``jacobian``: Jacobian regularisation CE + lambda/2 * ||J||_F^2 estimated with one
  random projection per step (Hoffman, Roberts & Yaida 2019, "Robust learning with
  Jacobian regularization").
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from aerl_ray.regimes import REGIMES


def expected_rl_loss(logits: torch.Tensor, y: torch.Tensor, explore_eps: float) -> torch.Tensor:
    k = logits.shape[1]
    p_y = torch.softmax(logits, dim=1).gather(1, y[:, None]).squeeze(1)
    ce = F.cross_entropy(logits, y, reduction="none")
    return ((1 - explore_eps) * (1 - p_y) + (explore_eps / k) * ce).mean()


@REGIMES.register("sl_rl_loss")
def sl_rl_loss(model, x, y, ctx):
    logits = model(x)
    return expected_rl_loss(logits, y, ctx.cfg.explore_eps), {"logits": logits.detach()}


@REGIMES.register("igr")
def igr(model, x, y, ctx):
    x = x.detach().requires_grad_(True)
    logits = model(x)
    ce = F.cross_entropy(logits, y)
    # grad of the summed CE gives per-example input gradients (mean would scale by 1/B)
    (g,) = torch.autograd.grad(ce * x.shape[0], x, create_graph=True)
    penalty = g.pow(2).flatten(1).sum(1).mean()
    return ce + ctx.cfg.reg_lambda * penalty, {"logits": logits.detach(),
                                               "grad_penalty": float(penalty.detach())}


@REGIMES.register("jacobian")
def jacobian(model, x, y, ctx):
    x = x.detach().requires_grad_(True)
    logits = model(x)
    ce = F.cross_entropy(logits, y)
    k = logits.shape[1]
    v = torch.randn(logits.shape, generator=ctx.generator).to(logits.device, logits.dtype)
    v = v / v.norm(dim=1, keepdim=True)
    (jv,) = torch.autograd.grad((logits * v).sum(), x, create_graph=True)
    frob = k * jv.pow(2).flatten(1).sum(1).mean()  # unbiased estimate of ||J||_F^2
    return ce + 0.5 * ctx.cfg.reg_lambda * frob, {"logits": logits.detach(),
                                                  "jacobian_frob": float(frob.detach())}
