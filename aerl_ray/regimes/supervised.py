"""Supervised learning: cross-entropy."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from aerl_ray.regimes import REGIMES


def ce_loss(logits: torch.Tensor, y: torch.Tensor, ctx=None) -> tuple[torch.Tensor, dict]:
    """Mean cross-entropy (the ``ctx`` argument keeps the base-loss signature)."""
    return F.cross_entropy(logits, y), {}


@REGIMES.register("sl")
def sl(model, x, y, ctx):
    logits = model(x)
    loss, stats = ce_loss(logits, y)
    return loss, {"logits": logits.detach(), **stats}
