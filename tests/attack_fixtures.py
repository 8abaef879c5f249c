"""Shared fixtures of the attack/evaluation tests: trained digits models, a tiny model,
an 8-image batch and a digits checkpoint.  Import them into a test module with
``from tests.attack_fixtures import *`` (pytest finds fixtures by name).

The models are trained once per session with a short inline loop (AdamW 1e-3, batch 64,
15 epochs, ~3 s on 2 cores), independent of aerl_ray.train so attack tests do not break
when training changes.  "Once" needs :func:`_trained`'s cache: each module that
star-imports these fixtures gets its own fixture definitions (pytest keys them by module),
so without it every such module retrained both models.
"""
from __future__ import annotations

import functools

import pytest
import torch

from aerl_ray.checkpoint import atomic_torch_save, make_checkpoint
from aerl_ray.config import DataConfig, TrainConfig
from aerl_ray.data import Splits, load_splits
from aerl_ray.models import Classifier, build_model

__all__ = ["digits", "sl_model", "sl_model_b", "tiny_model", "batch8", "sl_checkpoint",
           "sl_checkpoint_b", "train_digits"]


def train_digits(splits: Splits, seed: int = 0, epochs: int = 15,
                 model: str = "cnn4") -> Classifier:
    """Supervised training on digits; returns the model in eval mode.

    Runs single-threaded: for 8x8 images one thread is fastest, and two threads thrash
    when the two cores are shared."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _train(splits, seed, epochs, model)
    finally:
        torch.set_num_threads(threads)


def _train(splits: Splits, seed: int, epochs: int, model: str) -> Classifier:
    torch.manual_seed(seed)
    net = build_model(model, splits.info)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3)
    gen = torch.Generator().manual_seed(seed)
    x, y = splits.x_train, splits.y_train
    net.train()
    for _ in range(epochs):
        perm = torch.randperm(len(x), generator=gen)
        for i in range(0, len(x), 64):
            idx = perm[i:i + 64]
            loss = torch.nn.functional.cross_entropy(net(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return net.eval()


@pytest.fixture(scope="session")
def digits() -> Splits:
    return load_splits(DataConfig(dataset="digits"))


@functools.lru_cache(maxsize=None)
def _trained(seed: int, epochs: int) -> Classifier:
    """One trained model per (seed, epochs) per process, shared by every module."""
    return train_digits(load_splits(DataConfig(dataset="digits")), seed=seed, epochs=epochs)


@pytest.fixture(scope="session")
def sl_model(digits) -> Classifier:
    """SL cnn4 on digits, ~95-98% test accuracy."""
    return _trained(0, 15)


@pytest.fixture(scope="session")
def sl_model_b(digits) -> Classifier:
    """A second SL cnn4 (another seed): a transfer source for sl_model."""
    return _trained(1, 10)


@pytest.fixture(scope="session")
def tiny_model(digits) -> Classifier:
    torch.manual_seed(0)
    return build_model("tiny", digits.info).eval()


@pytest.fixture(scope="session")
def batch8(digits) -> tuple[torch.Tensor, torch.Tensor]:
    return digits.x_test[:8].clone(), digits.y_test[:8].clone()


def _save(model, info, path, seed):
    cfg = TrainConfig().replace(model="cnn4", dataset="digits", seed=seed).to_flat()
    atomic_torch_save(make_checkpoint(model, cfg, info, epoch=14, metrics={}), path)
    return path


@pytest.fixture(scope="session")
def sl_checkpoint(sl_model, digits, tmp_path_factory):
    """``sl_model`` written as an aerl_ray checkpoint (best.pt)."""
    return _save(sl_model, digits.info, tmp_path_factory.mktemp("sl") / "best.pt", 0)


@pytest.fixture(scope="session")
def sl_checkpoint_b(sl_model_b, digits, tmp_path_factory):
    return _save(sl_model_b, digits.info, tmp_path_factory.mktemp("slb") / "best.pt", 1)
