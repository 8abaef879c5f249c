"""Search-space files: every shipped file validates; bad files fail before Ray starts."""
from pathlib import Path

import optuna
import pytest
import yaml

from aerl_ray.space import SpaceError, load_space, parse_space

SPACES = sorted(Path(__file__).resolve().parent.parent.joinpath("search_spaces").glob("*.yaml"))


@pytest.mark.parametrize("path", SPACES, ids=[p.stem for p in SPACES])
@pytest.mark.parametrize("smoke", [False, True])
def test_every_shipped_space_validates(path, smoke):
    spec = load_space(path, smoke=smoke)
    assert spec.objectives and spec.params and spec.num_samples >= 1


def base():
    return yaml.safe_load((SPACES[0].parent / "quickstart.yaml").read_text())


@pytest.mark.parametrize("edit, match", [
    (lambda r: r.update(colour=1), r"unknown key\(s\) \['colour'\]"),
    (lambda r: r.pop("objectives"), "missing required key 'objectives'"),
    (lambda r: r["parameters"].update(lr={"type": "float", "low": 1e-2, "high": 1e-3}),
     "bad range low=0.01 high=0.001"),
    (lambda r: r["parameters"].update(lr={"type": "float", "low": 0, "high": 1, "log": True}),
     "log scale needs low > 0"),
    (lambda r: r["parameters"].update(lr={"type": "float", "low": 1e-3, "high": 1e-2, "lg": 1}),
     r"unknown key\(s\) \['lg'\]"),
    (lambda r: r["parameters"].update(gamma={"type": "float", "low": 0, "high": 1}),
     "parameters.gamma: unknown parameter"),
    (lambda r: r["parameters"].update(adv_rate={"type": "float", "low": 0.1, "high": 1,
                                                "when": {"attack": ["pgd"]}}),
     "condition on 'attack', which is not a parameter defined above it"),
    (lambda r: r["parameters"].update(adv_rate={"type": "float", "low": 0.1, "high": 1,
                                                "when": {"regime": ["dqn"]}}),
     "must be categorical with those choices"),
    (lambda r: r["fixed"].update(dataset="mnist"), "known datasets"),
    (lambda r: r["fixed"].update(model="vgg"), "known models"),
    (lambda r: r["fixed"].update(epochs=3), r"switch_epoch=\d must be in \[1, epochs=3\)"),
    (lambda r: r["evaluation"].update(attacks=["pgd", "cw"]), "unknown attack 'cw'"),
    (lambda r: r["evaluation"].update(grids={"linf": [0.1, 0.05]}), "sorted"),
    (lambda r: r["objectives"].append({"name": "r2", "attack": "square", "norm": "linf",
                                       "eps": 0.1}), "objective attack 'square' is not evaluated"),
    (lambda r: r["objectives"].append({"name": "r3", "attack": "pgd", "norm": "linf",
                                       "eps": 0.3}), "not in the evaluation grid"),
    (lambda r: r.update(sampler={"type": "cmaes"}), "sampler.type must be one of"),
    (lambda r: r.update(scheduler={"type": "asha"}), "asha needs 'metric'"),
    (lambda r: r.pop("reference"), "'transfer' needs a source"),
    (lambda r: r["points_to_evaluate"].append({"regime": "sl", "momentum": 0.9}),
     "'momentum' is not a searched parameter"),
])
def test_bad_space_is_rejected_with_a_clear_error(edit, match):
    raw = base()
    raw.pop("smoke")
    edit(raw)
    with pytest.raises(SpaceError, match=match):
        parse_space(raw, "bad.yaml")


def test_invalid_yaml_and_missing_file(tmp_path):
    p = tmp_path / "broken.yaml"
    p.write_text("parameters: [unclosed\n")
    with pytest.raises(SpaceError, match="invalid YAML"):
        load_space(p)
    p.write_text("name: a\nfixed: {epochs: 3}\nfixed: {model: tiny}\n")
    with pytest.raises(SpaceError, match="key 'fixed' is given twice"):
        load_space(p)
    with pytest.raises(SpaceError, match="does not exist"):
        load_space(tmp_path / "none.yaml")


def test_conditional_parameters_are_define_by_run():
    spec = load_space(SPACES[0].parent / "quickstart.yaml")
    study = optuna.create_study(directions=["maximize", "maximize"],
                                sampler=optuna.samplers.RandomSampler(seed=0))
    seen = set()
    for _ in range(40):
        t = study.ask()
        fixed = spec.define_by_run(t)
        assert fixed["dataset"] == "digits"
        regime = t.params["regime"]
        seen.add(regime)
        assert ("switch_epoch" in t.params) == (regime == "hybrid")
        assert ("adv_eps" in t.params) == (regime == "rl_adv")
        assert ("explore_eps" in t.params) == (regime != "sl")
        spec.train_config(t.params)  # every sampled point is a valid training config
        study.tell(t, [0.5, 0.5])
    assert seen == {"sl", "rl", "rl_adv", "hybrid"}
