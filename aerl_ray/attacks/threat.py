"""Threat models: the set of allowed perturbations around a clean image.

An L-infinity or L2 ball of radius ``eps`` around ``x``, intersected with the image box
[0, 1].  Attacks only talk to a :class:`Threat` for three things -- a random start, an
ascent step and a projection -- so every attack obeys the same constraint and the
invariants (``||delta|| <= eps``, ``x_adv`` in [0, 1]) are enforced in one place.

Random starts are drawn per *example*, from a generator seeded by (seed, example id,
restart).  The noise an example gets therefore does not depend on which other examples
share its batch, which is what lets a many-budget pass that attacks only the still-robust
subset reproduce separate per-budget runs exactly (see :func:`aerl_ray.attacks.pgd.pgd_curve`).
:func:`project_rows` and :func:`random_start_rows` are the same operations with a radius
per row, for the many-budget PGD loop that batches several budgets in one pass.
"""
from __future__ import annotations

import enum
import math
from dataclasses import dataclass
from fractions import Fraction

import torch

# The L2 ascent direction is g / (||g|| + GRAD_TINY): the *additive* floor keeps the step
# at full length for tiny-but-nonzero gradients.  The paper's cleverhans step,
# g / sqrt(max(1e-12, sum g^2)), shrinks the step for ||g|| < 1e-6 instead (method.md).
GRAD_TINY = 1e-12


class Norm(str, enum.Enum):
    """The perturbation norms; values are the spellings AutoAttack expects."""

    LINF = "Linf"
    L2 = "L2"

    @classmethod
    def parse(cls, value: "str | Norm") -> "Norm":
        """Accept ``Linf``/``linf``/``inf`` and ``L2``/``l2``/``2`` (case-insensitive)."""
        if isinstance(value, Norm):
            return value
        key = str(value).strip().lower()
        aliases = {"linf": cls.LINF, "inf": cls.LINF, "l_inf": cls.LINF,
                   "l2": cls.L2, "2": cls.L2}
        if key not in aliases:
            raise ValueError(f"unknown norm {value!r}; known norms: linf (Linf), l2 (L2)")
        return aliases[key]


def parse_eps(value: "str | float | int") -> float:
    """A budget from a number or a string such as ``"8/255"``, ``"0.5"`` or ``"1e-2"``.

    Raises:
        ValueError: unparsable, negative or non-finite budgets.
    """
    if isinstance(value, bool):
        raise ValueError(f"eps must be a number or a fraction string, not {value!r}")
    if isinstance(value, (int, float)):
        eps = float(value)
    else:
        text = str(value).strip()
        try:
            if "/" in text:
                num, den = text.split("/", 1)
                eps = float(Fraction(num.strip()) / Fraction(den.strip()))
            else:
                eps = float(text)
        except (ValueError, ZeroDivisionError):
            raise ValueError(f"cannot parse eps {value!r}; write a number (0.5) or a "
                             "fraction (8/255)") from None
    if not math.isfinite(eps):
        raise ValueError(f"eps {value!r} must be finite")
    if eps < 0:
        raise ValueError(f"eps {value!r} must be >= 0")
    return eps


def _mix(seed: int, example_id: int, restart: int) -> int:
    """A 63-bit seed from (seed, example, restart) by splitmix64, so nearby ids give
    unrelated streams."""
    z = (seed * 0x9E3779B97F4A7C15 + example_id * 0xBF58476D1CE4E5B9
         + restart * 0x94D049BB133111EB + 0x632BE59BD9B4E5B) & 0xFFFFFFFFFFFFFFFF
    for shift, mul in ((30, 0xBF58476D1CE4E5B9), (27, 0x94D049BB133111EB)):
        z ^= z >> shift
        z = (z * mul) & 0xFFFFFFFFFFFFFFFF
    z ^= z >> 31
    return z & 0x7FFFFFFFFFFFFFFF


def per_example_noise(shape: tuple[int, ...], example_ids: torch.Tensor, restart: int,
                      seed: int, kind: str = "uniform") -> torch.Tensor:
    """Noise of ``shape`` (N, ...) whose row i depends only on (seed, example_ids[i],
    restart): uniform in [-1, 1] or standard normal.  Drawn on the CPU (the same numbers
    on every device)."""
    out = torch.empty(shape, dtype=torch.float32)
    gen = torch.Generator()
    for i, eid in enumerate(example_ids.tolist()):
        gen.manual_seed(_mix(int(seed), int(eid), int(restart)))
        if kind == "uniform":
            out[i].uniform_(-1.0, 1.0, generator=gen)
        else:
            out[i].normal_(generator=gen)
    return out


def _flat_norm(t: torch.Tensor, norm: Norm) -> torch.Tensor:
    flat = t.reshape(t.shape[0], -1)
    return flat.abs().amax(1) if norm is Norm.LINF else flat.norm(dim=1)


