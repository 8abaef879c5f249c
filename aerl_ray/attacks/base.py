"""The attack interface, the ATTACKS registry and the many-budget driver.

Every attack is a function ``fn(model, x, y, threat, **params) -> AttackResult``
registered with :func:`register_attack`.  Callers go through :func:`run_attack`, which
does what no attack should have to repeat: validate inputs and parameters before any
work, put the model in eval mode, count passes with hooks, time the call, short-circuit
``eps == 0``, re-project the output onto the threat set and decide success by a fresh
forward pass of the *returned* points -- so a reported robust accuracy is always the
accuracy of the model on valid adversarial inputs, whatever the attack claims.

:func:`robustness_curve` evaluates a sorted budget grid in one pass: a point broken at
a budget stays broken at every larger budget with the same perturbation, so only the
still-robust examples are attacked at the next budget (PGD and FGSM go further and batch
all budgets in one loop, see :func:`aerl_ray.attacks.pgd.pgd_grid`).
"""
from __future__ import annotations

import inspect
import json
import logging
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import torch
from torch import nn

from aerl_ray.attacks.threat import Norm, Threat, parse_eps
from aerl_ray.passes import PassCounter
from aerl_ray.registry import Registry

logger = logging.getLogger(__name__)


class AttackInputError(ValueError):
    """Inputs, parameters or the model violate the attack contract (images in [0, 1],
    NCHW, int labels, logits out)."""


@dataclass
class AttackResult:
    """What an attack returns.

    Attributes:
        x_adv: adversarial points (N, C, H, W), inside the threat set and [0, 1].
        success: (N,) bool, True where the model misclassifies ``x_adv`` (examples that
            were already misclassified count as successes: robust accuracy is
            ``1 - success.mean()``).
        best_loss: (N,) the attack's objective at ``x_adv`` (nan if it has none).
        fwd_passes, bwd_passes: example-passes through the attacked model (hooks).
        queries: model queries (query-based attacks report their own; else fwd_passes).
        seconds: wall time.
        flags: warnings raised during the attack (e.g. AutoAttack's checks).
        extra: attack-specific facts (e.g. passes spent on a transfer source).
    """

    x_adv: torch.Tensor
    success: torch.Tensor
    best_loss: torch.Tensor
    fwd_passes: int = 0
    bwd_passes: int = 0
    queries: int = 0
    seconds: float = 0.0
    flags: list[str] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def n(self) -> int:
        return int(self.success.numel())

    @property
    def robust_acc(self) -> float:
        return int((~self.success).sum()) / self.n if self.n else float("nan")


AttackFn = Callable[..., AttackResult]


@dataclass(frozen=True)
class AttackSpec:
    """A registered attack.

    Attributes:
        name: registry name.
        fn: the attack function.
        kind: ``white-box``, ``black-box`` or ``transfer`` (what the attack may use).
        requires: parameters without a default the caller must give (e.g. ``source``).
        fast_params: a cheap configuration (few steps/queries) for tests and searches.
        per_example_rng: True if an example's result does not depend on the other
            examples in the call (so a many-budget pass equals separate runs exactly).
        reuse: ``subset`` -- in a budget grid, attack only the still-robust examples;
            ``full`` -- attack all examples at every budget (e.g. a cached transfer set)
            and combine per example afterwards.
        curve: optional ``curve(model, x, y, norm, grid, example_ids=..., **params) ->
            list[AttackResult]`` that runs the whole grid at once (PGD/FGSM: all budgets
            batched in one loop); it must give the per-example running minimum of
            separate runs, as the generic loop does, unless it says otherwise in each
            result's ``extra`` (PGD's ``curve="search"``: ``extra["curve"]`` and the
            audited ``extra["disagreement_upper"]``).  :func:`robustness_curve` uses it.
    """

    name: str
    fn: AttackFn
    kind: str
    requires: tuple[str, ...] = ()
    fast_params: Mapping[str, Any] = field(default_factory=dict)
    per_example_rng: bool = False
    reuse: str = "subset"
    curve: Callable[..., list[AttackResult]] | None = None

    def param_names(self) -> list[str]:
        sig = inspect.signature(self.fn)
        return [p for p in list(sig.parameters)[4:]]

    def validate_params(self, params: Mapping[str, Any]) -> None:
        known = self.param_names()
        unknown = sorted(set(params) - set(known))
        if unknown:
            raise AttackInputError(f"attack {self.name!r} has no parameter(s) {unknown}; "
                                   f"known: {', '.join(known)}")
        missing = [r for r in self.requires if params.get(r) is None]
        if missing:
            raise AttackInputError(f"attack {self.name!r} needs {missing}")


