"""aerl_ray.cluster: offline cluster-YAML validation and the runtime cluster checks.

Nothing here starts Ray: cluster_nodes_summary is exercised with ray.nodes /
ray.cluster_resources monkeypatched.
"""
from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml

from aerl_ray import cluster as cl

REPO = Path(__file__).resolve().parents[1]
CLUSTER_FILES = sorted(REPO.glob("cluster*.yaml"))


def test_repo_has_cluster_files():
    names = {p.name for p in CLUSTER_FILES}
    assert {"cluster.yaml", "cluster.local.yaml"} <= names


@pytest.mark.parametrize("path", CLUSTER_FILES, ids=lambda p: p.name)
def test_repo_cluster_files_validate(path):
    cfg = cl.validate_cluster_file(path)
    assert cfg["head_node_type"] in cfg["available_node_types"]
    assert "cluster_synced_files" in cfg  # defaults merged, as `ray up` does
    raw = yaml.safe_load(path.read_text())
    setup = " ".join(raw["setup_commands"])
    assert "-c ~/aerl/constraints.txt -e ~/aerl" in setup  # pinned install, never a nightly
    assert "ray-3.0.0.dev0" not in " ".join(cfg["head_setup_commands"])
    head = " ".join(raw["head_start_ray_commands"])
    assert "RAY_AUTH_MODE=token" in head and "--dashboard-host=127.0.0.1" in head
    assert "RAY_AUTH_MODE=token" in " ".join(raw["worker_start_ray_commands"])
    assert any("auth_token" in remote for remote in raw["file_mounts"])


def test_aws_cluster_shape():
    cfg = cl.validate_cluster_file(REPO / "cluster.yaml")
    assert cfg["provider"]["type"] == "aws"
    head = cfg["available_node_types"][cfg["head_node_type"]]
    assert head["resources"].get("train_driver", 0) >= 1 and "GPU" not in head["resources"]
    assert any("boto3" in c for c in cfg["head_setup_commands"])
    ceiling = cl.config_max_resources(cfg)
    assert ceiling["GPU"] == cfg["max_workers"] == 4


def test_strict_flags_placeholders():
    with pytest.raises(cl.ClusterConfigError, match="CHANGE-ME.*IamInstanceProfile"):
        cl.validate_cluster_file(REPO / "cluster.yaml", strict=True)
    # placeholders marked in comments (the IPs and user of cluster.local.yaml) count too
    with pytest.raises(cl.ClusterConfigError, match=r"line 17: head_ip: 10\.0\.0\.10") as e:
        cl.validate_cluster_file(REPO / "cluster.local.yaml", strict=True)
    assert "worker_ips" in str(e.value) and "ssh_user" in str(e.value)


def _broken(tmp_path, mutate, src="cluster.yaml"):
    cfg = yaml.safe_load((REPO / src).read_text())
    cfg = copy.deepcopy(cfg)
    mutate(cfg)
    path = tmp_path / "broken.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _rename(d, old, new):
    d[new] = d.pop(old)


@pytest.mark.parametrize("mutate, src, pattern", [
    (lambda c: _rename(c, "max_workers", "max_worker"), "cluster.yaml",
     r"unknown key 'max_worker' \(did you mean 'max_workers'\?\) at the top level"),
    (lambda c: c.pop("provider"), "cluster.yaml", r"missing required key 'provider'"),
    (lambda c: c.pop("provider"), "cluster.local.yaml", r"missing required key 'provider'"),
    (lambda c: c["available_node_types"]["gpu_worker"].__setitem__("min_worker", 1), "cluster.yaml",
     r"unknown key 'min_worker'.* at available_node_types/gpu_worker"),
    (lambda c: c["available_node_types"]["gpu_worker"].pop("resources"), "cluster.yaml",
     r"'resources' is a required property \(at available_node_types/gpu_worker\)"),
    (lambda c: c["available_node_types"]["gpu_worker"]["resources"].__setitem__("GPU", 0.5),
     "cluster.yaml", r"not of type 'integer' \(at available_node_types/gpu_worker/resources/GPU\)"),
    (lambda c: c.__setitem__("head_node_type", "nope"), "cluster.yaml", r"head_node_type"),
    (lambda c: c["available_node_types"]["gpu_worker"].__setitem__("min_workers", 9),
     "cluster.yaml", r"smaller than the sum of `min_workers`"),
    (lambda c: c["provider"].__setitem__("type", "awz"), "cluster.yaml",
     r"unknown provider type 'awz'"),
    (lambda c: c.pop("setup_commands"), "cluster.yaml", r"nightly"),
    (lambda c: c.__setitem__("head_setup_commands", ["echo hi"]), "cluster.yaml", r"boto3"),
    (lambda c: c.__setitem__("head_start_ray_commands", ["ray start --head"]), "cluster.yaml",
     r"--autoscaling-config"),
    (lambda c: c.__setitem__("available_node_types", {"x": {"resources": {}, "node_config": {}}}),
     "cluster.local.yaml", r"'available_node_types' is not supported with the local"),
    (lambda c: c["provider"].pop("worker_ips"), "cluster.local.yaml",
     r"head_ip and provider.worker_ips"),
])
def test_broken_copies_fail_clearly(tmp_path, mutate, src, pattern):
    path = _broken(tmp_path, mutate, src)
    with pytest.raises(cl.ClusterConfigError, match=pattern) as exc:
        cl.validate_cluster_file(path)
    assert str(exc.value).startswith(f"{path}: ")


