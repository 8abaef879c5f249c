"""Gradient-masking diagnostics: does a robust-accuracy number deserve trust?

Every evaluated checkpoint gets a set of automatable checks (robustness-eval.md §2;
Athalye et al. 2018, Carlini et al. 2019, Tramer et al. 2020, Pintor et al. 2022), each
reported as ``{"value", "reference", "delta", "flag", "detail", "eps", "kind", ...}``
under the key ``<check>/<norm>`` (``attack_flags`` is norm-free).  ``kind`` is
``masking`` (a signature of masked gradients: ``masking_suspected`` is True when one of
these flags) or ``attack`` (a finding about the evaluation's attack, not about the
model's gradients: ``attack_not_converged``).

The comparative checks (marked *) run over every budget of the grid where the plan's
PGD curve on the diagnostic subset is informative -- PGD broke some examples and left
more than ``delta`` robust, so another attack could show it is overstated; if no budget
is, the largest where PGD left examples robust (CE-PGD on masked gradients breaks
nothing anywhere) -- (``cheap``: at most 2 of them: the largest and the one nearest the
headline; the costly attacks -- the convergence check's many-step PGD and Square -- at
those 2 at either level), flag on the worst
budget and report it as the check's ``eps`` (a model with logits x10 hides 48 points at
eps = 0.2 but only 8 at the headline 0.1).

=========================== ============================================================
check                       flags when (acc = robust accuracy at a budget)
=========================== ============================================================
one_step_beats_iterative *  acc(FGSM) < acc(PGD) - delta (eval rows at every budget when
                            the plan ran FGSM, else FGSM on the subset)
black_box_beats_white_box * acc(Square or transfer) < min white-box acc - delta
unbounded_not_broken        PGD with the whole [0,1] box as budget (from the clean point)
                            breaks < 1 - delta of the correctly classified points
eps0_not_clean              each of the plan's attacks, its own function run at eps = 0
                            on a few examples (not the evaluation's short cut, which
                            returns the clean point): its output leaves the eps = 0 ball
                            or its accuracy differs from the clean accuracy (a
                            randomised model or an attack bug)
non_monotone_eps            separate (not running-minimum) PGD runs: acc(eps_k+1) >
                            acc(eps_k) + delta
attack_not_converged *      (kind ``attack``) PGD with more steps (and restarts, ``full``)
                            < acc(PGD) - delta: "attack not converged at budget eps (use
                            >= k steps x r restarts)"; the converged attack's rows are in
                            :attr:`DiagnosticsReport.attack_rows`
loss_choice_matters *       PGD-margin or PGD-DLR < acc(PGD with the plan's loss) - delta
temperature_sensitive *     PGD on logits / T, T in {10, 100, 1000} (same predictions)
                            < acc(PGD) - delta (only a *drop* means the evaluation over-
                            estimated; the largest change either way is in the detail)
vanishing_gradients         fraction of examples whose loss input-gradient is non-finite
                            somewhere, or ||g|| < 1e-6 at every point of a PGD path from
                            the random start, *and* that stay correctly classified; flags
                            when any gradient is non-finite, when exactly-zero gradients
                            exceed delta, or when the fraction exceeds delta and the share of
                            examples among them that fall to another diagnostic attack
                            exceeds delta too (tiny non-zero gradients still move signed
                            steps: alone they are no evidence).
                            Measured past the clean point: ~40% of clean digits points of
                            a confident model have ||g|| < 1e-6 (method.md) and still fall.
attack_flags                any attack raised a flag (AutoAttack's own checks)
=========================== ============================================================

``delta`` is the larger of 0.5 points and the largest half-width of the 95% Wilson
intervals of the proportions compared (so a flag is never a sampling fluke at the
subset size used).

The diagnostics' own attacks are real attacks: :attr:`DiagnosticsReport.attack_rows`
holds their results as evaluation rows (attack ``diag:<name>``, on the diagnostic
subset: the first ``n`` examples) and :attr:`DiagnosticsReport.success` their
per-example success masks with the example ids, so an evaluation can report the robust
accuracy of the strongest attack per example (in particular the converged PGD).

Before they start the diagnostics log an estimate (an upper bound on the example-passes
of the plan, times the measured cost of one) and then one progress line per stage:
``full`` on 256 examples and two norms takes minutes on 2 CPU cores.
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

from aerl_ray.attacks import (ATTACKS, LOSSES, AttackResult, Norm, Threat, parse_eps, predict,
                              robustness_curve, run_attack)
from aerl_ray.attacks.base import params_json
from aerl_ray.evalplan import DIAGNOSTIC_LEVELS as LEVELS
from aerl_ray.results import wilson_interval

logger = logging.getLogger(__name__)

SMALL_GRAD = 1e-6
MIN_DELTA = 0.005
WHITE_BOX = ("pgd", "fgsm", "autoattack")
BLACK_BOX = ("square", "transfer")
ATTACK_FINDINGS = ("attack_not_converged",)  # checks of kind "attack", not masking
DIAG_PREFIX = "diag:"  # attack label of the diagnostics' own rows

DIAGNOSTIC_COLUMNS: dict[str, str] = {
    "run_id": "sweep run id", "trial_id": "Tune trial id", "checkpoint": "checkpoint path",
    "split": "the split the diagnostics' examples come from (val or test)",
    "check": "diagnostic name (see aerl_ray.diagnostics)", "norm": "Linf, L2 or '' ",
    "eps": "budget of the check's worst comparison (nan if none)", "level": "cheap or full",
    "value": "measured value (an accuracy, success rate or fraction)",
    "reference": "what the value is compared with", "delta": "tolerance used",
    "flag": "True if the check fired",
    "kind": "masking (counts toward masking_suspected) or attack (a finding about the "
            "evaluation's attack, e.g. attack_not_converged)",
    "detail": "explanation (per budget for the comparative checks)",
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
    max_budgets: int  # budgets of the separate-run monotonicity check (0 = the grid's)
    compare_budgets: int  # budgets of the comparative checks (0 = every informative one)
    costly_budgets: int = 2  # budgets of the costly attacks: the convergence check's
    #                          many-step PGD and (if the plan has none) Square
    eps0_n: int = 16  # examples of the eps = 0 runs
    temperatures: tuple[float, ...] = (10.0, 100.0, 1000.0)


LEVEL_SETTINGS = {
    "cheap": Level(n=64, steps_factor=4, restarts=1, unbounded_steps=50, square_queries=300,
                   probe_steps=10, max_budgets=3, compare_budgets=2),
    "full": Level(n=256, steps_factor=10, restarts=5, unbounded_steps=200,
                  square_queries=2000, probe_steps=20, max_budgets=0, compare_budgets=0),
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
    """The checks of one checkpoint; ``checks`` is what the sweep stores as JSON.

    Attributes:
        level: ``off``, ``cheap`` or ``full``.
        checks: ``<check>/<norm>`` -> entry (see the module docstring).
        seconds: wall time.
        estimate_seconds: the up-front estimate logged before starting (the planned
            example-passes, an upper bound, times the measured cost of one).
        attack_rows: evaluation rows (``EVAL_COLUMNS`` minus the run/checkpoint fields,
            see :meth:`eval_rows`) of the diagnostics' own attacks, per budget they ran
            at, on the first ``n`` examples; attack ``diag:<name>``, e.g.
            ``diag:pgd-500x5`` (the convergence check's PGD).
        success: ``(attack, norm, eps_str)`` -> ``(example ids, success mask)`` of those
            attacks (CPU tensors), for a per-example worst case over all attacks.
    """

    level: str
    checks: dict[str, dict] = field(default_factory=dict)
    seconds: float = 0.0
    estimate_seconds: float = 0.0
    attack_rows: list[dict] = field(default_factory=list)
    success: dict[tuple[str, str, str], tuple[torch.Tensor, torch.Tensor]] = field(
        default_factory=dict)

    @property
    def masking_suspected(self) -> bool:
        """A signature of gradient masking fired (not counting attack findings)."""
        return any(c["flag"] for k, c in self.checks.items()
                   if c.get("kind", "masking") == "masking")

    @property
    def attack_not_converged(self) -> bool:
        """A stronger PGD (more steps/restarts) beat the evaluation's at some budget."""
        return any(c["flag"] for k, c in self.checks.items()
                   if k.split("/")[0] == "attack_not_converged")

    @property
    def flagged(self) -> list[str]:
        """Every check that fired, masking signatures and attack findings."""
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
                        "kind": str(c.get("kind", "masking")),
                        "detail": str(c["detail"]), "n": int(c.get("n", 0))})
        return out

    def eval_rows(self, **base: Any) -> list[dict]:
        """:attr:`attack_rows` with the evaluation's identifying fields (run_id,
        trial_id, checkpoint, model, dataset, regime, config_hash, seed) added."""
        return [{**base, **r} for r in self.attack_rows]

    def format_table(self) -> str:
        lines = [(f"diagnostics ({self.level}, {self.seconds:.1f} s): masking suspected: "
                  f"{'YES' if self.masking_suspected else 'no'}; attack not converged: "
                  f"{'YES' if self.attack_not_converged else 'no'}"),
                 f"{'check':<36}{'eps':>8}{'value':>9}{'ref':>9}{'delta':>8}  flag  detail"]
        for k, c in self.checks.items():
            eps = c.get("eps")
            lines.append(f"{k:<36}{_fmt(eps) if eps is not None else '-':>8}"
                         f"{_fmt(c['value']):>9}{_fmt(c['reference']):>9}"
                         f"{c['delta']:>8.3f}  {'FLAG' if c['flag'] else '  - '}  "
                         f"{c['detail']}")
        return "\n".join(lines)


