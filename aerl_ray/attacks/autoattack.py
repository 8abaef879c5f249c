"""Adapter over AutoAttack (Croce & Hein 2020): ``pyautoattack`` (preferred) or the
upstream ``autoattack`` package.

AutoAttack is the field's accepted evaluation, so we run the reference code rather than a
re-implementation, and only translate: our :class:`Threat` to its ``norm``/``eps``, its
version or custom attack list, and its check warnings (``check_randomized``,
``check_range_output``, ``check_dynamic``, ``check_n_classes``, zero DLR gradients,
``check_square_sr``) into :attr:`AttackResult.flags`.  pyautoattack reports them through
the ``auto-attack`` Python logger, upstream through ``warnings``/its own logger; both are
captured.  Its global RNG seeding is confined with ``torch.random.fork_rng``.
"""
from __future__ import annotations

import importlib
import logging
import warnings
from typing import Any, Sequence

import torch
from torch import nn

from aerl_ray.attacks.base import AttackResult, predict, register_attack
from aerl_ray.attacks.threat import Threat

logger = logging.getLogger(__name__)

VERSIONS = ("standard", "plus", "rand", "custom")
SUBATTACKS = ("apgd-ce", "apgd-dlr", "fab", "square", "apgd-t", "fab-t")


def backend() -> tuple[str, Any]:
    """(package name, module) of the installed AutoAttack; a clear ImportError if none."""
    for name in ("pyautoattack", "autoattack"):
        try:
            return name, importlib.import_module(name)
        except ImportError:
            continue
    raise ImportError("AutoAttack is not installed: `pip install pyautoattack` (or "
                      "fra31/auto-attack's `autoattack`)")


class _FlagHandler(logging.Handler):
    """Collects WARNING+ records of the ``auto-attack`` logger."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


class _UpstreamLogger:
    """Stand-in for upstream AutoAttack's ``Logger`` (a ``.log(str)`` method)."""

    def __init__(self) -> None:
        self.messages: list[str] = []

    def log(self, msg: str) -> None:
        if "warning" in str(msg).lower():
            self.messages.append(str(msg))


def _configure(adv: Any, version: str, n_iter: int | None, apgd_restarts: int | None,
               n_target_classes: int | None, square_queries: int | None) -> None:
    """Override iteration/restart/query counts (cheap subsets for searches)."""
    for a in (adv.apgd, adv.apgd_targeted):
        if n_iter is not None:
            a.n_iter = n_iter
    if n_iter is not None:
        adv.fab.n_iter = n_iter
    if apgd_restarts is not None:
        adv.apgd.n_restarts = apgd_restarts
    elif version == "custom":
        adv.apgd.n_restarts = 1  # the constructor's 5 is the `plus` setting
    if n_target_classes is not None:
        adv.apgd_targeted.n_target_classes = n_target_classes
        adv.fab.n_target_classes = n_target_classes
    if square_queries is not None:
        adv.square.n_queries = square_queries


def validate(version: str, attacks: Sequence[str] | None) -> None:
    if version not in VERSIONS:
        raise ValueError(f"unknown AutoAttack version {version!r}; known: {', '.join(VERSIONS)}")
    if attacks is not None:
        bad = [a for a in attacks if a not in SUBATTACKS]
        if bad:
            raise ValueError(f"unknown AutoAttack attack(s) {bad}; known: {', '.join(SUBATTACKS)}")
        if version != "custom":
            raise ValueError("an AutoAttack attack list needs version='custom'")
        if not attacks:
            raise ValueError("the AutoAttack attack list is empty")
    elif version == "custom":
        raise ValueError("version='custom' needs an attack list, e.g. apgd-ce,apgd-t")


@register_attack("autoattack", kind="white-box",
                 fast_params={"version": "custom", "attacks": ("apgd-ce",), "n_iter": 10})
def autoattack(model: nn.Module, x: torch.Tensor, y: torch.Tensor, threat: Threat, *,
               version: str = "standard", attacks: Sequence[str] | None = None,
               seed: int = 0, batch_size: int = 500, n_iter: int | None = None,
               apgd_restarts: int | None = None, n_target_classes: int | None = None,
               square_queries: int | None = None) -> AttackResult:
    """AutoAttack's ``run_standard_evaluation`` (worst case over its attacks per example).

    Args:
        version: ``standard`` (APGD-CE, APGD-T, FAB-T, Square-5000), ``plus``, ``rand``
            or ``custom`` (with ``attacks``).
        attacks: sub-attacks for ``custom``, e.g. ``("apgd-ce", "apgd-t")``.
        seed: AutoAttack's seed.
        batch_size: AutoAttack's batch size.
        n_iter, apgd_restarts, n_target_classes, square_queries: optional overrides of
            the version's settings (leave None for the reference settings).
    """
    validate(version, attacks)
    name, mod = backend()
    device = x.device
    flags: list[str] = []
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        if name == "pyautoattack":
            adv = mod.AutoAttack(model, norm=threat.norm.value, eps=threat.eps,
                                 version=version, device=device, seed=seed,
                                 attacks=list(attacks) if attacks else None)
            _configure(adv, version, n_iter, apgd_restarts, n_target_classes, square_queries)
            aa_logger = logging.getLogger("auto-attack")
            handler, old_level = _FlagHandler(), aa_logger.level
            aa_logger.addHandler(handler)
            if aa_logger.getEffectiveLevel() > logging.WARNING:
                aa_logger.setLevel(logging.WARNING)
            try:
                x_adv, _ = adv.run_standard_evaluation(x, y, batch_size=batch_size)
            finally:
                aa_logger.removeHandler(handler)
                aa_logger.setLevel(old_level)
            flags += handler.messages
        else:  # upstream fra31/auto-attack
            adv = mod.AutoAttack(model, norm=threat.norm.value, eps=threat.eps,
                                 version=version, device=device, seed=seed,
                                 attacks_to_run=list(attacks) if attacks else [])
            _configure(adv, version, n_iter, apgd_restarts, n_target_classes, square_queries)
            up_logger = _UpstreamLogger()
            adv.logger = up_logger
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                x_adv = adv.run_standard_evaluation(x, y, bs=batch_size)
            flags += up_logger.messages + [str(w.message) for w in caught]
    flags = [f"autoattack: {m}" for m in flags]
    for m in flags:
        logger.warning("%s", m)
    x_adv = x_adv.detach()
    success = (predict(model, x_adv, batch_size) != y).cpu()
    return AttackResult(x_adv, success, torch.full((len(x),), float("nan")), flags=flags)
