"""Self-describing checkpoints, written atomically and read with ``weights_only=True``.

A checkpoint is a dict of tensors and plain Python values (no pickled objects):

- ``format``: ``"aerl_ray.checkpoint/1"``
- ``model_state``: the :class:`~aerl_ray.models.Classifier` state dict (unwrapped from DDP)
- ``config``: the resolved flat :class:`~aerl_ray.config.TrainConfig`
- ``dataset_info``: num_classes, in_channels, image_size, mean, std
- ``epoch``, ``metrics`` (of that epoch), ``seed``, ``versions`` (python, torch, ray, ...),
  ``git_rev``, ``plugins`` (module, path, source hash of each loaded plugin) and
  ``code_hash`` (:func:`aerl_ray.plugins.code_hash`: which code made it)
- ``train_state`` (``last.pt`` only): optimiser, scheduler, RNG states, pass counters and
  the selection state, for resuming after a crash.
- ``selection`` (``best.pt``): why this epoch was kept (:mod:`aerl_ray.selection`): rule,
  metric values, candidate epochs, the regime that produced it and a ``reason`` sentence.
"""
from __future__ import annotations

import dataclasses
import functools
import importlib.metadata
import logging
import platform
import re
import subprocess
from pathlib import Path
from typing import Any

import torch

from aerl_ray.atomic import atomic_write

logger = logging.getLogger(__name__)

FORMAT = "aerl_ray.checkpoint/1"
REQUIRED = ("model_state", "config", "dataset_info", "epoch")


class CheckpointError(RuntimeError):
    """A checkpoint is missing, damaged, tampered with or of another architecture."""


@functools.lru_cache(maxsize=1)
def package_versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for pkg in ("torch", "torchvision", "ray", "optuna", "numpy", "pyautoattack", "aerl-ray"):
        try:
            out[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            pass
    return out


@functools.lru_cache(maxsize=1)
def git_revision() -> str:
    """The source tree's git revision (``+dirty`` if modified), or ``unknown``."""
    here = Path(__file__).resolve().parent
    try:
        rev = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True,
                             text=True, timeout=5, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               cwd=here, capture_output=True, text=True, timeout=5).stdout.strip()
        return rev + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def atomic_torch_save(obj: Any, path: Path) -> None:
    """Write to a temp file in the same directory, fsync, then rename over ``path``."""
    atomic_write(path, lambda f: torch.save(obj, f), binary=True)


def make_checkpoint(model: torch.nn.Module, config: dict, info, epoch: int, metrics: dict,
                    train_state: dict | None = None, selection: dict | None = None) -> dict:
    model = getattr(model, "module", model)  # DDP
    ckpt = {
        "format": FORMAT,
        "model_state": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "config": dict(config),
        "dataset_info": dataclasses.asdict(info),
        "epoch": int(epoch),
        "metrics": {k: v for k, v in metrics.items() if isinstance(v, (int, float, str, bool))},
        "seed": int(config.get("seed", 0)),
        "versions": package_versions(),
        "git_rev": git_revision(),
        "plugins": [p.as_dict() for p in _plugins()],
        "code_hash": _code_hash(),
    }
    if train_state is not None:
        ckpt["train_state"] = train_state
    if selection is not None:
        ckpt["selection"] = selection
    return ckpt


def _plugins():
    from aerl_ray.plugins import loaded

    return loaded()


def _code_hash() -> str:
    from aerl_ray.plugins import code_hash

    return code_hash()


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict:
    """Load without executing code (``weights_only=True``); clear errors otherwise."""
    path = Path(path)
    if path.is_dir():
        hint = [q.name for q in (path / "best.pt", path / "last.pt") if q.is_file()]
        raise CheckpointError(f"{path} is a directory, not a checkpoint file; give the .pt file "
                              "inside it" + (f" (it holds {', '.join(hint)})" if hint else
                                             ", e.g. RUN/best.pt written by aerl_ray.train"))
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist (expected a .pt file written "
                              "by aerl_ray.train, e.g. RUN/best.pt)")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # noqa: BLE001 - any failure to read is a damaged/foreign file
        raise CheckpointError(
            f"could not load {path} safely ({type(e).__name__}: {_load_reason(e)}); the file is "
            "truncated, corrupted or contains code/objects other than tensors and plain "
            "values, and will not be unpickled. Re-create it with aerl_ray.train.") from e
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not an aerl_ray checkpoint (format "
                              f"{ckpt.get('format') if isinstance(ckpt, dict) else type(ckpt)!r}, "
                              f"expected {FORMAT!r}); give a best.pt or last.pt written by "
                              "aerl_ray.train")
    missing = [k for k in REQUIRED if k not in ckpt]
    bad = [k for k in ("model_state", "config", "dataset_info")
           if k in ckpt and not isinstance(ckpt[k], dict)]
    if missing or bad:
        raise CheckpointError(f"{path} is a damaged aerl_ray checkpoint (missing {missing}, "
                              f"malformed {bad}); re-create it with aerl_ray.train")
    return ckpt


def _load_reason(err: Exception) -> str:
    """The gist of a torch.load error (its weights-only verdict, else its first sentence),
    without torch's advice on loading the file unsafely."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(err))
    m = re.search(r"WeightsUnpickler error: (.+?)(?:\.\s|\n|$)", text)
    if m:
        return m.group(1).strip()[:200]
    return re.split(r"\.\s|\n", text.strip(), maxsplit=1)[0][:200]


def model_from_checkpoint(ckpt: dict | str | Path, model_name: str | None = None):
    """Rebuild the model a checkpoint describes and load its weights (eval mode).

    ``model_name`` (optional) asserts the expected architecture."""
    from aerl_ray.data import DatasetInfo
    from aerl_ray.models import build_model

    if not isinstance(ckpt, dict):
        ckpt = load_checkpoint(ckpt)
    cfg = ckpt["config"]
    name = cfg["model"]
    if model_name is not None and model_name != name:
        raise CheckpointError(f"checkpoint holds a {name!r} model, not {model_name!r}")
    from aerl_ray.models import MODELS

    if name not in MODELS:
        made_with = [p.get("spec") for p in ckpt.get("plugins") or []]
        raise CheckpointError(f"checkpoint holds a {name!r} model, which no loaded code "
                              f"registers (known: {', '.join(MODELS.names())})"
                              + (f"; it was trained with plugins {made_with}: pass them with "
                                 "--plugin" if made_with else ""))
    info = DatasetInfo(**{k: tuple(v) if isinstance(v, list) else v
                          for k, v in ckpt["dataset_info"].items()})
    model = build_model(name, info, spectral_norm=bool(cfg.get("spectral_norm", False)))
    try:
        model.load_state_dict(ckpt["model_state"])
    except RuntimeError as e:
        raise CheckpointError(f"checkpoint weights do not fit a {name!r} model for "
                              f"{info.name} ({str(e).splitlines()[0]})") from e
    return model.eval(), info
