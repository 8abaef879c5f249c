"""Checkpoint selection belongs to the regime; the search never reads a test image."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from aerl_ray.checkpoint import load_checkpoint
from aerl_ray.config import ConfigError, TrainConfig
from aerl_ray.selection import Selector, selection_rule
from aerl_ray.train import fit, read_metrics


def cfg(**kw):
    base = dict(dataset="digits", model="tiny", epochs=4, lr=2e-3, batch_size=64, seed=0)
    return TrainConfig.from_flat({**base, **kw})


@pytest.mark.parametrize("kw,start,final", [
    (dict(regime="hybrid", switch_epoch=3, epochs=5), 3, "rl"),
    (dict(regime="hybrid", switch_epoch=1, start_adv_epoch=3, epochs=5), 3, "rl_adv"),
    (dict(regime="rl_adv", start_adv_epoch=2, epochs=4), 2, "rl_adv"),
    (dict(regime="sl", epochs=3), 0, "sl"),
])
def test_kept_epoch_is_of_the_final_regime(tmp_path, digits_splits, kw, start, final):
    """Even when an earlier epoch (of another regime) validates better, the kept one is
    an epoch of the final regime, and the checkpoint says which and why."""
    res = fit(cfg(**kw), tmp_path, splits=digits_splits)
    best = load_checkpoint(tmp_path / "best.pt")
    rows = read_metrics(tmp_path / "metrics.jsonl")
    assert best["epoch"] >= start
    assert best["metrics"]["regime_active"] == final == rows[best["epoch"]]["regime_active"]
    sel = best["selection"]
    assert sel["candidates"][0] == start and sel["regime"] == final
    assert f"final regime {final}" in sel["reason"]
    assert res.metrics["best_epoch"] == best["epoch"]
    # the rule picks the best of the candidates on its metric
    key = "val_robust_acc" if sel["rule"] == "robust" else "val_acc"
    cands = [r for r in rows if r["epoch"] >= start]
    assert rows[best["epoch"]][key] == max(r[key] for r in cands)
    assert [r["epoch"] for r in rows if r["selected"]][-1] == best["epoch"]


def test_hybrid_sl_phase_better_on_validation_is_not_kept(tmp_path, digits_splits):
    """The issue's example: a hybrid run whose SL phase validates best keeps an RL epoch."""
    c = cfg(regime="hybrid", switch_epoch=3, epochs=4, explore_eps=0.9, select="clean")
    fit(c, tmp_path, splits=digits_splits)
    rows = read_metrics(tmp_path / "metrics.jsonl")
    best = load_checkpoint(tmp_path / "best.pt")
    assert best["epoch"] == 3  # the only RL epoch ...
    assert max(r["val_acc"] for r in rows[:3]) > rows[3]["val_acc"]  # ... though SL was better


def test_robust_selection_measures_pgd_on_validation(tmp_path, digits_splits):
    res = fit(cfg(regime="sl_adv", adv_attack="fgsm", adv_eps=0.05, epochs=3, select_n=64,
                  select_steps=3), tmp_path, splits=digits_splits)
    rows = read_metrics(tmp_path / "metrics.jsonl")
    assert all(r["val_robust_acc"] is not None for r in rows)
    assert all(0 <= r["val_robust_acc"] <= r["val_acc"] + 0.1 for r in rows)
    sel = load_checkpoint(tmp_path / "best.pt")["selection"]
    assert sel["rule"] == "robust" and sel["eps"] == 0.05 and sel["n"] == 64
    assert "PGD-3 linf eps=0.05 on 64 val images" in sel["reason"]
    # the selection's passes are counted, apart from training's
    assert res.metrics["select_fwd_passes"] > 0
    assert res.metrics["fwd_passes"] == 3 * 2 * len(digits_splits.y_train)  # 2 fwd/example


def test_selection_rules_and_bad_input():
    assert selection_rule(cfg(regime="sl"))[0] == "clean"
    assert selection_rule(cfg(regime="sl", select_eps=0.1))[0] == "clean"  # auto: SL clean
    assert selection_rule(cfg(regime="hybrid", switch_epoch=1, select_eps=0.1))[:1] == ("robust",)
    assert selection_rule(cfg(regime="rl_adv", adv_eps=0.03)) == ("robust", "linf", 0.03)
    assert selection_rule(cfg(regime="hybrid", switch_epoch=1))[0] == "clean"  # no budget
    with pytest.raises(ConfigError, match="select=robust needs a PGD budget"):
        cfg(regime="rl", select="robust")
    with pytest.raises(ConfigError, match="select='best'"):
        cfg(select="best")


def test_run_that_never_reaches_its_final_regime_says_so(tmp_path, digits_splits):
    # a pass budget that ends the run during the SL phase of a hybrid
    n = len(digits_splits.y_train)
    c = cfg(regime="hybrid", switch_epoch=3, epochs=5, pass_budget=2 * 2 * n)
    fit(c, tmp_path, splits=digits_splits)
    sel = load_checkpoint(tmp_path / "best.pt")["selection"]
    assert sel["fallback"] and "was never reached" in sel["reason"]


