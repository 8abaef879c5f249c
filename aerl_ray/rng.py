"""Every random number generator a training process uses, saved and restored exactly.

A resumed run must continue the random streams of the interrupted one, or it is not the
same run: dropout draws from torch's global CPU generator (the CUDA generator of the
device on a GPU), exploration, augmentation and random starts from the trial's seeded
generator (on a CUDA run: its seeded generator on the device, see
:mod:`aerl_ray.fastpath`), and third-party code may draw from Python's ``random`` or NumPy's global
generator.  :func:`capture` returns all of them as tensors and plain values (so a
checkpoint stays loadable with ``weights_only=True``); :func:`restore` puts them back.

Under DDP every rank has its own streams (the seeded generator is seeded per rank, and
dropout masks differ between ranks because the ranks have seen different draws), so
``last.pt`` holds one state per rank, gathered on rank 0 with :func:`gather`, and each
rank restores its own.
"""
from __future__ import annotations

import logging
import random
from typing import Any

import numpy as np
import torch

logger = logging.getLogger(__name__)


def capture(generator: torch.Generator, device: torch.device | None = None,
            device_generator: torch.Generator | None = None) -> dict[str, Any]:
    """The state of ``generator``, ``device_generator`` (when it is another object),
    torch's global CPU (and ``device``'s CUDA) generator, Python's ``random`` and NumPy's
    global generator."""
    np_state = np.random.get_state(legacy=False)
    state: dict[str, Any] = {
        "generator": generator.get_state(),
        "torch_cpu": torch.get_rng_state(),
        "python": list(_tuples_to_lists(random.getstate())),
        "numpy": {"bit_generator": np_state["bit_generator"],
                  "key": torch.from_numpy(np_state["state"]["key"].astype(np.int64)),
                  "pos": int(np_state["state"]["pos"]),
                  "has_gauss": int(np_state["has_gauss"]),
                  "gauss": float(np_state["gauss"])},
    }
    if device is not None and device.type == "cuda":
        state["torch_cuda"] = torch.cuda.get_rng_state(device)
    if device_generator is not None and device_generator is not generator:
        state["device_generator"] = device_generator.get_state()
    return state


def restore(state: dict[str, Any], generator: torch.Generator,
            device: torch.device | None = None,
            device_generator: torch.Generator | None = None) -> None:
    """Put back what :func:`capture` returned (on the same kind of device)."""
    generator.set_state(state["generator"])
    if device_generator is not None and device_generator is not generator:
        if "device_generator" in state:
            device_generator.set_state(state["device_generator"])
        else:
            logger.warning("the checkpoint has no device-generator state (saved on a CPU "
                           "run or by an older version): exploration, augmentation and "
                           "random starts on %s restart from their seed; the resumed run "
                           "is not exact", device)
    torch.set_rng_state(state["torch_cpu"])
    random.setstate(_lists_to_tuples(state["python"]))
    n = state["numpy"]
    np.random.set_state({"bit_generator": n["bit_generator"],
                         "state": {"key": n["key"].numpy().astype(np.uint32),
                                   "pos": n["pos"]},
                         "has_gauss": n["has_gauss"], "gauss": n["gauss"]})
    if device is not None and device.type == "cuda":
        if "torch_cuda" in state:
            torch.cuda.set_rng_state(state["torch_cuda"], device)
        else:
            logger.warning("the checkpoint has no CUDA generator state (saved on a CPU run); "
                           "dropout on %s does not continue the interrupted run's stream",
                           device)


def gather(state: dict[str, Any], rank: int, world_size: int) -> list[dict] | None:
    """Every rank's state, in rank order, on rank 0 (None on the others); a collective:
    all ranks must call it.  Without an initialised process group: ``[state]``."""
    dist = torch.distributed
    if world_size <= 1 or not (dist.is_available() and dist.is_initialized()):
        return [state]
    out: list | None = [None] * world_size if rank == 0 else None
    dist.gather_object(state, out, dst=0)
    return out


def _tuples_to_lists(v: Any) -> Any:
    return [_tuples_to_lists(i) for i in v] if isinstance(v, (tuple, list)) else v


def _lists_to_tuples(v: Any) -> Any:
    return tuple(_lists_to_tuples(i) for i in v) if isinstance(v, (tuple, list)) else v
