"""Rung metrics: clean and cheap robust accuracy on a fixed validation subset.

:func:`robust_val_metrics` is what a trial computes at a rung of the multi-objective
scheduler (:mod:`aerl_ray.moasha`) and what the training loop can use for robust-validation
checkpoint selection.  It is deliberately cheap (PGD with few steps on a few hundred
validation images) and deliberately hard to fool:

- **Fixed subset.** The ``n`` images are drawn once from ``(x_val, y_val)`` by ``seed``
  (a seeded permutation, not the first ``n``), and PGD's random starts are keyed by the
  example ids, so the same model gets the same numbers at every call and two trials are
  compared on the same images.  The function sees only the tensors it is given: pass the
  validation split, never the test split.
- **Masking checks.** Besides PGD-k with the cross-entropy loss it runs FGSM and PGD-k
  with the margin (CW) loss.  A one-step attack beating the iterative one, or the margin
  loss beating CE, by more than the tolerance of :func:`aerl_ray.diagnostics.delta` (the
  larger of 0.5 points and the 95% Wilson half-widths at ``n``) is a gradient-masking
  sign (Athalye et al. 2018); then the reported ``robust_acc`` is the *worst* of the
  three attacks, so a trial cannot climb a rung on a masked PGD number.
- **Counted.** Every forward/backward example-pass is counted (hooks, see
  :class:`aerl_ray.passes.PassCounter`) and returned, so the trial adds them to its
  compute.  The model is in eval mode during the evaluation; its mode is restored.
"""
from __future__ import annotations

import logging
import math
import time

import torch
from torch import nn

from aerl_ray.attacks import Norm, Threat, run_attack
from aerl_ray.diagnostics import delta
from aerl_ray.passes import PassCounter

logger = logging.getLogger(__name__)

#: attacks of the masking checks, by the key they get in the result
CHECK_ATTACKS = ("fgsm", "pgd_margin")


def validation_subset(n_total: int, n: int, seed: int) -> torch.Tensor:
    """Sorted indices of the fixed subset: the first ``n`` of a seeded permutation."""
    if n < 1:
        raise ValueError(f"n={n} must be >= 1 (validation images per rung evaluation)")
    gen = torch.Generator().manual_seed(int(seed))
    return torch.randperm(n_total, generator=gen)[:min(n, n_total)].sort().values


@torch.no_grad()
def _accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int) -> float:
    correct = 0
    for i in range(0, len(y), batch_size):
        correct += int((model(x[i:i + batch_size]).argmax(1) == y[i:i + batch_size]).sum())
    return correct / len(y)


def robust_val_metrics(model: nn.Module, x_val: torch.Tensor, y_val: torch.Tensor, *,
                       norm: "str | Norm" = "linf", eps: float, steps: int = 10,
                       n: int = 256, seed: int = 0, batch_size: int = 256,
                       checks: bool = True, step_size: float | None = None) -> dict:
    """Clean and robust accuracy of ``model`` on a fixed subset of the validation split.

    Args:
        model: a classifier taking images in [0, 1] (NCHW) and returning logits.
        x_val, y_val: the validation split (only these tensors are read).
        norm, eps: the threat model of the robust accuracy (``linf``/``l2``, budget > 0).
        steps: PGD steps (k); the step size defaults to 2.5 / k of eps.
        n: images of the fixed subset (all of ``x_val`` if it has fewer).
        seed: picks the subset and keys PGD's per-example random starts.
        batch_size: examples per forward pass.
        checks: run the masking checks (FGSM, PGD with the margin loss).
        step_size: PGD step as a fraction of eps (default 2.5 / steps).

    Returns:
        ``clean_acc``, ``robust_acc`` (PGD-CE, or the worst attack when a check fired),
        ``pgd_acc`` and, with checks, ``fgsm_acc`` and ``pgd_margin_acc``; ``masking``
        (a check fired), ``flags`` (names of the checks that fired: ``fgsm_beats_pgd``,
        ``margin_beats_ce``), ``delta`` (the tolerance used), ``n``, ``norm``, ``eps``,
        ``steps``, ``fwd_passes``/``bwd_passes`` (example-passes spent) and ``seconds``.
    """
    norm = Norm.parse(norm)
    if not (isinstance(eps, (int, float)) and math.isfinite(eps) and eps > 0):
        raise ValueError(f"eps={eps!r} must be a finite number > 0 (the rung attack's budget)")
    if steps < 1:
        raise ValueError(f"steps={steps} must be >= 1")
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} must be >= 1")
    if len(x_val) == 0 or len(x_val) != len(y_val):
        raise ValueError(f"x_val ({len(x_val)}) and y_val ({len(y_val)}) must be non-empty "
                         "and of the same length")
    t0 = time.perf_counter()
    idx = validation_subset(len(x_val), n, seed)
    device = next(model.parameters()).device
    x = x_val[idx].to(device)
    y = y_val[idx].to(device)
    threat = Threat(norm, float(eps))
    was_training = model.training
    model.eval()
    pgd = dict(steps=steps, step_size=step_size, restarts=1, seed=seed, batch_size=batch_size,
               example_ids=idx)
    try:
        with PassCounter(model) as pc:
            clean = _accuracy(model, x, y, batch_size)
            accs = {"pgd": run_attack("pgd", model, x, y, threat, loss="ce", **pgd).robust_acc}
            if checks:
                accs["fgsm"] = run_attack("fgsm", model, x, y, threat, loss="ce",
                                          batch_size=batch_size).robust_acc
                accs["pgd_margin"] = run_attack("pgd", model, x, y, threat, loss="margin",
                                                **pgd).robust_acc
            fwd, bwd = pc.fwd, pc.bwd
    finally:
        model.train(was_training)
    m = len(idx)
    flags, tol = [], delta((accs["pgd"], m))
    if checks:
        tol = delta(*[(a, m) for a in accs.values()])
        if accs["fgsm"] < accs["pgd"] - tol:
            flags.append("fgsm_beats_pgd")
        if accs["pgd_margin"] < accs["pgd"] - tol:
            flags.append("margin_beats_ce")
    robust = min(accs.values()) if flags else accs["pgd"]
    if flags:
        logger.info("rung masking checks fired (%s): robust_acc %.4f is the worst attack, "
                    "PGD-CE said %.4f", ", ".join(flags), robust, accs["pgd"])
    out = {"clean_acc": clean, "robust_acc": robust,
           **{f"{k}_acc": v for k, v in accs.items()},
           "masking": bool(flags), "flags": flags, "delta": tol, "n": m,
           "norm": norm.value, "eps": float(eps), "steps": int(steps),
           "fwd_passes": int(fwd), "bwd_passes": int(bwd),
           "seconds": time.perf_counter() - t0}
    return out
