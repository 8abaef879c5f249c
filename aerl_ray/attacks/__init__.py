"""Attacks: threat models, the ATTACKS registry and the registered attacks.

Importing this package registers every attack (pgd, fgsm, autoattack, square, transfer);
call them through :func:`run_attack` / :func:`robustness_curve`.
"""
from aerl_ray.attacks.base import (ATTACKS, AttackInputError, AttackResult, AttackSpec,
                                   check_images, check_logits, parse_eps_grid, predict,
                                   register_attack, robustness_curve, run_attack)
from aerl_ray.attacks.threat import Norm, Threat, parse_eps
from aerl_ray.attacks import autoattack, fmn, pgd, square, transfer  # noqa: F401  (register)
from aerl_ray.attacks.pgd import LOSSES, fgsm, pgd_curve, pgd_core
from aerl_ray.attacks.transfer import TransferCache

__all__ = ["ATTACKS", "AttackInputError", "AttackResult", "AttackSpec", "LOSSES", "Norm",
           "Threat", "TransferCache", "check_images", "check_logits", "fgsm",
           "parse_eps", "parse_eps_grid", "pgd_core", "pgd_curve", "predict",
           "register_attack", "robustness_curve", "run_attack"]