ATTACKS: Registry[AttackSpec] = Registry("attack")


def register_attack(name: str, kind: str, requires: Sequence[str] = (),
                    fast_params: Mapping[str, Any] | None = None,
                    per_example_rng: bool = False, reuse: str = "subset",
                    curve: Callable[..., list[AttackResult]] | None = None):
    """Decorator: register ``fn`` under ``name`` in :data:`ATTACKS` (returns ``fn``)."""
    def deco(fn: AttackFn) -> AttackFn:
        ATTACKS.register(name)(AttackSpec(name, fn, kind, tuple(requires),
                                          dict(fast_params or {}), per_example_rng, reuse,
                                          curve))
        return fn

    return deco


# --- input checks ---------------------------------------------------------------------------
def check_images(x: torch.Tensor, y: torch.Tensor) -> None:
    """Images float NCHW in [0, 1]; labels integer (N,)."""
    if not torch.is_tensor(x) or not x.is_floating_point() or x.dim() != 4:
        raise AttackInputError(f"x must be a float tensor of shape (N, C, H, W), got "
                               f"{getattr(x, 'dtype', type(x))} {tuple(getattr(x, 'shape', ()))}")
    if not torch.is_tensor(y) or y.dim() != 1 or y.shape[0] != x.shape[0] \
            or y.is_floating_point():
        raise AttackInputError(f"y must be an integer tensor of shape ({x.shape[0]},), got "
                               f"{getattr(y, 'dtype', type(y))} {tuple(getattr(y, 'shape', ()))}")
    if x.numel() and (float(x.min()) < 0.0 or float(x.max()) > 1.0):
        raise AttackInputError(f"images must be in [0, 1] (the model normalises inside); got "
                               f"range [{float(x.min()):.3g}, {float(x.max()):.3g}]")


@torch.no_grad()
def check_logits(model: nn.Module, x: torch.Tensor, num_classes: int | None = None) -> None:
    """Refuse a model that returns probabilities (rows in [0, 1] summing to 1) -- the
    attacks' losses assume logits -- or the wrong number of classes."""
    out = model(x[: min(len(x), 64)])
    if out.dim() != 2:
        raise AttackInputError(f"model must return (N, classes) logits, got shape "
                               f"{tuple(out.shape)}")
    if num_classes is not None and out.shape[1] != num_classes:
        raise AttackInputError(f"model returns {out.shape[1]} classes, expected {num_classes}")
    if out.numel() and bool(out.min() > -1e-5) and bool(out.max() < 1 + 1e-5) and \
            bool(((out.sum(1) - 1).abs() < 1e-5).all()):
        raise AttackInputError("the model seems to return probabilities (outputs in [0, 1], "
                               "rows summing to 1); attacks need logits -- remove the "
                               "softmax from the model's forward")


@torch.no_grad()
def predict(model: nn.Module, x: torch.Tensor, batch_size: int = 1000) -> torch.Tensor:
    """Predicted labels of ``x`` (on ``x``'s device), in batches."""
    out = [model(x[i:i + batch_size]).argmax(1) for i in range(0, len(x), batch_size)]
    return torch.cat(out) if out else torch.empty(0, dtype=torch.long, device=x.device)


# --- the one entry point --------------------------------------------------------------------
def run_attack(name: "str | AttackSpec", model: nn.Module, x: torch.Tensor, y: torch.Tensor,
               threat: Threat, **params: Any) -> AttackResult:
    """Run a registered attack under the contract described in the module docstring.

    ``example_ids`` (ids of the rows of ``x``, default ``arange(N)``) is passed on to
    attacks that take it, so their random draws follow the examples.
    """
    spec = name if isinstance(name, AttackSpec) else ATTACKS.get(name)
    example_ids = params.pop("example_ids", None)
    spec.validate_params(params)
    check_images(x, y)
    if example_ids is None:
        example_ids = torch.arange(len(x))
    if "example_ids" in spec.param_names():
        params["example_ids"] = example_ids
    was_training = model.training
    model.eval()
    t0 = time.perf_counter()
    try:
        if len(x):
            check_logits(model, x)
        with PassCounter(model) as pc:
            if threat.eps == 0 or len(x) == 0:
                res = AttackResult(x.clone(), torch.zeros(len(x), dtype=torch.bool),
                                   torch.full((len(x),), float("nan")))
            else:
                res = spec.fn(model, x, y, threat, **params)
            x_adv = threat.project(res.x_adv.detach().to(x.device), x)
            success = predict(model, x_adv) != y.to(x.device)
            fwd, bwd = pc.fwd, pc.bwd
    finally:
        model.train(was_training)
    return AttackResult(x_adv=x_adv, success=success.cpu(), best_loss=res.best_loss.cpu(),
                        fwd_passes=fwd + res.fwd_passes, bwd_passes=bwd + res.bwd_passes,
                        queries=res.queries or fwd, seconds=time.perf_counter() - t0,
                        flags=list(dict.fromkeys(res.flags)), extra=dict(res.extra))


