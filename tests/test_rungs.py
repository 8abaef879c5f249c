"""Rung metrics: the worst attack when masking checks fire, only the validation tensors
given are read, the model's mode is restored, the subset is fixed, passes are counted."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from aerl_ray.rungs import robust_val_metrics, validation_subset
from tests.attack_fixtures import train_digits


@pytest.fixture(scope="module")
def model(digits_splits):
    return train_digits(digits_splits, seed=0, epochs=6, model="tiny")


class Scaled(nn.Module):
    """Logits x 1000: the same predictions, a saturated softmax (CE gradients vanish)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model(x) * 1000.0


def test_masked_model_is_ranked_on_the_worst_attack(model, digits_splits):
    s = digits_splits
    plain = robust_val_metrics(model, s.x_val, s.y_val, eps=0.1, steps=10, n=144)
    masked = robust_val_metrics(Scaled(model), s.x_val, s.y_val, eps=0.1, steps=10, n=144)
    assert masked["clean_acc"] == plain["clean_acc"]
    assert masked["masking"] and "margin_beats_ce" in masked["flags"]
    assert masked["pgd_acc"] > masked["pgd_margin_acc"] + masked["delta"]
    assert masked["robust_acc"] == min(masked["pgd_acc"], masked["fgsm_acc"],
                                       masked["pgd_margin_acc"]) < masked["pgd_acc"]
    assert not plain["masking"] and plain["robust_acc"] == plain["pgd_acc"]
    unchecked = robust_val_metrics(Scaled(model), s.x_val, s.y_val, eps=0.1, steps=10,
                                   n=144, checks=False)
    assert unchecked["robust_acc"] == unchecked["pgd_acc"] > masked["robust_acc"]


def test_rung_metrics_read_only_the_validation_tensors_given(model, digits_splits, monkeypatch):
    import aerl_ray.data

    monkeypatch.setattr(aerl_ray.data, "load_splits", lambda *a, **k: pytest.fail("loaded data"))
    s = digits_splits
    seen, modes = [], []

    class Spy(nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, x):
            seen.append(x.detach().clone())
            modes.append(self.training)
            return self.model(x)

    spy = Spy().train()
    out = robust_val_metrics(spy, s.x_val, s.y_val, eps=0.1, steps=3, n=64, seed=3)
    assert spy.training and not any(modes)  # eval during the evaluation, mode restored
    subset = s.x_val[validation_subset(len(s.x_val), 64, 3)].flatten(1)
    test = s.x_test.flatten(1)
    for x in seen:
        d = torch.cdist(x.flatten(1), subset, p=float("inf")).min(1).values
        assert (d <= 0.1 + 1e-5).all()  # every input is a perturbed subset image
        assert (torch.cdist(x.flatten(1), test, p=float("inf")).min(1).values > 0).all()
    assert out["n"] == 64 and out["fwd_passes"] >= sum(len(x) for x in seen) > 0
    assert out["bwd_passes"] > 0


def test_the_subset_is_fixed_and_numbers_reproducible(model, digits_splits):
    s = digits_splits
    a = robust_val_metrics(model, s.x_val, s.y_val, eps=0.1, steps=3, n=50, seed=1)
    b = robust_val_metrics(model, s.x_val, s.y_val, eps=0.1, steps=3, n=50, seed=1)
    assert {k: v for k, v in a.items() if k != "seconds"} == \
        {k: v for k, v in b.items() if k != "seconds"}
    assert not torch.equal(validation_subset(144, 50, 1), validation_subset(144, 50, 2))
    assert robust_val_metrics(model, s.x_val, s.y_val, eps=0.1, steps=1, n=10 ** 6)["n"] == 144


@pytest.mark.parametrize("kw, match", [(dict(eps=0), "eps"), (dict(eps=0.1, steps=0), "steps"),
                                       (dict(eps=0.1, n=0), "n=0"),
                                       (dict(eps=0.1, norm="l3"), "l3")])
def test_bad_arguments_are_refused(model, digits_splits, kw, match):
    with pytest.raises((ValueError, KeyError), match=match):
        robust_val_metrics(model, digits_splits.x_val, digits_splits.y_val, **kw)
