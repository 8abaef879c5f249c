"""Logit squeezing (Kannan et al. 2018): cross-entropy plus a penalty on the logits' size.

A regime is a plain loss function ``(model, x, y, ctx) -> (loss, stats)``; the training loop
owns the optimiser, modes and logging.  ``stats["logits"]`` (detached) is what the loop's
training accuracy is measured on.  Its settings come from the run's RegimeConfig
(``ctx.cfg``): here ``reg_lambda`` weighs the penalty.  Known to shrink logits -- which can
*mask* gradients for PGD with a CE loss -- so it is a good regime to test with aerl-ray's
masking diagnostics: does its PGD number survive AutoAttack?
"""
import torch.nn.functional as F

from aerl_ray.regimes import REGIMES


@REGIMES.register("logit_squeeze")
def logit_squeeze(model, x, y, ctx):
    logits = model(x)
    ce = F.cross_entropy(logits, y)
    squeeze = logits.pow(2).sum(1).mean()
    loss = ce + ctx.cfg.reg_lambda * squeeze
    return loss, {"logits": logits.detach(), "logit_sq": float(squeeze.detach())}