def parse_eps_grid(grid: Sequence["str | float"]) -> list[float]:
    """Parse a budget grid; it must be non-empty and sorted ascending."""
    values = [parse_eps(e) for e in grid]
    if not values:
        raise ValueError("the eps grid is empty")
    if any(b < a for a, b in zip(values, values[1:])):
        raise ValueError(f"the eps grid must be sorted ascending, got {list(grid)}")
    return values


def robustness_curve(name: "str | AttackSpec", model: nn.Module, x: torch.Tensor,
                     y: torch.Tensor, norm: "str | Norm", eps_grid: Sequence["str | float"],
                     *, one_loop: bool = True, **params: Any) -> list[AttackResult]:
    """One :class:`AttackResult` per budget of a sorted grid, reusing work across budgets.

    Per example, the result at budget k is robust only if the attack failed at every
    budget <= k (the perturbation found at a smaller budget is valid at a larger one),
    so the curve is non-increasing by construction.  With ``reuse == "subset"`` only the
    still-robust examples are attacked at the next budget; for attacks with per-example
    RNG this gives exactly the per-example minimum of separate runs.  Each result's
    passes/seconds are the *incremental* cost of its budget.

    Attacks with a ``curve`` (PGD, FGSM) run all budgets in one batched loop instead
    (``one_loop=False`` forces the budget-by-budget loop below, for comparison); their
    shared passes are split over budgets by the rows each budget used (see
    :func:`aerl_ray.attacks.pgd.pgd_grid`).
    """
    spec = name if isinstance(name, AttackSpec) else ATTACKS.get(name)
    grid = parse_eps_grid(eps_grid)
    norm = Norm.parse(norm)
    example_ids = params.pop("example_ids", None)
    spec.validate_params(params)
    check_images(x, y)
    ids = torch.arange(len(x)) if example_ids is None else example_ids.cpu()
    if one_loop and spec.curve is not None:
        was_training = model.training
        model.eval()
        try:
            if len(x):
                check_logits(model, x)
            return spec.curve(model, x, y, norm, grid, example_ids=ids, **params)
        finally:
            model.train(was_training)
    robust = torch.ones(len(x), dtype=torch.bool)
    x_best = x.clone()
    best_loss = torch.full((len(x),), float("nan"))
    out: list[AttackResult] = []
    for eps in grid:
        t0 = time.perf_counter()
        idx = robust.nonzero().view(-1) if spec.reuse == "subset" else torch.arange(len(x))
        if len(idx) == 0:
            out.append(AttackResult(x_best.clone(), ~robust, best_loss.clone()))
            continue
        r = run_attack(spec, model, x[idx.to(x.device)], y[idx.to(y.device)],
                       Threat(norm, eps), example_ids=ids[idx], **params)
        newly = r.success & robust[idx]
        dst = idx[newly]
        x_best[dst.to(x.device)] = r.x_adv[newly.to(r.x_adv.device)]
        best_loss[dst] = r.best_loss[newly]
        keep = robust[idx] & ~r.success
        best_loss[idx[keep]] = r.best_loss[keep]
        robust[dst] = False
        out.append(AttackResult(x_best.clone(), ~robust, best_loss.clone(), r.fwd_passes,
                                r.bwd_passes, r.queries, time.perf_counter() - t0, r.flags,
                                {**r.extra, "attacked": int(len(idx))}))
    return out


def params_json(params: Mapping[str, Any]) -> str:
    """Attack parameters as stable JSON (non-JSON values such as models become names)."""
    def conv(v: Any) -> Any:
        if isinstance(v, (str, int, float, bool)) or v is None:
            return v
        if isinstance(v, (list, tuple)):
            return [conv(i) for i in v]
        if isinstance(v, Mapping):
            return {str(k): conv(i) for k, i in v.items()}
        return type(v).__name__

    return json.dumps({k: conv(v) for k, v in sorted(params.items())}, sort_keys=True)
