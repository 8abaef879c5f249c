"""Gradient indicators along PGD trajectories, softmax entropy and loss landscapes.

The paper logged, per PGD iteration on the cross-entropy input gradient g: the mean
||g||_2 (AGN), the cosine of g_t to g_{t-1} per sample, their sign consistency, the
within-batch direction dispersion (1 - mean cosine to the batch-mean direction) and the
dispersion of the batch-mean direction over steps.  Its script saved only the last
batch; here every statistic is aggregated over *all* batches, weighted by batch size.

g is the gradient of the *summed* CE, i.e. each example's own gradient (the paper's
mean-reduced loss adds a 1/B factor).  A vanishing-gradient check is measured at the
random start and along the path, not only at the clean point: about 40% of clean points
of a confident digits model have ||g|| < 1e-6 (softmax saturation) and still fall to PGD
(method.md), so a clean-point check would flag every confident model.
"""
from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from aerl_ray.attacks.pgd import pgd_core
from aerl_ray.attacks.threat import Threat

SMALL_GRAD = 1e-6


def _unit(v: torch.Tensor) -> torch.Tensor:
    return v / (v.norm(dim=-1, keepdim=True) + 1e-30)


class TrajectoryStats:
    """A :class:`~aerl_ray.attacks.pgd.GradRecorder` accumulating the indicators.

    Per step t it keeps example-weighted sums (so the final means are over all examples
    of all batches); per batch it keeps what needs the whole trajectory (the batch-mean
    direction over steps; whether an example's gradient was ever finite/large).
    """

    def __init__(self) -> None:
        self.sums: dict[int, dict[str, float]] = defaultdict(lambda: defaultdict(float))
        self.n_examples = 0
        self.small_at_start = 0
        self.small_all_path = 0
        self.nonfinite_any = 0
        self.mean_dir_disp_sum = 0.0
        self.mean_dir_disp_weight = 0
        self._reset_batch(0)

    def _reset_batch(self, n: int) -> None:
        self._n = n
        self._prev: torch.Tensor | None = None
        self._mean_dirs: list[torch.Tensor] = []
        self._always_small = torch.ones(n, dtype=torch.bool)
        self._nonfinite = torch.zeros(n, dtype=torch.bool)

    def start_batch(self, n: int) -> None:
        self._reset_batch(n)

    def record(self, step: int, grad: torch.Tensor) -> None:
        g = grad.detach().reshape(len(grad), -1).double().cpu()
        finite = torch.isfinite(g).all(1)
        g = torch.where(finite[:, None], g, torch.zeros_like(g))
        norms = g.norm(dim=1)
        n = len(g)
        s = self.sums[step]
        s["n"] += n
        s["agn"] += float(norms.sum())
        s["frac_small_grad"] += float((norms < SMALL_GRAD).sum())
        s["frac_nonfinite_grad"] += float((~finite).sum())
        u = _unit(g)
        mean_dir = _unit(g.mean(0))
        s["dispersion"] += float((1 - u @ mean_dir).sum())
        if self._prev is not None:
            s["n_prev"] += n
            s["cos_prev"] += float((u * _unit(self._prev)).sum(1).sum())
            s["sign_consistency"] += float((g.sign() == self._prev.sign()).double()
                                           .mean(1).sum())
        if step == 0:
            self.small_at_start += int((norms < SMALL_GRAD).sum())
        self._always_small &= norms < SMALL_GRAD
        self._nonfinite |= ~finite
        self._prev = g
        self._mean_dirs.append(mean_dir)

    def end_batch(self) -> None:
        self.n_examples += self._n
        self.small_all_path += int(self._always_small.sum())
        self.nonfinite_any += int(self._nonfinite.sum())
        if len(self._mean_dirs) >= 2:
            d = torch.stack(self._mean_dirs)
            cos = d @ d.T
            k = len(d)
            mean_pair = float((cos.sum() - cos.diagonal().sum()) / (k * (k - 1)))
            self.mean_dir_disp_sum += (1 - mean_pair) * self._n
            self.mean_dir_disp_weight += self._n

    def per_step(self) -> dict[str, list[float]]:
        """Indicator -> list over steps (nan where undefined, e.g. cos_prev at step 0)."""
        out: dict[str, list[float]] = defaultdict(list)
        for t in sorted(self.sums):
            s = self.sums[t]
            out["agn"].append(s["agn"] / s["n"])
            out["dispersion"].append(s["dispersion"] / s["n"])
            out["frac_small_grad"].append(s["frac_small_grad"] / s["n"])
            out["frac_nonfinite_grad"].append(s["frac_nonfinite_grad"] / s["n"])
            for k in ("cos_prev", "sign_consistency"):
                out[k].append(s[k] / s["n_prev"] if s["n_prev"] else math.nan)
        return dict(out)

    def aggregate(self) -> dict[str, float]:
        """Trajectory aggregates (means over steps of the per-step values) and fractions."""
        agg = {k: _nanmean(v) for k, v in self.per_step().items()}
        n = max(self.n_examples, 1)
        agg.update(
            mean_dir_dispersion=(self.mean_dir_disp_sum / self.mean_dir_disp_weight
                                 if self.mean_dir_disp_weight else math.nan),
            frac_small_grad_start=self.small_at_start / n,
            frac_small_grad_path=self.small_all_path / n,
            frac_nonfinite_grad=self.nonfinite_any / n,
        )
        return agg


