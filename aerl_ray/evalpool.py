"""The evaluator pool: a named dispatcher actor lending N evaluator actors to all trials.

``ray.util.ActorPool`` is driver-local bookkeeping and cannot be shared between Tune
trials (separate processes), so the sweep creates one named async
:class:`EvalDispatcher` that owns the :class:`EvaluatorActor` s; each trial looks it up by
name and calls ``evaluate``.  The dispatcher queues callers while every evaluator is busy,
and when an evaluator dies mid-job (a preempted node, a killed process) it replaces the
actor and retries the job, so every job returns exactly one set of rows.

Checkpoints travel through the object store (``ray.put`` of the weights-only checkpoint
dict), so evaluators on other nodes need no shared filesystem.  Each evaluator keeps a
transfer cache: adversarial examples of the reference model are crafted once per
(attack, norm, eps) and reused for every later trial.
"""
from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import time
from typing import Any, Mapping

import ray

logger = logging.getLogger(__name__)

# keys of a space's evaluation: section that are not EvalPlan fields: the pool's size
POOL_KEYS = {"actors", "cpus_per_actor", "gpus_per_actor"}
REFERENCE_LABEL = "sl_reference"
SEARCH_PLAN, CONFIRM_PLAN = "search", "confirm"


def plan_from_spec(ev: Mapping[str, Any], has_reference: bool, split: str = "val"):
    """The :class:`~aerl_ray.evaluate.EvalPlan` of a space file's ``evaluation:`` section
    (its keys are EvalPlan fields plus the pool's ``actors``/``cpus_per_actor``/
    ``gpus_per_actor``), on ``split`` (the search: validation).  ``transfer`` crafts on the
    sweep's ``reference:`` model."""
    from aerl_ray.evalplan import REMOVED
    from aerl_ray.evaluate import EvalPlan, EvalPlanError

    fields = {f.name for f in dataclasses.fields(EvalPlan)}
    for k in set(ev) & set(REMOVED):
        raise EvalPlanError(f"{k} was removed: {REMOVED[k]}")
    unknown = set(ev) - fields - POOL_KEYS
    if unknown:
        raise EvalPlanError(f"unknown key(s) {sorted(unknown)}; known: "
                            f"{', '.join(sorted(fields | POOL_KEYS))}")
    kw = {k: v for k, v in ev.items() if k in fields}
    kw.setdefault("diagnostics", "cheap")  # every sweep trial gets the masking diagnostics
    kw["split"] = split
    attacks = kw.get("attacks", ("pgd",))
    attacks = attacks.split(",") if isinstance(attacks, str) else list(attacks)
    if "transfer" in attacks and not kw.get("transfer_source"):
        if not has_reference:
            raise EvalPlanError("attack 'transfer' needs a source: add a top-level 'reference:' "
                                "section (e.g. {regime: sl, epochs: 10}) or "
                                "evaluation.transfer_source: CKPT")
        kw["transfer_source"] = REFERENCE_LABEL
    if int(ev.get("actors", 1)) < 1:
        raise EvalPlanError("actors must be >= 1")
    return EvalPlan(**kw)


def headline_budgets(spec) -> dict[str, list[str]]:
    """norm -> budgets of the robust objectives (the "headline" budgets)."""
    from aerl_ray.attacks.threat import Norm

    out: dict[str, list[str]] = {}
    for o in spec.objectives:
        if o.attack is not None:
            out.setdefault(Norm.parse(o.norm).value.lower(), []).append(str(o.eps))
    return out


def confirm_plan_spec(spec) -> dict[str, Any]:
    """The confirmation stage's evaluation section: the search plan on the test split with
    AutoAttack ``standard`` at the headline budgets (added if the search did not run it),
    full masking diagnostics and ``confirm.n`` test images, then ``confirm.evaluation``'s
    overrides."""
    from aerl_ray.space import apply_overrides

    ev = {k: v for k, v in dict(spec.evaluation).items() if k not in POOL_KEYS}
    c = spec.confirm
    attacks = ev.get("attacks", ["pgd"])
    attacks = attacks.split(",") if isinstance(attacks, str) else list(attacks)
    if "autoattack" not in attacks:
        attacks.append("autoattack")
    params = {k: dict(v) for k, v in dict(ev.get("attack_params") or {}).items()
              if k != "autoattack"}  # the search's cheap AutoAttack settings do not carry over
    head = headline_budgets(spec)
    grids = dict(ev.get("grids") or {"linf": ["0", "8/255"]})
    base = {**ev, "attacks": attacks, "attack_params": params,
            "autoattack_version": "standard", "autoattack_attacks": [],
            "diagnostics": "full", "n": int(c.get("n") or ev.get("n", 1000))}
    if head:
        base["attack_grids"] = {"autoattack": {k: v for k, v in head.items() if k in
                                               {str(g).lower() for g in grids}}}
    return apply_overrides(base, c.get("evaluation") or {})


