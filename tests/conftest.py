"""Shared fixtures: digits splits, a tiny model, an 8-image batch, one Ray instance.

Ray is started once per test session (``ray.init(address="local", num_cpus=2)``) by the
``ray_session`` fixture, only when a test asks for it; it keeps the dashboard on because
early-stopped Ray Train trials are cleaned up through the State API.
"""
from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("RAY_TRAIN_ENABLE_V2_MIGRATION_WARNINGS", "1")
os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "0")
torch.set_num_threads(1)  # 2 shared cores: extra threads only contend (PGD 20x slower)


@pytest.fixture(scope="session")
def digits_splits():
    from aerl_ray.config import DataConfig
    from aerl_ray.data import load_splits

    return load_splits(DataConfig(dataset="digits"))


@pytest.fixture(scope="session")
def digits_info(digits_splits):
    return digits_splits.info


@pytest.fixture
def tiny_model(digits_info):
    from aerl_ray.models import build_model

    torch.manual_seed(0)
    return build_model("tiny", digits_info)


@pytest.fixture
def batch8(digits_splits):
    return digits_splits.x_test[:8].clone(), digits_splits.y_test[:8].clone()


@pytest.fixture(scope="session")
def ray_session(tmp_path_factory):
    """The one local Ray instance of the test session (2 CPUs, dashboard on)."""
    import ray

    if not ray.is_initialized():
        ray.init(address="local", num_cpus=2, include_dashboard=True, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture
def study_of():
    """``study_of(run_dir)``: the Optuna study a sweep's run dir names in sweep.json."""
    import json
    from pathlib import Path

    import optuna

    def load(run_dir):
        spec = json.loads((Path(run_dir) / "sweep.json").read_text())
        return optuna.load_study(study_name=spec["study_name"], storage=spec["optuna_storage"])

    return load
