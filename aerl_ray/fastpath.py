"""The accelerator fast path of the training loop: no host round trip in a training step.

What :func:`aerl_ray.train.train_loop` uses from here, each switched by a config field
(all searchable, all recorded in the checkpoints' ``config``):

- ``resident_data``: the train/validation tensors live on the training device when they
  fit (:func:`place_splits`); batches are gathered there with a device index and
  augmented there (:func:`aerl_ray.data.augment` draws from the device generator).
- per-step random draws (exploration, augmentation, random starts) come from a seeded
  generator *on the training device* (:func:`device_generator`); on a CPU run that is the
  trial's CPU generator itself, so CPU runs draw exactly what they drew before.  A CUDA
  run is reproducible for a given seed and device; ``last.pt`` saves its state.
- :class:`EpochSums`: the epoch's loss/accuracy/reward sums stay on the device and are
  read once per epoch (and every ``FINITE_CHECK_STEPS`` steps, to stop a diverged run).
- ``precision``: ``fp32`` or ``bf16`` autocast around a regime's loss (forward passes and
  the regime's inner attack); weights, optimiser state, evaluation, selection PGD and the
  attacks of :mod:`aerl_ray.evaluate` / AutoAttack stay fp32 (:func:`autocast`).
- ``channels_last``: model and batches in NHWC memory format (:func:`prepare_model`,
  :func:`memory_format`).
- ``compile``: ``torch.compile`` of the network behind the normalisation layer (the state
  dict keeps its keys; pass counting and its hooks stay eager).  A first forward+backward
  on a real batch is tried at start; if compilation fails there the run continues eager
  with a warning (:func:`prepare_model`).
- ``cudnn_benchmark``: ``torch.backends.cudnn.benchmark`` (:func:`configure_backends`).

With the defaults (fp32, no channels_last, no compile) a CPU run is bit-identical to the
loop before this module existed.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import logging

import torch
from torch import nn

logger = logging.getLogger(__name__)

FINITE_CHECK_STEPS = 100  # read the loss sum (one host sync) this often within an epoch
RESIDENT_FRACTION = 0.5  # data may take at most this fraction of the free device memory


def check_precision(precision: str, device: torch.device) -> None:
    """Refuse ``bf16`` on a CUDA device without bfloat16 support (a clear RuntimeError)."""
    if str(precision) != "bf16":
        return
    if device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise RuntimeError(f"precision=bf16 on {torch.cuda.get_device_name(device)}, which "
                           "does not support bfloat16 (needs compute capability >= 8.0); "
                           "use --precision fp32")
    if device.type not in ("cuda", "cpu"):
        raise RuntimeError(f"precision=bf16 is supported on cuda and cpu, not {device.type}")


def autocast(precision: str, device: torch.device):
    """The context a regime's loss runs in: bf16 autocast, or nothing for fp32."""
    if str(precision) == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def configure_backends(cudnn_benchmark: bool, deterministic: bool) -> None:
    """Set ``cudnn.benchmark`` for this process (every run sets it, so a default run
    after a benchmarking one is not affected)."""
    torch.backends.cudnn.benchmark = bool(cudnn_benchmark)
    if cudnn_benchmark and deterministic:
        logger.warning("cudnn_benchmark with deterministic=True: cuDNN may pick different "
                       "convolution algorithms from run to run, so CUDA runs are not "
                       "bit-reproducible; use --no-deterministic to say you accept that")


def device_generator(cpu_generator: torch.Generator, device: torch.device,
                     seed: int) -> torch.Generator:
    """The generator of per-step draws: ``cpu_generator`` itself on the CPU, else a new
    generator on ``device`` seeded with ``seed``."""
    if device.type == "cpu":
        return cpu_generator
    return torch.Generator(device=device).manual_seed(seed)


