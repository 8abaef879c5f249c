"""Each regime's loss on hand-made inputs, exploration statistics, costs, schedules."""
import math

import pytest
import torch
import torch.nn.functional as F

from aerl_ray.config import ExploreMode, RegimeConfig, Reward
from aerl_ray.passes import PassCounter
from aerl_ray.regimes import REGIMES, RegimeContext
from aerl_ray.regimes.policy_gradient import pg_loss, rewards, sample_actions
from aerl_ray.regimes.regularised import expected_rl_loss
from aerl_ray.regimes.schedule import regime_for_epoch


def ctx_for(**kw):
    return RegimeContext(cfg=RegimeConfig(**kw), num_classes=10,
                         generator=torch.Generator().manual_seed(0))


def test_pg_loss_with_one_sampled_action():
    logits = torch.tensor([[2.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    actions = torch.tensor([0, 2])
    y = torch.tensor([0, 1])
    r = rewards(actions, y, Reward.ZERO_ONE)
    assert r.tolist() == [1.0, 0.0]
    logp0 = F.log_softmax(logits, 1)[0, 0]
    # only the rewarded sample contributes: -(logp0 * 1 + logp * 0) / 2
    assert float(pg_loss(logits, actions, r)) == pytest.approx(float(-logp0 / 2))
    r_pm = rewards(actions, y, Reward.PLUS_MINUS)
    assert r_pm.tolist() == [1.0, -1.0]
    logp1 = F.log_softmax(logits, 1)[1, 2]
    assert float(pg_loss(logits, actions, r_pm)) == pytest.approx(float(-(logp0 - logp1) / 2))
    # mean-reward baseline: rewards centred -> (1-0.5, 0-0.5)
    assert float(pg_loss(logits, actions, r, baseline=True)) == pytest.approx(
        float(-(logp0 * 0.5 + F.log_softmax(logits, 1)[1, 2] * -0.5) / 2))


def test_pg_loss_gradient_pushes_rewarded_action_up():
    logits = torch.zeros(1, 4, requires_grad=True)
    pg_loss(logits, torch.tensor([2]), torch.tensor([1.0])).backward()
    assert logits.grad[0, 2] < 0 and (logits.grad[0, [0, 1, 3]] > 0).all()


def test_exploration_frequency_per_sample_vs_per_batch():
    """Confident logits: the policy never picks classes 1..9, so a non-zero action means
    an exploratory uniform draw hit another class."""
    logits = torch.tensor([[50.0] + [0.0] * 9]).repeat(64, 1)
    g = torch.Generator().manual_seed(0)
    per_sample, per_batch = [], []
    for _ in range(400):
        _, e = sample_actions(logits, 0.1, ExploreMode.PER_SAMPLE, g)
        per_sample.append(e.float())
        _, e = sample_actions(logits, 0.1, ExploreMode.PER_BATCH, g)
        per_batch.append(e.float())
    ps, pb = torch.stack(per_sample), torch.stack(per_batch)
    assert float(ps.mean()) == pytest.approx(0.1, abs=0.01)
    assert float(pb.mean()) == pytest.approx(0.1, abs=0.04)
    # per batch: every row of a batch explores together; per sample: never all at once
    assert set(pb.mean(1).tolist()) <= {0.0, 1.0}
    assert float(ps.mean(1).max()) < 0.5
    acts, _ = sample_actions(logits, 0.0, ExploreMode.PER_SAMPLE, g)
    assert (acts == 0).all()


def test_sampling_is_seeded():
    logits = torch.randn(32, 10)
    a, _ = sample_actions(logits, 0.3, "per_sample", torch.Generator().manual_seed(5))
    b, _ = sample_actions(logits, 0.3, "per_sample", torch.Generator().manual_seed(5))
    assert torch.equal(a, b)


def test_expected_rl_loss_value():
    logits = torch.log(torch.tensor([[0.7, 0.2, 0.1]]))
    y = torch.tensor([0])
    expected = (1 - 0.1) * (1 - 0.7) + (0.1 / 3) * -math.log(0.7)
    assert float(expected_rl_loss(logits, y, 0.1)) == pytest.approx(expected, rel=1e-5)


def _sampled_pg_grads(logits, y, eps, reward, baseline, mode, draws, g):
    """Per-draw gradients (draws, B, K) of the rl regime's loss on a batch ``logits``:
    ``draws`` independent batches of sampled actions (the production sampler for
    per-sample exploration; one coin per batch for per_batch, as sample_actions does)."""
    from torch.func import grad, vmap

    b, k = logits.shape
    big = logits.repeat(draws, 1)
    if mode == "per_sample":
        a, _ = sample_actions(big, eps, mode, g)
    else:
        pol, _ = sample_actions(big, 0.0, "per_sample", g)
        uniform = torch.randint(0, k, (draws * b,), generator=g)
        coin = (torch.rand(draws, generator=g) < eps).repeat_interleave(b)
        a = torch.where(coin, uniform, pol)
    a = a.view(draws, b)
    r = rewards(a, y.repeat(draws, 1), reward)
    return vmap(grad(lambda lg, aa, rr: pg_loss(lg, aa, rr, baseline)),
                in_dims=(None, 0, 0))(logits, a, r)


@pytest.mark.parametrize("mode", ["per_sample", "per_batch"])
@pytest.mark.parametrize("baseline", [False, True])
@pytest.mark.parametrize("reward", ["01", "pm1"])
def test_sl_rl_loss_gradient_is_the_expected_pg_gradient(reward, baseline, mode):
    """Monte Carlo over 20,000 sampled batches (B = 4, so the batch-mean baseline's
    1 - 1/B shrink and its exploration correction are large): the mean gradient of the
    sampled PG loss equals the gradient of ``sl_rl_loss``'s expectation within 4 standard
    errors.  The old ablation ignored reward and baseline (errors 0.28-0.30 with the
    baseline, 1.15 with +-1 rewards at these settings)."""
    torch.manual_seed(0)
    b, k, eps, draws = 4, 5, 0.2, 20000
    logits = torch.randn(b, k) * 1.5
    y = torch.randint(0, k, (b,))
    grads = _sampled_pg_grads(logits, y, eps, reward, baseline, mode, draws,
                              torch.Generator().manual_seed(1))
    lg = logits.clone().requires_grad_(True)
    cfg = RegimeConfig(regime="sl_rl_loss", explore_eps=eps, reward=reward,
                       baseline=baseline, explore_mode=mode)
    ctx = RegimeContext(cfg=cfg, num_classes=k)
    loss, _ = REGIMES.get("sl_rl_loss")(lambda x: x, lg, y, ctx)  # identity "model"
    (expected,) = torch.autograd.grad(loss, lg)
    err = float((grads.mean(0) - expected).norm() / expected.norm())
    se = float((grads.std(0) / draws ** 0.5).norm() / expected.norm())
    assert err < max(4 * se, 0.02), (err, se)


def test_igr_and_jacobian_add_a_positive_penalty(tiny_model, batch8):
    x, y = batch8
    with torch.no_grad():
        ce = float(F.cross_entropy(tiny_model(x), y))
    for name in ("igr", "jacobian"):
        loss, stats = REGIMES.get(name)(tiny_model, x, y, ctx_for(regime=name, reg_lambda=1.0))
        assert float(loss) > ce
        loss.backward()  # double backprop works


def test_fgsm_adv_costs_two_forward_two_backward(tiny_model, batch8):
    """2 forward + 2 training backward passes (each 2 forward-equivalents of work: input
    and parameter gradients; see aerl_ray.passes)."""
    x, y = batch8
    for regime in ("sl_adv", "rl_adv"):
        tiny_model.zero_grad()
        with PassCounter(tiny_model) as c:
            loss, stats = REGIMES.get(regime)(tiny_model, x, y, ctx_for(regime=regime))
            loss.backward()
        assert (c.fwd, c.bwd) == (2 * len(y), 4 * len(y)), regime
        assert "loss_value" in stats


def test_fgsm_equals_clean_plus_adversarial_loss(tiny_model, batch8):
    """The fused backward gives exactly the gradient of CE(x) + rate * CE(x_adv)."""
    x, y = batch8
    eps, rate = 0.05, 0.7
    ctx = ctx_for(regime="sl_adv", adv_eps=eps, adv_rate=rate)
    tiny_model.zero_grad()
    loss, _ = REGIMES.get("sl_adv")(tiny_model, x, y, ctx)
    loss.backward()
    fused = [p.grad.clone() for p in tiny_model.parameters()]
    tiny_model.zero_grad()
    xr = x.clone().requires_grad_(True)
    (gx,) = torch.autograd.grad(F.cross_entropy(tiny_model(xr), y), xr)
    x_adv = (x + eps * gx.sign()).clamp(0, 1)
    ref = F.cross_entropy(tiny_model(x), y) + rate * F.cross_entropy(tiny_model(x_adv), y)
    ref.backward()
    for a, p in zip(fused, tiny_model.parameters()):
        assert torch.allclose(a, p.grad, atol=1e-6)


def test_rl_fgsm_perturbs_only_rewarded_samples(tiny_model, batch8):
    """The paper's quirk: grad_x of the sampled PG loss is 0 where the reward is 0."""
    x, y = batch8
    x = x.clone().requires_grad_(True)
    logits = tiny_model(x)
    acts, _ = sample_actions(logits, 0.0, "per_sample", torch.Generator().manual_seed(0))
    r = rewards(acts, y, "01")
    pg_loss(logits, acts, r).backward()
    zero_rows = x.grad.flatten(1).abs().sum(1) == 0
    assert torch.equal(zero_rows, r == 0)


@pytest.mark.parametrize("attack", ["fgsm_rs", "pgd", "trades"])
def test_inner_attacks_stay_in_ball(tiny_model, batch8, attack):
    from aerl_ray.regimes.adversarial import pgd_linf_ce, trades_perturb

    x, y = batch8
    g = torch.Generator().manual_seed(0)
    if attack == "trades":
        x_adv = trades_perturb(tiny_model, x, 0.1, 5, 0.03, g)
    else:
        x_adv = pgd_linf_ce(tiny_model, x, y, 0.1, 5, 0.03, g)
    assert float((x_adv - x).abs().max()) <= 0.1 + 1e-6
    assert float(x_adv.min()) >= 0 and float(x_adv.max()) <= 1
    loss, _ = REGIMES.get("sl_adv")(tiny_model, x, y, ctx_for(regime="sl_adv", adv_attack=attack,
                                                              adv_steps=3, adv_eps=0.1))
    assert torch.isfinite(loss)


def test_pgd_inner_attack_raises_the_loss(tiny_model, batch8):
    from aerl_ray.regimes.adversarial import pgd_linf_ce

    x, y = batch8
    x_adv = pgd_linf_ce(tiny_model, x, y, 0.2, 10, 0.05, torch.Generator().manual_seed(0))
    assert float(F.cross_entropy(tiny_model(x_adv), y)) > float(F.cross_entropy(tiny_model(x), y))


def test_schedule():
    hyb = RegimeConfig(regime="hybrid", switch_epoch=3)
    assert [regime_for_epoch(hyb, e) for e in range(5)] == ["sl"] * 3 + ["rl"] * 2
    hyb_adv = RegimeConfig(regime="hybrid", switch_epoch=2, start_adv_epoch=3)
    assert [regime_for_epoch(hyb_adv, e) for e in range(5)] == ["sl", "sl", "rl", "rl_adv", "rl_adv"]
    adv = RegimeConfig(regime="sl_adv", start_adv_epoch=2)
    assert [regime_for_epoch(adv, e) for e in range(4)] == ["sl", "sl", "sl_adv", "sl_adv"]
    assert regime_for_epoch(RegimeConfig(regime="rl_adv"), 0) == "rl_adv"


@pytest.mark.parametrize("regime", REGIMES.names())
def test_every_regime_passes_the_regime_checks(regime, digits_splits):
    """The shared regime checks (aerl_ray.testing.check_regime: a finite scalar loss with
    gradients, same seed same loss, a few steps lower it), hybrid in its RL phase; plugin
    regimes get the same checks (tests/test_plugins.py)."""
    from aerl_ray.testing import check_regime

    x, y = digits_splits.x_train[:64], digits_splits.y_train[:64]
    kw = dict(explore_eps=0.0, adv_steps=2, adv_eps=0.02)
    if regime == "hybrid":
        kw["switch_epoch"] = 1
    out = check_regime(regime, x, y, 10, **kw)
    if regime in ("rl", "rl_adv", "hybrid"):  # the policy-gradient loss really ran
        assert "reward" in out["stats"]


def test_regime_checks_catch_broken_regimes(digits_splits):
    """The checks can fail: a regime on the global RNG, one detached from the model and
    one that does not learn are each refused with the property named."""
    import torch.nn.functional as F

    from aerl_ray.testing import RegimeCheckError, check_regime

    x, y = digits_splits.x_train[:64], digits_splits.y_train[:64]

    def global_rng(model, x, y, ctx):
        noise = torch.rand(x.shape)  # not ctx.generator
        return F.cross_entropy(model((x + 0.1 * noise).clamp(0, 1)), y), {}

    def detached(model, x, y, ctx):
        return F.cross_entropy(model(x).detach().requires_grad_(), y), {}

    def unlearnable(model, x, y, ctx):  # a loss the parameters cannot change
        return 0.0 * F.cross_entropy(model(x), y) + 1.0, {}

    for name, fn, match in [("_rng", global_rng, "same generator seed"),
                            ("_det", detached, "no gradient"),
                            ("_up", unlearnable, "did not lower")]:
        REGIMES._items[name] = fn
        try:
            with pytest.raises(RegimeCheckError, match=match):
                check_regime(name, x, y, 10)
        finally:
            REGIMES._items.pop(name)


# --- TRADES --------------------------------------------------------------------------------
def test_trades_beta_defaults_to_six_and_adv_rate_is_refused():
    from aerl_ray.config import ConfigError, TrainConfig

    cfg = TrainConfig.from_flat(dict(regime="sl_adv", adv_attack="trades"))
    assert cfg.regime.trades_beta == 6.0
    with pytest.raises(ConfigError, match="adv_rate=6.0 with adv_attack=trades.*trades_beta"):
        TrainConfig.from_flat(dict(regime="sl_adv", adv_attack="trades", adv_rate=6.0))
    with pytest.raises(ConfigError, match="trades_beta=3.0 with adv_attack=fgsm"):
        TrainConfig.from_flat(dict(regime="sl_adv", trades_beta=3.0))


def test_a_space_searching_adv_rate_for_trades_trials_is_rejected():
    """adv_rate searched for every adv regime while adv_attack may be trades: caught when
    the space loads (every branch of the conditional categoricals is validated)."""
    from aerl_ray.space import SpaceError, parse_space

    raw = {"fixed": {"dataset": "digits", "model": "tiny", "epochs": 2},
           "parameters": {
               "regime": {"type": "categorical", "choices": ["sl", "sl_adv"]},
               "adv_attack": {"type": "categorical", "choices": ["fgsm", "trades"],
                              "when": {"regime": ["sl_adv"]}},
               "adv_rate": {"type": "float", "low": 0.5, "high": 6.0,
                            "when": {"regime": ["sl_adv"]}}},
           "objectives": [{"name": "clean_acc"}], "evaluation": {"attacks": ["pgd"]}}
    with pytest.raises(SpaceError, match="adv_attack=trades.*trades_beta"):
        parse_space(raw)
    raw["parameters"]["adv_rate"]["when"] = {"adv_attack": ["fgsm"]}  # fgsm trials only
    parse_space(raw)


def test_shipped_spaces_give_trades_trials_beta_six():
    from pathlib import Path

    from aerl_ray.space import load_space

    for path in sorted((Path(__file__).parents[1] / "search_spaces").glob("*.yaml")):
        sp = load_space(path)
        attacks = next((p.choices for p in sp.params if p.name == "adv_attack"),
                       (sp.fixed.get("adv_attack"),))
        if "trades" in attacks:
            cfg = sp.train_config({"regime": "sl_adv", "adv_attack": "trades"})
            assert cfg.regime.trades_beta == 6.0, path


def _trades_setup(tiny_model, batch8, **kw):
    """(ctx, x_adv) with the x_adv the regime's inner maximisation finds (same seed)."""
    from aerl_ray.regimes.adversarial import trades_perturb

    x, y = batch8
    ctx = ctx_for(regime="sl_adv", adv_attack="trades", adv_eps=0.1, adv_steps=3, **kw)
    c = ctx.cfg
    g = torch.Generator().manual_seed(0)
    x_adv = trades_perturb(tiny_model, x, c.adv_eps, c.adv_steps, c.adv_step_size * c.adv_eps,
                           g)
    return ctx, x_adv


def test_trades_loss_is_ce_plus_beta_times_batchmean_kl_nat_to_adv(tiny_model, batch8):
    """CE(x) + 6 * (1/B) sum_i KL(p(x_i) || p(x'_i)): the KL's direction (natural
    distribution first), its reduction (batch mean, not per element) and beta = 6 by
    default (the old code weighted it by adv_rate = 1)."""
    x, y = batch8
    ctx, x_adv = _trades_setup(tiny_model, batch8)
    loss, stats = REGIMES.get("sl_adv")(tiny_model, x, y, ctx)
    with torch.no_grad():
        ln, la = F.log_softmax(tiny_model(x), 1), F.log_softmax(tiny_model(x_adv), 1)
        kl_rows = (ln.exp() * (ln - la)).sum(1)  # KL(p(x) || p(x')) per example
        reverse = (la.exp() * (la - ln)).sum(1).mean()
        ce = F.cross_entropy(tiny_model(x), y)
    kl = kl_rows.mean()
    assert stats["kl"] == pytest.approx(float(kl), rel=1e-4)
    assert float(loss) == pytest.approx(float(ce + 6.0 * kl), rel=1e-5)
    assert abs(float(reverse) - float(kl)) > 1e-3 * float(kl)  # the direction is testable
    assert abs(float(kl_rows.sum() / kl_rows.numel() / 10) - float(kl)) > 1e-6  # not per-elt
    ctx2, _ = _trades_setup(tiny_model, batch8, trades_beta=1.5)
    loss2, _ = REGIMES.get("sl_adv")(tiny_model, x, y, ctx2)
    assert float(loss2) == pytest.approx(float(ce + 1.5 * kl), rel=1e-5)


def test_trades_kl_gradient_flows_through_both_distributions(tiny_model, batch8):
    from aerl_ray.regimes.adversarial import trades_kl

    ln = torch.randn(4, 10, requires_grad=True)
    la = torch.randn(4, 10, requires_grad=True)
    trades_kl(ln, la).backward()
    assert ln.grad.abs().sum() > 0 and la.grad.abs().sum() > 0


def test_trades_logs_its_kl_without_a_warning(tiny_model, batch8):
    import warnings

    x, y = batch8
    ctx, _ = _trades_setup(tiny_model, batch8)
    was = torch.is_warn_always_enabled()
    torch.set_warn_always(True)  # torch warns once per process otherwise
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # float(kl) on a tensor requiring grad warns
            REGIMES.get("sl_adv")(tiny_model, x, y, ctx)
    finally:
        torch.set_warn_always(was)


# --- train / eval mode of the inner attacks, through the training loop ---------------------
class ModeRecorder(torch.nn.Module):
    """Wraps a model; records (training, input requires grad) at every forward."""

    def __init__(self, model):
        super().__init__()
        self.model = model
        self.calls: list[tuple[bool, bool]] = []

    def forward(self, x):
        self.calls.append((self.training, x.requires_grad))
        return self.model(x)


@pytest.mark.parametrize("attack, expected", [
    # (training, input requires grad) of every forward of one step
    ("fgsm", [(True, True), (True, False)]),
    # Wong et al.: the FGSM-RS step runs in train mode
    ("fgsm_rs", [(True, True), (True, False)]),
    # PGD-AT and TRADES: the inner maximisation in eval mode (BN frozen), training in train
    ("pgd", [(False, True)] * 2 + [(True, False)]),
    ("trades", [(False, False)] + [(False, True)] * 2 + [(True, False)] * 2),
])
def test_inner_attacks_run_in_the_mode_of_their_method(attack, expected, digits_splits,
                                                       monkeypatch, tmp_path):
    """One training step through the real loop (its attack_mode), recording the mode of
    every forward pass; validation runs after it and is not recorded."""
    import aerl_ray.train as train_mod
    from aerl_ray.config import TrainConfig
    from aerl_ray.models import build_model

    made = []

    def build(name, info, spectral_norm=False):
        made.append(ModeRecorder(build_model(name, info, spectral_norm)))
        return made[-1]

    monkeypatch.setattr(train_mod, "build_model", build)
    cfg = TrainConfig.from_flat(dict(dataset="digits", model="tiny", regime="sl_adv",
                                     adv_attack=attack, adv_steps=2, adv_eps=0.05, epochs=1,
                                     batch_size=64, select="clean"))
    splits = _first(digits_splits, 64)
    monkeypatch.setattr(train_mod, "accuracy", lambda *a, **k: 0.5)
    monkeypatch.setattr(train_mod, "input_grad_norm", lambda *a, **k: 0.0)
    train_mod.fit(cfg, tmp_path, splits=splits)
    assert made[0].calls[:len(expected)] == expected
    assert len(made[0].calls) == len(expected)


def _first(splits, n):
    import dataclasses

    return dataclasses.replace(splits, x_train=splits.x_train[:n], y_train=splits.y_train[:n])
