"""Transfer attack: adversarial examples crafted on a *source* model with PGD, scored
on the target.

A defence that only masks gradients falls to points crafted on an undefended surrogate
(Athalye et al. 2018: "black-box beats white-box"), so transfer from an SL reference
checkpoint is a masking diagnostic as well as an attack.  Crafting is independent of
the target, so crafted sets are cached per (source, attack parameters, norm, eps,
images) in memory and optionally on disk, and reused for every target of a sweep.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from aerl_ray.attacks.base import AttackInputError, AttackResult, predict, register_attack
from aerl_ray.attacks.pgd import pgd_core
from aerl_ray.attacks.threat import Threat
from aerl_ray.passes import PassCounter

logger = logging.getLogger(__name__)


def tensor_fingerprint(t: torch.Tensor) -> str:
    """sha1 (16 hex) of a tensor's dtype, shape and bytes."""
    h = hashlib.sha1(f"{t.dtype}{tuple(t.shape)}".encode())
    h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


_PLAIN = (bool, int, float, str, type(None))


def model_fingerprint(model: nn.Module) -> str:
    """sha1 (16 hex) of what a model computes, to identify a source without a path: every
    submodule's name and class with its plain attributes (a wrapper's logit temperature,
    a layer's stride, ...) and the state dict (weights and buffers).  Two models that
    share weights but differ in such an attribute craft different sets."""
    h = hashlib.sha1()
    for name, m in model.named_modules():
        plain = sorted((k, v) for k, v in vars(m).items()
                       if not k.startswith("_") and k != "training"
                       and (isinstance(v, _PLAIN) or (isinstance(v, tuple) and all(
                           isinstance(i, _PLAIN) for i in v))))
        h.update(f"{name}:{type(m).__module__}.{type(m).__qualname__}:{plain!r};".encode())
    for k, v in sorted(model.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


class TransferCache:
    """Crafted adversarial sets by key, in memory and (if ``cache_dir``) on disk.

    Disk entries are plain tensors saved atomically and loaded with
    ``weights_only=True``; a damaged entry is ignored and re-crafted.
    """

    def __init__(self, cache_dir: str | os.PathLike | None = None, max_items: int = 64):
        self.dir = Path(cache_dir) if cache_dir else None
        self.max_items = max_items
        self._mem: dict[str, torch.Tensor] = {}
        self.hits = 0
        self.misses = 0

    def _path(self, key: str) -> Path | None:
        return self.dir / f"{key}.pt" if self.dir else None

    def get(self, key: str) -> torch.Tensor | None:
        if key in self._mem:
            self.hits += 1
            return self._mem[key]
        p = self._path(key)
        if p is not None and p.is_file():
            try:
                t = torch.load(p, map_location="cpu", weights_only=True)
                self._remember(key, t)
                self.hits += 1
                return t
            except Exception as e:  # noqa: BLE001 - a damaged entry is re-crafted
                logger.warning("ignoring damaged transfer cache entry %s (%s)", p, e)
        self.misses += 1
        return None

    def put(self, key: str, x_adv: torch.Tensor) -> None:
        t = x_adv.detach().cpu()
        self._remember(key, t)
        p = self._path(key)
        if p is not None:
            p.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=p.parent, prefix=".", suffix=".tmp")
            os.close(fd)
            try:
                torch.save(t, tmp)
                os.replace(tmp, p)
            except BaseException:
                Path(tmp).unlink(missing_ok=True)
                raise

    def _remember(self, key: str, t: torch.Tensor) -> None:
        if len(self._mem) >= self.max_items:
            self._mem.pop(next(iter(self._mem)))
        self._mem[key] = t

    def __len__(self) -> int:
        return len(self._mem)


def load_source(source: "nn.Module | str | os.PathLike") -> tuple[nn.Module, str]:
    """(model in eval mode, id) of a source given as a model or a checkpoint path."""
    if isinstance(source, nn.Module):
        return source.eval(), model_fingerprint(source)
    from aerl_ray.checkpoint import model_from_checkpoint

    model, _ = model_from_checkpoint(source)
    return model, model_fingerprint(model)


@register_attack("transfer", kind="transfer", requires=("source",), reuse="full",
                 fast_params={"steps": 10})
def transfer(model: nn.Module, x: torch.Tensor, y: torch.Tensor, threat: Threat, *,
             source: "nn.Module | str | os.PathLike | None" = None, steps: int = 50,
             step_size: float | None = None, restarts: int = 1, loss: str = "ce",
             seed: int = 0, batch_size: int = 500, cache: TransferCache | None = None,
             example_ids: torch.Tensor | None = None) -> AttackResult:
    """PGD on ``source`` (no early stop: transfer needs high-loss points, not barely
    misclassified ones), evaluated on the target ``model``.

    Args:
        source: source model or checkpoint path (e.g. an SL reference ``best.pt``).
        steps, step_size, restarts, loss, seed: PGD settings on the source (step_size is
            a fraction of eps, default 2.5 / steps).
        batch_size: examples per forward pass.
        cache: a :class:`TransferCache` to reuse crafted sets across targets.
        example_ids: keys of the per-example random starts.
    """
    if source is None:
        raise AttackInputError("the transfer attack needs a source model: pass source=MODEL "
                               "or a checkpoint path (e.g. an SL reference run's best.pt)")
    src, src_id = load_source(source)
    src = src.to(x.device)
    with torch.no_grad():
        n_src, n_tgt = src(x[:2]).shape[1], model(x[:2]).shape[1]
    if n_src != n_tgt:
        raise AttackInputError(f"source model has {n_src} classes, the target {n_tgt}")
    if steps < 1:
        raise ValueError(f"steps={steps} must be >= 1")
    step = step_size if step_size is not None else 2.5 / steps
    params = {"steps": steps, "step_size": step, "restarts": restarts, "loss": loss,
              "seed": seed}
    ids = torch.arange(len(x)) if example_ids is None else example_ids
    key = hashlib.sha1(json.dumps([src_id, params, threat.norm.value, repr(threat.eps),
                                   tensor_fingerprint(x), tensor_fingerprint(y),
                                   tensor_fingerprint(ids)]).encode()).hexdigest()[:24]
    cached = cache.get(key) if cache is not None else None
    extra: dict[str, Any] = {"source_id": src_id, "cached": cached is not None}
    fwd = bwd = 0
    if cached is None:
        with PassCounter(src) as pc:
            x_adv, _, _ = pgd_core(src, x, y, threat, steps=steps, step_size=step,
                                   restarts=restarts, loss=loss, random_start=True, seed=seed,
                                   example_ids=ids, early_stop=False, batch_size=batch_size)
        fwd, bwd = pc.fwd, pc.bwd
        if cache is not None:
            cache.put(key, x_adv)
    else:
        x_adv = cached.to(x.device)
    extra.update(source_fwd_passes=fwd, source_bwd_passes=bwd)
    success = (predict(model, x_adv, batch_size) != y).cpu()
    return AttackResult(x_adv, success, torch.full((len(x),), float("nan")),
                        fwd_passes=fwd, bwd_passes=bwd, extra=extra)
