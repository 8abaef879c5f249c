"""FGSM and PGD (Madry et al. 2018) with the evaluation-grade choices.

- Sum-reduced per-example losses: an example's gradient does not shrink with the batch
  size (the paper's mean-reduced CE scales it by 1/B).
- The L2 step is ``g / (||g|| + 1e-12)`` (never cleverhans' ``g / sqrt(max(1e-12,
  sum g^2))``, which stalls on tiny gradients); L-inf uses ``sign(g)``.
- Losses: ``ce``, ``margin`` (Carlini-Wagner, max_{j!=y} z_j - z_y) and ``dlr``
  (Croce & Hein 2020; scale-invariant, so saturated logits cannot hide the gradient).
- The returned point is the *best* per example: the first iterate (over steps and
  restarts) that fooled the model, else the highest-loss iterate; always clipped to
  [0, 1].  With ``early_stop`` a fooled example leaves the batch.
- Random starts are per-example reproducible (:func:`Threat.random_start`), which makes
  :func:`pgd_curve` with ``curve="exact"`` -- many budgets in one pass -- equal separate
  runs.  Its loop, :func:`pgd_grid`, batches (example, budget) pairs of all budgets into
  shared passes; with ``curve="search"`` (the default) it searches each example's
  breaking budget instead of attacking every budget (:mod:`aerl_ray.attacks.curve_search`).
"""
from __future__ import annotations

import logging
import time
from typing import Protocol, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from aerl_ray.attacks.base import AttackResult, register_attack, robustness_curve
from aerl_ray.attacks.curve_search import (ACTIVE, BRACKET_STEPS, BROKEN, DEFAULT_AUDIT,
                                           DEFAULT_BRACKET, DEFAULT_CURVE, DROPPED, PENDING,
                                           AuditReport, audit_curve, check_curve_params,
                                           fmn_bracket, next_budget, settle)
from aerl_ray.attacks.threat import (Norm, Threat, parse_eps, project_rows,
                                     random_start_rows)
from aerl_ray.passes import PassCounter
from aerl_ray.registry import Registry

logger = logging.getLogger(__name__)

LOSSES: Registry = Registry("attack loss")


@LOSSES.register("ce")
def ce_loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-example cross-entropy (to maximise); summed, never averaged, over the batch."""
    return F.cross_entropy(logits, y, reduction="none")


@LOSSES.register("margin")
def margin_loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """CW margin: max_{j != y} z_j - z_y (positive iff misclassified)."""
    z_y = logits.gather(1, y[:, None]).squeeze(1)
    other = logits.clone()
    other.scatter_(1, y[:, None], float("-inf"))
    return other.amax(1) - z_y


@LOSSES.register("dlr")
def dlr_loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Difference of logits ratio: -(z_y - max_{j!=y} z_j) / (z_pi1 - z_pi3 + 1e-12)."""
    if logits.shape[1] < 3:
        raise ValueError("the dlr loss needs at least 3 classes")
    top = logits.sort(1, descending=True).values
    return margin_loss(logits, y) / (top[:, 0] - top[:, 2] + 1e-12)


class GradRecorder(Protocol):
    """Receives the loss input-gradient of every PGD step (see aerl_ray.indicators)."""

    def start_batch(self, n: int) -> None: ...

    def record(self, step: int, grad: torch.Tensor) -> None: ...

    def end_batch(self) -> None: ...


def _check(steps: int, restarts: int, step_size: float | None, loss: str) -> None:
    if steps < 1:
        raise ValueError(f"steps={steps} must be >= 1")
    if restarts < 1:
        raise ValueError(f"restarts={restarts} must be >= 1")
    if step_size is not None and not step_size > 0:
        raise ValueError(f"step_size={step_size} must be > 0 (a fraction of eps)")
    LOSSES.get(loss)


