"""Checks a registered regime must pass -- the built-in ones and a lab's plugin regimes alike.

``check_regime(name, x, y, num_classes)`` is what the package's registry-driven tests call
for every name in :data:`aerl_ray.regimes.REGIMES`, and what a plugin author calls for
their own regime (``examples/mylab`` does, in ``tests/test_plugins.py``)::

    from aerl_ray.testing import check_regime
    check_regime("logit_squeeze", x, y, num_classes=10, reg_lambda=0.05)

It checks, on one fixed batch of a tiny model:

- **the loss**: a finite scalar with a gradient for every trained parameter, and
  ``stats["logits"]`` (what the loop's training accuracy is measured on), if given, has
  one row per example;
- **determinism**: the same generator seed gives the same loss (exploration, random starts
  and augmentation must draw from ``ctx.rng`` or ``ctx.generator``, not a global RNG);
- **learning**: 40 Adam steps lower the loss averaged over 3 fixed seeds.

Each failure raises :class:`RegimeCheckError` naming the regime and the property.
"""
from __future__ import annotations

import logging
from typing import Any

import torch

logger = logging.getLogger(__name__)


class RegimeCheckError(AssertionError):
    """A regime broke one of the properties :func:`check_regime` checks."""


def _context(name: str, num_classes: int, seed: int, epoch: int, cfg_kw: dict):
    from aerl_ray.config import RegimeConfig
    from aerl_ray.regimes import RegimeContext

    ctx = RegimeContext(cfg=RegimeConfig(regime=name, **cfg_kw), num_classes=num_classes,
                        generator=torch.Generator().manual_seed(seed))
    ctx.epoch = epoch
    return ctx


def check_regime(name: str, x: torch.Tensor, y: torch.Tensor, num_classes: int, *,
                 model: str = "tiny", epoch: int = 1, steps: int = 40, lr: float = 3e-2,
                 **cfg_kw: Any) -> dict:
    """Check the regime ``name`` (see the module docstring); ``cfg_kw`` are RegimeConfig
    fields (e.g. ``explore_eps=0.0``); ``epoch`` is the context's epoch (a hybrid's RL
    phase from ``switch_epoch``).  Returns ``{"before": ..., "after": ..., "stats": ...}``."""
    from aerl_ray.data import DatasetInfo
    from aerl_ray.models import build_model
    from aerl_ray.regimes import REGIMES

    fn = REGIMES.get(name)  # unknown names list the known ones
    torch.manual_seed(0)
    info = DatasetInfo(name="check", num_classes=num_classes, in_channels=x.shape[1],
                       image_size=x.shape[-1], mean=(0.5,) * x.shape[1],
                       std=(0.5,) * x.shape[1])
    net = build_model(model, info)
    net.train()
    opt = torch.optim.Adam(net.parameters(), lr=lr)

    def run(seed: int):
        net.zero_grad()
        loss, stats = fn(net, x, y, _context(name, num_classes, seed, epoch, cfg_kw))
        return loss, stats

    def value(loss, stats) -> float:
        return float(stats.get("loss_value", loss.detach()))

    loss, stats = run(0)
    if not (isinstance(loss, torch.Tensor) and loss.dim() == 0):
        raise RegimeCheckError(f"regime {name!r}: the loss must be a scalar tensor, got "
                               f"{type(loss).__name__} of shape {getattr(loss, 'shape', '?')}")
    if not torch.isfinite(loss):
        raise RegimeCheckError(f"regime {name!r}: the loss is not finite ({float(loss)})")
    loss.backward()
    trained = [n for n, p in net.named_parameters() if p.requires_grad]
    missing = [n for n, p in net.named_parameters() if p.requires_grad and p.grad is None]
    if len(missing) == len(trained):
        raise RegimeCheckError(f"regime {name!r}: the loss has no gradient for any parameter "
                               "(detached, or computed without the model)")
    logits = stats.get("logits")
    if logits is not None and logits.shape[0] != len(y):
        raise RegimeCheckError(f"regime {name!r}: stats['logits'] has {logits.shape[0]} rows "
                               f"for a batch of {len(y)}")

    a, b = value(*run(7)), value(*run(7))
    if a != b:
        raise RegimeCheckError(f"regime {name!r}: the same generator seed gave losses {a} and "
                               f"{b}: draw randomness from ctx.rng (or ctx.generator), not a global RNG")

    before = sum(value(*run(s)) for s in range(3))
    for i in range(steps):
        loss, _ = run(100 + i)
        loss.backward()
        opt.step()
    after = sum(value(*run(s)) for s in range(3))
    if not after < before:
        raise RegimeCheckError(f"regime {name!r}: {steps} steps did not lower the loss "
                               f"(summed over 3 seeds: {before:.4f} -> {after:.4f})")
    logger.info("regime %s: loss %.4f -> %.4f over %d steps", name, before / 3, after / 3,
                steps)
    return {"before": before / 3, "after": after / 3, "stats": run(0)[1]}
