"""Run by tests/test_multinode.py in a subprocess: a 2-node Ray cluster on this machine
(head + worker as separate Ray nodes), a sweep whose trial trains with 2 Ray Train workers
(DDP over gloo) on different nodes and whose evaluator pool spans both nodes, with a
shared storage path.  Writes a JSON summary to OUT/summary.json."""
import json
import os
import socket
import sys
from pathlib import Path

import ray
from ray.cluster_utils import Cluster

from aerl_ray import results as R
from aerl_ray.sweep import run_sweep

out = Path(sys.argv[1])
os.environ["AERL_SHARED_STORAGE"] = "1"  # one machine: the path is shared by construction


def free_port() -> int:  # the test session's own Ray may hold the default dashboard port
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


cluster = Cluster(initialize_head=True,
                  head_node_args={"num_cpus": 2, "resources": {"train_driver": 4},
                                  "include_dashboard": True, "dashboard_port": free_port()})
cluster.add_node(num_cpus=2)
cluster.wait_for_nodes()
ray.init(address=cluster.address, namespace="aerl", log_to_driver=False)
try:
    space = Path(__file__).resolve().parent.parent / "search_spaces" / "quickstart.yaml"
    res = run_sweep(space, out / "run", smoke=True, verbose=0, storage=str(out / "storage"),
                    overrides={
                        "num_samples": 1, "points_to_evaluate": [{"regime": "sl", "lr": 1.0e-3}],
                        "resources": {"workers": 2, "cpus_per_worker": 1.5, "mode": "ray_train",
                                      "driver_resource": "train_driver"},
                        "evaluation": {"actors": 2, "cpus_per_actor": 0.25},
                        "confirm": {"enabled": False}})
    from ray.util.state import list_actors

    def nodes(cls):
        return sorted({a.node_id for a in list_actors(filters=[("class_name", "=", cls)],
                                                      limit=1000, raise_on_missing_output=False)})

    run = R.RunDir(res.run_dir)
    summary = {
        "nodes": len([n for n in ray.nodes() if n["Alive"]]),
        "train_worker_nodes": nodes("RayTrainWorker"),
        "evaluator_nodes": nodes("EvaluatorActor"),
        "statuses": list(res.trials["status"]),
        "trial_columns": sorted(res.trials.columns),
        "eval_columns": sorted(R.read_table(run.evals).columns),
        "n_eval_rows": int((R.read_table(run.evals)["attack"] != "worst_case+diag").sum()),
        "indicator_columns": sorted(R.read_table(run.indicators).columns),
        "storage_has_checkpoints": any((out / "storage").rglob("checkpoint_*")),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
finally:
    ray.shutdown()
    cluster.shutdown()
