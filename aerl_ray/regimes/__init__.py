"""Training regimes: plain loss functions ``(model, x, y, ctx) -> (loss, stats)``.

The training loop owns the optimiser, train/eval modes, devices and logging; a regime
only computes a loss.  ``stats`` holds detached ``logits`` of the clean inputs and/or
``logits_adv`` of adversarial inputs (whichever the regime computed; the loop reports
clean and adversarial training accuracy from them) and optional scalars such as
``reward``.  A regime may back-propagate part of its loss itself -- forward *and*
backward inside ``with ctx.no_sync():`` (the loop zeroes gradients before calling it) --
and return the rest; it then reports the whole loss value as ``stats["loss_value"]``.
Modules, one per family:

- :mod:`.supervised`: ``sl`` (cross-entropy)
- :mod:`.policy_gradient`: ``rl`` (REINFORCE with epsilon-greedy exploration)
- :mod:`.adversarial`: ``sl_adv``, ``rl_adv`` (fgsm / fgsm_rs / pgd / trades inner loops)
- :mod:`.regularised`: ``sl_rl_loss``, ``igr``, ``jacobian`` (baselines)
- :mod:`.schedule`: ``hybrid`` and which regime is active in a given epoch
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Callable, ContextManager

import torch
from torch import nn

from aerl_ray.registry import Registry

RegimeFn = Callable[[nn.Module, torch.Tensor, torch.Tensor, "RegimeContext"],
                    tuple[torch.Tensor, dict[str, Any]]]
REGIMES: Registry[RegimeFn] = Registry("regime")


@dataclass
class RegimeContext:
    """What a regime may use besides the batch.

    Attributes:
        cfg: the run's :class:`~aerl_ray.config.RegimeConfig`.
        num_classes: K.
        epoch: the current epoch (0-based).
        generator: the trial's seeded CPU generator.
        device_generator: seeded generator on the training device for per-step draws
            (exploration, random starts, projections) without a host sync; None: use
            ``generator`` (on a CPU run the loop passes the same object).  Draw from
            :attr:`rng`, with ``device=ctx.rng.device``.
        attack_mode: context manager from the training loop that puts the model in eval
            mode for an inner attack (BN statistics frozen), then restores the mode.
        no_sync: context manager for the forward and backward of a partial loss the
            regime back-propagates itself: its parameter gradients accumulate locally
            and are all-reduced once, with the final backward's (the loop supplies DDP's
            ``no_sync``; DDP arms its all-reduce in the forward, so the forward must be
            inside too).
    """

    cfg: Any
    num_classes: int
    epoch: int = 0
    generator: torch.Generator = field(default_factory=lambda: torch.Generator().manual_seed(0))
    attack_mode: Callable[[], ContextManager] = contextlib.nullcontext
    no_sync: Callable[[], ContextManager] = contextlib.nullcontext
    device_generator: torch.Generator | None = None

    @property
    def rng(self) -> torch.Generator:
        """The generator of per-step draws: ``device_generator``, else ``generator``."""
        return self.device_generator if self.device_generator is not None else self.generator


# Import the families so their @REGIMES.register decorators run.
from aerl_ray.regimes import supervised, policy_gradient, adversarial, regularised, schedule  # noqa: E402,F401

__all__ = ["REGIMES", "RegimeContext", "RegimeFn"]
