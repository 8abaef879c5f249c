"""Gradient-masking diagnostics: does a robust-accuracy number deserve trust?

Every evaluated checkpoint gets a set of automatable checks (robustness-eval.md §2;
Athalye et al. 2018, Carlini et al. 2019, Tramer et al. 2020, Pintor et al. 2022), each
reported as ``{"value", "reference", "delta", "flag", "detail", ...}`` under the key
``<check>/<norm>`` (``attack_flags`` is norm-free).  A checkpoint is
``masking_suspected`` when any check flags.

========================== ===============================================================
check                      flags when (acc = robust accuracy at the headline budget)
========================== ===============================================================
one_step_beats_iterative   acc(FGSM) < acc(PGD) - delta
black_box_beats_white_box  acc(Square or transfer) < min white-box acc - delta
unbounded_not_broken       PGD with the whole [0,1] box as budget (from the clean point)
                           breaks < 1 - delta of the correctly classified points
eps0_not_clean             acc at eps = 0 differs from clean accuracy (exact)
non_monotone_eps           separate (not running-minimum) PGD runs: acc(eps_k+1) >
                           acc(eps_k) + delta
not_converged              PGD with more steps (and restarts, ``full``) < acc(PGD) - delta
loss_choice_matters        PGD-margin or PGD-DLR < acc(PGD with the plan's loss) - delta
temperature_sensitive      PGD on logits / T, T in {10, 100, 1000} (same predictions)
                           < acc(PGD) - delta (only a *drop* means the evaluation over-
                           estimated; the largest change either way is in the detail)
vanishing_gradients        fraction of examples whose loss input-gradient is non-finite
                           somewhere, or ||g|| < 1e-6 at every point of a PGD path from
                           the random start, *and* that stay correctly classified; flags
                           when any gradient is non-finite, when exactly-zero gradients
                           exceed delta, or when the fraction exceeds delta and the share of
                           examples among them that fall to another diagnostic attack
                           exceeds delta too (tiny non-zero gradients still move signed
                           steps: alone they are no evidence).
                           Measured past the clean point: ~40% of clean digits points of
                           a confident model have ||g|| < 1e-6 (method.md) and still fall.
attack_flags               any attack raised a flag (AutoAttack's own checks)
========================== ===============================================================

``delta`` is the larger of 0.5 points and the largest half-width of the 95% Wilson
intervals of the proportions compared (so a flag is never a sampling fluke at the
subset size used).

Numbers already in the evaluation's rows are reused (FGSM, PGD, Square, transfer,
AutoAttack at the headline budget, the eps = 0 rows); the extra attacks run on the first
``n`` examples (64 ``cheap``, 256 ``full``) at the headline budget of each norm (the
plan's indicator budget: the grid's middle non-zero budget).
"""
from __future__ import annotations

import inspect
import json
import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping, Sequence

import torch
from torch import nn

from aerl_ray.attacks import ATTACKS, LOSSES, Norm, Threat, parse_eps, predict, run_attack
from aerl_ray.evalplan import DIAGNOSTIC_LEVELS as LEVELS
from aerl_ray.results import wilson_interval

logger = logging.getLogger(__name__)

SMALL_GRAD = 1e-6
MIN_DELTA = 0.005
WHITE_BOX = ("pgd", "fgsm", "autoattack")
BLACK_BOX = ("square", "transfer")

DIAGNOSTIC_COLUMNS: dict[str, str] = {
    "run_id": "sweep run id", "trial_id": "Tune trial id", "checkpoint": "checkpoint path",
    "check": "diagnostic name (see aerl_ray.diagnostics)", "norm": "Linf, L2 or '' ",
    "eps": "budget the check ran at (nan if none)", "level": "cheap or full",
    "value": "measured value (an accuracy, success rate or fraction)",
    "reference": "what the value is compared with", "delta": "tolerance used",
    "flag": "True if the check suggests gradient masking", "detail": "explanation",
    "n": "examples the value is measured on",
}


