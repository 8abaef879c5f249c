"""The GPU fast path, measured side by side in one run on CIFAR-shaped random data.

Needs nothing but torch and this package (no Ray, no Optuna; ``pyautoattack`` only for
the AutoAttack row, skipped with a message without it).  Prints one table:

1. training img/s of cnn4, cnn6 and resnet18, SL with augmentation, for
   ``eager`` -- today's path before the fast path: data on the host copied per batch,
   augmentation and sampling draws from the CPU generator, the loss and accuracy read
   every step, fp32 -- and ``tuned`` -- data resident on the device, draws from the device
   generator, sums read once (:class:`aerl_ray.fastpath.EpochSums`), bf16 autocast,
   channels_last, ``torch.compile``, cudnn benchmark -- and their ratio.  Target on one
   H200: >= 3x for cnn6.
2. RL step / SL step (cnn6, tuned).  Target <= 1.1.
3. PGD-50 img/s, ours (``aerl_ray.attacks.pgd_core``, no early stop, so both do the same
   work) / a torchattacks-style plain loop on resnet18 (fp32, eval mode).  Target >= 1.0.
4. seconds of AutoAttack ``standard`` on 1,000 images of resnet18 (Linf 8/255).

The models are untrained; labels are random for training and the model's own predictions
for the attacks (so every image starts correctly classified).  ``--smoke`` runs every row
at tiny sizes (the test suite runs it on the CPU so the script cannot rot); on the CPU
``tuned`` leaves compile out unless ``--compile`` is given (inductor's first CPU compile
takes a minute or more).

    python bench/gpu.py                       # on a GPU machine: the full table (< 8 min)
    python bench/gpu.py --smoke --device cpu  # seconds
"""
from __future__ import annotations

import argparse
import contextlib
import sys
import time

import torch
import torch.nn.functional as F

from aerl_ray import fastpath
from aerl_ray.attacks.pgd import pgd_core
from aerl_ray.attacks.threat import Threat
from aerl_ray.config import RegimeConfig
from aerl_ray.data import DatasetInfo, augment
from aerl_ray.models import build_model
from aerl_ray.regimes import REGIMES, RegimeContext
from aerl_ray.train import train_step

CIFAR = DatasetInfo("random-cifar", 10, 3, 32, (0.49, 0.48, 0.45), (0.25, 0.24, 0.26))


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Trainer:
    """One model + optimiser + data, stepped by today's path or the tuned one."""

    def __init__(self, model_name: str, regime: str, tuned: bool, device: torch.device,
                 n: int, batch: int, compile_: bool, seed: int = 0):
        torch.manual_seed(seed)
        self.device, self.batch, self.tuned = device, batch, tuned
        self.precision = "bf16" if tuned else "fp32"
        self.channels_last = tuned
        g = torch.Generator().manual_seed(seed)
        x = torch.rand(n, 3, 32, 32, generator=g)
        y = torch.randint(0, 10, (n,), generator=g)
        self.x, self.y = (x.to(device), y.to(device)) if tuned else (x, y)
        self.model = build_model(model_name, CIFAR).to(device)
        if tuned:
            fastpath.configure_backends(device.type == "cuda", False)
        self.compiled = fastpath.prepare_model(
            self.model, channels_last=tuned, compile=tuned and compile_,
            precision=self.precision, device=device,
            sample=(self.x[:batch], self.y[:batch]))
        self.model.train()
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=1e-3)
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, lambda s: 1.0)
        self.gen = torch.Generator().manual_seed(seed + 1)
        dgen = fastpath.device_generator(self.gen, device, seed + 2) if tuned else self.gen
        self.ctx = RegimeContext(cfg=RegimeConfig(regime=regime), num_classes=10,
                                 generator=self.gen, device_generator=dgen)
        self.loss_fn = REGIMES.get(regime)
        self.perm = torch.randperm(n, generator=g).to(self.x.device)
        self.i = 0
        self.sums = fastpath.EpochSums(device)

    def step(self) -> None:
        idx = self.perm[self.i:self.i + self.batch]
        self.i = (self.i + self.batch) % (len(self.perm) - self.batch + 1)
        x, y = self.x[idx].to(self.device), self.y[idx].to(self.device)
        x = augment(x, self.ctx.rng)
        x = fastpath.memory_format(x, self.channels_last)
        value, stats = train_step(self.model, self.loss_fn, x, y, self.ctx, self.opt,
                                  self.sched, 0.0, self.precision)
        if self.tuned:
            self.sums.add(value, stats, y)
        else:  # the loop before the fast path read these on the host every step
            float(value), int((stats["logits"].argmax(1) == y).sum())
            if "reward" in stats:
                float(stats["reward"])

    def img_per_s(self, steps: int, warmup: int) -> float:
        for _ in range(warmup):
            self.step()
        sync(self.device)
        t = time.perf_counter()
        for _ in range(steps):
            self.step()
        self.sums.read()  # the once-per-epoch read belongs to the tuned path's cost
        sync(self.device)
        return steps * self.batch / (time.perf_counter() - t)


def plain_pgd(model, x, y, eps: float, alpha: float, steps: int) -> torch.Tensor:
    """torchattacks.PGD's loop (mean CE, random start, sign step, clamp)."""
    adv = (x + torch.empty_like(x).uniform_(-eps, eps)).clamp(0, 1).detach()
    for _ in range(steps):
        adv.requires_grad_(True)
        loss = F.cross_entropy(model(adv), y)
        (grad,) = torch.autograd.grad(loss, adv)
        adv = adv.detach() + alpha * grad.sign()
        adv = (x + (adv - x).clamp(-eps, eps)).clamp(0, 1).detach()
    return adv


