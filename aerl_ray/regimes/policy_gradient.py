"""Policy-gradient classification (REINFORCE), the paper's RL regime.

The logits define a softmax policy; an action (a class) is sampled per image, the reward
is 1 if it equals the label (0/1; or +1/-1), and the loss is ``-mean(log p(a) * r)``.
With probability ``explore_eps`` an action is drawn uniformly instead: per sample (the
textbook epsilon-greedy) or once for the whole batch (``per_batch``, what the paper's
code does with Python's global ``random``; here a seeded generator).  Evaluation takes
the argmax.  In expectation the loss is ``(1-eps)(1-p_y) + (eps/K) CE`` (see
``regularised.sl_rl_loss``).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from aerl_ray.config import ExploreMode, Reward
from aerl_ray.regimes import REGIMES


def sample_actions(logits: torch.Tensor, explore_eps: float, mode: ExploreMode,
                   generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample one action per row; returns ``(actions, explored_mask)`` on logits' device.

    The draws happen on ``generator``'s device: with a generator on the logits' device
    (the training loop's ``ctx.rng``) nothing leaves the device; with a CPU generator the
    probabilities are copied to the host (reproducible across devices, one sync)."""
    n, k = logits.shape
    dev = generator.device
    probs = torch.softmax(logits.detach().float(), dim=1).to(dev)
    policy = torch.multinomial(probs, 1, generator=generator).squeeze(1)
    uniform = torch.randint(0, k, (n,), generator=generator, device=dev)
    if ExploreMode(mode) is ExploreMode.PER_BATCH:
        explored = (torch.rand(1, generator=generator, device=dev) < explore_eps).expand(n)
    else:
        explored = torch.rand(n, generator=generator, device=dev) < explore_eps
    actions = torch.where(explored, uniform, policy)
    return actions.to(logits.device), explored.to(logits.device)


def rewards(actions: torch.Tensor, y: torch.Tensor, reward: Reward) -> torch.Tensor:
    hit = (actions == y).float()
    return hit if Reward(reward) is Reward.ZERO_ONE else 2 * hit - 1


def pg_loss(logits: torch.Tensor, actions: torch.Tensor, r: torch.Tensor,
            baseline: bool = False) -> torch.Tensor:
    """``-mean(log p(a) * (r - b))`` with ``b`` the batch-mean reward if ``baseline``."""
    adv = r - r.mean() if baseline else r
    logp = F.log_softmax(logits, dim=1).gather(1, actions[:, None]).squeeze(1)
    return -(logp * adv.detach()).mean()


def rl_base_loss(logits: torch.Tensor, y: torch.Tensor, ctx) -> tuple[torch.Tensor, dict]:
    """Sample actions from ``logits`` and return the PG loss and the mean reward (a 0-dim
    tensor on the device: reading it is the loop's business, once per epoch)."""
    c = ctx.cfg
    actions, explored = sample_actions(logits, c.explore_eps, c.explore_mode, ctx.rng)
    r = rewards(actions, y, c.reward)
    return pg_loss(logits, actions, r, c.baseline), {"reward": r.mean().detach(),
                                                     "explored": explored.float().mean()}


@REGIMES.register("rl")
def rl(model, x, y, ctx):
    logits = model(x)
    loss, stats = rl_base_loss(logits, y, ctx)
    return loss, {"logits": logits.detach(), **stats}
