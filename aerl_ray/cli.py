"""Command-line flags generated from the config dataclasses (one source of truth).

``--explore-eps 0.1`` sets ``RegimeConfig.explore_eps``; booleans get ``--x/--no-x``;
enum fields get their values as choices; every flag's help is the field's help string.
"""
from __future__ import annotations

import argparse
import enum
import re
import logging
import typing
from typing import Any

from aerl_ray.config import ConfigError, TrainConfig, flat_fields


def add_config_arguments(parser: argparse.ArgumentParser, defaults: dict[str, Any] | None = None
                         ) -> None:
    """Add one flag per flat :class:`TrainConfig` field (default: the dataclass default)."""
    defaults = {**TrainConfig().to_flat(), **(defaults or {})}
    from aerl_ray.config import _FLAT_OWNER, _SUBCONFIGS

    hints = {name: typing.get_type_hints(_SUBCONFIGS.get(_FLAT_OWNER[name], TrainConfig))[name]
             for name in flat_fields()}
    groups: dict[str, argparse._ArgumentGroup] = {}
    for name, f in flat_fields().items():
        owner = f"{_owner(name)} options"
        group = groups.setdefault(owner, parser.add_argument_group(owner))
        flag = "--" + name.replace("_", "-")
        typ = hints[name]
        default = defaults[name]
        help_ = f"{f.metadata.get('help', '')} (default: {default})"
        if typ is bool:
            group.add_argument(flag, dest=name, action=argparse.BooleanOptionalAction,
                               default=default, help=help_)
        elif isinstance(typ, type) and issubclass(typ, enum.Enum):
            group.add_argument(flag, dest=name, choices=[m.value for m in typ], default=default,
                               help=help_)
        else:
            group.add_argument(flag, dest=name, type=typ, default=default, metavar=name.upper(),
                               help=help_)


def _owner(name: str) -> str:
    from aerl_ray.config import _FLAT_OWNER
    return {"data": "data", "model": "model", "regime": "regime", "": "training"}[
        _FLAT_OWNER[name]]


_NUMBER = re.compile(r"^-(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$")


def normalize_argv(argv: list[str] | None) -> list[str]:
    """``--lr -1e-3`` -> ``--lr=-1e-3``: argparse takes a negative number in scientific
    notation for an option, so the config's own check ("lr must be > 0") can answer."""
    import sys

    args = list(sys.argv[1:] if argv is None else argv)
    out: list[str] = []
    for a in args:
        if out and _NUMBER.match(a) and out[-1].startswith("--") and "=" not in out[-1]:
            out[-1] = f"{out[-1]}={a}"
        else:
            out.append(a)
    return out


def config_from_args(ns: argparse.Namespace) -> TrainConfig:
    values = {k: getattr(ns, k) for k in flat_fields()}
    return TrainConfig.from_flat(values)


def setup_logging(level: str = "INFO") -> None:
    logging.basicConfig(level=getattr(logging, level.upper(), logging.INFO),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def fail(parser: argparse.ArgumentParser, err: Exception) -> typing.NoReturn:
    """Exit with the error message (status 2), no traceback, for user-facing errors."""
    parser.exit(2, f"{parser.prog}: error: {err}\n")


__all__ = ["add_config_arguments", "config_from_args", "normalize_argv", "setup_logging",
           "fail", "ConfigError"]