def test_unreadable_and_non_mapping_files(tmp_path):
    with pytest.raises(cl.ClusterConfigError, match="cannot read"):
        cl.validate_cluster_file(tmp_path / "missing.yaml")
    (tmp_path / "list.yaml").write_text("- a\n- b\n")
    with pytest.raises(cl.ClusterConfigError, match="mapping"):
        cl.validate_cluster_file(tmp_path / "list.yaml")
    (tmp_path / "bad.yaml").write_text("provider: {type: aws\n")
    with pytest.raises(cl.ClusterConfigError, match="not valid YAML"):
        cl.validate_cluster_file(tmp_path / "bad.yaml")


def test_validation_needs_no_boto3():
    import sys

    cl.validate_cluster_file(REPO / "cluster.yaml")
    assert "boto3" not in sys.modules


def test_cli(tmp_path, caplog):
    assert cl.main(["validate", *map(str, CLUSTER_FILES)]) == 0
    bad = _broken(tmp_path, lambda c: _rename(c, "max_workers", "max_worker"))
    assert cl.main(["validate", str(REPO / "cluster.yaml"), str(bad)]) == 1
    assert "max_worker" in caplog.text
    assert cl.main(["validate", "--strict", str(REPO / "cluster.yaml")]) == 1


# ---------------------------------------------------------------- storage


@pytest.mark.parametrize("uri", ["s3://bucket/aerl", "gs://b/x", "abfs://c@acct/x",
                                 "hdfs://nn:8020/x"])
def test_storage_uris_ok_on_any_cluster(uri, monkeypatch):
    monkeypatch.delenv(cl.SHARED_STORAGE_ENV, raising=False)
    assert cl.check_storage(uri, num_nodes=8) == uri


def test_storage_local_path(tmp_path, monkeypatch):
    monkeypatch.delenv(cl.SHARED_STORAGE_ENV, raising=False)
    assert cl.check_storage(str(tmp_path), num_nodes=1) == str(tmp_path)
    assert cl.check_storage(f"file://{tmp_path}", num_nodes=1) == str(tmp_path)
    with pytest.raises(cl.StorageError,
                       match="not accessible by worker nodes.*AERL_SHARED_STORAGE=1"):
        cl.check_storage(str(tmp_path), num_nodes=3)
    with pytest.raises(cl.StorageError, match="local path"):
        cl.check_storage(f"file://{tmp_path}", num_nodes=2)
    assert cl.check_storage(str(tmp_path), num_nodes=3, shared=True) == str(tmp_path)
    monkeypatch.setenv(cl.SHARED_STORAGE_ENV, "1")
    assert cl.check_storage(str(tmp_path), num_nodes=3) == str(tmp_path)
    assert cl.check_storage("~/runs", num_nodes=1).startswith("/")


def test_storage_missing_or_malformed(monkeypatch):
    monkeypatch.delenv(cl.SHARED_STORAGE_ENV, raising=False)
    assert cl.check_storage(None, num_nodes=1) is None
    with pytest.raises(cl.StorageError, match="ray_results"):
        cl.check_storage(None, num_nodes=2)
    with pytest.raises(cl.StorageError, match="no bucket"):
        cl.check_storage("s3://", num_nodes=2)


# ---------------------------------------------------------------- GPUs

NO_GPU = {"CPU": 8.0}
TWO_GPU = {"CPU": 8.0, "GPU": 2.0}


def test_gpu_request_without_gpus_names_the_yaml_key():
    cl.check_gpu_request(0, 0, NO_GPU)
    with pytest.raises(cl.GpuRequestError,
                       match=r"resources.gpus_per_worker=1 .*no GPUs.*InstanceType"):
        cl.check_gpu_request(1, 0, NO_GPU)
    with pytest.raises(cl.GpuRequestError,
                       match=r"evaluation.gpus_per_actor=0.25 .*resources: \{GPU: 1\}"):
        cl.check_gpu_request(0, 0.25, NO_GPU)