def _num(v: Any) -> float:
    try:
        return float(v)
    except (TypeError, ValueError):
        return math.nan


def _fmt(v: Any) -> str:
    if isinstance(v, (int, float)) and v is not None and math.isfinite(v):
        return f"{v:.3f}" if v >= 0.001 or v == 0 else f"{v:.2g}"
    return "-"


def _pgd_defaults() -> dict[str, Any]:
    sig = inspect.signature(ATTACKS.get("pgd").fn)
    return {k: p.default for k, p in sig.parameters.items()
            if p.default is not inspect.Parameter.empty and k != "example_ids"}


def _rows_by_budget(rows: Iterable[Mapping], norm: str) -> dict[float, dict[str, Mapping]]:
    """eps -> attack label -> eval row, for one norm."""
    out: dict[float, dict[str, Mapping]] = {}
    for r in rows:
        if r["norm"] == norm:
            out.setdefault(float(r["eps"]), {})[r["attack"]] = r
    return out


def _at(by_eps: Mapping[float, Any], eps: float) -> Any:
    return next((v for e, v in by_eps.items() if abs(e - eps) < 1e-12), {})


# --- work plan, estimate and progress -------------------------------------------------------
class _Progress:
    """Stages with planned example-passes (upper bounds: early stops make them cheaper);
    logs the estimate before the start and a progress line after each stage."""

    def __init__(self, level: str, m: int, sec_per_pass: float):
        self.level, self.m, self.rate = level, m, sec_per_pass
        self.stages: list[tuple[str, float]] = []
        self.done = 0
        self.done_passes = 0.0
        self.t0 = time.perf_counter()

    def plan(self, label: str, passes: float) -> None:
        self.stages.append((label, float(passes)))

    def replan(self, prefix: str, factor: float) -> None:
        """Scale the not-yet-run stages whose label starts with ``prefix``."""
        self.stages = [(lab, p * factor if i >= self.done and lab.startswith(prefix) else p)
                       for i, (lab, p) in enumerate(self.stages)]

    @property
    def total(self) -> float:
        return sum(p for _, p in self.stages)

    def announce(self, detail: str) -> float:
        est = self.total * self.rate
        logger.info("diagnostics (%s) on %d examples, %s: %d stages, at most %.3g "
                    "example-passes (early stops make it less): estimated %s at the "
                    "measured %.3g ms per example-pass", self.level, self.m, detail,
                    len(self.stages), self.total, _duration(est), 1000 * self.rate)
        return est

    def step(self, label: str) -> None:
        i = next((k for k in range(self.done, len(self.stages))
                  if self.stages[k][0] == label), None)
        if i is None:
            return
        self.done_passes += sum(p for _, p in self.stages[self.done:i + 1])
        self.done = i + 1
        elapsed = time.perf_counter() - self.t0
        # the stages so far calibrate the rest: seconds per *planned* pass (early stops
        # and the machine's load included)
        rate = elapsed / self.done_passes if self.done_passes else self.rate
        left = sum(p for _, p in self.stages[self.done:]) * rate
        logger.info("diagnostics (%s) %d/%d %s done; %s elapsed, about %s left",
                    self.level, self.done, len(self.stages), label, _duration(elapsed),
                    _duration(left))