def pgd_core(model: nn.Module, x: torch.Tensor, y: torch.Tensor, threat: Threat, *,
             steps: int, step_size: float | None = None, restarts: int = 1, loss: str = "ce",
             random_start: bool = True, seed: int = 0,
             example_ids: torch.Tensor | None = None, early_stop: bool = True,
             batch_size: int = 500, recorder: GradRecorder | None = None,
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The PGD loop; returns (x_best, fooled, best_loss), all (N, ...).

    ``step_size`` is a fraction of ``threat.eps`` (default 2.5 / steps, Madry et al.).
    A ``recorder`` sees every step of every example, so it disables ``early_stop``.
    """
    _check(steps, restarts, step_size, loss)
    loss_fn = LOSSES.get(loss)
    alpha = (step_size if step_size is not None else 2.5 / steps) * threat.eps
    ids = torch.arange(len(x)) if example_ids is None else example_ids.cpu()
    early_stop = early_stop and recorder is None
    xs_best, fooled_all, loss_all = [], [], []
    for b in range(0, len(x), batch_size):
        xc, yc, idc = x[b:b + batch_size], y[b:b + batch_size], ids[b:b + batch_size]
        with torch.no_grad():
            logits = model(xc)
        fooled = logits.argmax(1) != yc
        best_loss = loss_fn(logits, yc).detach()
        x_best = xc.clone()
        for r in range(restarts):
            act = (~fooled).nonzero().view(-1) if early_stop else torch.arange(len(xc),
                                                                            device=xc.device)
            if len(act) == 0:
                break
            xa, ya = xc[act], yc[act]
            xadv = (threat.random_start(xa, idc[act.cpu()], r, seed) if random_start
                    else xa.clone())
            live = torch.arange(len(act), device=xc.device)
            if recorder is not None:
                recorder.start_batch(len(act))
            for t in range(steps + 1):
                xin = xadv[live].detach().requires_grad_(t < steps)
                with torch.enable_grad():
                    logits = model(xin)
                    lv = loss_fn(logits, ya[live])
                pos = act[live]
                now = logits.argmax(1) != ya[live]
                before = fooled[pos]
                better = (now & ~before) | ((now == before) & (lv.detach() > best_loss[pos]))
                x_best[pos[better]] = xin.detach()[better]
                best_loss[pos[better]] = lv.detach()[better]
                fooled[pos] = before | now
                if t == steps:
                    break
                grad, = torch.autograd.grad(lv.sum(), xin)
                if recorder is not None:
                    recorder.record(t, grad)
                xadv[live] = threat.project(xin.detach() + alpha * threat.direction(grad),
                                            xa[live])
                if early_stop:
                    live = live[~now]
                    if len(live) == 0:
                        break
            if recorder is not None:
                recorder.end_batch()
        xs_best.append(x_best)
        fooled_all.append(fooled)
        loss_all.append(best_loss)
    if not xs_best:
        return x.clone(), torch.zeros(0, dtype=torch.bool), torch.zeros(0)
    return torch.cat(xs_best), torch.cat(fooled_all).cpu(), torch.cat(loss_all).cpu()


# --- many budgets in one loop ---------------------------------------------------------------
def _split(total: int, rows: torch.Tensor) -> torch.Tensor:
    """Split ``total`` passes over budgets in proportion to ``rows`` (largest remainder),
    so the parts are integers summing to ``total``."""
    if int(rows.sum()) == total:
        return rows.clone()
    share = rows.double() * total / max(int(rows.sum()), 1)
    part = share.floor().long()
    rest = total - int(part.sum())
    if rest > 0:
        part[(share - part).argsort(descending=True)[:rest]] += 1
    return part


WARM_MODES = ("off", "replace")


def pgd_grid(model: nn.Module, x: torch.Tensor, y: torch.Tensor, norm: "str | Norm",
             eps_grid: Sequence["str | float"], *, steps: int = 50,
             step_size: float | None = None, restarts: int = 1, loss: str = "ce",
             random_start: bool = True, seed: int = 0, early_stop: bool = True,
             batch_size: int = 500, example_ids: torch.Tensor | None = None,
             speculate: bool | None = None, curve: str = DEFAULT_CURVE,
             audit: int = DEFAULT_AUDIT, bracket: str = DEFAULT_BRACKET,
             order: str = "descending", warm: str = "off",
             bracket_steps: int = BRACKET_STEPS) -> list[AttackResult]:
    """PGD at every budget of a sorted grid in one batched loop; one result per budget.

    The units of work are (example, budget) *pairs*.  Each pair runs exactly the PGD of
    a separate :func:`pgd` run at its budget -- its own random start per restart (drawn
    from (seed, example id, restart), scaled to its eps), its own step ``step_size * eps``,
    its own best point, early exit and restarts (a later restart only if the earlier ones
    failed) -- but the pairs of all budgets share the forward/backward passes: every
    iteration steps all active pairs (up to ``batch_size``), whatever their budget, step
    or restart, in one forward/backward pass (plus a forward-only pass for pairs at their
    last iterate and one that checks finished pairs).  Finished pairs leave and pending
    ones take their place.

    ``curve="exact"``: when pair (i, k) is broken (decided, as in :func:`run_attack`, by a
    fresh forward pass of its projected best point), the pairs (i, j > k) are broken by
    that same perturbation; they are dropped -- mid-run if active, never started if
    pending.  Pairs enter in order: an example's next budget is admitted once its smaller
    budgets are done (the least work: exactly the pairs a budget-by-budget loop attacks),
    or -- with ``speculate``, only to fill otherwise idle slots of the batch -- while they
    are still running, which cuts the number of passes (all budgets of an example at once
    when the batch has room) at the price of pairs that a smaller budget's later break
    makes useless.  ``None`` (default) speculates off the CPU only: on a CPU a pass costs
    in proportion to its rows, so idle slots are free and speculative rows are not; on an
    accelerator a pass costs about the same for any batch up to ``batch_size``.  Either
    way the numbers are the same: the sum-reduced loss keeps each row's gradient
    independent of the batch, so a pair's trajectory is that of the separate run (up to
    float noise of batch-size-dependent kernels), and the result at budget k is exactly
    the per-example running minimum of separate runs at budgets <= k.

    ``curve="search"`` (:mod:`aerl_ray.attacks.curve_search`, which explains the why):
    ``bracket="fmn"`` first runs FMN for ``bracket_steps`` steps -- its smallest
    adversarial point breaks the example at the smallest budget that holds it (and all
    larger ones); ``"fmn-guide"`` uses that budget only as the first probe, so the curve
    is PGD's alone.  Then one pair per example at a time, each exactly the separate run
    at its budget, in ``order`` (``descending``: the largest undecided budget, or after
    a robust probe the smallest; ``bisect``: the middle one); broken => larger budgets
    broken (as above), robust => smaller budgets counted robust without an attack.
    ``warm="replace"`` starts a pair below a broken one from that pair's point, projected
    into its ball, instead of the first random start (measured: a little cheaper, but it
    disagrees with separate runs more often; off by default).  Then ``audit`` seeded
    robust pairs are re-attacked by the separate run; its breaks are fixed in the curve
    and the estimated disagreement with separate runs goes into every result's ``extra``
    (:class:`~aerl_ray.attacks.curve_search.AuditReport`; the exact curve reports 0).

    Returned points: at a budget where an example is broken, the point of its smallest
    breaking budget (as the budget-by-budget loop); where it is robust, the attacked
    pair's best point (the clean point for a pair counted robust without an attack).

    Costs per result (``fwd_passes``/``bwd_passes``): the hook-counted passes of every
    shared pass, split over budgets by the rows each budget had in it (pair-steps and the
    check of finished pairs; the audit's runs go to their budget); the clean forward
    pass, shared by all budgets, is charged to the grid's first budget.  ``seconds``
    splits the call's wall time in proportion to those passes.  ``extra["attacked"]`` is
    the number of pairs started at the budget.
    """
    _check(steps, restarts, step_size, loss)
    check_curve_params(curve, audit, bracket)
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} must be >= 1")
    if warm not in WARM_MODES:
        raise ValueError(f"warm={warm!r}; known: {', '.join(WARM_MODES)}")
    t_start = time.perf_counter()
    loss_fn = LOSSES.get(loss)
    norm = Norm.parse(norm)
    grid = [parse_eps(e) for e in eps_grid]
    n, dev = len(x), x.device
    ids = torch.arange(n) if example_ids is None else example_ids.cpu()
    budgets = sorted({e for e in grid if e > 0})
    nb = len(budgets)
    search = curve == "search"
    policy = order if search else "ascending"
    if search:
        next_budget(torch.zeros(0, 1, dtype=torch.int8), order)  # validates ``order``
        speculate = False
    rel = step_size if step_size is not None else 2.5 / steps
    eps64 = torch.tensor(budgets, dtype=torch.float64)
    eps_dev = eps64.to(dev, x.dtype)
    alpha_dev = torch.tensor([rel * e for e in budgets], dtype=torch.float64).to(dev, x.dtype)
    direction = Threat(norm, 1.0).direction
    if speculate is None:
        speculate = dev.type != "cpu"
    fwd = torch.zeros(nb, dtype=torch.long)
    bwd = torch.zeros(nb, dtype=torch.long)
    admitted = torch.zeros(nb, dtype=torch.long)
    y = y.to(dev)
    report = AuditReport(curve, total_pairs=n * nb)

    with PassCounter(model) as pc:
        # the clean pass, shared by every budget (each separate run repeats it)
        with torch.no_grad():
            chunks = [model(x[b:b + batch_size]) for b in range(0, n, batch_size)]
        clean_fwd = pc.fwd
        logits = torch.cat(chunks) if chunks else torch.zeros(0, 1, device=dev)
        clean_wrong = logits.argmax(1) != y if n else torch.zeros(0, dtype=torch.bool,
                                                                    device=dev)
        clean_loss = loss_fn(logits, y).detach() if n else torch.zeros(0, device=dev)
        # per pair (budget k, example i): best point, its loss, fooled; status on the CPU
        xb = x.unsqueeze(0).repeat(nb, *([1] * x.dim()))
        best = clean_loss.unsqueeze(0).repeat(nb, 1)
        fooled = torch.zeros(nb, n, dtype=torch.bool, device=dev)
        status = torch.full((n, nb), PENDING, dtype=torch.int8)
        if nb and n:  # misclassified clean: broken at every budget by x itself
            wrong = clean_wrong.cpu()
            fooled[0, wrong.to(dev)] = True
            status[wrong, 0] = BROKEN
            status[wrong, 1:] = DROPPED
        guess = None
        if search and bracket != "none" and n and nb:
            f0, b0 = pc.fwd, pc.bwd
            guess = fmn_bracket(model, x, y, norm, budgets, status, xb, best, loss_fn,
                                bracket_steps, batch_size, evidence=bracket == "fmn")
            even = torch.ones(nb, dtype=torch.long)
            fwd.add_(_split(pc.fwd - f0, even))
            bwd.add_(_split(pc.bwd - b0, even))
            logger.debug("fmn bracket: %d of %d examples broken within the grid",
                         int((guess >= 0).sum()), n)
        # the active pairs: example, budget, step, random-start stream (-1: a warm start,
        # in place of stream 0) on the CPU, and the current point
        a_i = torch.zeros(0, dtype=torch.long)
        a_k, a_t, a_r = a_i.clone(), a_i.clone(), a_i.clone()
        a_x = x[:0].clone()

        def starts(ii: torch.Tensor, kk: torch.Tensor, rr: torch.Tensor) -> torch.Tensor:
            xa = x[ii.to(dev)]
            out = xa.clone()
            for r in (rr[rr >= 0].unique().tolist() if random_start else []):
                m = rr == r
                out[m.to(dev)] = random_start_rows(norm, xa[m.to(dev)], ids[ii[m]], r, seed,
                                                   eps64[kk[m]])
            wm = rr < 0
            if bool(wm.any()):  # warm: the smallest broken budget's point, projected
                src = (status[ii[wm]] == BROKEN).to(torch.uint8).argmax(1)
                wd = wm.to(dev)
                out[wd] = project_rows(norm, xb[src.to(dev), ii[wm].to(dev)], xa[wd],
                                       eps_dev[kk[wm].to(dev)])
            return out

        def forward(xin: torch.Tensor, kk: torch.Tensor) -> torch.Tensor:
            f0 = pc.fwd
            out = model(xin)
            fwd.add_(_split(pc.fwd - f0, torch.bincount(kk, minlength=nb)))
            return out

        while True:
            while len(a_i) < batch_size:  # admit pending pairs: each example's next budget
                pend = status == PENDING
                has_p = pend.any(1)
                if not bool(has_p.any()):
                    break
                nxt = next_budget(status, policy, guess)
                has_a = (status == ACTIVE).any(1)
                cand = (has_p & ~has_a).nonzero().view(-1)
                if speculate and len(cand) < batch_size - len(a_i):
                    spec = (has_p & has_a).nonzero().view(-1)
                    cand = torch.cat([cand, spec[nxt[spec].argsort(stable=True)]])
                cand = cand[:batch_size - len(a_i)]
                if len(cand) == 0:
                    break
                kk = nxt[cand]
                zero = torch.zeros(len(cand), dtype=torch.long)
                rr = zero.clone()  # random-start stream; -1: warm start
                if search and warm == "replace":
                    rr[(status[cand] == BROKEN).any(1)] = -1
                status[cand, kk] = ACTIVE
                admitted.add_(torch.bincount(kk, minlength=nb))
                a_x = torch.cat([a_x, starts(cand, kk, rr)])
                a_i, a_k = torch.cat([a_i, cand]), torch.cat([a_k, kk])
                a_t, a_r = torch.cat([a_t, zero]), torch.cat([a_r, rr])
            if len(a_i) == 0:
                break
            i_d, k_d = a_i.to(dev), a_k.to(dev)
            now = torch.zeros(len(a_i), dtype=torch.bool, device=dev)
            final = a_t == steps
            for last in (False, True):  # rows that step, then rows at their last iterate
                m = final if last else ~final
                if not bool(m.any()):
                    continue
                md = m.to(dev)
                ii, kk = i_d[md], k_d[md]
                xin = a_x[md].detach().requires_grad_(not last)
                with torch.set_grad_enabled(not last):
                    out = forward(xin, a_k[m])
                    lv = loss_fn(out, y[ii])
                nw = out.argmax(1) != y[ii]
                before = fooled[kk, ii]
                lvd = lv.detach()
                better = (nw & ~before) | ((nw == before) & (lvd > best[kk, ii]))
                xb[kk[better], ii[better]] = xin.detach()[better]
                best[kk[better], ii[better]] = lvd[better]
                fooled[kk, ii] = before | nw
                now[md] = nw
                if not last:
                    b0 = pc.bwd
                    grad, = torch.autograd.grad(lv.sum(), xin)
                    bwd.add_(_split(pc.bwd - b0, torch.bincount(a_k[m], minlength=nb)))
                    a_x[md] = project_rows(norm, xin.detach() + alpha_dev[kk].view(
                        -1, *([1] * (x.dim() - 1))) * direction(grad), x[ii], eps_dev[kk])
            a_t += 1
            now_c = now.cpu()
            done = final & (a_r.clamp_min(0) + 1 >= restarts)
            if early_stop:
                done |= now_c
            again = final & ~done
            if bool(again.any()):  # the next restart of pairs that failed
                # (a warm start took the place of random start 0: next is 1)
                a_r[again] = a_r[again].clamp_min(0) + 1
                a_t[again] = 0
                a_x[again.to(dev)] = starts(a_i[again], a_k[again], a_r[again])
            if bool(done.any()):  # check finished pairs as run_attack does
                fi, fk = a_i[done], a_k[done]
                fi_d, fk_d = fi.to(dev), fk.to(dev)
                pts = project_rows(norm, xb[fk_d, fi_d], x[fi_d], eps_dev[fk_d])
                with torch.no_grad():
                    ok = forward(pts, fk).argmax(1) == y[fi_d]
                xb[fk_d, fi_d] = pts
                settle(status, fi, fk, ok.cpu(), search)
                keep = status[a_i, a_k] == ACTIVE
                kd = keep.to(dev)
                a_i, a_k, a_t, a_r, a_x = a_i[keep], a_k[keep], a_t[keep], a_r[keep], a_x[kd]
        if search and n and nb:
            def separate(ii: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
                ii_d = ii.to(dev)
                xa, _, bl = pgd_core(model, x[ii_d], y[ii_d], Threat(norm, budgets[k]),
                                     steps=steps, step_size=step_size, restarts=restarts,
                                     loss=loss, random_start=random_start, seed=seed,
                                     example_ids=ids[ii], early_stop=early_stop,
                                     batch_size=batch_size)
                return xa, bl

            audit_curve(model, x, y, norm, budgets, status, xb, best, fwd, bwd, pc, report,
                        audit, seed, separate)
            logger.debug("pgd search curve: %d probes for %d pairs; audit %d/%d broken",
                         int(admitted.sum()), n * nb, report.breaks, report.audited)

    # assemble one result per grid entry (running minimum over budgets)
    passes = []
    seen: set[float] = set()
    for g, e in enumerate(grid):
        f = b = 0
        if e > 0 and e not in seen:
            k = budgets.index(e)
            f, b = int(fwd[k]), int(bwd[k])
        seen.add(e)
        if g == 0:
            f += clean_fwd
        passes.append((f, b))
    total = sum(f + b for f, b in passes)
    wall = time.perf_counter() - t_start
    broken = status.cpu() == BROKEN
    rows = torch.arange(n)
    out: list[AttackResult] = []
    for g, e in enumerate(grid):
        f, b = passes[g]
        sec = wall * (f + b) / total if total else wall / len(grid)
        if e == 0:
            res_x, succ = x.clone(), clean_wrong.cpu()
            bl = torch.full((n,), float("nan"))
            att, k = (n if g == 0 else 0), None
        else:
            k = budgets.index(e)
            upto = broken[:, :k + 1]
            succ = upto.any(1)
            first = torch.where(succ, upto.to(torch.uint8).argmax(1), torch.tensor(k))
            res_x = xb[first.to(dev), rows.to(dev)]
            bl = best[first.to(dev), rows.to(dev)].cpu()
            if grid[0] == 0:  # broken at eps = 0: the clean point, as a separate run
                bl[clean_wrong.cpu()] = float("nan")
            att = int(admitted[k]) if e not in grid[:g] else 0
        out.append(AttackResult(res_x, succ, bl, f, b, f, sec, [],
                                {"attacked": att, "one_loop": True, **report.extra(k)}))
    return out


@register_attack("pgd", kind="white-box", per_example_rng=True,
                 fast_params={"steps": 10, "restarts": 1}, curve=pgd_grid)
def pgd(model: nn.Module, x: torch.Tensor, y: torch.Tensor, threat: Threat, *,
        steps: int = 50, step_size: float | None = None, restarts: int = 1,
        loss: str = "ce", random_start: bool = True, seed: int = 0,
        early_stop: bool = True, batch_size: int = 500,
        example_ids: torch.Tensor | None = None, curve: str = DEFAULT_CURVE,
        audit: int = DEFAULT_AUDIT, bracket: str = DEFAULT_BRACKET) -> AttackResult:
    """Untargeted PGD in ``threat``'s ball.

    Args:
        steps: ascent steps per restart.
        step_size: step as a fraction of eps (default 2.5 / steps, Madry et al.).
        restarts: random restarts; each attacks only the examples not yet fooled.
        loss: ``ce``, ``margin`` or ``dlr``.
        random_start: start uniformly in the ball (else at x).
        seed: seed of the per-example random starts.
        early_stop: stop attacking an example once fooled (the result is the same).
        batch_size: examples per forward pass.
        example_ids: ids of the rows, keys of the per-example random streams.
        curve: how a budget grid is evaluated by :func:`robustness_curve` (a single run
            ignores ``curve``, ``audit`` and ``bracket``): ``search`` (default) -- a
            per-example search over the grid, audited against separate runs
            (:mod:`aerl_ray.attacks.curve_search`); ``exact`` -- the per-example running
            minimum of separate runs (about K runs' cost).
        audit: search only: robust (example, budget) pairs re-attacked by a separate
            run to estimate the curve's disagreement with separate runs (0 = none).
        bracket: search only: ``fmn`` -- a 10-step FMN run first; its smallest
            adversarial point breaks the example from the smallest budget that holds
            it (a tighter curve, but no longer PGD's alone); ``fmn-guide`` (default)
            -- FMN only picks the first budget to probe, so the curve is PGD's alone
            and a "pgd" row still shows PGD-specific masking; ``none`` -- probe from
            the largest budget down.
    """
    check_curve_params(curve, audit, bracket)
    xb, fooled, best = pgd_core(model, x, y, threat, steps=steps, step_size=step_size,
                                restarts=restarts, loss=loss, random_start=random_start,
                                seed=seed, example_ids=example_ids, early_stop=early_stop,
                                batch_size=batch_size)
    return AttackResult(xb, fooled, best)


def _fgsm_grid(model: nn.Module, x: torch.Tensor, y: torch.Tensor, norm: "str | Norm",
               eps_grid: Sequence["str | float"], *, loss: str = "ce", batch_size: int = 500,
               example_ids: torch.Tensor | None = None) -> list[AttackResult]:
    """:func:`fgsm` at every budget of a grid in one loop (see :func:`pgd_grid`)."""
    return pgd_grid(model, x, y, norm, eps_grid, steps=1, step_size=1.0, restarts=1,
                    loss=loss, random_start=False, early_stop=True, batch_size=batch_size,
                    example_ids=example_ids, curve="exact", audit=0)


@register_attack("fgsm", kind="white-box", per_example_rng=True, curve=_fgsm_grid)
def fgsm(model: nn.Module, x: torch.Tensor, y: torch.Tensor, threat: Threat, *,
         loss: str = "ce", batch_size: int = 500) -> AttackResult:
    """One full-size step from the clean point (Goodfellow et al. 2015): ``x + eps *
    sign(g)`` (L-inf) or ``x + eps * g / ||g||`` (L2).  A one-step attack that beats PGD
    is a gradient-masking sign (Athalye et al. 2018)."""
    xb, fooled, best = pgd_core(model, x, y, threat, steps=1, step_size=1.0, restarts=1,
                                loss=loss, random_start=False, early_stop=True,
                                batch_size=batch_size)
    return AttackResult(xb, fooled, best)


def pgd_curve(model: nn.Module, x: torch.Tensor, y: torch.Tensor, norm: "str | Norm",
              eps_grid: Sequence["str | float"], **params) -> list[AttackResult]:
    """PGD robust accuracy for every budget of a sorted grid in one pass.

    Goes through :func:`robustness_curve`, which runs :func:`pgd_grid`: all budgets in
    one batched loop of (example, budget) pairs, each with its own early exit; a pair
    broken at a budget breaks the example at every larger budget with the same
    perturbation (those pairs are dropped).  With ``curve="exact"``, because random
    starts depend only on (seed, example id, restart), the per-example outcome at
    budget k equals that of a separate ``pgd`` run at budget k whenever the example
    survived all smaller budgets: the curve is the per-example running minimum of
    separate runs (identical numbers whenever the separate runs are monotone, as they
    are for a working attack).  With ``curve="search"`` (default) a robust probe also
    stands for every smaller budget; each result's ``extra`` carries the audited
    disagreement with separate runs.  Takes the parameters of :func:`pgd`.
    """
    return robustness_curve("pgd", model, x, y, norm, eps_grid, **params)