@dataclass(frozen=True)
class Level:
    """Settings of a diagnostics level."""

    n: int  # examples of the extra attacks
    steps_factor: int  # convergence check: steps x factor
    restarts: int  # convergence check: restarts
    unbounded_steps: int
    square_queries: int  # only when the plan has no black-box attack
    probe_steps: int  # gradient probe path length
    max_budgets: int  # separate runs of the monotonicity check (0 = every grid budget)
    temperatures: tuple[float, ...] = (10.0, 100.0, 1000.0)


LEVEL_SETTINGS = {
    "cheap": Level(n=64, steps_factor=4, restarts=1, unbounded_steps=50, square_queries=300,
                   probe_steps=10, max_budgets=3),
    "full": Level(n=256, steps_factor=10, restarts=5, unbounded_steps=200,
                  square_queries=2000, probe_steps=20, max_budgets=0),
}


def check_level(level: str) -> str:
    if level not in LEVELS:
        raise ValueError(f"diagnostics level {level!r}; known: {', '.join(LEVELS)}")
    return level


def delta(*measured: tuple[float, int]) -> float:
    """max(0.5 points, largest half-width of the 95% Wilson intervals of (p, n) pairs)."""
    d = MIN_DELTA
    for p, n in measured:
        if n and p is not None and math.isfinite(p):
            lo, hi = wilson_interval(round(p * n), int(n))
            d = max(d, (hi - lo) / 2)
    return d


def _entry(value: Any, reference: Any, dlt: float, flag: bool, detail: str,
           **extra: Any) -> dict:
    return {"value": value, "reference": reference, "delta": dlt, "flag": bool(flag),
            "detail": detail, **extra}


class LogitScale(nn.Module):
    """``model(x) / temperature``: the same predictions, a different softmax scale."""

    def __init__(self, model: nn.Module, temperature: float):
        super().__init__()
        self.model = model
        self.temperature = float(temperature)
        self.train(model.training)  # a new Module is in training mode: follow the model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x) / self.temperature


@dataclass
class DiagnosticsReport:
    """The checks of one checkpoint; ``checks`` is what the sweep stores as JSON."""

    level: str
    checks: dict[str, dict] = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def masking_suspected(self) -> bool:
        return any(c["flag"] for c in self.checks.values())

    @property
    def flagged(self) -> list[str]:
        return [k for k, c in self.checks.items() if c["flag"]]

    def to_dict(self) -> dict[str, dict]:
        return {k: {**c, "level": self.level} for k, c in self.checks.items()}

    def rows(self, **base: Any) -> list[dict]:
        """One row per check (DIAGNOSTIC_COLUMNS) for ``diagnostics.parquet``."""
        out = []
        for k, c in self.checks.items():
            name, _, norm = k.partition("/")
            out.append({**base, "check": name, "norm": norm,
                        "eps": float(c.get("eps", math.nan)), "level": self.level,
                        "value": _num(c["value"]), "reference": _num(c["reference"]),
                        "delta": float(c["delta"]), "flag": bool(c["flag"]),
                        "detail": str(c["detail"]), "n": int(c.get("n", 0))})
        return out

    def format_table(self) -> str:
        lines = [(f"diagnostics ({self.level}, {self.seconds:.1f} s): masking suspected: "
                  f"{'YES' if self.masking_suspected else 'no'}"),
                 f"{'check':<36}{'value':>9}{'ref':>9}{'delta':>8}  flag  detail"]
        for k, c in self.checks.items():
            lines.append(f"{k:<36}{_fmt(c['value']):>9}{_fmt(c['reference']):>9}"
                         f"{c['delta']:>8.3f}  {'FLAG' if c['flag'] else '  - '}  "
                         f"{c['detail']}")
        return "\n".join(lines)


def _num(v: Any) -> float:
    try:
        return float(v)
    except (TypeError, ValueError):
        return math.nan


def _fmt(v: Any) -> str:
    return f"{v:.3f}" if isinstance(v, (int, float)) and v is not None else "-"


def _pgd_defaults() -> dict[str, Any]:
    sig = inspect.signature(ATTACKS.get("pgd").fn)
    return {k: p.default for k, p in sig.parameters.items()
            if p.default is not inspect.Parameter.empty and k != "example_ids"}