def confirm_plan_from_spec(spec):
    return plan_from_spec(confirm_plan_spec(spec), bool(spec.reference), split="test")


def check_objective(plan, attack: str, norm: str | None, eps: str | None) -> None:
    """An objective must name an attack and budget the plan evaluates."""
    from aerl_ray.attacks.threat import Norm, parse_eps
    from aerl_ray.evaluate import EvalPlanError

    base = attack.split(":")[0]
    if base not in plan.attacks:
        raise EvalPlanError(f"objective attack {attack!r} is not evaluated; evaluation.attacks "
                            f"is {list(plan.attacks)}")
    if norm is None or eps is None:
        raise EvalPlanError(f"objective on {attack!r} needs 'norm' and 'eps'")
    grids = dict(plan.grids)
    nrm = Norm.parse(norm).value
    if nrm not in grids or not any(abs(parse_eps(e) - parse_eps(eps)) < 1e-9 for e in grids[nrm]):
        raise EvalPlanError(f"objective budget {norm} {eps} is not in the evaluation grid "
                            f"{ {k: list(v) for k, v in grids.items()} }")


class SweepEvaluator:
    """Evaluates a trial's checkpoint dict with the plan of its phase (search: validation;
    confirm: test); the transfer source is the sweep's reference."""

    def __init__(self, plans: Mapping[str, Mapping[str, Any]], reference: dict | None,
                 seed: int, device: str = "cpu"):
        from aerl_ray.checkpoint import model_from_checkpoint
        from aerl_ray.evaluate import Evaluator

        self.plans = {}
        for phase, spec in plans.items():
            plan = plan_from_spec(spec, reference is not None,
                                  split="test" if phase == CONFIRM_PLAN else "val")
            if seed and "seed" not in spec:
                plan = dataclasses.replace(plan, seed=seed)
            self.plans[phase] = plan
        self.plan = self.plans[SEARCH_PLAN]
        self.source = model_from_checkpoint(reference)[0] if reference is not None else None
        self.base = Evaluator(device=device)  # its transfer cache and per-split data

    def evaluate(self, ckpt: dict, meta: Mapping[str, Any]) -> dict:
        """Rows, indicators and diagnostics of one checkpoint.

        ``meta["phase"]`` picks the plan (``search`` or ``confirm``); ``meta["diagnostics"]``
        (``off``/``cheap``/``full``) overrides the plan's level.  ``diagnostics`` maps
        check -> {value, reference, delta, flag, detail, ...} (aerl_ray.diagnostics);
        ``masking_suspected`` is True when any check (or any attack flag) fired.
        """
        from aerl_ray.evaluate import run_evaluation

        phase = meta.get("phase") or SEARCH_PLAN
        plan = self.plans[phase]
        data = self.base.eval_data(ckpt.get("config", {}), plan.split)
        t = time.perf_counter()
        ev = run_evaluation(
            ckpt, plan, data=data, run_id=meta.get("run_id", ""),
            trial_id=meta.get("trial_id", ""), cache=self.base.cache, source=self.source,
            device=self.base.device, label=meta.get("checkpoint") or None,
            source_label=REFERENCE_LABEL if self.source is not None else None,
            diagnostics=meta.get("diagnostics") or None, phase=phase)
        if ev.diagnostics is not None:
            diag = ev.diagnostics.to_dict()
            suspected = ev.diagnostics.masking_suspected
        else:  # diagnostics off: only the attacks' own flags
            flags = sorted({f for r in ev.rows for f in json.loads(r["flags"])})
            diag = {"attack_flags": {"value": len(flags), "reference": 0, "delta": 0.0,
                                     "flag": bool(flags), "detail": "; ".join(flags),
                                     "level": "off"}}
            suspected = bool(flags)
        return {"rows": ev.rows, "indicators": ev.indicators,
                "seconds": time.perf_counter() - t, "diagnostics": diag,
                "diagnostics_level": meta.get("diagnostics") or plan.diagnostics,
                "masking_suspected": bool(suspected)}


