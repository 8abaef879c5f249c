"""Gradient indicators: aggregated over all batches, measured along the path."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from aerl_ray.attacks import Threat
from aerl_ray.indicators import (adversarial_landscape, measure_indicators,
                                 save_landscape_png)
from tests.attack_fixtures import *  # noqa: F401,F403  (fixtures)




def test_per_example_indicators_do_not_depend_on_batching(sl_model, digits):
    """Aggregation covers every batch (the paper's script kept only the last one)."""
    x, y = digits.x_test[:48], digits.y_test[:48]
    t = Threat("linf", 0.1)
    one = measure_indicators(sl_model, x, y, t, steps=6, batch_size=48)
    many = measure_indicators(sl_model, x, y, t, steps=6, batch_size=10)
    for k in ("agn", "cos_prev", "sign_consistency", "frac_small_grad_start",
              "frac_small_grad_path", "entropy_clean", "entropy_adv"):
        assert many.aggregate[k] == pytest.approx(one.aggregate[k], rel=1e-4, abs=1e-7), k
    assert len(one.per_step["agn"]) == 6 and one.per_step["cos_prev"][0] != \
        one.per_step["cos_prev"][0]  # nan at step 0: no previous step
    assert 0 <= one.aggregate["dispersion"] <= 2


class ConstantLogits(nn.Module):
    """Output independent of the input: a zero input gradient everywhere."""

    def __init__(self):
        super().__init__()
        self.bias = nn.Parameter(torch.arange(10.0))

    def forward(self, x):
        return self.bias.expand(len(x), 10) + 0 * x.flatten(1)[:, :1]


def test_vanishing_gradient_is_seen_along_the_path(sl_model, digits):
    x, y = digits.x_test[:16], digits.y_test[:16]
    dead = measure_indicators(ConstantLogits(), x, y, Threat("l2", 1.0), steps=3)
    assert dead.aggregate["frac_small_grad_path"] == 1.0
    assert dead.aggregate["agn"] == 0.0
    live = measure_indicators(sl_model, x, y, Threat("l2", 1.0), steps=3)
    assert live.aggregate["frac_small_grad_path"] < 1.0 and live.aggregate["agn"] > 0


def test_landscape_slice_and_png(sl_model, digits, tmp_path):
    x, y = digits.x_test[:8], digits.y_test[:8]
    rep = measure_indicators(sl_model, x, y, Threat("linf", 0.1), steps=3)
    data = adversarial_landscape(sl_model, x, y, rep.x_adv, points=5, two_d=True)
    assert len(data["loss"]) == 5 and len(data["loss"][0]) == 5
    one = adversarial_landscape(sl_model, x, y, rep.x_adv, points=5)
    assert one["loss"][4] > one["loss"][2]  # loss rises along the adversarial direction
    assert save_landscape_png(data, tmp_path / "l.png").stat().st_size > 0