def timed(fn, device: torch.device) -> float:
    sync(device)
    t = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t


def attack_rows(device: torch.device, model_name: str, n_pgd: int, n_aa: int,
                pgd_steps: int, aa: dict) -> list[tuple[str, str]]:
    torch.manual_seed(0)
    model = build_model(model_name, CIFAR).to(device).eval()
    x = torch.rand(max(n_pgd, n_aa), 3, 32, 32, device=device)
    with torch.no_grad():
        y = torch.cat([model(c).argmax(1) for c in x.split(500)])
    threat, eps = Threat("linf", 8 / 255), 8 / 255
    xp, yp = x[:n_pgd], y[:n_pgd]
    alpha = 2.5 / pgd_steps * eps
    ours = lambda: pgd_core(model, xp, yp, threat, steps=pgd_steps, early_stop=False,  # noqa: E731
                            batch_size=n_pgd)
    plain = lambda: plain_pgd(model, xp, yp, eps, alpha, pgd_steps)  # noqa: E731
    ours(), plain()  # warm-up (cudnn, allocator)
    t_ours = min(timed(ours, device) for _ in range(2))
    t_plain = min(timed(plain, device) for _ in range(2))
    rows = [(f"PGD-{pgd_steps} img/s, {model_name} fp32 (ours / plain loop)",
             f"{n_pgd / t_ours:9.0f} / {n_pgd / t_plain:9.0f} = {t_plain / t_ours:.2f}x"
             "  (target >= 1.0)")]
    try:
        from aerl_ray.attacks.autoattack import backend

        backend()
    except ImportError as e:
        return rows + [(f"AutoAttack standard, {n_aa} images", f"skipped: {e}")]
    from aerl_ray.attacks import run_attack

    t = time.perf_counter()
    res = run_attack("autoattack", model, x[:n_aa], y[:n_aa], threat, **aa)
    sync(device)
    rows.append((f"AutoAttack {aa['version']}, {n_aa} images of {model_name}",
                 f"{time.perf_counter() - t:9.1f} s  (robust acc {1 - res.success.float().mean():.3f}"
                 " of an untrained model)"))
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="auto", help="auto, cpu or cuda[:N]")
    p.add_argument("--smoke", action="store_true", help="tiny sizes (CPU test)")
    p.add_argument("--compile", action="store_true",
                   help="compile in the tuned rows on the CPU too (always on CUDA)")
    p.add_argument("--batch", type=int, default=None)
    p.add_argument("--steps", type=int, default=None)
    a = p.parse_args(argv)
    device = torch.device("cuda" if a.device == "auto" and torch.cuda.is_available()
                          else ("cpu" if a.device == "auto" else a.device))
    if a.smoke:
        models, n, batch, steps, warmup = ["tiny", "cnn4"], 64, a.batch or 16, a.steps or 3, 2
        pgd_model, n_pgd, n_aa, pgd_steps = "tiny", 16, 4, 5
        aa = {"version": "custom", "attacks": ("apgd-ce",), "n_iter": 5}  # the code path only
    else:
        models, n, batch, steps, warmup = (["cnn4", "cnn6", "resnet18"], 8192, a.batch or 256,
                                           a.steps or 30, 8)
        pgd_model, n_pgd, n_aa, pgd_steps = "resnet18", 1000, 1000, 50
        aa = {"version": "standard"}
    compile_ = device.type == "cuda" or a.compile
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"# bench/gpu.py on {name}, torch {torch.__version__}; batch {batch}, "
          f"{steps} timed steps; tuned = resident data + device RNG + bf16 + channels_last"
          f"{' + compile' if compile_ else ' (no compile)'}"
          f"{' + cudnn benchmark' if device.type == 'cuda' else ''}", flush=True)
    rows: list[tuple[str, str]] = []
    for m in models:
        eager = Trainer(m, "sl", False, device, n, batch, compile_).img_per_s(steps, warmup)
        tuned_t = Trainer(m, "sl", True, device, n, batch, compile_)
        tuned = tuned_t.img_per_s(steps, warmup)
        rows.append((f"train SL img/s, {m} (eager fp32 / tuned)",
                     f"{eager:9.0f} / {tuned:9.0f} = {tuned / eager:.2f}x"
                     f"{'  (target >= 3 on an H200)' if m == 'cnn6' else ''}"
                     f"{'' if tuned_t.compiled or not compile_ else '  [compile fell back]'}"))
        print(f"{rows[-1][0]:<52} {rows[-1][1]}", flush=True)
    rl_model = "cnn6" if "cnn6" in models else models[-1]
    sl = Trainer(rl_model, "sl", True, device, n, batch, compile_).img_per_s(steps, warmup)
    rl = Trainer(rl_model, "rl", True, device, n, batch, compile_).img_per_s(steps, warmup)
    rows.append((f"RL step / SL step, {rl_model} tuned", f"{sl / rl:.2f}x  (target <= 1.1)"))
    print(f"{rows[-1][0]:<52} {rows[-1][1]}", flush=True)
    for r in attack_rows(device, pgd_model, n_pgd, n_aa, pgd_steps, aa):
        rows.append(r)
        print(f"{r[0]:<52} {r[1]}", flush=True)
    heavy = sorted(m for m in ("ray", "optuna") if sys.modules.get(m) is not None)
    print(f"imports: {'torch + aerl_ray only' if not heavy else 'ALSO ' + ', '.join(heavy)}")
    return 0


if __name__ == "__main__":
    with contextlib.suppress(BrokenPipeError):
        raise SystemExit(main())