def _nanmean(v: Sequence[float]) -> float:
    vals = [x for x in v if not math.isnan(x)]
    return sum(vals) / len(vals) if vals else math.nan


@torch.no_grad()
def softmax_entropy(model: nn.Module, x: torch.Tensor, batch_size: int = 1000) -> torch.Tensor:
    """Per-example entropy (nats) of the model's softmax."""
    out = []
    for b in range(0, len(x), batch_size):
        logp = F.log_softmax(model(x[b:b + batch_size]).double(), 1)
        out.append(-(logp.exp() * logp).sum(1))
    return torch.cat(out).float().cpu()


def clean_grad_norms(model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                     batch_size: int = 500) -> torch.Tensor:
    """||grad_x CE(f(x), y)|| per example at the clean points (summed CE)."""
    out = []
    for b in range(0, len(x), batch_size):
        xb = x[b:b + batch_size].detach().requires_grad_(True)
        with torch.enable_grad():
            loss = F.cross_entropy(model(xb), y[b:b + batch_size], reduction="sum")
            g, = torch.autograd.grad(loss, xb)
        out.append(g.reshape(len(g), -1).norm(dim=1).cpu())
    return torch.cat(out)


@dataclass
class IndicatorReport:
    """Indicators of one PGD run: per-step curves, aggregates and the adversarial points."""

    threat: Threat
    per_step: dict[str, list[float]]
    aggregate: dict[str, float]
    x_adv: torch.Tensor = field(repr=False)

    def rows(self) -> list[dict]:
        """Long format (indicator, step, value); step -1 = aggregate (INDICATOR_COLUMNS)."""
        base = {"norm": self.threat.norm.value, "eps": self.threat.eps}
        rows = [{**base, "indicator": k, "step": -1, "value": float(v)}
                for k, v in sorted(self.aggregate.items())]
        for k, vals in sorted(self.per_step.items()):
            rows += [{**base, "indicator": k, "step": t, "value": float(v)}
                     for t, v in enumerate(vals)]
        return rows