def _duration(sec: float) -> str:
    return f"{sec:.0f} s" if sec < 120 else f"{sec / 60:.1f} min"


def _seconds_per_pass(model: nn.Module, x: torch.Tensor, y: torch.Tensor, threat: Threat,
                      pgd_params: dict) -> float:
    """Measured wall time of one example-pass of the diagnostics' PGD loop (a short run
    without early stop, its bookkeeping included), after a warm-up."""
    k = min(len(x), int(pgd_params.get("batch_size", 500)), 64)
    params = {**pgd_params, "steps": 4, "restarts": 1, "early_stop": False}

    def one() -> None:
        robustness_curve("pgd", model, x[:k], y[:k], threat.norm, [threat.eps], **params)

    one()  # warm-up
    t = time.perf_counter()
    one()
    return (time.perf_counter() - t) / (k * 2 * 5)


# --- the attacks of one norm ----------------------------------------------------------------
class _Runner:
    """The extra attacks of one norm on the diagnostic subset.

    ``curve`` runs an attack over several budgets at once (per example the running
    minimum: a point found at a smaller budget is valid at a larger one) and records
    rows and success masks for :class:`DiagnosticsReport`; ``acc`` is one separate run.
    """

    def __init__(self, rep: DiagnosticsReport, model, x, y, ids, norm: Norm,
                 grid: Sequence[str], pgd_params: dict, batch_size: int, seed: int):
        self.rep, self.model, self.x, self.y, self.ids = rep, model, x, y, ids
        self.norm, self.base, self.batch_size, self.seed = norm, pgd_params, batch_size, seed
        self.eps_str = {parse_eps(e): str(e) for e in grid}
        self.clean_acc = float((predict(model, x, batch_size) == y).float().mean())
        self.curves: dict[str, dict[float, AttackResult]] = {}

    def curve(self, key: str, name: str, budgets: Sequence[float], model: nn.Module | None = None,
              record: bool = True, **override: Any) -> dict[float, AttackResult]:
        """key -> {eps: result}; ``record`` adds rows/masks labelled ``diag:<key>``."""
        if key in self.curves or not budgets:
            return self.curves.get(key, {})
        params = {**self.base, **override} if name == "pgd" else override
        res = robustness_curve(name, model or self.model, self.x, self.y, self.norm,
                               list(budgets), example_ids=self.ids, **params)
        out = dict(zip(budgets, res))
        self.curves[key] = out
        if record:
            self._record(key, name, params, out)
        return out

    def accs(self, key: str) -> dict[float, float]:
        return {e: r.robust_acc for e, r in self.curves.get(key, {}).items()}

    def acc(self, name: str, eps: float, **override: Any) -> float:
        """One separate run (no running minimum over budgets)."""
        params = {**self.base, **override} if name == "pgd" else override
        return run_attack(name, self.model, self.x, self.y, Threat(self.norm, eps),
                          example_ids=self.ids, **params).robust_acc

    def _record(self, key: str, name: str, params: dict, out: dict[float, AttackResult]
                ) -> None:
        label = DIAG_PREFIX + key
        m = len(self.x)
        shown = {k: v for k, v in params.items() if k != "cache"}
        for eps, r in out.items():
            eps_str = self.eps_str.get(eps, repr(eps))
            k = int((~r.success).sum())
            lo, hi = wilson_interval(k, m)
            self.rep.attack_rows.append({
                "attack": label, "norm": self.norm.value, "eps": float(eps),
                "eps_str": eps_str, "n": m, "clean_acc": self.clean_acc,
                "robust_acc": k / m, "ci_low": lo, "ci_high": hi, "seed": self.seed,
                "fwd_passes": int(r.fwd_passes), "bwd_passes": int(r.bwd_passes),
                "queries": int(r.queries), "seconds": float(r.seconds),
                "params": params_json({**shown, "attack": name, "subset": "first n",
                                       "diagnostic": key}),
                "flags": json.dumps(r.flags)})
            self.rep.success[(label, self.norm.value, eps_str)] = (self.ids.cpu().clone(),
                                                                   r.success.cpu().clone())