def _rows_at(rows: Iterable[Mapping], norm: str, eps: float) -> dict[str, Mapping]:
    """attack label -> eval row at (norm, eps)."""
    return {r["attack"]: r for r in rows
            if r["norm"] == norm and abs(float(r["eps"]) - eps) < 1e-9}


class _Runner:
    """The extra attacks of one norm on the diagnostic subset (results memoised)."""

    def __init__(self, model, x, y, ids, norm: Norm, pgd_params: dict, batch_size: int):
        self.model, self.x, self.y, self.ids = model, x, y, ids
        self.norm, self.base, self.batch_size = norm, pgd_params, batch_size
        self._memo: dict[str, float] = {}
        self.success: dict[str, torch.Tensor] = {}  # key -> per-example success (CPU)

    def acc(self, key: str, name: str, eps: float, model: nn.Module | None = None,
            x=None, y=None, ids=None, **override: Any) -> float:
        if key not in self._memo:
            params = ({**self.base, **override} if name == "pgd" else override)
            x = self.x if x is None else x
            r = run_attack(name, model or self.model, x, self.y if y is None else y,
                           Threat(self.norm, eps),
                           example_ids=self.ids if ids is None else ids, **params)
            self._memo[key] = r.robust_acc
            if x is self.x:
                self.success[key] = r.success.cpu()
        return self._memo[key]


def run_diagnostics(model: nn.Module, x: torch.Tensor, y: torch.Tensor, plan, *,
                    level: str = "cheap", eval_rows: Sequence[Mapping] = (),
                    n: int = 0) -> DiagnosticsReport:
    """Run the diagnostics of ``level`` for every norm of ``plan`` (an EvalPlan).

    Args:
        model: the evaluated model (logits out; run in eval mode, its mode is restored).
        x, y: the evaluation's examples (the diagnostic subset is their first ``n``).
        plan: the :class:`~aerl_ray.evalplan.EvalPlan` (grids, seed, PGD settings).
        level: ``cheap`` or ``full`` (``off`` returns an empty report).
        eval_rows: the evaluation's rows of this checkpoint (reused where possible).
        n: subset size (0 = the level's default), capped at ``len(x)``.
    """
    check_level(level)
    rep = DiagnosticsReport(level)
    if level == "off":
        return rep
    t0 = time.perf_counter()
    was_training = model.training
    model.eval()
    try:
        _run_all(rep, model, x, y, plan, eval_rows, n)
    finally:
        model.train(was_training)
    rep.seconds = time.perf_counter() - t0
    logger.info("diagnostics (%s) in %.1f s; flagged: %s", level, rep.seconds,
                rep.flagged or "none")
    return rep


def _run_all(rep: DiagnosticsReport, model: nn.Module, x: torch.Tensor, y: torch.Tensor,
             plan, eval_rows: Sequence[Mapping], n: int) -> None:
    cfg = LEVEL_SETTINGS[rep.level]
    m = min(n or cfg.n, len(x))
    xs, ys, ids = x[:m], y[:m], torch.arange(m)
    pgd_params = {**_pgd_defaults(), **plan.params_for("pgd")}
    for nrm, grid in plan.grids:
        norm = Norm.parse(nrm)
        eps_str = plan.indicator_budget(norm.value)
        if eps_str is None:
            logger.info("diagnostics: no non-zero %s budget; skipped", norm.value)
            continue
        eps = parse_eps(eps_str)
        run = _Runner(model, xs, ys, ids, norm, pgd_params, plan.batch_size)
        rows = _rows_at(eval_rows, norm.value, eps)
        checks = _norm_checks(run, model, xs, ys, ids, norm, eps, grid, rows, eval_rows,
                              cfg, plan)
        for name, c in checks.items():
            rep.checks[f"{name}/{norm.value}"] = {**c, "eps": eps,
                                                  "eps_str": str(eps_str)}
    flags = sorted({f for r in eval_rows for f in json.loads(r.get("flags") or "[]")})
    rep.checks["attack_flags"] = _entry(len(flags), 0, 0.0, bool(flags),
                                        "; ".join(flags) or "no attack raised a flag",
                                        n=0)


