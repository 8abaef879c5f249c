"""Which regime is active in a given epoch.

- ``sl_adv`` / ``rl_adv`` train without the adversarial term before ``start_adv_epoch``
  (-1 = from epoch 0);
- ``hybrid`` is SL for ``switch_epoch`` epochs, then RL, and RL-adv from
  ``start_adv_epoch`` if that is set (-1 = never adversarial).
"""
from __future__ import annotations

from aerl_ray.regimes import REGIMES


def regime_for_epoch(cfg, epoch: int) -> str:
    """The name of the registered loss used in ``epoch`` (0-based)."""
    name, start = cfg.regime, cfg.start_adv_epoch
    if name in ("sl_adv", "rl_adv"):
        return name if epoch >= max(start, 0) else name[:-4]
    if name == "hybrid":
        if epoch < cfg.switch_epoch:
            return "sl"
        return "rl_adv" if 0 <= start <= epoch else "rl"
    return name


def final_regime_start(cfg, epochs: int) -> int:
    """The first epoch (0-based) in which the run's final regime is active: the epochs a
    checkpoint may be selected from (a hybrid trial is judged on its RL phase)."""
    name, start = cfg.regime, cfg.start_adv_epoch
    if name in ("sl_adv", "rl_adv"):
        return max(start, 0)
    if name == "hybrid":
        return max(cfg.switch_epoch, start) if start >= 0 else cfg.switch_epoch
    return 0


@REGIMES.register("hybrid")
def hybrid(model, x, y, ctx):
    """SL until ``switch_epoch``, then RL (the paper's future-work suggestion)."""
    return REGIMES.get(regime_for_epoch(ctx.cfg, ctx.epoch))(model, x, y, ctx)