def run_diagnostics(model: nn.Module, x: torch.Tensor, y: torch.Tensor, plan, *,
                    level: str = "cheap", eval_rows: Sequence[Mapping] = (),
                    n: int = 0, source: nn.Module | None = None) -> DiagnosticsReport:
    """Run the diagnostics of ``level`` for every norm of ``plan`` (an EvalPlan).

    Args:
        model: the evaluated model (logits out; run in eval mode, its mode is restored).
        x, y: the evaluation's examples (the diagnostic subset is their first ``n``).
        plan: the :class:`~aerl_ray.evalplan.EvalPlan` (grids, seed, PGD settings).
        level: ``cheap`` or ``full`` (``off`` returns an empty report).
        eval_rows: the evaluation's rows of this checkpoint (reused where possible).
        n: subset size (0 = the level's default), capped at ``len(x)``.
        source: the transfer attack's source model, as the evaluation loaded it (else
            ``plan.transfer_source`` is loaded when it is a checkpoint path).
    """
    check_level(level)
    rep = DiagnosticsReport(level)
    if level == "off":
        return rep
    t0 = time.perf_counter()
    was_training = model.training
    model.eval()
    try:
        _run_all(rep, model, x, y, plan, eval_rows, n, source)
    finally:
        model.train(was_training)
    rep.seconds = time.perf_counter() - t0
    logger.info("diagnostics (%s) in %.1f s (estimated %.1f s); masking flags: %s; "
                "attack not converged: %s", level, rep.seconds, rep.estimate_seconds,
                [k for k in rep.flagged if k.split("/")[0] not in ATTACK_FINDINGS] or "none",
                "yes" if rep.attack_not_converged else "no")
    return rep


def _pick_budgets(budgets: Sequence[float], headline: float, cap: int) -> list[float]:
    """At most ``cap`` (0 = all) of sorted ``budgets``: the largest (where masking hides
    most), the one nearest the headline, the smallest, then the rest from the top."""
    if not cap or len(budgets) <= cap:
        return list(budgets)
    order = [budgets[-1], min(budgets, key=lambda e: abs(e - headline)), budgets[0],
             *reversed(budgets)]
    return sorted(list(dict.fromkeys(order))[:cap])


def _comparison_budgets(grid: Sequence[str], headline: float, cfg: Level) -> list[float]:
    """Candidate budgets of the comparative checks before the PGD curve is known."""
    budgets = sorted({parse_eps(e) for e in grid if parse_eps(e) > 0})
    return _pick_budgets(budgets, headline, cfg.compare_budgets)