def test_gpu_request_limits():
    cl.check_gpu_request(1, 0.5, TWO_GPU)
    cl.check_gpu_request(2, 0, TWO_GPU)
    with pytest.raises(cl.GpuRequestError, match="at most 2"):
        cl.check_gpu_request(4, 0, TWO_GPU)
    with pytest.raises(cl.GpuRequestError, match="a node has at most 1"):
        cl.check_gpu_request(2, 0, TWO_GPU, gpus_per_node=1)
    with pytest.raises(cl.GpuRequestError, match="whole GPUs"):
        cl.check_gpu_request(1.5, 0, TWO_GPU)
    with pytest.raises(cl.GpuRequestError, match=">= 0"):
        cl.check_gpu_request(-1, 0, TWO_GPU)


def test_resolve_use_gpu():
    assert cl.resolve_use_gpu("auto", TWO_GPU) is True
    assert cl.resolve_use_gpu("auto", NO_GPU) is False
    assert cl.resolve_use_gpu(False, TWO_GPU) is False
    assert cl.resolve_use_gpu("false", NO_GPU) is False
    assert cl.resolve_use_gpu(True, TWO_GPU) is True
    with pytest.raises(cl.GpuRequestError, match="no GPUs"):
        cl.resolve_use_gpu(True, NO_GPU)
    with pytest.raises(cl.GpuRequestError):
        cl.resolve_use_gpu("true", {})
    with pytest.raises(ValueError, match="auto"):
        cl.resolve_use_gpu("sometimes", TWO_GPU)


# ---------------------------------------------------------------- cluster summary

NODES = [
    {"Alive": True, "Resources": {"CPU": 2.0, "train_driver": 16.0}},
    {"Alive": True, "Resources": {"CPU": 4.0, "GPU": 1.0}},
    {"Alive": False, "Resources": {"CPU": 4.0, "GPU": 1.0}},
]


def test_summarize_and_autoscaler_ceiling():
    s = cl.summarize(NODES, {"CPU": 6.0, "GPU": 1.0, "train_driver": 16.0},
                     max_resources={"CPU": 18, "GPU": 4, "train_driver": 16})
    assert (s.num_nodes, s.cpus, s.gpus, s.max_gpus_per_node) == (2, 6.0, 1.0, 1.0)
    assert s.reachable["GPU"] == 4 and s.reachable["CPU"] == 18
    cpu_only = cl.summarize(NODES[:1], {"CPU": 2.0})
    assert cpu_only.reachable.get("GPU", 0) == 0
    assert cl.resolve_use_gpu("auto", cpu_only.reachable) is False
    # An autoscaling cluster with no GPU node up yet can still satisfy GPU requests.
    cold = cl.summarize(NODES[:1], {"CPU": 2.0}, max_resources={"GPU": 4})
    cl.check_gpu_request(1, 0.5, cold.reachable)
    # Only the head is up, but workers can join: a head-local path must be refused.
    cold = cl.summarize(NODES[:1], {"CPU": 2.0}, max_resources={"GPU": 4}, max_nodes=5)
    assert cold.num_nodes == 1 and cold.nodes_possible == 5
    with pytest.raises(cl.StorageError):
        cl.check_storage("/tmp/x", cold.nodes_possible, shared=False)


def test_cluster_nodes_summary_uses_ray(monkeypatch, tmp_path):
    import ray

    monkeypatch.setattr(ray, "is_initialized", lambda: True)
    monkeypatch.setattr(ray, "nodes", lambda: NODES)
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 6.0, "GPU": 1.0})
    boot = tmp_path / "ray_bootstrap_config.yaml"
    boot.write_text(yaml.safe_dump(cl.validate_cluster_file(REPO / "cluster.yaml")))
    monkeypatch.setattr(cl, "BOOTSTRAP_CONFIG", str(boot))
    from ray._private.state import state

    monkeypatch.setattr(state, "get_max_resources_from_cluster_config", lambda: None)
    s = cl.cluster_nodes_summary()
    assert (s.num_nodes, s.gpus, s.reachable["GPU"], s.nodes_possible) == (2, 1.0, 4, 5)

    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    with pytest.raises(RuntimeError, match="ray.init"):
        cl.cluster_nodes_summary()


def test_autoscaler_ceiling_from_gcs(monkeypatch):
    from types import SimpleNamespace as NS

    from ray._private.state import state

    monkeypatch.setattr(state, "get_max_resources_from_cluster_config",
                        lambda: {"GPU": 8, "CPU": 40})
    groups = [NS(resources={"GPU": 2, "CPU": 8}, max_count=4),
              NS(resources={"CPU": 8}, max_count=1)]
    monkeypatch.setattr(state, "get_cluster_config", lambda: NS(node_group_configs=groups))
    assert cl._autoscaler_ceiling() == ({"GPU": 8.0, "CPU": 40.0}, 2.0, 5)
