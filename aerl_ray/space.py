"""Search spaces: the YAML schema of ``search_spaces/*.yaml``, validated before Ray starts.

A space file has these top-level keys (all but ``parameters`` and ``objectives`` optional)::

    name: quickstart                 # experiment name
    seed: 0                          # searcher seed; trial seeds derive from it
    fixed: {dataset: digits, model: cnn4, epochs: 6}   # TrainConfig values for every trial
    parameters:                      # searched, define-by-run (Optuna)
      regime: {type: categorical, choices: [sl, rl, rl_adv, hybrid]}
      lr: {type: float, low: 3.0e-4, high: 3.0e-3, log: true}
      switch_epoch: {type: int, low: 1, high: 4, when: {regime: [hybrid]}}   # conditional
    points_to_evaluate: [{regime: sl, lr: 1.0e-3}]   # tried first (partial points allowed)
    objectives:                      # Pareto objectives of the multi-objective study
      - {name: clean_acc, direction: max}
      - {name: robust_aa, attack: autoattack, norm: linf, eps: 8/255, direction: max}
    sampler: {type: tpe}             # tpe | nsga2 | random | grid (+ options, e.g. population_size)
    num_samples: 8
    max_concurrent: 0                # 0 = as many as the cluster's free resources allow
    resources: {workers: 1, cpus_per_worker: 1, gpus_per_worker: 0, use_gpu: auto,
                mode: auto}          # mode: auto | in_process | ray_train
    scheduler: {type: none}          # or {type: asha, metric: val_acc, mode: max,
                                     #      grace_period: 2, reduction_factor: 2}
                                     # or {type: moasha, grace_period: 3, reduction_factor: 3,
                                     #      rung_metrics: [val_acc, val_robust_acc],
                                     #      mode: stop | promote, noise_aware: false,
                                     #      rung: {norm: linf, eps: 0.1, steps: 10, n: 256}}
                                     # (aerl_ray.moasha; rung metrics on validation)
    evaluation: {...}                # the search's evaluation plan (aerl_ray.evalplan.EvalPlan),
                                     # always on the validation split
    confirm:                         # the confirmation stage (on by default)
      seeds: 3                       # retrain each confirmed configuration with 3 new seeds
      configs: front+best            # front (the search front) or front+best (+ the best
                                     # trial of each regime on the robust objective)
      n: 0                           # test images (0 = the search plan's n); every attack
      evaluation: {...}              # the same n; overrides of the confirmation plan, which
                                     # is the search plan on test + AutoAttack standard at the
                                     # headline budget + full diagnostics
      enabled: true
    keep_checkpoints: 2              # Tune checkpoints kept per trial (each holds last.pt and
                                     # the selected best.pt)
    plugins: [mylab.regimes, ./my_attacks.py]   # your own regimes/models/attacks/datasets
                                     # (aerl_ray.plugins; paths relative to this file)
    smoke: {...}                     # overrides applied by --smoke (tiny runs for tests)

Keys of ``fixed``, ``parameters`` and ``points_to_evaluate`` are flat
:class:`~aerl_ray.config.TrainConfig` names (the same as ``python -m aerl_ray.train``
flags).  A parameter with ``when: {other: [values]}`` is only suggested when ``other`` (a
categorical parameter defined before it) takes one of those values.

Checkpoint selection (``select``, see :mod:`aerl_ray.selection`) defaults to the space's
robust objective: unless ``fixed`` or ``parameters`` set them, ``select_eps`` and
``select_norm`` are the first robust objective's budget, so adversarial and hybrid trials
keep their best *robust validation* epoch of the final regime.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import yaml

from aerl_ray.config import ConfigError, TrainConfig, flat_fields

TOP_KEYS = {"name", "seed", "fixed", "parameters", "points_to_evaluate", "objectives",
            "sampler", "num_samples", "max_concurrent", "resources", "scheduler", "evaluation",
            "smoke", "description", "reference", "confirm", "keep_checkpoints", "plugins"}
CONFIRM_KEYS = {"enabled", "seeds", "configs", "n", "evaluation"}
CONFIRM_CONFIGS = ("front", "front+best")
PARAM_TYPES = {"categorical": {"choices"}, "float": {"low", "high", "log", "step"},
               "int": {"low", "high", "log", "step"}}
SAMPLERS = ("tpe", "nsga2", "random", "grid")
DIRECTIONS = ("max", "min")


class SpaceError(ConfigError):
    """The search-space file is invalid; the message names the file, key and fix."""


@dataclass(frozen=True)
class Param:
    name: str
    type: str
    choices: tuple = ()
    low: float | None = None
    high: float | None = None
    log: bool = False
    step: float | None = None
    when: tuple[tuple[str, tuple], ...] = ()  # ((other_param, allowed values), ...)

    def active(self, values: Mapping[str, Any]) -> bool:
        return all(values.get(k) in allowed for k, allowed in self.when)

    def suggest(self, trial) -> Any:
        if self.type == "categorical":
            return trial.suggest_categorical(self.name, list(self.choices))
        if self.type == "int":
            return trial.suggest_int(self.name, int(self.low), int(self.high),
                                     step=int(self.step or 1), log=self.log)
        return trial.suggest_float(self.name, self.low, self.high, step=self.step, log=self.log)

    def grid_values(self) -> list:
        if self.type == "categorical":
            return list(self.choices)
        if self.type == "int":
            return list(range(int(self.low), int(self.high) + 1, int(self.step or 1)))
        if self.step:
            n = int(round((self.high - self.low) / self.step))
            return [self.low + i * self.step for i in range(n + 1)]
        raise SpaceError(f"parameter {self.name!r}: the grid sampler needs a 'step' for floats")


@dataclass(frozen=True)
class Objective:
    name: str
    direction: str = "max"
    attack: str | None = None  # None: a clean metric (clean_acc or val_acc)
    norm: str | None = None
    eps: str | None = None  # as written ("8/255")

    @property
    def mode(self) -> str:
        return self.direction


@dataclass(frozen=True)
class SweepSpec:
    name: str
    params: tuple[Param, ...]
    objectives: tuple[Objective, ...]
    fixed: Mapping[str, Any] = field(default_factory=dict)
    seed: int = 0
    points_to_evaluate: tuple[Mapping[str, Any], ...] = ()
    sampler: Mapping[str, Any] = field(default_factory=lambda: {"type": "tpe"})
    num_samples: int = 8
    max_concurrent: int = 0
    resources: Mapping[str, Any] = field(default_factory=dict)
    scheduler: Mapping[str, Any] = field(default_factory=lambda: {"type": "none"})
    evaluation: Mapping[str, Any] = field(default_factory=dict)
    reference: Mapping[str, Any] = field(default_factory=dict)
    confirm: Mapping[str, Any] = field(default_factory=dict)
    keep_checkpoints: int = 2
    plugins: tuple = ()  # aerl_ray.plugins.Plugin: imported before validation
    source: str = ""
    raw: Mapping[str, Any] = field(default_factory=dict)

    # -- Optuna define-by-run ----------------------------------------------------------
    def define_by_run(self, trial) -> dict[str, Any]:
        """Suggest the active parameters; returns the constants (fixed values)."""
        values: dict[str, Any] = {}
        for p in self.params:
            if p.active(values):
                values[p.name] = p.suggest(trial)
        return dict(self.fixed)

    def train_config(self, params: Mapping[str, Any], seed: int | None = None) -> TrainConfig:
        flat = {**self.fixed, **{k: v for k, v in params.items() if k in flat_fields()}}
        if seed is not None:
            flat["seed"] = seed
        return TrainConfig.from_flat(flat)

    def resource(self, key: str, default: Any) -> Any:
        return self.resources.get(key, default)


def _err(src: str, msg: str) -> SpaceError:
    return SpaceError(f"{src}: {msg}")


def _parse_param(src: str, name: str, d: Any, known: list[str], defined: dict[str, Param]
                 ) -> Param:
    if name not in flat_fields():
        raise _err(src, f"parameters.{name}: unknown parameter; use a training config key: "
                        f"{', '.join(sorted(flat_fields()))}")
    if not isinstance(d, Mapping) or d.get("type") not in PARAM_TYPES:
        raise _err(src, f"parameters.{name}: needs 'type' one of {sorted(PARAM_TYPES)}")
    allowed = PARAM_TYPES[d["type"]] | {"type", "when"}
    extra = set(d) - allowed
    if extra:
        raise _err(src, f"parameters.{name}: unknown key(s) {sorted(extra)}; allowed: "
                        f"{sorted(allowed)}")
    when = []
    for other, vals in (d.get("when") or {}).items():
        if other not in defined:
            raise _err(src, f"parameters.{name}: condition on {other!r}, which is not a "
                            "parameter defined above it; define the categorical parameter "
                            f"{other!r} first (known so far: {sorted(defined) or 'none'})")
        cond = defined[other]
        vals = tuple(vals if isinstance(vals, (list, tuple)) else [vals])
        if cond.type != "categorical" or not set(vals) <= set(cond.choices):
            raise _err(src, f"parameters.{name}: when {other} in {list(vals)}: {other} must be "
                            f"categorical with those choices ({list(cond.choices)})")
        when.append((other, vals))
    if d["type"] == "categorical":
        choices = d.get("choices")
        if not choices or not isinstance(choices, list):
            raise _err(src, f"parameters.{name}: categorical needs a non-empty 'choices' list")
        return Param(name, "categorical", choices=tuple(choices), when=tuple(when))
    try:
        low, high = float(d["low"]), float(d["high"])
    except (KeyError, TypeError, ValueError):
        raise _err(src, f"parameters.{name}: {d['type']} needs numeric 'low' and 'high'") from None
    if not (math.isfinite(low) and math.isfinite(high) and low < high):
        raise _err(src, f"parameters.{name}: bad range low={low} high={high} (need low < high)")
    if d.get("log") and low <= 0:
        raise _err(src, f"parameters.{name}: log scale needs low > 0 (got {low})")
    if d["type"] == "int" and (low != int(low) or high != int(high)):
        raise _err(src, f"parameters.{name}: int bounds must be integers")
    return Param(name, d["type"], low=low, high=high, log=bool(d.get("log", False)),
                 step=d.get("step"), when=tuple(when))


def _corner_configs(spec: SweepSpec) -> list[dict]:
    """Parameter assignments at the corners of the space (every choice of every active
    categorical, conditional ones included, and each numeric param at low or high), used
    to validate that every region builds a valid TrainConfig (e.g. a searched adv_rate
    in a branch where adv_attack may be trades)."""
    out: list[dict] = []
    for end in ("low", "high"):
        partial: list[dict] = [{}]
        for p in spec.params:  # conditions only refer to parameters defined before
            grown = []
            for values in partial:
                if not p.active(values):
                    grown.append(values)
                elif p.type == "categorical":
                    grown += [{**values, p.name: c} for c in p.choices]
                else:
                    v = getattr(p, end)
                    grown.append({**values, p.name: int(v) if p.type == "int" else v})
            partial = grown
        out += partial
    return out


def parse_space(raw: Mapping[str, Any], source: str = "<space>") -> SweepSpec:
    """Validate a parsed YAML mapping and return the :class:`SweepSpec`."""
    from aerl_ray.evalpool import check_objective, confirm_plan_from_spec, plan_from_spec

    src = source
    if not isinstance(raw, Mapping):
        raise _err(src, "the file must contain a mapping of keys")
    unknown = set(raw) - TOP_KEYS
    if unknown:
        raise _err(src, f"unknown key(s) {sorted(unknown)}; allowed: {sorted(TOP_KEYS)}")
    for k in ("parameters", "objectives"):
        if not raw.get(k):
            raise _err(src, f"missing required key {k!r}")
    plugins = _load_space_plugins(src, raw.get("plugins"))
    fixed = dict(raw.get("fixed") or {})
    for k in fixed:
        if k not in flat_fields():
            raise _err(src, f"fixed.{k}: unknown training config key; known: "
                            f"{', '.join(sorted(flat_fields()))}")
    params: dict[str, Param] = {}
    for name, d in raw["parameters"].items():
        if name in fixed:
            raise _err(src, f"{name!r} is both fixed and searched; keep one")
        params[name] = _parse_param(src, name, d, list(params), params)
    objectives = []
    for i, o in enumerate(raw["objectives"]):
        if not isinstance(o, Mapping) or "name" not in o:
            raise _err(src, f"objectives[{i}]: needs at least 'name' (and 'direction')")
        extra = set(o) - {"name", "direction", "attack", "norm", "eps"}
        if extra:
            raise _err(src, f"objectives[{i}]: unknown key(s) {sorted(extra)}")
        if o.get("direction", "max") not in DIRECTIONS:
            raise _err(src, f"objectives[{i}]: direction must be max or min")
        if o.get("attack") is None and o["name"] not in ("clean_acc", "val_acc"):
            raise _err(src, f"objectives[{i}] {o['name']!r}: give 'attack', 'norm' and 'eps' "
                            "for a robust-accuracy objective, or name it clean_acc / val_acc")
        objectives.append(Objective(o["name"], o.get("direction", "max"), o.get("attack"),
                                    o.get("norm"), None if o.get("eps") is None else str(o["eps"])))
    if len({o.name for o in objectives}) != len(objectives):
        raise _err(src, "objective names must be unique")
    sampler = dict(raw.get("sampler") or {"type": "tpe"})
    if sampler.get("type") not in SAMPLERS:
        raise _err(src, f"sampler.type must be one of {list(SAMPLERS)}")
    defaults = _selection_defaults(objectives, fixed, raw["parameters"])
    sched = dict(raw.get("scheduler") or {"type": "none"})
    if sched.get("type") not in SCHEDULERS:
        raise _err(src, f"scheduler.type must be one of {list(SCHEDULERS)}")
    if sched["type"] == "asha" and not sched.get("metric"):
        raise _err(src, "scheduler: asha needs 'metric', a per-epoch scalar such as val_acc")
    if sched["type"] == "moasha":
        sched = _parse_moasha(src, sched, fixed, raw, defaults)
        defaults.update(sched.pop("_select"))  # the rung PGD is the robust selection's
    fixed = {**defaults, **fixed}
    res = dict(raw.get("resources") or {})
    extra = set(res) - {"workers", "cpus_per_worker", "gpus_per_worker", "use_gpu", "mode",
                        "driver_resource"}
    if extra:
        raise _err(src, f"resources: unknown key(s) {sorted(extra)}")
    if int(res.get("workers", 1)) < 1 or float(res.get("cpus_per_worker", 1)) <= 0:
        raise _err(src, "resources: workers must be >= 1 and cpus_per_worker > 0")
    if res.get("mode", "auto") not in ("auto", "in_process", "ray_train"):
        raise _err(src, "resources.mode must be auto, in_process or ray_train")
    num_samples = int(raw.get("num_samples", 8))
    if num_samples < 1:
        raise _err(src, "num_samples must be >= 1")
    confirm = _parse_confirm(src, raw.get("confirm"))
    keep = raw.get("keep_checkpoints", 2)
    if not isinstance(keep, int) or keep < 1:
        raise _err(src, f"keep_checkpoints={keep!r} must be an integer >= 1 (each checkpoint "
                        "holds last.pt for resuming and the selected best.pt)")
    if (raw.get("evaluation") or {}).get("split", "val") != "val":
        raise _err(src, "evaluation.split: the search evaluates on the validation split "
                        "(objectives select hyperparameters); the test split is read only by "
                        "the confirm: stage")
    spec = SweepSpec(name=str(raw.get("name") or Path(src).stem), params=tuple(params.values()),
                     objectives=tuple(objectives), fixed=fixed, seed=int(raw.get("seed", 0)),
                     points_to_evaluate=tuple(raw.get("points_to_evaluate") or ()),
                     sampler=sampler, num_samples=num_samples,
                     max_concurrent=int(raw.get("max_concurrent", 0)), resources=res,
                     scheduler=sched, evaluation=dict(raw.get("evaluation") or {}),
                     reference=dict(raw.get("reference") or {}), confirm=confirm,
                     keep_checkpoints=keep, plugins=tuple(plugins), source=src, raw=dict(raw))
    # every corner of the space and every point to evaluate must build a valid config
    for values in _corner_configs(spec) + [dict(p) for p in spec.points_to_evaluate]:
        for k in values:
            if k not in params:
                raise _err(src, f"points_to_evaluate: {k!r} is not a searched parameter")
        try:
            spec.train_config(values)
        except ConfigError as e:
            raise _err(src, f"parameters give an invalid training config at {values}: {e}") from None
    try:
        plan = plan_from_spec(spec.evaluation, has_reference=bool(spec.reference))
        for o in spec.objectives:
            if o.attack is not None:
                check_objective(plan, o.attack, o.norm, o.eps)
    except (ValueError, KeyError, TypeError) as e:
        raise _err(src, f"evaluation: {e}") from None
    if spec.confirm.get("enabled"):
        try:
            cplan = confirm_plan_from_spec(spec)
            for o in spec.objectives:
                if o.attack is not None:
                    check_objective(cplan, o.attack, o.norm, o.eps)
        except (ValueError, KeyError, TypeError) as e:
            raise _err(src, f"confirm.evaluation: {e}") from None
    bad_ref = set(spec.reference) - set(flat_fields()) - {"checkpoint"}
    if bad_ref:
        raise _err(src, f"reference: unknown key(s) {sorted(bad_ref)}; give training config "
                        "keys (e.g. regime: sl, epochs: 10) or checkpoint: PATH")
    if spec.reference and not spec.reference.get("checkpoint"):
        try:
            spec.train_config({k: v for k, v in spec.reference.items()})
        except ConfigError as e:
            raise _err(src, f"reference: {e}") from None
    return spec


SCHEDULERS = ("none", "asha", "moasha")
MOASHA_KEYS = {"type", "grace_period", "reduction_factor", "max_t", "rung_metrics", "modes",
               "mode", "noise_aware", "rung"}
RUNG_METRICS = ("val_acc", "val_robust_acc", "train_loss", "train_acc", "mean_reward")


def _parse_moasha(src: str, sched: dict, fixed: Mapping[str, Any], raw: Mapping,
                  defaults: Mapping[str, Any]) -> dict:
    """Validate a moasha scheduler section; its ``rung`` PGD becomes the select_* settings
    (one measurement serves the rungs and the robust checkpoint selection)."""
    from aerl_ray.moasha_config import MOASHAConfig

    extra = set(sched) - MOASHA_KEYS
    if extra:
        raise _err(src, f"scheduler: unknown key(s) {sorted(extra)}; allowed: "
                        f"{sorted(MOASHA_KEYS)}")
    metrics = list(sched.get("rung_metrics") or ["val_acc", "val_robust_acc"])
    bad = [m for m in metrics if m not in RUNG_METRICS]
    if bad:
        raise _err(src, f"scheduler.rung_metrics {bad}: rung metrics are per-epoch "
                        f"validation/training values, one of {list(RUNG_METRICS)}")
    modes = list(sched.get("modes") or ["min" if m == "train_loss" else "max"
                                        for m in metrics])
    ep = (raw.get("parameters") or {}).get("epochs") or {}
    epochs = fixed.get("epochs", ep.get("high") or max(ep.get("choices") or [0]) or None)
    max_t = sched.get("max_t") or epochs or 1000
    try:
        cfg = MOASHAConfig(tuple(metrics), tuple(modes), "epochs_done",
                           sched.get("grace_period", 1), sched.get("reduction_factor", 3),
                           max_t, sched.get("mode", "stop"), bool(sched.get("noise_aware",
                                                                           False)))
    except (ValueError, TypeError) as e:
        raise _err(src, f"scheduler: {e}") from None
    rung = dict(sched.get("rung") or {})
    extra = set(rung) - {"norm", "eps", "steps", "n"}
    if extra:
        raise _err(src, f"scheduler.rung: unknown key(s) {sorted(extra)}; give norm, eps, "
                        "steps and n of the rung PGD")
    select = {f"select_{k}": (str(v).lower() if k == "norm" else v) for k, v in rung.items()}
    if "select_eps" in select:
        from aerl_ray.attacks.threat import parse_eps

        select["select_eps"] = parse_eps(select["select_eps"])
    clash = [k for k in select if k in fixed and fixed[k] != select[k]]
    if clash:
        raise _err(src, f"scheduler.rung and fixed both set {clash}; set the rung PGD in one "
                        "place (it is also the robust checkpoint selection's)")
    if "val_robust_acc" in metrics and not (select.get("select_eps") or fixed.get("select_eps")
                                            or defaults.get("select_eps")):
        raise _err(src, "scheduler: the rung metric val_robust_acc needs a PGD budget: give "
                        "scheduler.rung.eps (or a robust objective, whose budget is the "
                        "default)")
    return {"type": "moasha", "rung_metrics": list(cfg.metrics), "modes": list(cfg.modes),
            "grace_period": cfg.grace_period, "reduction_factor": cfg.reduction_factor,
            "max_t": cfg.max_t, "mode": cfg.mode, "noise_aware": cfg.noise_aware,
            "milestones": [m for m in cfg.milestones()], "_select": select}


def _load_space_plugins(src: str, specs: Any) -> list:
    """Import the space's plugins (paths relative to the space file) before anything is
    validated, so their regimes, models, attacks and datasets are known names."""
    from aerl_ray.plugins import PluginError, load_plugins

    if specs is None:
        return []
    if not isinstance(specs, list) or not all(isinstance(p, str) and p for p in specs):
        raise _err(src, "plugins: give a list of module names or paths, e.g. "
                        "[mylab.regimes, ./my_attacks.py]")
    base = Path(src).parent if src and not src.startswith("<") else Path(".")
    try:
        return load_plugins(specs, base_dir=base)
    except PluginError as e:
        raise _err(src, str(e)) from None


def _parse_confirm(src: str, raw: Any) -> dict[str, Any]:
    c = {"enabled": True, "seeds": 3, "configs": "front+best", "n": 0, "evaluation": {}}
    if raw is None:
        return c
    if not isinstance(raw, Mapping):
        raise _err(src, "confirm: must be a mapping (seeds, configs, n, evaluation, enabled)")
    extra = set(raw) - CONFIRM_KEYS
    if extra:
        raise _err(src, f"confirm: unknown key(s) {sorted(extra)}; allowed: "
                        f"{sorted(CONFIRM_KEYS)}")
    c.update(raw)
    if not isinstance(c["seeds"], int) or c["seeds"] < 1:
        raise _err(src, f"confirm.seeds={c['seeds']!r} must be an integer >= 1 (3 is the "
                        "usual minimum for an interval across seeds)")
    if c["configs"] not in CONFIRM_CONFIGS:
        raise _err(src, f"confirm.configs={c['configs']!r}; choose one of {list(CONFIRM_CONFIGS)}")
    if not isinstance(c["n"], int) or c["n"] < 0:
        raise _err(src, f"confirm.n={c['n']!r} must be an integer >= 0 (0 = the search's n)")
    if not isinstance(c["evaluation"] or {}, Mapping):
        raise _err(src, "confirm.evaluation must be a mapping of evaluation-plan keys")
    c["evaluation"] = dict(c["evaluation"] or {})
    c["enabled"] = bool(c["enabled"])
    return c


def _selection_defaults(objectives, fixed: Mapping[str, Any], params: Mapping[str, Any]
                        ) -> dict[str, Any]:
    """select_eps/select_norm from the first robust objective (unless set)."""
    from aerl_ray.attacks.threat import Norm, parse_eps

    robust = next((o for o in objectives if o.attack is not None), None)
    if robust is None or "select_eps" in fixed or "select_eps" in params:
        return {}
    out: dict[str, Any] = {"select_eps": parse_eps(robust.eps)}
    if "select_norm" not in fixed and "select_norm" not in params:
        out["select_norm"] = Norm.parse(robust.norm).value.lower()
    return out


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that rejects a key given twice in one mapping (YAML keeps the last one
    silently, which hides half of a config)."""