def _plan_norm(prog: _Progress, norm: str, m: int, grid: Sequence[str], headline: float,
               cfg: Level, base: dict, rows: Mapping, plan) -> None:
    """Planned example-passes of one norm's stages (upper bounds, no early stop)."""
    steps = int(base.get("steps", 50)) * int(base.get("restarts", 1))
    nb = len([e for e in grid if parse_eps(e) > 0])
    nc = len(_comparison_budgets(grid, headline, cfg))
    strong = int(base.get("steps", 50)) * cfg.steps_factor * max(cfg.restarts, int(
        base.get("restarts", 1)))
    prog.plan(f"{norm} pgd curve", m * nb * 2 * (steps + 1))
    has = {k.split(":")[0] for r in rows.values() for k in r}
    if "fgsm" not in has:
        prog.plan(f"{norm} compare: fgsm", m * nc * 3)
    nconv = min(nc, cfg.costly_budgets) if cfg.costly_budgets else nc
    prog.plan(f"{norm} compare: pgd {strong} steps", m * nconv * 2 * (strong + 1))
    prog.plan(f"{norm} compare: losses", 2 * m * nc * 2 * (steps + 1))
    prog.plan(f"{norm} compare: temperatures", len(cfg.temperatures) * m * nc * 2 * (steps + 1))
    if "square" not in has:
        prog.plan(f"{norm} compare: square", m * nconv * cfg.square_queries)
    prog.plan(f"{norm} unbounded", m * 2 * (cfg.unbounded_steps + 1))
    prog.plan(f"{norm} eps=0 runs", sum(min(cfg.eps0_n, m) * 2 * 12 for _ in plan.attacks))
    nmono = min(nb, cfg.max_budgets) if cfg.max_budgets else nb
    prog.plan(f"{norm} monotonicity", m * nmono * 2 * (steps + 1))
    prog.plan(f"{norm} gradient probe", m * 2 * (cfg.probe_steps + 2))


def _run_all(rep: DiagnosticsReport, model: nn.Module, x: torch.Tensor, y: torch.Tensor,
             plan, eval_rows: Sequence[Mapping], n: int,
             source: nn.Module | None = None) -> None:
    cfg = LEVEL_SETTINGS[rep.level]
    m = min(n or cfg.n, len(x))
    xs, ys, ids = x[:m], y[:m], torch.arange(m)
    pgd_params = {**_pgd_defaults(), **plan.params_for("pgd")}
    norms = []
    for nrm, grid in plan.grids:
        norm = Norm.parse(nrm)
        eps_str = plan.indicator_budget(norm.value)
        if eps_str is None:
            logger.info("diagnostics: no non-zero %s budget; skipped", norm.value)
            continue
        norms.append((norm, grid, parse_eps(eps_str), str(eps_str)))
    prog = _Progress(rep.level, m, _seconds_per_pass(
        model, xs, ys, Threat(norms[0][0], norms[0][2]), pgd_params) if m and norms else 0.0)
    for norm, grid, eps, _ in norms:
        _plan_norm(prog, norm.value, m, grid, eps, cfg, pgd_params,
                   _rows_by_budget(eval_rows, norm.value), plan)
    rep.estimate_seconds = prog.announce(", ".join(
        f"{norm.value} ({len([e for e in grid if parse_eps(e) > 0])} budgets)"
        for norm, grid, _, _ in norms) or "no norm")
    for norm, grid, eps, eps_str in norms:
        run = _Runner(rep, model, xs, ys, ids, norm, grid, pgd_params, plan.batch_size,
                      plan.seed)
        checks = _norm_checks(run, model, xs, ys, ids, norm, eps, grid,
                              _rows_by_budget(eval_rows, norm.value), eval_rows, cfg, plan,
                              prog, source)
        for name, c in checks.items():
            kind = "attack" if name in ATTACK_FINDINGS else "masking"
            rep.checks[f"{name}/{norm.value}"] = {"eps": eps, "eps_str": eps_str,
                                                  **c, "kind": kind}
    flags = sorted({f for r in eval_rows for f in json.loads(r.get("flags") or "[]")})
    rep.checks["attack_flags"] = _entry(len(flags), 0, 0.0, bool(flags),
                                        "; ".join(flags) or "no attack raised a flag",
                                        n=0, kind="masking")


def _compare(values: Mapping[float, tuple[float, int]], refs: Mapping[float, tuple[float, int]],
             eps_str: Mapping[float, str], describe: str) -> dict:
    """A comparative check over budgets: flags where value < reference - delta; reports
    the budget where value falls furthest below (reference - delta)."""
    cands = []
    for e in sorted(set(values) & set(refs)):
        (v, nv), (r, nr) = values[e], refs[e]
        d = delta((v, nv), (r, nr))
        cands.append((r - v - d, e, v, r, d, nv))
    if not cands:
        return _entry(None, None, MIN_DELTA, False,
                      f"{describe}: not run (PGD breaks every example at every budget)",
                      n=0, eps=math.nan, eps_str="")
    margin, e, v, r, d, nv = max(cands)
    per = "; ".join(f"eps {eps_str.get(c[1], f'{c[1]:g}')}: {c[2]:.3f} vs {c[3]:.3f}"
                    + (" FLAG" if c[0] > 0 else "") for c in cands)
    where = (f"worst at eps {eps_str.get(e, f'{e:g}')}" if margin > 0 else
             "no budget flags")
    return _entry(v, r, d, any(c[0] > 0 for c in cands), f"{describe}: {per} ({where})",
                  eps=e, eps_str=eps_str.get(e, repr(e)), n=nv)


