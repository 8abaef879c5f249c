"""Adversarial training: ``sl_adv`` and ``rl_adv`` with four inner attacks.

- ``fgsm`` (the paper's SL-adv / RL-adv): ``L(x) + adv_rate * L(x + eps*sign(grad_x L(x)))``
  where ``L`` is the regime's own loss (CE, or the sampled PG loss: as in the paper its
  input gradient is zero for samples whose sampled action was wrong, so only the others
  are perturbed).  Costs 2 forward + 2 backward passes per step (the paper's code: 4
  forward + 3 backward): the clean loss is back-propagated once, inside
  ``ctx.no_sync()``, which yields both its parameter gradients and the input gradient
  the attack needs; under DDP those gradients are all-reduced once, with the final
  backward's (no_sync must cover the forward too, or DDP reduces twice).
- ``fgsm_rs`` (Wong, Rice & Kolter 2020, "Fast is better than free"): uniform random start
  in the eps-ball, one CE step of 1.25 eps, train on ``L(x_adv)``.  As in their code the
  attack step runs in *train* mode (BatchNorm batch statistics, dropout active).
- ``pgd`` (Madry et al. 2018, PGD-AT): ``adv_steps`` signed CE steps of
  ``adv_step_size*eps`` from a random start, train on ``L(x_adv)``.
- ``trades`` (Zhang et al. 2019): ``CE(x) + trades_beta * KL(p(x) || p(x'))`` (batch mean
  of the per-example KL), ``x'`` maximising the summed KL by ``adv_steps`` signed steps
  from ``x + 0.001 N(0, I)``.  Zhang et al.: beta 6 (the default of ``trades_beta``),
  10 steps of 0.007 at eps 0.031 (``adv_step_size`` 0.226; the default 0.25 gives 0.00775).

Inner maximisations of pgd / trades run under ``ctx.attack_mode()`` (the training loop
switches BN/dropout to eval mode there, as TRADES' code does).  All inputs stay in [0, 1].
``adv_rate`` weights only the fgsm composition; TRADES' beta is ``trades_beta`` (the
config refuses an ``adv_rate`` that no term uses).

Stats: ``logits`` are those of the clean inputs (when the regime computes them: fgsm,
trades) and ``logits_adv`` those of the adversarial inputs it trains on (all four), so
the loop can report clean and adversarial training accuracy under their own names.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from aerl_ray.config import AdvAttack
from aerl_ray.regimes import REGIMES
from aerl_ray.regimes.policy_gradient import rl_base_loss
from aerl_ray.regimes.supervised import ce_loss


def _uniform(x: torch.Tensor, eps: float, g: torch.Generator) -> torch.Tensor:
    return ((torch.rand(x.shape, generator=g, device=g.device) * 2 - 1) * eps).to(x.device,
                                                                                  x.dtype)


def pgd_linf_ce(model, x: torch.Tensor, y: torch.Tensor, eps: float, steps: int,
                step: float, g: torch.Generator) -> torch.Tensor:
    """Linf PGD on summed CE from a uniform random start (the inner loop of PGD-AT /
    FGSM-RS).  Returns ``x_adv`` detached, in the eps-ball and in [0, 1]."""
    x = x.detach()
    x_adv = (x + _uniform(x, eps, g)).clamp(0, 1)
    for _ in range(steps):
        x_adv.requires_grad_(True)
        loss = F.cross_entropy(model(x_adv), y, reduction="sum")
        (grad,) = torch.autograd.grad(loss, x_adv)
        x_adv = x_adv.detach() + step * grad.sign()
        x_adv = torch.min(torch.max(x_adv, x - eps), x + eps).clamp(0, 1)
    return x_adv.detach()


def trades_perturb(model, x: torch.Tensor, eps: float, steps: int, step: float,
                   g: torch.Generator) -> torch.Tensor:
    """TRADES inner maximisation of KL(p(x) || p(x')) over the Linf eps-ball."""
    x = x.detach()
    with torch.no_grad():
        p_nat = torch.softmax(model(x), dim=1)
    noise = torch.randn(x.shape, generator=g, device=g.device).to(x.device, x.dtype)
    x_adv = (x + 0.001 * noise).clamp(0, 1)
    for _ in range(steps):
        x_adv.requires_grad_(True)
        kl = F.kl_div(F.log_softmax(model(x_adv), dim=1), p_nat, reduction="sum")
        (grad,) = torch.autograd.grad(kl, x_adv)
        x_adv = x_adv.detach() + step * grad.sign()
        x_adv = torch.min(torch.max(x_adv, x - eps), x + eps).clamp(0, 1)
    return x_adv.detach()


def trades_kl(logits_nat: torch.Tensor, logits_adv: torch.Tensor) -> torch.Tensor:
    """TRADES' robust term: ``(1/B) sum_i KL(p(x_i) || p(x'_i))``, gradients through both."""
    return F.kl_div(F.log_softmax(logits_adv, dim=1), F.softmax(logits_nat, dim=1),
                    reduction="batchmean")


def adversarial_loss(base_loss, model, x, y, ctx):
    """Compose a base loss (``ce_loss`` or ``rl_base_loss``) with the configured attack."""
    c = ctx.cfg
    eps, attack = c.adv_eps, AdvAttack(c.adv_attack)
    if attack is AdvAttack.FGSM:
        x = x.detach().requires_grad_(True)
        with ctx.no_sync():  # gradients of L(x) accumulate locally, reduced with the final ones
            logits = model(x)                                    # forward 1
            loss_clean, stats = base_loss(logits, y, ctx)
            # backward 1: the parameter gradients of L(x) AND grad_x L(x) in one pass
            loss_clean.backward()
        x_adv = (x.detach() + eps * x.grad.sign()).clamp(0, 1)
        logits_adv = model(x_adv)                                # forward 2 (backward 2: loop)
        loss_adv, _ = base_loss(logits_adv, y, ctx)
        loss = c.adv_rate * loss_adv
        return loss, {"logits": logits.detach(), "logits_adv": logits_adv.detach(),
                      "loss_value": loss_clean.detach() + loss.detach(), **stats}
    if attack is AdvAttack.TRADES:
        with ctx.attack_mode():
            x_adv = trades_perturb(model, x, eps, c.adv_steps, c.adv_step_size * eps,
                                   ctx.rng)
        logits = model(x)
        loss_clean, stats = base_loss(logits, y, ctx)
        logits_adv = model(x_adv)
        kl = trades_kl(logits, logits_adv)
        return loss_clean + c.trades_beta * kl, {
            "logits": logits.detach(), "logits_adv": logits_adv.detach(),
            "kl": kl.detach(), **stats}
    if attack is AdvAttack.FGSM_RS:  # Wong et al.: the attack step in train mode
        x_adv = pgd_linf_ce(model, x, y, eps, 1, 1.25 * eps, ctx.rng)
    else:
        with ctx.attack_mode():
            x_adv = pgd_linf_ce(model, x, y, eps, c.adv_steps, c.adv_step_size * eps,
                                ctx.rng)
    logits_adv = model(x_adv)
    loss, stats = base_loss(logits_adv, y, ctx)
    return loss, {"logits_adv": logits_adv.detach(), **stats}


@REGIMES.register("sl_adv")
def sl_adv(model, x, y, ctx):
    return adversarial_loss(ce_loss, model, x, y, ctx)


@REGIMES.register("rl_adv")
def rl_adv(model, x, y, ctx):
    return adversarial_loss(rl_base_loss, model, x, y, ctx)
