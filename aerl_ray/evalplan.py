"""The evaluation plan: which attacks, norms, budgets and settings to run.

Kept apart from :mod:`aerl_ray.evaluate` because the sweep validates a search space's
``evaluation:`` section (and its objectives) against it long before any checkpoint
exists.  Everything is checked at construction -- unknown attack or norm (the message
lists the known ones), negative or unsorted budgets, unknown attack parameters, a bad
AutoAttack version/list, a transfer attack without a source -- so a bad request fails
before any model is loaded.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

from aerl_ray.attacks import ATTACKS, Norm, parse_eps, parse_eps_grid
from aerl_ray.attacks import autoattack as aa_mod

DIAGNOSTIC_LEVELS = ("off", "cheap", "full")  # see aerl_ray.diagnostics
SPLITS = ("val", "test")
REMOVED = {"autoattack_n": "every attack of an evaluation runs on the same n images (so "
                           "their numbers compare per example); lower n, or restrict "
                           "AutoAttack to the headline budget with attack_grids"}
DEFAULT_GRIDS = {"linf": ("0", "1/255", "2/255", "4/255", "8/255", "16/255"),
                 "l2": ("0", "0.125", "0.25", "0.5", "1.0", "2.0")}


class EvalPlanError(ValueError):
    """An evaluation request is invalid; the message says what to pass instead."""


def _freeze(mapping: Any) -> tuple:
    """A mapping (or pairs) as a sorted tuple of pairs, with list values as tuples."""
    items = mapping.items() if isinstance(mapping, Mapping) else mapping
    out = []
    for k, v in items:
        if isinstance(v, Mapping):
            v = _freeze(v)
        elif isinstance(v, list):
            v = tuple(v)
        out.append((str(k), v))
    return tuple(sorted(out))


@dataclass(frozen=True)
class EvalPlan:
    """What to evaluate.  Built once, validated at construction.

    Attributes:
        attacks: registry names (``pgd``, ``fgsm``, ``autoattack``, ``square``, ``transfer``).
        grids: norm -> budget grid (sorted; strings such as "8/255" keep their spelling in
            the rows); a mapping or pairs.
        n: evaluate the first n images of the split (0 = all).  Every attack runs on the
            same n images, so the attacks of one table are comparable per example.
        split: ``test`` (the untouched test split: the evaluate CLI, a sweep's confirmation
            stage) or ``val`` (the validation split: a sweep's search objectives, so the
            search never selects on test).
        batch_size: examples per forward pass.
        seed: seed of every attack.
        attack_params: attack name -> parameters (e.g. {"pgd": {"steps": 100}}).
        autoattack_version: ``standard``, ``plus``, ``rand`` or ``custom``.
        autoattack_attacks: sub-attacks for ``custom`` (e.g. apgd-ce, apgd-t).
        attack_grids: attack -> {norm: budgets}: run that attack only at these budgets of
            the grid (e.g. AutoAttack at the headline budget only: it dominates the cost);
            the other attacks run the whole grid.
        transfer_source: checkpoint the transfer attack crafts on (e.g. an SL reference).
        model: expected architecture of the checkpoint ("" = any).
        indicators: measure gradient indicators on a CE-PGD trajectory per norm.
        indicator_steps: PGD steps of that trajectory.
        indicator_eps: norm -> budget of that trajectory (default: the grid's middle
            non-zero budget).
        diagnostics: gradient-masking diagnostics (:mod:`aerl_ray.diagnostics`): ``off``,
            ``cheap`` (small subset, few extra attacks: the sweep's default) or ``full``
            (more examples, steps and restarts: for final Pareto trials).  They run at
            the indicator budget of each norm.
        diagnostics_n: examples of the diagnostics' extra attacks (0 = the level's
            default: 64 cheap, 256 full; capped at n).
    """

    attacks: tuple[str, ...] = ("pgd",)
    grids: Any = field(default_factory=lambda: {"linf": DEFAULT_GRIDS["linf"]})
    n: int = 1000
    batch_size: int = 500
    seed: int = 0
    attack_params: Any = ()
    autoattack_version: str = "standard"
    autoattack_attacks: tuple[str, ...] = ()
    split: str = "test"
    attack_grids: Any = ()
    transfer_source: str = ""
    model: str = ""
    indicators: bool = True
    indicator_steps: int = 20
    indicator_eps: Any = ()
    diagnostics: str = "off"
    diagnostics_n: int = 0

    def __post_init__(self) -> None:
        def err(msg: str) -> None:
            raise EvalPlanError(msg)

        attacks = (self.attacks.split(",") if isinstance(self.attacks, str)
                   else list(self.attacks))
        attacks = [a.strip() for a in attacks if a.strip()]
        if not attacks:
            err(f"no attacks given; known attacks: {', '.join(ATTACKS.names())}")
        for a in attacks:
            if a not in ATTACKS:
                err(f"unknown attack {a!r}; known attacks: {', '.join(ATTACKS.names())}")
        if len(set(attacks)) != len(attacks):
            err(f"attack listed twice: {attacks}")
        object.__setattr__(self, "attacks", tuple(attacks))
        grids = []
        for norm, eps in (self.grids.items() if isinstance(self.grids, Mapping)
                          else self.grids):
            try:
                nrm = Norm.parse(norm)
                eps = tuple(str(e) for e in eps)
                parse_eps_grid(eps)
            except ValueError as e:
                err(f"{norm}: {e}")
            grids.append((nrm.value, eps))
        if not grids:
            err("no norm/eps grid given")
        if len({g[0] for g in grids}) != len(grids):
            err("a norm is listed twice")
        object.__setattr__(self, "grids", tuple(grids))
        if self.n < 0:
            err(f"n={self.n} must be >= 0 (0 = the whole test set)")
        if self.batch_size < 1:
            err(f"batch_size={self.batch_size} must be >= 1")
        if self.split not in SPLITS:
            err(f"split={self.split!r}; evaluate on one of: {', '.join(SPLITS)}")
        sub = []
        given = self.attack_grids
        if isinstance(given, tuple) and all(isinstance(g, tuple) and len(g) == 3
                                            for g in given):  # already normalised (replace)
            given = {}
            for name, nrm, grid in self.attack_grids:
                given.setdefault(name, {})[nrm] = list(grid)
        for name, per_norm in _freeze(given):
            if name not in attacks:
                err(f"attack_grids names {name!r}, which is not among the attacks {attacks}")
            for norm, eps in per_norm:
                try:
                    nrm = Norm.parse(norm).value
                    vals = [parse_eps(e) for e in (eps if isinstance(eps, tuple) else (eps,))]
                except ValueError as e:
                    err(f"attack_grids.{name}: {e}")
                grid = dict(grids).get(nrm)
                if grid is None:
                    err(f"attack_grids.{name}: norm {nrm} has no grid")
                missing = [v for v in vals if not any(abs(v - parse_eps(g)) < 1e-9 for g in grid)]
                if missing:
                    err(f"attack_grids.{name}.{nrm}: budgets {missing} are not in the "
                        f"{nrm} grid {list(grid)}")
                sub.append((name, nrm, tuple(g for g in grid
                                             if any(abs(v - parse_eps(g)) < 1e-9 for v in vals))))
        object.__setattr__(self, "attack_grids", tuple(sub))
        if self.indicator_steps < 1:
            err(f"indicator_steps={self.indicator_steps} must be >= 1")
        params = _freeze(self.attack_params)
        for name, p in params:
            if name not in ATTACKS:  # params of registered but unused attacks are fine
                err(f"attack_params for unknown attack {name!r}; known attacks: "
                    f"{', '.join(ATTACKS.names())}")
            known = ATTACKS.get(name).param_names()
            bad = [k for k, _ in p if k not in known]
            if bad:
                err(f"attack {name!r} has no parameter(s) {bad}; known: {', '.join(known)}")
        object.__setattr__(self, "attack_params", params)
        aa_attacks = tuple(self.autoattack_attacks)
        version = self.autoattack_version
        if aa_attacks and version == "standard":
            version = "custom"  # a sub-attack list implies a custom version
            object.__setattr__(self, "autoattack_version", version)
        object.__setattr__(self, "autoattack_attacks", aa_attacks)
        try:
            aa_mod.validate(version, aa_attacks or None)
        except ValueError as e:
            err(str(e))
        if "transfer" in self.attacks and not self.transfer_source and \
                dict(self.params_for_raw("transfer")).get("source") is None:
            err("attack 'transfer' needs a source model: pass --transfer-source CKPT "
                "(transfer_source=...), e.g. the best.pt of an SL reference run trained on "
                "the same dataset, or drop 'transfer' from the attacks")
        ind = _freeze(self.indicator_eps)
        for norm, e in ind:
            try:
                Norm.parse(norm), parse_eps(e)
            except ValueError as ex:
                err(f"indicator_eps: {ex}")
        object.__setattr__(self, "indicator_eps", ind)
        if self.diagnostics not in DIAGNOSTIC_LEVELS:
            err(f"diagnostics={self.diagnostics!r}; known levels: "
                f"{', '.join(DIAGNOSTIC_LEVELS)}")
        if self.diagnostics_n < 0:
            err(f"diagnostics_n={self.diagnostics_n} must be >= 0 (0 = the level's default)")

    def params_for_raw(self, name: str) -> tuple:
        return dict(self.attack_params).get(name, ())

    def params_for(self, name: str) -> dict[str, Any]:
        """The full parameters of one attack: plan-wide settings + attack_params."""
        known = ATTACKS.get(name).param_names()
        p: dict[str, Any] = {}
        if "seed" in known:
            p["seed"] = self.seed
        if "batch_size" in known:
            p["batch_size"] = self.batch_size
        if name == "autoattack":
            p["version"] = self.autoattack_version
            if self.autoattack_attacks:
                p["attacks"] = list(self.autoattack_attacks)
        p.update({k: (dict(v) if isinstance(v, tuple) and v and isinstance(v[0], tuple)
                      else v) for k, v in self.params_for_raw(name)})
        return p

    def eps_grid(self, norm: str, attack: str | None = None) -> tuple[str, ...]:
        """The budgets of ``norm`` (of ``attack``, when attack_grids restricts it)."""
        nrm = Norm.parse(norm).value
        for name, n, grid in self.attack_grids:
            if name == attack and n == nrm:
                return grid
        return dict(self.grids)[nrm]

    def indicator_budget(self, norm: str) -> str | None:
        """The budget of the indicator trajectory for ``norm`` (None: no non-zero budget)."""
        given = {Norm.parse(k).value: v for k, v in self.indicator_eps}
        nrm = Norm.parse(norm).value
        if nrm in given:
            return str(given[nrm])
        nonzero = [e for e in self.eps_grid(nrm) if parse_eps(e) > 0]
        return nonzero[(len(nonzero) - 1) // 2] if nonzero else None