def _informative(pgd: Mapping[float, float], clean: float, m: int) -> list[float]:
    """Budgets where the PGD curve says something another attack could contradict: PGD
    broke some examples (beyond delta of the clean accuracy: smaller budgets are too
    small to matter) and left some robust (beyond delta of 0).  If none qualifies --
    e.g. masked gradients: CE-PGD breaks nothing anywhere -- the largest budget where
    PGD left something robust."""
    alive = [e for e in sorted(pgd) if pgd[e] > delta((pgd[e], m))]
    mid = [e for e in alive if pgd[e] < clean - delta((pgd[e], m), (clean, m))]
    return mid or alive[-1:]


def _margin(c: Mapping) -> float:
    """How far a comparative entry's value falls below reference - delta (-inf: n/a)."""
    m = _num(c["reference"]) - _num(c["value"]) - float(c["delta"])
    return m if math.isfinite(m) else -math.inf


def _norm_checks(run: _Runner, model, xs, ys, ids, norm: Norm, eps: float,
                 grid: Sequence[str], rows: Mapping[float, Mapping[str, Mapping]],
                 eval_rows: Sequence[Mapping], cfg: Level, plan,
                 prog: _Progress, source: nn.Module | None = None) -> dict[str, dict]:
    m = len(xs)
    nv = norm.value
    out: dict[str, dict] = {}
    base_loss = run.base.get("loss", "ce")
    es = run.eps_str

    # the plan's PGD over every budget of the grid, on the subset (not recorded: the
    # evaluation has it); the comparative checks run where it is informative
    all_budgets = sorted({parse_eps(e) for e in grid if parse_eps(e) > 0})
    pgd = run.accs("pgd") if run.curve("pgd", "pgd", all_budgets, record=False) else {}
    prog.step(f"{nv} pgd curve")
    informative = _pick_budgets(_informative(pgd, run.clean_acc, m), eps,
                                cfg.compare_budgets)
    costly = _pick_budgets(informative, eps, cfg.costly_budgets)
    planned = len(_comparison_budgets(grid, eps, cfg))
    # early stops: an example costs full steps only where PGD left it robust
    prog.replan(f"{nv} compare", sum(min(1.0, pgd[e] + 0.1) for e in informative)
                / max(planned, 1))
    def note_for(used: Sequence[float]) -> str:
        flat = [e for e in all_budgets if e not in informative]
        capped = [e for e in informative if e not in used]
        parts = ([f"eps {', '.join(es.get(e, f'{e:g}') for e in flat)}: PGD broke nothing "
                  "or left nothing there"] if flat else []) + (
            [f"eps {', '.join(es.get(e, f'{e:g}') for e in capped)}: the level runs this "
             f"attack at {len(used)} budgets"] if capped else [])
        return f" (not run at {'; '.join(parts)})" if parts else ""

    note = note_for(informative)
    ref = {e: (pgd[e], m) for e in informative}

    # 1. one step beats iterative: eval rows at every budget if the plan ran FGSM
    fg_rows = {e: (r["fgsm"]["robust_acc"], int(r["fgsm"]["n"])) for e, r in rows.items()
               if e > 0 and "fgsm" in r and "pgd" in r}
    if fg_rows:
        pg_rows = {e: (rows[e]["pgd"]["robust_acc"], int(rows[e]["pgd"]["n"])) for e in fg_rows}
        c = _compare(fg_rows, pg_rows, es, "FGSM vs PGD (eval rows)")
    else:
        run.curve("fgsm", "fgsm", informative, loss=base_loss, batch_size=plan.batch_size)
        c = _compare({e: (a, m) for e, a in run.accs("fgsm").items()}, ref, es,
                     "FGSM vs PGD (subset)" + note)
        prog.step(f"{nv} compare: fgsm")
    if c:
        out["one_step_beats_iterative"] = c

    # 5. convergence: more steps (and restarts) -- a finding about the attack
    steps = int(run.base.get("steps", 50))
    restarts = int(run.base.get("restarts", 1))
    more = {"steps": steps * cfg.steps_factor, "restarts": max(cfg.restarts, restarts)}
    key = f"pgd-{more['steps']}x{more['restarts']}"
    run.curve(key, "pgd", costly, **more)
    prog.step(f"{nv} compare: pgd {more['steps']} steps")
    c = _compare({e: (a, m) for e, a in run.accs(key).items()}, ref, es,
                 f"PGD {more['steps']} steps x {more['restarts']} restarts vs {steps} x "
                 f"{restarts}" + note_for(costly))
    if c:
        if c["flag"]:
            bad = [e for e in costly
                   if run.accs(key)[e] < pgd[e] - delta((run.accs(key)[e], m), (pgd[e], m))]
            c["detail"] = (f"attack not converged at budget eps "
                           f"{', '.join(es.get(e, f'{e:g}') for e in bad)} (use >= "
                           f"{more['steps']} steps x {more['restarts']} restarts; rows "
                           f"{DIAG_PREFIX}{key}): " + c["detail"])
        c.update(stronger_attack=DIAG_PREFIX + key)
        out["attack_not_converged"] = c

    # 6. loss choice
    others = [lo for lo in ("ce", "margin", "dlr") if lo != base_loss and lo in LOSSES
              and not (lo == "dlr" and _num_classes(model, xs) < 3)]
    for lo in others:
        run.curve(f"pgd-{lo}", "pgd", informative, loss=lo)
    prog.step(f"{nv} compare: losses")
    best = {e: min((run.accs(f"pgd-{lo}")[e], lo) for lo in others) for e in informative} \
        if others else {}
    c = _compare({e: (a, m) for e, (a, _) in best.items()}, ref, es,
                 f"best of PGD-{'/'.join(others)} vs {base_loss}" + note)
    if c:
        out["loss_choice_matters"] = c

    # 7. logit temperature
    for t in cfg.temperatures:
        run.curve(f"pgd-T{t:g}", "pgd", informative, model=LogitScale(model, t))
    prog.step(f"{nv} compare: temperatures")
    temps = {e: min((run.accs(f"pgd-T{t:g}")[e], t) for t in cfg.temperatures)
             for e in informative}
    c = _compare({e: (a, m) for e, (a, _) in temps.items()}, ref, es,
                 "best of PGD on logits/T, T in "
                 f"{{{', '.join(f'{t:g}' for t in cfg.temperatures)}}}, vs T=1" + note)
    if c:
        change = max((abs(run.accs(f"pgd-T{t:g}")[e] - pgd[e]) for t in cfg.temperatures
                      for e in informative), default=0.0)
        c["detail"] += f"; max change either way {change:.3f}"
        out["temperature_sensitive"] = c

    # 2. black box beats white box: the eval rows at every budget (transfer/square vs
    # pgd/fgsm/autoattack) and, unless the plan ran Square, Square on the subset vs the
    # subset's PGD/FGSM
    cands = []
    bb = {e: min(((r["robust_acc"], int(r["n"]), k) for k, r in rr.items()
                  if k.split(":")[0] in BLACK_BOX), default=None) for e, rr in rows.items() if e > 0}
    wb = {e: min(((r["robust_acc"], int(r["n"]), k) for k, r in rr.items()
                  if k.split(":")[0] in WHITE_BOX), default=None) for e, rr in rows.items() if e > 0}
    both = [e for e in bb if bb[e] is not None and wb.get(e) is not None]
    if both:
        c = _compare({e: bb[e][:2] for e in both}, {e: wb[e][:2] for e in both}, es,
                     "best black-box vs best white-box eval row ("
                     + ", ".join(sorted({bb[e][2] for e in both} | {wb[e][2] for e in both}))
                     + ")")
        cands.append(c)
    has_square = any("square" in {k.split(":")[0] for k in rr} for rr in rows.values())
    if not has_square:
        try:
            run.curve(f"square-{cfg.square_queries}", "square", costly,
                      n_queries=cfg.square_queries, seed=plan.seed, resc_schedule=True,
                      batch_size=plan.batch_size)
            white = {e: min([pgd[e]] + [run.accs("fgsm").get(e, 1.0)]) for e in costly}
            cands.append(_compare(
                {e: (a, m) for e, a in run.accs(f"square-{cfg.square_queries}").items()},
                {e: (a, m) for e, a in white.items()}, es,
                f"Square ({cfg.square_queries} queries) vs PGD/FGSM (subset)"
                + note_for(costly)))
        except ImportError as e:
            logger.info("diagnostics: square skipped: %s", e)
        prog.step(f"{nv} compare: square")
    if cands:
        worst = max(cands, key=_margin)
        out["black_box_beats_white_box"] = {
            **worst, "flag": any(c["flag"] for c in cands),
            "detail": " | ".join(c["detail"] for c in cands)}

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
            f"correct points", n=k, eps=big, eps_str=f"{big:.6g}")
    prog.step(f"{nv} unbounded")

    # 4. eps = 0: each attack's own pipeline, then monotonicity (separate runs)
    out["eps0_not_clean"] = _eps0_check(model, xs, ys, ids, norm, plan, cfg, source)
    prog.step(f"{nv} eps=0 runs")
    budgets = all_budgets
    if cfg.max_budgets and len(budgets) > cfg.max_budgets:
        budgets = sorted({budgets[0], eps, budgets[-1]})
    accs_eps = [(e, run.acc("pgd", e)) for e in budgets]
    worst, wd = 0.0, MIN_DELTA
    for (e1, a1), (e2, a2) in zip(accs_eps, accs_eps[1:]):
        dd = delta((a1, m), (a2, m))
        if a2 - a1 - dd > worst - wd:
            worst, wd = a2 - a1, dd
    out["non_monotone_eps"] = _entry(
        worst, 0.0, wd, worst > wd,
        "separate PGD runs: " + ", ".join(f"{e:.4g}: {a:.3f}" for e, a in accs_eps), n=m)
    prog.step(f"{nv} monotonicity")

    # 8. vanishing / non-finite gradients past the clean point (at the headline budget);
    # "hidden": stuck examples that another diagnostic attack breaks at a budget <= it
    stuck, zero, start_small, clean_small, nonfinite, mask = _gradient_probe(
        model, xs, ys, ids, Threat(norm, eps), base_loss, cfg.probe_steps, plan.seed,
        plan.batch_size)
    prog.step(f"{nv} gradient probe")
    d = delta((stuck, m), (pgd.get(eps, 0.0), m))
    hidden = torch.zeros(m, dtype=torch.bool)
    used = []
    for key_, curve in run.curves.items():
        if key_ == "pgd":
            continue
        below = [e for e in curve if e <= eps + 1e-12]
        if below:
            hidden |= curve[max(below)].success.cpu()
            used.append(key_)
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
        f"the other diagnostic attacks ({', '.join(used) or 'none ran'})", n=m,
        stuck_broken=n_hidden)
    return out


