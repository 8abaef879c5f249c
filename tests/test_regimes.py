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


def test_expected_rl_loss_matches_sampled_rl_gradient_on_average():
    """E[grad of the sampled PG loss] = grad of (1-eps)(1-p_y) + eps/K CE."""
    torch.manual_seed(0)
    logits = torch.randn(1, 5, requires_grad=True)
    y = torch.tensor([3])
    expected_rl_loss(logits, y, 0.2).backward()
    target = logits.grad.clone()
    logits.grad = None
    g = torch.Generator().manual_seed(1)
    big = logits.detach().repeat(20000, 1).requires_grad_(True)
    acts, _ = sample_actions(big, 0.2, "per_sample", g)
    pg_loss(big, acts, rewards(acts, y.repeat(20000), "01")).backward()
    mean_grad = big.grad.sum(0)  # pg_loss already averages over the 20000 draws
    assert torch.allclose(mean_grad, target[0], atol=0.01)


def test_igr_and_jacobian_add_a_positive_penalty(tiny_model, batch8):
    x, y = batch8
    with torch.no_grad():
        ce = float(F.cross_entropy(tiny_model(x), y))
    for name in ("igr", "jacobian"):
        loss, stats = REGIMES.get(name)(tiny_model, x, y, ctx_for(regime=name, reg_lambda=1.0))
        assert float(loss) > ce
        loss.backward()  # double backprop works


def test_fgsm_adv_costs_two_forward_two_backward(tiny_model, batch8):
    x, y = batch8
    for regime in ("sl_adv", "rl_adv"):
        tiny_model.zero_grad()
        with PassCounter(tiny_model) as c:
            loss, stats = REGIMES.get(regime)(tiny_model, x, y, ctx_for(regime=regime))
            loss.backward()
        assert (c.fwd, c.bwd) == (2 * len(y), 2 * len(y)), regime
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
def test_every_regime_lowers_its_loss(regime, digits_splits):
    """A few optimisation steps on one fixed batch lower the regime's loss."""
    from aerl_ray.models import build_model

    torch.manual_seed(0)
    model = build_model("tiny", digits_splits.info)
    x, y = digits_splits.x_train[:64], digits_splits.y_train[:64]
    kw = dict(regime=regime, explore_eps=0.0, adv_steps=2, adv_eps=0.02)
    if regime == "hybrid":
        kw["switch_epoch"] = 1
    opt = torch.optim.Adam(model.parameters(), lr=3e-2)

    def step(seed):
        ctx = ctx_for(**kw)
        ctx.generator.manual_seed(seed)
        model.zero_grad()
        loss, stats = REGIMES.get(regime)(model, x, y, ctx)
        return loss, float(stats.get("loss_value", loss))

    before = sum(step(s)[1] for s in range(3))
    for i in range(40):
        loss, _ = step(100 + i)
        loss.backward()
        opt.step()
    after = sum(step(s)[1] for s in range(3))
    assert after < before, (regime, before, after)