def _marked_splits(digits_splits):
    """Digits with every TEST image marked (pixel (0,0) = 1.0; train/val have 0 there and
    an attack at eps <= 0.2 cannot reach 1.0 from 0)."""
    import dataclasses

    def clear(x):
        x = x.clone()
        x[:, :, 0, 0] = 0.0
        return x

    xt = digits_splits.x_test.clone()
    xt[:, :, 0, 0] = 1.0
    return dataclasses.replace(digits_splits, x_train=clear(digits_splits.x_train),
                               x_val=clear(digits_splits.x_val), x_test=xt)


class _Spy:
    """Forward pre-hook on every model built: records whether a marked image went in."""

    def __init__(self, monkeypatch):
        import aerl_ray.models as models
        import aerl_ray.train as train

        self.seen_test = 0
        self.calls = 0
        real = models.build_model

        def build(*a, **k):
            m = real(*a, **k)
            m.register_forward_pre_hook(self._hook)
            return m

        monkeypatch.setattr(models, "build_model", build)  # evaluation (model_from_checkpoint)
        monkeypatch.setattr(train, "build_model", build)  # the training loop

    def _hook(self, module, args):
        x = args[0]
        self.calls += 1
        self.seen_test += int((x[:, :, 0, 0] > 0.5).any())


def test_search_never_reads_a_test_image(tmp_path, digits_splits, monkeypatch):
    """Training with robust selection and the search's evaluation plan touch validation
    only (asserted on every forward pass); the confirmation plan reads test."""
    from aerl_ray import evaluate as ev
    from aerl_ray.evalpool import SweepEvaluator
    from aerl_ray.train import WorkerContext, train_loop

    marked = _marked_splits(digits_splits)
    monkeypatch.setattr(ev, "load_eval_data", lambda config, split="test": (
        (marked.x_val, marked.y_val) if split == "val" else (marked.x_test, marked.y_test)))
    spy = _Spy(monkeypatch)
    c = cfg(regime="hybrid", switch_epoch=1, epochs=3, select_eps=0.1, select_n=32,
            select_steps=2)
    train_loop(c, tmp_path, WorkerContext(splits=marked, final_test=False))
    assert spy.calls > 0 and spy.seen_test == 0
    plan = {"attacks": ["pgd", "fgsm"], "grids": {"linf": [0, 0.1]}, "n": 32,
            "attack_params": {"pgd": {"steps": 3}}, "indicator_steps": 2}
    evaluator = SweepEvaluator({"search": plan, "confirm": plan}, None, 0)
    ckpt = load_checkpoint(tmp_path / "best.pt")
    res = evaluator.evaluate(ckpt, {"trial_id": "t0000", "phase": "search"})
    assert spy.seen_test == 0
    assert {r["split"] for r in res["rows"]} == {"val"}
    assert {r["split"] for r in res["indicators"]} == {"val"}
    res = evaluator.evaluate(ckpt, {"trial_id": "t0000-s0", "phase": "confirm"})
    assert spy.seen_test > 0 and {r["split"] for r in res["rows"]} == {"test"}


def test_split_indices_are_disjoint_stratified_and_validated(tmp_path):
    from aerl_ray.config import DataConfig
    from aerl_ray.data import DatasetUnavailableError, load_splits

    s = load_splits(DataConfig(dataset="digits", val_size=300))
    assert len(s.y_val) == 300 and not set(s.idx_val) & set(s.idx_train)
    assert len(np.unique(s.y_val.numpy())) == 10
    assert torch.equal(load_splits(DataConfig(dataset="digits", val_size=300)).x_val, s.x_val)
    with pytest.raises(DatasetUnavailableError, match="leaves a class out"):
        load_splits(DataConfig(dataset="digits", val_size=5))
    bad = tmp_path / "bad.npz"
    x = np.zeros((20, 4, 4, 1), np.uint8)
    np.savez(bad, X_train=x, y_train=np.array([0, 2] * 10), X_test=x[:4], y_test=np.zeros(4, int))
    with pytest.raises(DatasetUnavailableError, match=r"classes \[1\] have no training image"):
        load_splits(DataConfig(dataset=f"npz:{bad}"))
    np.savez(bad, X_train=x, y_train=np.linspace(0, 1, 20), X_test=x[:4], y_test=np.zeros(4))
    with pytest.raises(DatasetUnavailableError, match="integer class labels"):
        load_splits(DataConfig(dataset=f"npz:{bad}"))


def test_selector_state_round_trips():
    s = Selector.of(cfg(regime="rl_adv", adv_eps=0.05))
    s.offer(0, "rl_adv", 0.5, 0.2, False)
    t = Selector.of(cfg(regime="rl_adv", adv_eps=0.05))
    t.load_state(s.state())
    assert t.best_epoch == 0 and not t.offer(1, "rl_adv", 0.9, 0.1, False)
    assert t.offer(2, "rl_adv", 0.4, 0.3, True) and t.best_epoch == 2
