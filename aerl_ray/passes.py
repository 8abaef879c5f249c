"""Counting forward and backward passes through a model, in examples.

Compute is compared between regimes (an RL-adv step costs more than an SL step) and
between attacks by these counts, so they are measured by hooks rather than declared by
hand: a forward hook adds the batch size, and a hook on the output tensor adds it again
each time a backward pass (``loss.backward()`` or ``torch.autograd.grad``) flows through.
"""
from __future__ import annotations

import contextlib

import torch
from torch import nn


class PassCounter:
    """Attach to a model; ``fwd``/``bwd`` count example-passes until :meth:`remove`."""

    def __init__(self, model: nn.Module):
        self.fwd = 0
        self.bwd = 0
        self.active = True
        self._handle = model.register_forward_hook(self._on_forward)

    def _on_forward(self, module: nn.Module, inputs, output: torch.Tensor) -> None:
        if not self.active:
            return
        n = int(output.shape[0])
        self.fwd += n
        if output.requires_grad:
            output.register_hook(lambda grad: self._on_backward(n))

    def _on_backward(self, n: int) -> None:
        self.bwd += n

    @contextlib.contextmanager
    def paused(self):
        """Do not count passes inside this block (e.g. validation)."""
        was, self.active = self.active, False
        try:
            yield
        finally:
            self.active = was

    def remove(self) -> None:
        self._handle.remove()

    def __enter__(self) -> "PassCounter":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()
