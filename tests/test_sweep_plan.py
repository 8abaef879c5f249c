"""Resource planning of a sweep (no Ray needed): GPU placement, CPU fallback, concurrency."""
from pathlib import Path

import pytest

from aerl_ray.space import load_space
from aerl_ray.sweep import SweepError, _plan_resources

SPACES = Path(__file__).resolve().parent.parent / "search_spaces"


def test_quickstart_on_two_cpus_runs_two_trials_beside_one_evaluator():
    plan = _plan_resources(load_space(SPACES / "quickstart.yaml"), {"CPU": 2.0})
    assert plan["mode"] == "in_process" and not plan["use_gpu"]
    assert plan["trial_resources"] == {"cpu": 0.75}
    assert plan["concurrency"] == 2  # (2 - 0.5 evaluator CPU) // 0.75


def test_fractional_gpus_pack_several_trials_per_gpu():
    spec = load_space(SPACES / "paper_cifar10.yaml")
    plan = _plan_resources(spec, {"CPU": 18.0, "GPU": 4.0, "train_driver": 16.0},
                           gpus_per_node=1.0)
    assert plan["use_gpu"] and plan["mode"] == "in_process"
    assert plan["trial_resources"] == {"cpu": 1.0, "gpu": 0.25}
    # 4 GPUs - 4 evaluators x 0.25 GPU = 3 GPUs for trials of 0.25 GPU each
    assert plan["concurrency"] == 12


def test_gpu_auto_falls_back_to_cpu_without_gpus():
    plan = _plan_resources(load_space(SPACES / "paper_cifar10.yaml"), {"CPU": 8.0})
    assert not plan["use_gpu"] and "gpu" not in plan["trial_resources"]


def test_asking_for_gpus_on_a_cpu_cluster_fails_clearly():
    spec = load_space(SPACES / "quickstart.yaml", overrides={"resources": {"use_gpu": True}})
    with pytest.raises(Exception, match="no GPUs"):
        _plan_resources(spec, {"CPU": 4.0})


def test_multi_worker_trials_use_ray_train_with_a_tiny_driver():
    spec = load_space(SPACES / "quickstart.yaml",
                      overrides={"resources": {"workers": 2, "cpus_per_worker": 1,
                                               "driver_resource": "train_driver"}})
    plan = _plan_resources(spec, {"CPU": 8.0, "train_driver": 4.0})
    assert plan["mode"] == "ray_train"
    assert plan["trial_resources"] == {"cpu": 0.01, "train_driver": 0.01}  # no 2-CPU deadlock
    assert plan["concurrency"] == 3  # (8 - 0.5) // 2
    with pytest.raises(SweepError, match="in_process needs workers: 1"):
        _plan_resources(load_space(SPACES / "quickstart.yaml", overrides={
            "resources": {"workers": 2, "mode": "in_process"}}), {"CPU": 8.0})