def _norm_checks(run: _Runner, model, xs, ys, ids, norm: Norm, eps: float,
                 grid: Sequence[str], rows: Mapping[str, Mapping],
                 eval_rows: Sequence[Mapping], cfg: Level, plan) -> dict[str, dict]:
    m = len(xs)
    out: dict[str, dict] = {}
    base_loss = run.base.get("loss", "ce")
    pgd = run.acc("pgd", "pgd", eps)
    white = {"pgd": pgd}  # the evaluation's white-box attacks (not the diagnostic variants)

    # 1. one step beats iterative
    if "fgsm" in rows and "pgd" in rows:
        a, b = rows["fgsm"], rows["pgd"]
        fg, pg, nf, npg, src = a["robust_acc"], b["robust_acc"], a["n"], b["n"], "eval rows"
    else:
        fg = run.acc("fgsm", "fgsm", eps, loss=base_loss, batch_size=plan.batch_size)
        pg, nf, npg, src = pgd, m, m, "subset"
        white["fgsm"] = fg
    d = delta((fg, nf), (pg, npg))
    out["one_step_beats_iterative"] = _entry(
        fg, pg, d, fg < pg - d, f"FGSM {fg:.3f} vs PGD {pg:.3f} ({src})", n=nf)

    # 5. convergence: more steps (and restarts)
    steps = int(run.base.get("steps", 50))
    more = {"steps": steps * cfg.steps_factor,
            "restarts": max(cfg.restarts, int(run.base.get("restarts", 1)))}
    strong = run.acc("more", "pgd", eps, **more)
    d = delta((strong, m), (pgd, m))
    out["not_converged"] = _entry(
        strong, pgd, d, strong < pgd - d,
        f"PGD {more['steps']} steps x {more['restarts']} restarts {strong:.3f} vs "
        f"{steps} x {run.base.get('restarts', 1)} {pgd:.3f}", n=m)

    # 6. loss choice
    others = [lo for lo in ("ce", "margin", "dlr") if lo != base_loss and lo in LOSSES
              and not (lo == "dlr" and _num_classes(model, xs) < 3)]
    accs = {lo: run.acc(f"loss_{lo}", "pgd", eps, loss=lo) for lo in others}
    best_lo = min(accs, key=accs.get) if accs else None
    if best_lo is not None:
        v = accs[best_lo]
        d = delta((v, m), (pgd, m))
        out["loss_choice_matters"] = _entry(
            v, pgd, d, v < pgd - d, ", ".join(f"{k} {a:.3f}" for k, a in accs.items())
            + f" vs {base_loss} {pgd:.3f}", n=m)

    # 7. logit temperature
    temps = {t: run.acc(f"T{t:g}", "pgd", eps, model=LogitScale(model, t))
             for t in cfg.temperatures}
    t_min = min(temps, key=temps.get)
    v = temps[t_min]
    d = delta((v, m), (pgd, m))
    change = max(abs(a - pgd) for a in temps.values())
    out["temperature_sensitive"] = _entry(
        v, pgd, d, v < pgd - d, ", ".join(f"T={t:g} {a:.3f}" for t, a in temps.items())
        + f" vs T=1 {pgd:.3f} (max change {change:.3f})", n=m)

    # 2. black box beats white box: the eval rows (transfer/square vs pgd/fgsm/autoattack)
    # and, unless the plan ran Square, a Square run on the subset vs the subset's PGD/FGSM
    cands = []  # (black value, white value, delta, detail, n)
    bb_rows = {k: r for k, r in rows.items() if k.split(":")[0] in BLACK_BOX}
    wb_rows = {k: r for k, r in rows.items() if k.split(":")[0] in WHITE_BOX}
    if bb_rows and wb_rows:
        bk = min(bb_rows, key=lambda k: bb_rows[k]["robust_acc"])
        wk = min(wb_rows, key=lambda k: wb_rows[k]["robust_acc"])
        bv, wv = bb_rows[bk]["robust_acc"], wb_rows[wk]["robust_acc"]
        cands.append((bv, wv, delta((bv, bb_rows[bk]["n"]), (wv, wb_rows[wk]["n"])),
                      f"{bk} {bv:.3f} vs {wk} {wv:.3f} (eval rows)", int(bb_rows[bk]["n"])))
    skipped = ""
    if "square" not in rows:
        try:
            bv = run.acc("square", "square", eps, n_queries=cfg.square_queries,
                         seed=plan.seed, resc_schedule=True, batch_size=plan.batch_size)
            wk = min(white, key=white.get)
            wv = white[wk]
            cands.append((bv, wv, delta((bv, m), (wv, m)),
                          (f"square({cfg.square_queries} queries) {bv:.3f} vs {wk} "
                           f"{wv:.3f} (subset)"), m))
        except ImportError as e:
            skipped = f"square skipped: {e}"
    if cands:
        bv, wv, d, _, nb = max(cands, key=lambda c: c[1] - c[0] - c[2])
        out["black_box_beats_white_box"] = _entry(
            bv, wv, d, any(c[0] < c[1] - c[2] for c in cands),
            "; ".join([c[3] for c in cands] + ([skipped] if skipped else [])), n=nb)

    # 3. unbounded attack
    ok = predict(model, xs, plan.batch_size) == ys
    k = int(ok.sum())
    if k:
        big = 1.0 if norm is Norm.LINF else math.sqrt(xs[0].numel())
        r = run_attack("pgd", model, xs[ok], ys[ok], Threat(norm, big),
                       example_ids=ids[ok.cpu()],
                       **{**run.base, "steps": cfg.unbounded_steps, "step_size": None,
                          "restarts": 1, "random_start": False})
        succ = float(r.success.float().mean())
        d = delta((succ, k))
        out["unbounded_not_broken"] = _entry(
            succ, 1.0, d, succ < 1.0 - d,
            f"PGD-{cfg.unbounded_steps} eps={big:.3g} (whole box) broke {succ:.3f} of {k} "
            f"correct points", n=k)

    # 4. eps = 0 and monotonicity (separate runs, no running minimum)
    zero = [r for r in eval_rows if r["norm"] == norm.value and float(r["eps"]) == 0.0]
    if zero:
        bad = [r["attack"] for r in zero if abs(r["robust_acc"] - r["clean_acc"]) > 1e-9]
        r0 = zero[0]
        out["eps0_not_clean"] = _entry(
            r0["robust_acc"], r0["clean_acc"], 0.0, bool(bad),
            f"eps=0 accuracy differs from clean for {bad}" if bad
            else "eps=0 accuracy equals clean accuracy for every attack", n=int(r0["n"]))
    budgets = sorted({parse_eps(e) for e in grid if parse_eps(e) > 0})
    if cfg.max_budgets and len(budgets) > cfg.max_budgets:
        budgets = sorted({budgets[0], eps, budgets[-1]})
    accs_eps = [(e, pgd if abs(e - eps) < 1e-12 else run.acc(f"eps{e!r}", "pgd", e))
                for e in budgets]
    worst, wd = 0.0, MIN_DELTA
    for (e1, a1), (e2, a2) in zip(accs_eps, accs_eps[1:]):
        dd = delta((a1, m), (a2, m))
        if a2 - a1 - dd > worst - wd:
            worst, wd = a2 - a1, dd
    out["non_monotone_eps"] = _entry(
        worst, 0.0, wd, worst > wd,
        "separate PGD runs: " + ", ".join(f"{e:.4g}: {a:.3f}" for e, a in accs_eps), n=m)

    # 8. vanishing / non-finite gradients past the clean point
    stuck, zero, start_small, clean_small, nonfinite, mask = _gradient_probe(
        model, xs, ys, ids, Threat(norm, eps), base_loss, cfg.probe_steps, plan.seed,
        plan.batch_size)
    d = delta((stuck, m), (pgd, m))
    others = [k for k in run.success if k != "pgd" and not k.startswith("eps")]
    hidden = torch.zeros(m, dtype=torch.bool)
    for k in others:
        hidden |= run.success[k]
    n_stuck, n_hidden = int(mask.sum()), int((mask & hidden).sum())
    # Tiny but non-zero gradients still move signed (Linf) steps and are common in
    # confident models; they are masking evidence only if the stuck examples are in fact
    # breakable.  Exactly zero or non-finite gradients stop any gradient attack outright.
    hidden_frac = n_hidden / m  # accuracy these stuck-but-breakable examples overstate
    flag = nonfinite > 0 or zero > d or (stuck > d and hidden_frac > delta((hidden_frac, m)))
    out["vanishing_gradients"] = _entry(
        stuck, 0.0, d, flag,
        f"{stuck:.3f} of examples stay correct with ||g||<1e-6 at every point of a "
        f"{cfg.probe_steps}-step path (or a non-finite gradient: {nonfinite:.3f}; exactly "
        f"zero all along: {zero:.3f}); small at random start {start_small:.3f}, at clean "
        f"point {clean_small:.3f}; {n_hidden} of the {n_stuck} stuck examples are broken by "
        f"the other diagnostic attacks ({', '.join(others)})", n=m, stuck_broken=n_hidden)
    return out