@ray.remote(max_restarts=2, max_task_retries=0)
class EvaluatorActor:
    """Holds an :class:`aerl_ray.evaluate.Evaluator` (plan, reference model, caches)."""

    def __init__(self, plans: dict, reference: dict | None, seed: int,
                 plugins: list | None = None):
        import torch

        from aerl_ray.plugins import load_in_worker

        load_in_worker(plugins or [])

        gpus = ray.get_runtime_context().get_assigned_resources().get("GPU", 0)
        device = "cuda" if gpus and torch.cuda.is_available() else "cpu"
        self.evaluator = SweepEvaluator(plans, reference, seed, device)
        self.jobs = 0

    def evaluate(self, ckpt: dict, meta: dict) -> dict:
        self.jobs += 1
        return self.evaluator.evaluate(ckpt, meta)

    def info(self) -> dict:
        import os

        import psutil

        return {"pid": os.getpid(), "jobs": self.jobs,
                "rss": psutil.Process().memory_info().rss}


@ray.remote(num_cpus=0, max_restarts=-1, max_task_retries=-1)
class EvalDispatcher:
    """Async actor: many trials call :meth:`evaluate` concurrently; each call borrows one
    idle evaluator and returns it afterwards."""

    def __init__(self, n: int, plans: dict, reference_ref: list | None, seed: int,
                 actor_options: dict, max_attempts: int = 3, plugins: list | None = None):
        self.plans, self.seed, self.plugins = plans, seed, plugins or []
        self.reference_ref = reference_ref[0] if reference_ref else None
        self.options = actor_options
        self.max_attempts = max_attempts
        self.idle: asyncio.Queue = asyncio.Queue()
        self.actors = [self._new_actor(i) for i in range(n)]
        for a in self.actors:
            self.idle.put_nowait(a)
        self.retries = 0

    def _new_actor(self, i: int):
        return EvaluatorActor.options(**self.options).remote(
            self.plans, self.reference_ref, self.seed, self.plugins)

    async def evaluate(self, ckpt_ref: list, meta: dict) -> dict:
        """Evaluate one checkpoint (passed as ``[ObjectRef]`` so it is not copied here)."""
        last_err: Exception | None = None
        for attempt in range(self.max_attempts):
            actor = await self.idle.get()
            try:
                result = await actor.evaluate.remote(ckpt_ref[0], meta)
            except (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError) as e:
                last_err = e
                self.retries += 1
                logger.warning("evaluator died during %s (attempt %d): %s; replacing it",
                               meta.get("trial_id"), attempt + 1, e)
                ray.kill(actor, no_restart=True)
                replacement = self._new_actor(len(self.actors))
                self.actors = [replacement if a is actor else a for a in self.actors]
                self.idle.put_nowait(replacement)
                continue
            self.idle.put_nowait(actor)
            return result
        raise RuntimeError(f"evaluation of {meta.get('trial_id')} failed on "
                           f"{self.max_attempts} evaluators: {last_err}")

    async def stats(self) -> dict[str, Any]:
        return {"actors": len(self.actors), "idle": self.idle.qsize(), "retries": self.retries}

    async def actor_handles(self) -> list:
        return list(self.actors)


def start_pool(name: str, namespace: str, n: int, plans: dict, reference: dict | None,
               seed: int, cpus: float, gpus: float, plugins: list | None = None):
    """Create the named dispatcher (and its evaluators); returns the handle.  ``plans``:
    phase (search, confirm) -> evaluation section."""
    # SPREAD: evaluators land on different nodes (a lost node takes one evaluator, not all)
    options: dict[str, Any] = {"num_cpus": cpus, "scheduling_strategy": "SPREAD"}
    if gpus:
        options["num_gpus"] = gpus
    ref = [ray.put(reference)] if reference is not None else None
    _ALIVE[name] = ref  # the driver owns the reference: restarted actors need it in scope
    return EvalDispatcher.options(name=name, namespace=namespace, lifetime=None).remote(
        n, plans, ref, seed, options, plugins=plugins)


_ALIVE: dict[str, Any] = {}