def _eps0_check(model: nn.Module, xs: torch.Tensor, ys: torch.Tensor, ids: torch.Tensor,
                norm: Norm, plan, cfg: Level, source: nn.Module | None = None) -> dict:
    """Each attack of the plan (and PGD), its own function at eps = 0 on the first
    ``eps0_n`` examples with its cheap settings: the output must stay at x (the eps = 0
    ball) and be classified as x is.  The evaluation never runs this (it returns the
    clean point at eps = 0), so a deterministic model with sound attacks never flags; a
    randomised model or an attack that ignores its budget does."""
    k = min(cfg.eps0_n, len(xs))
    x0, y0, i0 = xs[:k], ys[:k], ids[:k]
    clean = predict(model, x0, plan.batch_size)
    threat = Threat(norm, 0.0)
    notes, bad, worst = [], [], (1.0, "")
    names = list(dict.fromkeys(["pgd", *plan.attacks]))
    for name in names:
        spec = ATTACKS.get(name)
        params = {**plan.params_for(name), **spec.fast_params}
        if "example_ids" in spec.param_names():
            params["example_ids"] = i0
        if name == "transfer":
            src = source if source is not None else (params.get("source")
                                                     or plan.transfer_source)
            if src is None or (isinstance(src, str) and not src):
                notes.append("transfer: no source")
                continue
            if not isinstance(src, nn.Module):
                from aerl_ray.attacks.transfer import load_source  # noqa: PLC0415
                from aerl_ray.checkpoint import CheckpointError  # noqa: PLC0415

                try:
                    src = load_source(src)[0]
                except CheckpointError as e:  # a label, not a path: say so, do not crash
                    notes.append(f"transfer: source {src!r} not loadable here ({e})")
                    continue
            params["source"] = src.to(x0.device)
            params.pop("cache", None)
        try:
            r = spec.fn(model, x0, y0, threat, **params)
        except Exception as e:  # noqa: BLE001 - a crash at eps=0 is reported, not fatal
            notes.append(f"{name}: raised {type(e).__name__}: {e}")
            continue
        moved = float(threat.size(r.x_adv.detach().to(x0.device) - x0).max()) if k else 0.0
        pred = predict(model, r.x_adv.detach().to(x0.device), plan.batch_size)
        agree = float((pred == clean).float().mean()) if k else 1.0
        if moved > 0 or agree < 1.0:
            bad.append(name)
        worst = min(worst, (agree, name))
        notes.append(f"{name}: moved {moved:.3g}, predictions as clean {agree:.3f}")
    acc0 = 1.0 - float((predict(model, x0, plan.batch_size) != y0).float().mean()) if k else 1.0
    acc_clean = float((clean == y0).float().mean()) if k else 1.0
    detail = (f"attacks at eps=0 change the input or the prediction: {bad}; " if bad else
              "every attack's own pipeline at eps=0 returns x, classified as clean; ")
    return _entry(worst[0], 1.0, 0.0, bool(bad) or abs(acc0 - acc_clean) > 0,
                  detail + "; ".join(notes)
                  + f" (a repeated forward pass: accuracy {acc0:.3f} vs {acc_clean:.3f})",
                  n=k, eps=0.0, eps_str="0")


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