def _num_classes(model: nn.Module, x: torch.Tensor) -> int:
    with torch.no_grad():
        return int(model(x[:1]).shape[1])


def _gradient_probe(model: nn.Module, x: torch.Tensor, y: torch.Tensor, ids: torch.Tensor,
                    threat: Threat, loss: str, steps: int, seed: int, batch_size: int
                    ) -> tuple[float, float, float, float, float, torch.Tensor]:
    """PGD-like path from the random start (no early stop) recording each example's loss
    input-gradient.  Returns fractions of examples: (unusable gradient all along the path
    -- small at every point or non-finite anywhere -- and still correct at the end;
    of those, exactly zero at every point; small at the random start; small at the clean
    point; non-finite anywhere) and the per-example mask of the first."""
    loss_fn = LOSSES.get(loss)
    alpha = 2.5 / steps * threat.eps
    was_training = model.training
    model.eval()
    stuck = zero = start_small = clean_small = nonfinite = 0
    masks = []

    def grad_of(xin: torch.Tensor, yb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        xin = xin.detach().requires_grad_(True)
        with torch.enable_grad():
            logits = model(xin)
            g, = torch.autograd.grad(loss_fn(logits, yb).sum(), xin)
        return g.reshape(len(g), -1), logits.detach()

    try:
        for b in range(0, len(x), batch_size):
            xb, yb, ib = x[b:b + batch_size], y[b:b + batch_size], ids[b:b + batch_size]
            g, _ = grad_of(xb, yb)
            clean_small += int((g.norm(dim=1) < SMALL_GRAD).sum())
            xa = threat.random_start(xb, ib, 0, seed)
            always_small = torch.ones(len(xb), dtype=torch.bool, device=xb.device)
            always_zero = always_small.clone()
            bad = torch.zeros_like(always_small)
            for t in range(steps + 1):
                g, logits = grad_of(xa, yb)
                finite = torch.isfinite(g).all(1)
                norms = torch.where(finite, g.norm(dim=1), torch.zeros_like(g[:, 0]))
                small = norms < SMALL_GRAD
                if t == 0:
                    start_small += int(small.sum())
                always_small &= small
                always_zero &= norms == 0
                bad |= ~finite
                if t == steps:
                    correct = logits.argmax(1) == yb
                    break
                g = torch.where(finite[:, None], g, torch.zeros_like(g)).view_as(xa)
                xa = threat.project(xa + alpha * threat.direction(g), xb).detach()
            stuck += int(((always_small | bad) & correct).sum())
            masks.append(((always_small | bad) & correct).cpu())
            zero += int((always_zero & ~bad & correct).sum())
            nonfinite += int(bad.sum())
    finally:
        model.train(was_training)
    n = max(len(x), 1)
    mask = torch.cat(masks) if masks else torch.zeros(0, dtype=torch.bool)
    return stuck / n, zero / n, start_small / n, clean_small / n, nonfinite / n, mask