def measure_indicators(model: nn.Module, x: torch.Tensor, y: torch.Tensor, threat: Threat, *,
                       steps: int = 20, step_size: float | None = None, seed: int = 0,
                       batch_size: int = 500,
                       example_ids: torch.Tensor | None = None) -> IndicatorReport:
    """Run CE-PGD from a random start without early stop and collect the indicators,
    plus clean/adversarial softmax entropy and the clean-point small-gradient fraction
    (reported separately: it is expected to be high for confident models)."""
    if threat.eps <= 0:
        raise ValueError("indicators need eps > 0 (a PGD trajectory)")
    was_training = model.training
    model.eval()
    try:
        rec = TrajectoryStats()
        x_adv, fooled, _ = pgd_core(model, x, y, threat, steps=steps,
                                    step_size=step_size,
                                    seed=seed, example_ids=example_ids, early_stop=False,
                                    batch_size=batch_size, recorder=rec)
        agg = rec.aggregate()
        ent_clean, ent_adv = softmax_entropy(model, x), softmax_entropy(model, x_adv)
        agg.update(entropy_clean=float(ent_clean.mean()), entropy_adv=float(ent_adv.mean()),
                   frac_small_grad_clean=float((clean_grad_norms(model, x, y, batch_size)
                                                < SMALL_GRAD).float().mean()),
                   pgd_success=float(fooled.float().mean()))
    finally:
        model.train(was_training)
    return IndicatorReport(threat, rec.per_step(), agg, x_adv)


# --- loss landscape -----------------------------------------------------------------------
@torch.no_grad()
def loss_landscape(model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                   direction: torch.Tensor, *, radius: float, points: int = 21,
                   second: torch.Tensor | None = None) -> dict:
    """Mean CE on a 1-D line ``x + a d`` or a 2-D plane ``x + a d + b e`` (|a|, |b| <=
    radius), with per-example directions normalised to unit norm of the threat's kind
    left to the caller.  Points are clipped to [0, 1]."""
    alphas = torch.linspace(-radius, radius, points)
    betas = alphas if second is not None else torch.zeros(1)
    grid = torch.empty(len(betas), len(alphas))
    for j, b in enumerate(betas):
        for i, a in enumerate(alphas):
            xp = x + a * direction
            if second is not None:
                xp = xp + b * second
            grid[j, i] = F.cross_entropy(model(xp.clamp(0, 1)), y).item()
    return {"alphas": alphas.tolist(), "betas": betas.tolist() if second is not None else [],
            "loss": grid.tolist() if second is not None else grid[0].tolist()}


def adversarial_landscape(model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                          x_adv: torch.Tensor, *, points: int = 21, two_d: bool = False,
                          seed: int = 0) -> dict:
    """Landscape along the adversarial direction (x_adv - x, scaled to radius 1 = the
    attack's perturbation) and optionally an orthogonal random direction of equal size."""
    d = x_adv - x
    data = {"kind": "2d" if two_d else "1d"}
    second = None
    if two_d:
        g = torch.Generator().manual_seed(seed)
        r = torch.randn(d.shape, generator=g).to(d)
        flat_d, flat_r = d.reshape(len(d), -1), r.reshape(len(r), -1)
        proj = (flat_r * flat_d).sum(1, keepdim=True) / (flat_d.pow(2).sum(1, keepdim=True)
                                                         + 1e-30)
        flat_r = flat_r - proj * flat_d
        flat_r = flat_r * (flat_d.norm(dim=1, keepdim=True) / (flat_r.norm(dim=1, keepdim=True)
                                                               + 1e-30))
        second = flat_r.view_as(d)
    data.update(loss_landscape(model, x, y, d, radius=2.0, points=points, second=second))
    return data


def save_landscape_png(data: dict, path: str | Path, title: str = "") -> Path:
    """Plot a landscape dict (1-D curve or 2-D contour) to a PNG (matplotlib Agg)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 4))
    if data["betas"]:
        cs = ax.contourf(data["alphas"], data["betas"], data["loss"], levels=20)
        fig.colorbar(cs, ax=ax, label="mean CE")
        ax.set_ylabel("random orthogonal direction")
    else:
        ax.plot(data["alphas"], data["loss"])
        ax.set_ylabel("mean CE")
    ax.axvline(1.0, color="grey", lw=0.8, ls="--")
    ax.set_xlabel("adversarial direction (1 = attack's perturbation)")
    ax.set_title(title)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
