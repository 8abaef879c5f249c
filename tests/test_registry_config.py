import pytest

from aerl_ray.config import ConfigError, DataConfig, ModelConfig, RegimeConfig, TrainConfig
from aerl_ray.registry import Registry, UnknownNameError


def test_registry_unknown_name_lists_known():
    reg = Registry("widget")
    reg.register("a")(1)
    reg.register("b")(2)
    with pytest.raises(UnknownNameError, match="known widgets: a, b"):
        reg.get("c")
    with pytest.raises(ValueError, match="already registered"):
        reg.register("a")(3)
    assert reg.names() == ["a", "b"] and "a" in reg


@pytest.mark.parametrize("kwargs, match", [
    (dict(dataset="mnist"), "known datasets: cifar10, cifar100, digits, imagenet100"),
    (dict(model="vgg"), "known models: cnn4, cnn6, resnet18, tiny"),
    (dict(regime="dqn"), "known regimes: .*rl_adv"),
    (dict(lr=-1.0), "lr=-1.0 must be > 0"),
    (dict(lr=float("nan")), "lr=nan"),
    (dict(epochs=0), "epochs=0 must be >= 1"),
    (dict(batch_size=0), "batch_size=0"),
    (dict(explore_eps=1.5), r"explore_eps=1.5 must be in \[0, 1\]"),
    (dict(explore_mode="sometimes"), "explore_mode='sometimes' is not valid; choose one of: "
                                     "per_sample, per_batch"),
    (dict(adv_attack="cw"), "choose one of: fgsm, fgsm_rs, pgd, trades"),
    (dict(adv_eps=-0.1), "adv_eps"),
    (dict(regime="hybrid", epochs=5, switch_epoch=5), r"switch_epoch=5 must be in \[1, epochs=5\)"),
    (dict(regime="hybrid", epochs=5, switch_epoch=0), "switch_epoch=0"),
    (dict(regime="rl_adv", epochs=5, start_adv_epoch=6), "start_adv_epoch=6 must be <= epochs=5"),
    (dict(val_fraction=1.0), "val_fraction"),
    (dict(warmup_epochs=10, epochs=5), "warmup_epochs=10"),
    (dict(device="tpu"), "device='tpu'"),
    (dict(colour="red"), "unknown config key 'colour'; known keys: .*adv_attack"),
])
def test_bad_config_raises_clear_error(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        TrainConfig.from_flat(kwargs)


def test_flat_round_trip_and_enums():
    cfg = TrainConfig.from_flat({"regime": "rl", "explore_mode": "per_batch", "lr": 3e-4,
                                 "dataset": "digits", "model": "tiny"})
    flat = cfg.to_flat()
    assert flat["explore_mode"] == "per_batch" and flat["lr"] == 3e-4
    assert TrainConfig.from_flat(flat) == cfg
    assert cfg.replace(lr=1e-2).lr == 1e-2
    with pytest.raises(Exception):  # frozen
        cfg.lr = 1.0  # type: ignore[misc]


def test_nested_configs_validate_on_their_own():
    assert DataConfig(dataset="npz:/nowhere.npz").dataset.startswith("npz:")
    with pytest.raises(ConfigError):
        ModelConfig(model="nope")
    with pytest.raises(ConfigError):
        RegimeConfig(reward="2")
