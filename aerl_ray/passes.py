"""Counting the work of forward and backward passes through a model, in example-passes.

Compute is compared between regimes (an RL-adv step costs more than an SL step, IGR's
double backward more than both) and between attacks by these counts, so they are
measured by hooks rather than declared by hand, and they count what the hardware does.
The unit is the work of one forward pass of one example:

- a forward pass adds the batch size ``n`` to ``fwd``;
- every backward traversal that reaches the model's output adds ``n`` to ``bwd`` for the
  input-gradient chain back through the layers (what an attack step needs);
- if that traversal also computes the parameter gradients (a training ``backward()``,
  not ``torch.autograd.grad(loss, x)``), it adds ``n`` more for them, once per forward
  graph it runs through -- so a training step of SL costs 1 forward + 2 backward;
- a traversal through a graph that an earlier backward recorded with
  ``create_graph=True`` (double backpropagation: IGR, Jacobian regularisation) adds
  ``2 n`` more: it back-propagates through that recorded backward pass, which costs
  about a backward pass of its own (input and parameter gradients of every layer).

With these weights the counted passes of a step follow its floating-point operations
(convolutions and matrix products, counted with ``torch.utils.flop_counter``: SL 3,
IGR and Jacobian 6, FGSM adversarial training 6, FGSM-RS 5, PGD-AT with k steps
3 + 2k forward-equivalents per example) and the measured step time (tests/test_passes.py,
NOTES-issue11.md).  A parameter-gradient pass is detected by a hook on every parameter;
the double backward by a hook on the gradient that reached the model's input, when that
gradient was recorded with a graph.
"""
from __future__ import annotations

import contextlib

import torch
from torch import nn


def _graph_task() -> int:
    """Id of the backward traversal running now (-1 outside of one)."""
    return int(torch._C._current_graph_task_id())


class PassCounter:
    """Attach to a model; ``fwd``/``bwd`` count example-passes until :meth:`remove`.

    ``bwd`` is backward work in units of a forward pass (see the module docstring): 2 per
    example for a training backward, 1 for an input-gradient-only backward (attacks).
    """

    def __init__(self, model: nn.Module):
        self.fwd = 0
        self.bwd = 0
        self.active = True
        self._handles = [model.register_forward_hook(self._on_forward)]
        self._handles += [p.register_hook(self._on_param_grad)
                          for p in model.parameters() if p.requires_grad]
        self._reached: dict[int, int] = {}  # traversal id -> examples whose output it reached
        self._charged: set[int] = set()  # traversals whose parameter gradients are counted

    def _on_forward(self, module: nn.Module, inputs, output: torch.Tensor) -> None:
        if not self.active:
            return
        n = int(output.shape[0])
        self.fwd += n
        if output.requires_grad:
            output.register_hook(lambda grad: self._on_output_grad(n))
        for x in inputs:
            if torch.is_tensor(x) and x.requires_grad:
                x.register_hook(lambda grad, n=n: self._on_input_grad(grad, n))

    def _on_output_grad(self, n: int) -> None:
        self.bwd += n
        task = _graph_task()
        if task not in self._reached:  # a new traversal: forget those long finished
            self._reached = {t: k for t, k in self._reached.items() if t > task - 16}
        self._reached[task] = self._reached.get(task, 0) + n

    def _on_param_grad(self, grad: torch.Tensor) -> None:
        task = _graph_task()
        if task in self._charged or task not in self._reached:
            return
        self._charged = {t for t in self._charged if t > task - 16}
        self._charged.add(task)
        self.bwd += self._reached.pop(task)

    def _on_input_grad(self, grad: torch.Tensor, n: int) -> None:
        # the input gradient was recorded with a graph (create_graph=True): a later
        # traversal through it back-propagates through this backward pass
        if self.active and grad.requires_grad:
            grad.register_hook(lambda g: self._on_double_backward(n))

    def _on_double_backward(self, n: int) -> None:
        self.bwd += 2 * n

    @contextlib.contextmanager
    def paused(self):
        """Do not count passes inside this block (e.g. validation)."""
        was, self.active = self.active, False
        try:
            yield
        finally:
            self.active = was

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def __enter__(self) -> "PassCounter":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()