def data_bytes(*tensors: torch.Tensor) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def place_splits(splits, device: torch.device, resident: bool):
    """``splits`` with train and validation tensors on ``device`` when ``resident`` and
    they fit in ``RESIDENT_FRACTION`` of its free memory (test stays on the host: it is
    read once).  Returns a copy; the caller's splits are not changed."""
    if device.type == "cpu" or not resident:
        return splits
    tensors = (splits.x_train, splits.y_train, splits.x_val, splits.y_val)
    need = data_bytes(*tensors)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        if need > RESIDENT_FRACTION * free:
            logger.warning("train+validation data take %.2f GiB, more than %.0f%% of the "
                           "%.2f GiB free on %s: batches are copied from the host each step",
                           need / 2**30, 100 * RESIDENT_FRACTION, free / 2**30, device)
            return splits
    moved = dataclasses.replace(splits, **{
        k: getattr(splits, k).to(device) for k in ("x_train", "y_train", "x_val", "y_val")})
    logger.info("train+validation data resident on %s (%.1f MiB)", device, need / 2**20)
    return moved


def memory_format(x: torch.Tensor, channels_last: bool) -> torch.Tensor:
    return x.contiguous(memory_format=torch.channels_last) if channels_last and x.dim() == 4 \
        else x


def prepare_model(base: nn.Module, *, channels_last: bool, compile: bool,
                  precision: str, device: torch.device,
                  sample: tuple[torch.Tensor, torch.Tensor] | None = None) -> bool:
    """Apply channels_last and compile to ``base`` (a :class:`~aerl_ray.models.Classifier`)
    in place; returns whether the network runs compiled.

    ``compile`` compiles ``base.net`` (``nn.Module.compile``: parameter names unchanged)
    and tries one train-mode forward+backward on ``sample`` (random streams forked, model
    state and gradients put back), so that a backend that cannot compile here is found
    before training; then the network runs eager and a warning says why."""
    if channels_last:
        base.to(memory_format=torch.channels_last)
    if not compile:
        return False
    net = base.net
    net.compile()
    if sample is None:
        return True
    x, y = sample
    x = memory_format(x.to(device), channels_last)
    y = y.to(device)
    state = copy.deepcopy(base.state_dict())
    was = base.training
    devices = [device] if device.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=devices):
            base.train()
            with autocast(precision, device):
                loss = nn.functional.cross_entropy(base(x), y)
            loss.backward()
    except Exception as e:  # noqa: BLE001 - any backend failure: continue eager
        net._compiled_call_impl = None
        torch._dynamo.reset()
        logger.warning("compile=true: torch.compile failed on %s (%s: %s); training runs "
                       "eager", device, type(e).__name__, str(e).splitlines()[0][:300])
        return False
    finally:
        base.load_state_dict(state)
        base.train(was)
        for p in base.parameters():
            p.grad = None
    logger.info("compile=true: the network runs compiled (torch.compile, inductor)")
    return True


class EpochSums:
    """Per-epoch sums kept on the device; :meth:`read` syncs once.

    The loss and reward sums are float64 (``value * n`` added in double, as the host
    floats of the loop before did), the counts int64 (on the device) or ints."""

    def __init__(self, device: torch.device):
        z = lambda dt: torch.zeros((), dtype=dt, device=device)  # noqa: E731
        self.device = device
        self.loss, self.reward = z(torch.float64), z(torch.float64)
        self.correct, self.correct_adv = z(torch.int64), z(torch.int64)
        self.n = self.reward_n = self.clean_n = self.adv_n = 0

    def add(self, loss_value: torch.Tensor, stats: dict, y: torch.Tensor) -> None:
        n = len(y)
        self.loss += torch.as_tensor(loss_value, device=self.device).double() * n
        self.n += n
        if "logits" in stats:
            self.correct += (stats["logits"].argmax(1) == y).sum()
            self.clean_n += n
        if "logits_adv" in stats:
            self.correct_adv += (stats["logits_adv"].argmax(1) == y).sum()
            self.adv_n += n
        if "reward" in stats:
            self.reward += torch.as_tensor(stats["reward"], device=self.device).double() * n
            self.reward_n += n

    def loss_finite(self) -> bool:
        """Whether every loss so far was finite (one host sync)."""
        return bool(torch.isfinite(self.loss))

    def read(self) -> dict:
        loss, reward, correct, correct_adv = torch.stack(
            [self.loss, self.reward, self.correct.double(), self.correct_adv.double()]).tolist()
        return {"loss": loss, "n": self.n, "reward": reward, "reward_n": self.reward_n,
                "correct": int(correct), "clean_n": self.clean_n,
                "correct_adv": int(correct_adv), "adv_n": self.adv_n}
