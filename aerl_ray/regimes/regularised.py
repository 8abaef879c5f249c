"""Baselines that separate "RL" from "a smoother loss" (the reviewer's request).

- ``sl_rl_loss``: deterministic SL on the RL loss's expectation -- for the 0/1 reward
  without baseline ``(1-eps)(1-p_y) + (eps/K) CE`` -- the loss shape of RL without its
  sampling noise, for every reward / baseline / exploration setting the ``rl`` regime
  supports (see :func:`expected_rl_loss`).
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

from aerl_ray.config import ExploreMode, Reward
from aerl_ray.regimes import REGIMES


def expected_rl_loss(logits: torch.Tensor, y: torch.Tensor, explore_eps: float,
                     reward: "Reward | str" = Reward.ZERO_ONE, baseline: bool = False,
                     explore_mode: "ExploreMode | str" = ExploreMode.PER_SAMPLE
                     ) -> torch.Tensor:
    """A deterministic loss whose gradient is the expected gradient of the ``rl`` regime's
    sampled loss ``-mean_i log p_i(a_i) (r_i - b)`` on this batch (``pg_loss``).

    Actions come from ``q = (1-eps) p + eps/K`` (the marginal of both exploration modes)
    while the score is ``log p``, so ``E[grad log p(a)] = (eps/K) grad sum_a log p_a``, not
    0.  With ``h = 1[a = y]`` and the reward ``r = s h + t`` ((s, t) = (1, 0) for ``01``,
    (2, -1) for ``pm1``), per example (K classes, B the batch size):

    - no baseline: ``s [(1-eps)(1-p_y) + (eps/K) CE] - t (eps/K) sum_a log p_a``
      (for ``01``: the paper's ``(1-eps)(1-p_y) + (eps/K) CE``);
    - batch-mean baseline ``b = mean_j r_j`` (the example's own reward included, so the
      offset t cancels and the example's own term shrinks by ``1 - 1/B``):
      ``s [(1 - 1/B) ((1-eps)(1-p_y) + (eps/K) CE) + (eps/K) (c_i / B) sum_a log p_a]``
      with ``c_i = sum_{j != i} E[h_j | i explores or not]``: ``sum_{j != i} q_j(y_j)``
      (detached) when samples explore independently (``per_sample``), ``(B-1)/K`` when one
      coin decides for the whole batch (``per_batch``: given the coin, an exploring batch
      has ``E[h_j] = 1/K``, and a non-exploring one contributes nothing because then
      ``E[grad log p(a)] = 0``).

    The value of the baseline form is a surrogate (only its gradient is the expectation).
    ``tests/test_regimes.py`` checks every combination against 20,000 sampled batches.
    """
    b, k = logits.shape
    eps = float(explore_eps)
    logp = F.log_softmax(logits, dim=1)
    logp_y = logp.gather(1, y[:, None]).squeeze(1)
    p_y = logp_y.exp()
    hit = (1 - eps) * (1 - p_y) - (eps / k) * logp_y  # E-loss of the 0/1 reward
    spread = logp.sum(1)  # sum_a log p_a: the score of the exploration draws
    scale, shift = (1.0, 0.0) if Reward(reward) is Reward.ZERO_ONE else (2.0, -1.0)
    if not baseline:
        return (scale * hit - shift * (eps / k) * spread).mean()
    if ExploreMode(explore_mode) is ExploreMode.PER_SAMPLE:
        q_y = ((1 - eps) * p_y + eps / k).detach()
        others = q_y.sum() - q_y
    else:
        others = torch.full_like(p_y, (b - 1) / k)
    return (scale * ((1 - 1 / b) * hit + (eps / k) * others / b * spread)).mean()


@REGIMES.register("sl_rl_loss")
def sl_rl_loss(model, x, y, ctx):
    c = ctx.cfg
    logits = model(x)
    loss = expected_rl_loss(logits, y, c.explore_eps, c.reward, c.baseline, c.explore_mode)
    return loss, {"logits": logits.detach()}


@REGIMES.register("igr")
def igr(model, x, y, ctx):
    x = x.detach().requires_grad_(True)
    logits = model(x)
    ce = F.cross_entropy(logits, y)
    # grad of the summed CE gives per-example input gradients (mean would scale by 1/B)
    (g,) = torch.autograd.grad(ce * x.shape[0], x, create_graph=True)
    penalty = g.pow(2).flatten(1).sum(1).mean()
    return ce + ctx.cfg.reg_lambda * penalty, {"logits": logits.detach(),
                                               "grad_penalty": penalty.detach()}


@REGIMES.register("jacobian")
def jacobian(model, x, y, ctx):
    x = x.detach().requires_grad_(True)
    logits = model(x)
    ce = F.cross_entropy(logits, y)
    k = logits.shape[1]
    v = torch.randn(logits.shape, generator=ctx.rng, device=ctx.rng.device).to(logits.device,
                                                                               logits.dtype)
    v = v / v.norm(dim=1, keepdim=True)
    (jv,) = torch.autograd.grad((logits * v).sum(), x, create_graph=True)
    frob = k * jv.pow(2).flatten(1).sum(1).mean()  # unbiased estimate of ||J||_F^2
    return ce + 0.5 * ctx.cfg.reg_lambda * frob, {"logits": logits.detach(),
                                                  "jacobian_frob": frob.detach()}
