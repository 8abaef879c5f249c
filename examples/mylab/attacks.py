"""Momentum iterative FGSM (MI-FGSM, Dong et al. 2018), registered as ``mifgsm``.

An attack is ``fn(model, x, y, threat, **params) -> AttackResult`` with images in [0, 1];
``threat`` projects onto the budget ball and gives the step direction (sign for Linf,
normalised for L2).  aerl-ray's ``run_attack`` checks inputs, puts the model in eval mode,
counts passes, re-projects the returned points and decides success itself, so an attack
only has to search.  Its keyword parameters are settable from a plan
(``attack_params: {mifgsm: {steps: 10}}``).
"""
import torch
import torch.nn.functional as F

from aerl_ray.attacks import AttackResult, register_attack


@register_attack("mifgsm", kind="white-box", per_example_rng=True)
def mifgsm(model, x, y, threat, *, steps: int = 10, decay: float = 1.0) -> AttackResult:
    alpha, g = threat.eps / steps, torch.zeros_like(x)
    x_adv = x.clone()
    for _ in range(steps):
        x_adv.requires_grad_(True)
        loss = F.cross_entropy(model(x_adv), y, reduction="sum")
        (grad,) = torch.autograd.grad(loss, x_adv)
        g = decay * g + grad / grad.abs().flatten(1).sum(1).clamp_min(1e-12).view(-1, 1, 1, 1)
        x_adv = threat.project(x_adv.detach() + alpha * threat.direction(g), x)
    with torch.no_grad():
        fooled = model(x_adv).argmax(1) != y
    return AttackResult(x_adv, fooled, torch.full((len(x),), float("nan")))
