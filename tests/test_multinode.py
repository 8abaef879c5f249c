"""A real multi-node sweep on one machine (2 Ray nodes), checked against the schema of a
single-node run."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from aerl_ray import results as R

pytestmark = [pytest.mark.slow]
ROOT = Path(__file__).resolve().parent.parent


def test_two_node_sweep_with_ddp_and_spread_evaluators(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "tests" / "multinode_sweep.py"),
                           str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=420)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    s = json.loads((tmp_path / "summary.json").read_text())
    assert s["nodes"] == 2
    assert s["statuses"] == ["COMPLETE"]
    assert len(s["train_worker_nodes"]) == 2, s  # one DDP worker per node
    assert len(s["evaluator_nodes"]) == 2, s  # the evaluator pool spans both nodes
    assert s["storage_has_checkpoints"]  # Ray Train persisted to the shared storage path
    # identical schema to a single-node run
    assert set(R.EVAL_COLUMNS) <= set(s["eval_columns"])
    assert set(R.TRIAL_COLUMNS) <= set(s["trial_columns"])
    assert set(R.INDICATOR_COLUMNS) <= set(s["indicator_columns"])
    # 3 attacks x 4 budgets + AutoAttack at the objective's budget + 4 worst-case rows
    # (not counting the cheap diagnostics' worst_case+diag rows)
    assert s["n_eval_rows"] == 3 * 4 + 1 + 4