def _col(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A per-row (N,) tensor shaped to broadcast against ``like`` (N, ...)."""
    return v.view(-1, *([1] * (like.dim() - 1)))


def project_rows(norm: Norm, x_adv: torch.Tensor, x: torch.Tensor,
                 eps: torch.Tensor) -> torch.Tensor:
    """:meth:`Threat.project` with a radius per row (``eps`` (N,), best float64: it is
    rounded to ``x_adv``'s dtype as the scalar is).  Bit-for-bit the same arithmetic as
    the scalar version (``s / t`` is ``t.reciprocal() * s`` in PyTorch), so a row gets
    the same point whichever way it is projected."""
    delta = x_adv - x
    e = _col(eps.to(delta.device, delta.dtype), delta)
    if norm is Norm.LINF:
        delta = torch.clamp(delta, -e, e)
    else:
        n = _col(_flat_norm(delta, Norm.L2), delta)
        delta = delta * torch.clamp((n + GRAD_TINY).reciprocal() * e, max=1.0)
    return (x + delta).clamp(0.0, 1.0)


def random_start_rows(norm: Norm, x: torch.Tensor, example_ids: torch.Tensor, restart: int,
                      seed: int, eps: torch.Tensor) -> torch.Tensor:
    """:meth:`Threat.random_start` with a radius per row (``eps`` (N,) float64 on the CPU,
    the exact budgets): row i is the start that a separate run at budget ``eps[i]`` draws
    for that example, bit for bit."""
    shape = tuple(x.shape)
    eps32 = eps.to(torch.float32)  # float32 noise times a scalar rounds the scalar so
    if norm is Norm.LINF:
        noise = per_example_noise(shape, example_ids, restart, seed, "uniform")
        delta = noise * _col(eps32, noise)
    else:
        g = per_example_noise(shape, example_ids, restart, seed, "normal")
        d = g[0].numel()
        u = per_example_noise((shape[0], 1), example_ids, restart + 1_000_003, seed)
        r = ((u.view(-1) + 1) / 2).clamp_min(1e-12) ** (1.0 / d) * eps32
        n = _flat_norm(g, Norm.L2).view(-1, *([1] * (g.dim() - 1)))
        delta = g / (n + GRAD_TINY) * r.view(-1, *([1] * (g.dim() - 1)))
    return project_rows(norm, x + delta.to(x.device, x.dtype), x, eps)


@dataclass(frozen=True)
class Threat:
    """A norm ball of radius ``eps`` intersected with [0, 1].

    Attributes:
        norm: :class:`Norm` (strings are parsed).
        eps: radius in pixel units of [0, 1] images (strings such as "8/255" are parsed).
    """

    norm: Norm
    eps: float

    def __post_init__(self) -> None:
        object.__setattr__(self, "norm", Norm.parse(self.norm))
        object.__setattr__(self, "eps", parse_eps(self.eps))

    def with_eps(self, eps: "float | str") -> "Threat":
        return Threat(self.norm, eps)

    def size(self, delta: torch.Tensor) -> torch.Tensor:
        """Per-example norm of ``delta`` (N, ...) -> (N,)."""
        return _flat_norm(delta, self.norm)

    def project(self, x_adv: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Nearest point (per example) of the ball around ``x``, then the [0, 1] box.

        Clipping to the box after the ball keeps the norm bound: each coordinate of the
        clipped delta moves towards 0 because ``x`` itself lies in [0, 1]."""
        delta = x_adv - x
        if self.norm is Norm.LINF:
            delta = delta.clamp(-self.eps, self.eps)
        else:
            n = _flat_norm(delta, Norm.L2).view(-1, *([1] * (delta.dim() - 1)))
            delta = delta * torch.clamp(self.eps / (n + GRAD_TINY), max=1.0)
        return (x + delta).clamp(0.0, 1.0)

    def direction(self, grad: torch.Tensor) -> torch.Tensor:
        """Steepest-ascent direction of unit norm: sign(g) or g / (||g|| + 1e-12)."""
        if self.norm is Norm.LINF:
            return grad.sign()
        n = _flat_norm(grad, Norm.L2).view(-1, *([1] * (grad.dim() - 1)))
        return grad / (n + GRAD_TINY)

    def random_start(self, x: torch.Tensor, example_ids: torch.Tensor, restart: int,
                     seed: int) -> torch.Tensor:
        """A uniform random point of the ball (L-inf cube / L2 ball) around ``x``,
        projected into [0, 1]; per-example reproducible (see the module docstring)."""
        shape = tuple(x.shape)
        if self.norm is Norm.LINF:
            delta = per_example_noise(shape, example_ids, restart, seed, "uniform") * self.eps
        else:
            g = per_example_noise(shape, example_ids, restart, seed, "normal")
            d = g[0].numel()
            # radius ~ eps * U^(1/d): uniform in the ball; U from the same per-example stream
            # would couple it to g, so derive it from a second restart slot.
            u = per_example_noise((shape[0], 1), example_ids, restart + 1_000_003, seed)
            r = ((u.view(-1) + 1) / 2).clamp_min(1e-12) ** (1.0 / d) * self.eps
            n = _flat_norm(g, Norm.L2).view(-1, *([1] * (g.dim() - 1)))
            delta = g / (n + GRAD_TINY) * r.view(-1, *([1] * (g.dim() - 1)))
        return self.project(x + delta.to(x.device, x.dtype), x)

    def contains(self, x_adv: torch.Tensor, x: torch.Tensor, tol: float = 1e-6) -> bool:
        """True if every ``x_adv`` is within ``eps + tol`` of ``x`` and inside [0, 1]."""
        in_box = bool((x_adv >= -tol).all() and (x_adv <= 1 + tol).all())
        return in_box and bool((self.size(x_adv - x) <= self.eps + tol).all())

    def __str__(self) -> str:
        return f"{self.norm.value} eps={self.eps:g}"