def _no_duplicates(loader: _StrictLoader, node: yaml.MappingNode, deep: bool = False):
    seen = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise yaml.constructor.ConstructorError(
                None, None, f"key {key!r} is given twice", key_node.start_mark)
        seen.add(key)
    return loader.construct_mapping(node, deep)


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _no_duplicates)


def load_space(path: str | Path, smoke: bool = False,
               overrides: Mapping[str, Any] | None = None,
               plugins: Sequence[str] = ()) -> SweepSpec:
    """Read and validate a space file; ``smoke`` applies its ``smoke:`` overrides, then
    ``overrides`` (e.g. ``{"num_samples": 2}``) are merged on top; ``plugins`` (module
    names or absolute paths, e.g. from ``--plugin``) are added to the file's."""
    path = Path(path)
    if not path.is_file():
        raise SpaceError(f"search space {path} does not exist; see search_spaces/ for examples")
    try:
        raw = yaml.load(path.read_text(), Loader=_StrictLoader)  # noqa: S506 (safe subclass)
    except yaml.YAMLError as e:
        raise SpaceError(f"{path}: invalid YAML: {e}") from None
    if smoke and isinstance(raw, Mapping) and raw.get("smoke"):
        raw = apply_overrides(raw, raw["smoke"])
    if overrides and isinstance(raw, Mapping):
        raw = apply_overrides(raw, overrides)
    if plugins and isinstance(raw, Mapping):
        raw = {**raw, "plugins": [*(raw.get("plugins") or []),
                                  *[str(Path(p).resolve()) if Path(p).exists() else p
                                    for p in plugins]]}
    return parse_space(raw, str(path))


def apply_overrides(raw: Mapping[str, Any], overrides: Mapping[str, Any]) -> dict:
    """Deep-merge ``overrides`` into ``raw`` (dicts merge, other values replace)."""
    out = copy.deepcopy(dict(raw))
    for k, v in overrides.items():
        if isinstance(v, Mapping) and isinstance(out.get(k), Mapping):
            out[k] = apply_overrides(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out
