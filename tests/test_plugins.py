"""Researchers' own code: plugins register into the registries, travel with a sweep, and
every checkpoint and results row says which code made it."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from aerl_ray.plugins import PluginError, code_hash, load_plugins, source_hash

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"


@pytest.fixture(scope="module", autouse=True)
def restore_registries():
    """Plugins register into process-wide registries: undo it for the other tests."""
    import aerl_ray.plugins as plugins
    from aerl_ray.attacks import ATTACKS
    from aerl_ray.data import DATASETS
    from aerl_ray.models import MODELS
    from aerl_ray.regimes import REGIMES

    regs = (ATTACKS, DATASETS, MODELS, REGIMES)
    saved = [dict(r._items) for r in regs]
    mods, path = set(sys.modules), list(sys.path)
    yield
    for r, items in zip(regs, saved):
        r._items.clear()
        r._items.update(items)
    for m in set(sys.modules) - mods:
        del sys.modules[m]
    sys.path[:] = path
    plugins.LOADED.clear()


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    """The example plugin package and space, copied to a directory outside the package."""
    d = tmp_path_factory.mktemp("outside")
    shutil.copytree(EXAMPLES / "mylab", d / "mylab")
    shutil.copy(EXAMPLES / "mylab_space.yaml", d / "mylab_space.yaml")
    return d


def test_plugin_names_become_valid_and_unknown_ones_list_them(lab):
    from aerl_ray.attacks import ATTACKS
    from aerl_ray.config import ConfigError, TrainConfig
    from aerl_ray.models import MODELS
    from aerl_ray.regimes import REGIMES

    (p,) = load_plugins([str(lab / "mylab")])
    assert p.module == "mylab" and len(p.sha) == 12
    assert "logit_squeeze" in REGIMES and "mlp2" in MODELS and "mifgsm" in ATTACKS
    assert load_plugins([str(lab / "mylab")]) == [p]  # once per process
    TrainConfig.from_flat({"regime": "logit_squeeze", "model": "mlp2"})
    with pytest.raises(ConfigError, match="logit_squeeze"):  # the known list includes it
        TrainConfig.from_flat({"regime": "nope"})
    assert "+plugins:" in code_hash()


def test_plugin_regime_gets_the_built_in_regime_checks(lab, digits_splits):
    """A plugin's regime is checked by the same helper as the built-in ones
    (aerl_ray.testing.check_regime): loss, determinism, learning."""
    from aerl_ray.testing import check_regime

    load_plugins([str(lab / "mylab")])
    x, y = digits_splits.x_train[:64], digits_splits.y_train[:64]
    out = check_regime("logit_squeeze", x, y, 10, reg_lambda=0.05)
    assert out["after"] < out["before"] and out["stats"]["logit_sq"] >= 0


def test_bad_plugins_fail_clearly(tmp_path):
    with pytest.raises(PluginError, match="neither a .py file nor a package"):
        load_plugins([str(tmp_path / "missing.py")])
    with pytest.raises(PluginError, match="no module of that name"):
        load_plugins(["no_such_module_anywhere"])
    broken = tmp_path / "broken_plugin.py"
    broken.write_text("raise RuntimeError('half-written plugin')\n")
    with pytest.raises(PluginError, match="failed to import: RuntimeError: half-written"):
        load_plugins([str(broken)])


def test_source_hash_follows_the_code(tmp_path):
    f = tmp_path / "p.py"
    f.write_text("X = 1\n")
    h = source_hash(f)
    f.write_text("X = 2\n")
    assert source_hash(f) != h


def test_space_validates_plugin_names_before_ray(tmp_path, lab):
    from aerl_ray.space import SpaceError, load_space

    space = load_space(lab / "mylab_space.yaml", smoke=True)
    assert [p.module for p in space.plugins] == ["mylab"]
    raw = (lab / "mylab_space.yaml").read_text().replace("plugins: [./mylab]",
                                                         "plugins: [./nowhere]")
    (tmp_path / "bad.yaml").write_text(raw)
    with pytest.raises(SpaceError, match="nowhere"):
        load_space(tmp_path / "bad.yaml")
    raw = (lab / "mylab_space.yaml").read_text().replace("logit_squeeze]}",
                                                         "logit_sqeeze]}")
    (lab / "typo.yaml").write_text(raw)
    with pytest.raises(SpaceError, match="known regimes: .*logit_squeeze"):
        load_space(lab / "typo.yaml")


def _run(args, cwd, timeout=600):
    p = subprocess.run([sys.executable, "-m", *args], cwd=cwd, capture_output=True, text=True,
                       timeout=timeout)
    assert p.returncode == 0, (args, p.stdout[-2000:], p.stderr[-3000:])
    return p


@pytest.mark.ray
@pytest.mark.slow
def test_external_plugin_through_train_evaluate_and_a_sweep(lab):
    """From a directory outside the package: train with the plugin's regime and model,
    evaluate with its attack, and sweep its space through real Ray (the code travels to
    the trials and evaluators); checkpoints and rows record the plugin's hash."""
    from aerl_ray.checkpoint import load_checkpoint

    _run(["aerl_ray.train", "--plugin", "./mylab", "--dataset", "digits", "--model", "mlp2",
          "--regime", "logit_squeeze", "--reg-lambda", "0.01", "--epochs", "2", "--out", "run",
          "--log-level", "WARNING"], lab)
    ck = load_checkpoint(lab / "run" / "best.pt")
    assert ck["plugins"][0]["module"] == "mylab" and "+plugins:" in ck["code_hash"]
    p = subprocess.run([sys.executable, "-m", "aerl_ray.evaluate", "run/best.pt", "--n", "16",
                        "--attacks", "pgd"], cwd=lab, capture_output=True, text=True)
    assert p.returncode == 2 and "--plugin" in p.stderr  # the model needs the plugin
    _run(["aerl_ray.evaluate", "run/best.pt", "--plugin", "./mylab", "--n", "16", "--attacks",
          "pgd,mifgsm", "--eps", "0,0.1", "--steps", "3", "--out", "ev"], lab)
    ev = pd.read_parquet(lab / "ev" / "evals.parquet")
    assert "mifgsm" in set(ev["attack"]) and ev["code_hash"].str.contains(r"\+plugins:").all()
    _run(["aerl_ray.sweep", "--space", "mylab_space.yaml", "--smoke", "--run-dir", "sweep",
          "--no-report", "--num-cpus", "2"], lab, timeout=900)
    trials = pd.read_parquet(lab / "sweep" / "trials.parquet")
    assert (trials["status"] == "COMPLETE").all() and "logit_squeeze" in set(trials["regime"])
    assert trials["code_hash"].str.contains(r"\+plugins:").all()
    evals = pd.read_parquet(lab / "sweep" / "evals.parquet")
    assert "mifgsm" in set(evals["attack"]) and evals["code_hash"].str.contains("plugins").all()
    spec = json.loads((lab / "sweep" / "sweep.json").read_text())
    assert spec["space"]["plugins"] == ["./mylab"]
