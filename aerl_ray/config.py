"""Frozen, validated configuration for one training run.

A :class:`TrainConfig` nests a :class:`DataConfig`, a :class:`ModelConfig` and a
:class:`RegimeConfig` plus the optimiser settings.  Every field carries a ``help``
string: the CLI (``python -m aerl_ray.train``) and the sweep's search spaces are both
generated from these fields, so a flag, a YAML key and a config attribute are always the
same name.  Invalid values raise :class:`ConfigError` at construction, before any data
is loaded or any model is built.
"""
from __future__ import annotations

import dataclasses
import enum
import math
from dataclasses import dataclass, field
from typing import Any, Mapping


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the field and the fix."""


class ExploreMode(str, enum.Enum):
    """Where the epsilon-greedy coin is flipped."""

    PER_SAMPLE = "per_sample"  # textbook: each image explores with probability eps
    PER_BATCH = "per_batch"  # the paper's code: one coin for the whole batch


class Reward(str, enum.Enum):
    ZERO_ONE = "01"  # 1 if the sampled action is the label, else 0 (the paper)
    PLUS_MINUS = "pm1"  # +1 / -1 (the earlier RL-classification paper)


class AdvAttack(str, enum.Enum):
    """Inner maximisation used by the *_adv regimes."""

    FGSM = "fgsm"  # one signed step, no random start (the paper's SL-adv / RL-adv)
    FGSM_RS = "fgsm_rs"  # random start + 1.25 eps step (Wong, Rice & Kolter 2020)
    PGD = "pgd"  # PGD-AT (Madry et al. 2018)
    TRADES = "trades"  # KL-regularised (Zhang et al. 2019)


class Precision(str, enum.Enum):
    """Arithmetic of the training forward passes (see aerl_ray.fastpath)."""

    FP32 = "fp32"
    BF16 = "bf16"  # autocast; weights, optimiser, evaluation and attacks stay fp32


def _help(text: str, **kw: Any) -> Any:
    return field(metadata={"help": text}, **kw)


def _enum(enum_cls: type[enum.Enum], value: Any, name: str) -> Any:
    try:
        return enum_cls(value)
    except ValueError:
        valid = ", ".join(m.value for m in enum_cls)
        raise ConfigError(f"{name}={value!r} is not valid; choose one of: {valid}") from None


def _require(cond: bool, msg: str) -> None:
    if not cond:
        raise ConfigError(msg)


@dataclass(frozen=True)
class DataConfig:
    dataset: str = _help("dataset name (digits, cifar10, cifar100, imagenet100) or npz:PATH",
                         default="digits")
    cache_dir: str = _help("where downloaded/converted datasets are cached "
                           "(default $AERL_DATA_DIR or ~/.cache/aerl_ray)", default="")
    val_fraction: float = _help("stratified validation split taken from train (fraction; "
                                "see val_size)", default=0.1)
    val_size: int = _help("validation images taken from train (a count; 0 = use "
                          "val_fraction).  Validation picks checkpoints and drives the "
                          "search; test is only read to confirm", default=0)
    split_seed: int = _help("seed of the train/validation split (fixed across trials)",
                            default=0)
    augment: bool = _help("random h/v flips + 10%% translation on the training batches",
                          default=False)
    train_limit: int = _help("use at most this many training images (0 = all)", default=0)
    image_size: int = _help("resize target for imagenet100 (pixels)", default=32)
    hf_dataset_id: str = _help("Hugging Face dataset id used for imagenet100",
                               default="clane9/imagenet-100")

    def __post_init__(self) -> None:
        from aerl_ray.data import DATASETS  # noqa: PLC0415  (avoid an import cycle)

        if not self.dataset.startswith("npz:"):
            try:
                DATASETS.get(self.dataset)
            except KeyError as e:
                raise ConfigError(f"{e}; or use npz:PATH for your own file") from None
        _require(0.0 < self.val_fraction < 1.0,
                 f"val_fraction={self.val_fraction} must be in (0, 1)")
        _require(self.val_size >= 0, f"val_size={self.val_size} must be >= 0 (0 = use "
                                     "val_fraction)")
        _require(self.train_limit >= 0, f"train_limit={self.train_limit} must be >= 0")
        _require(self.image_size >= 8, f"image_size={self.image_size} must be >= 8")


@dataclass(frozen=True)
class ModelConfig:
    model: str = _help("architecture (see aerl_ray.models.MODELS)", default="cnn4")
    spectral_norm: bool = _help("wrap conv/linear layers in spectral normalisation "
                                "(Miyato et al. 2018)", default=False)

    def __post_init__(self) -> None:
        from aerl_ray.models import MODELS  # noqa: PLC0415

        try:
            MODELS.get(self.model)
        except KeyError as e:
            raise ConfigError(str(e)) from None


@dataclass(frozen=True)
class RegimeConfig:
    regime: str = _help("training regime (see aerl_ray.regimes.REGIMES)", default="sl")
    explore_eps: float = _help("RL epsilon-greedy exploration probability", default=0.1)
    explore_mode: ExploreMode = _help("per_sample (textbook) or per_batch (the paper)",
                                      default=ExploreMode.PER_SAMPLE)
    reward: Reward = _help("RL reward: 01 (0/1) or pm1 (+1/-1)", default=Reward.ZERO_ONE)
    baseline: bool = _help("subtract the batch-mean reward (variance reduction)",
                           default=False)
    switch_epoch: int = _help("hybrid: epochs of SL before switching to RL", default=0)
    adv_attack: AdvAttack = _help("inner attack of *_adv regimes: fgsm, fgsm_rs, pgd, trades",
                                  default=AdvAttack.FGSM)
    adv_eps: float = _help("Linf budget of the inner attack (pixels in [0,1])", default=0.01)
    adv_rate: float = _help("fgsm inner attack: weight of the adversarial term in "
                            "L(x) + adv_rate * L(x_adv) (the other attacks do not use it)",
                            default=1.0)
    trades_beta: float = _help("trades inner attack: weight beta of the KL term in "
                               "CE(x) + beta * KL(p(x) || p(x')) (Zhang et al. 2019: 6)",
                               default=6.0)
    adv_steps: int = _help("steps of the pgd/trades inner attack", default=10)
    adv_step_size: float = _help("pgd/trades step size as a fraction of adv_eps",
                                 default=0.25)
    start_adv_epoch: int = _help("first epoch (0-based) with adversarial training; -1 = the "
                                 "regime's default (*_adv: 0, hybrid: never)", default=-1)
    reg_lambda: float = _help("weight of the gradient regulariser (igr, jacobian)",
                              default=0.1)

    def __post_init__(self) -> None:
        from aerl_ray.regimes import REGIMES  # noqa: PLC0415

        try:
            REGIMES.get(self.regime)
        except KeyError as e:
            raise ConfigError(str(e)) from None
        object.__setattr__(self, "explore_mode",
                           _enum(ExploreMode, self.explore_mode, "explore_mode"))
        object.__setattr__(self, "reward", _enum(Reward, self.reward, "reward"))
        object.__setattr__(self, "adv_attack", _enum(AdvAttack, self.adv_attack, "adv_attack"))
        _require(0.0 <= self.explore_eps <= 1.0,
                 f"explore_eps={self.explore_eps} must be in [0, 1]")
        _require(self.switch_epoch >= 0, f"switch_epoch={self.switch_epoch} must be >= 0")
        _require(0.0 <= self.adv_eps <= 1.0, f"adv_eps={self.adv_eps} must be in [0, 1]")
        _require(self.adv_rate >= 0.0, f"adv_rate={self.adv_rate} must be >= 0")
        _require(self.trades_beta >= 0.0, f"trades_beta={self.trades_beta} must be >= 0")
        _require(self.adv_rate == 1.0 or self.adv_attack is AdvAttack.FGSM,
                 f"adv_rate={self.adv_rate} with adv_attack={self.adv_attack.value}: adv_rate "
                 "weights only the fgsm attack's adversarial term; leave it at 1.0"
                 + ("; TRADES' beta is trades_beta (default 6)"
                    if self.adv_attack is AdvAttack.TRADES else
                    f" ({self.adv_attack.value} trains on the adversarial loss alone)"))
        _require(self.trades_beta == 6.0 or self.adv_attack is AdvAttack.TRADES,
                 f"trades_beta={self.trades_beta} with adv_attack={self.adv_attack.value}: "
                 "trades_beta is TRADES' beta; use adv_attack=trades (or adv_rate for fgsm)")
        _require(self.adv_steps >= 1, f"adv_steps={self.adv_steps} must be >= 1")
        _require(0.0 < self.adv_step_size <= 2.0,
                 f"adv_step_size={self.adv_step_size} must be in (0, 2] (fraction of adv_eps)")
        _require(self.start_adv_epoch >= -1,
                 f"start_adv_epoch={self.start_adv_epoch} must be >= 0 (or -1 = default)")
        _require(self.reg_lambda >= 0.0, f"reg_lambda={self.reg_lambda} must be >= 0")


@dataclass(frozen=True)
class TrainConfig:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    regime: RegimeConfig = field(default_factory=RegimeConfig)
    epochs: int = _help("training epochs (the compute budget; an upper bound with "
                        "pass_budget)", default=10)
    pass_budget: int = _help("stop after this many forward+backward example-passes of "
                             "training (0 = off): compares regimes at equal compute", default=0)
    batch_size: int = _help("per-worker batch size", default=64)
    lr: float = _help("AdamW learning rate", default=1e-3)
    weight_decay: float = _help("AdamW weight decay", default=0.01)
    warmup_epochs: int = _help("linear learning-rate warm-up epochs (0 = none)", default=0)
    final_lr_ratio: float = _help("lr decays linearly to lr*final_lr_ratio at the last epoch "
                                  "(1.0 = constant lr)", default=1.0)
    grad_clip: float = _help("gradient-norm clipping (0 = off)", default=0.0)
    seed: int = _help("seed of the trial (weights, batches, exploration)", default=0)
    device: str = _help("auto, cpu or cuda[:N]", default="auto")
    eval_batch_size: int = _help("batch size for validation/test passes", default=512)
    deterministic: bool = _help("use deterministic torch algorithms", default=True)
    select: str = _help("which epoch to keep: auto (robust for adversarial/hybrid regimes "
                        "when a budget is known, else clean), last, clean (best clean val "
                        "acc) or robust (best val acc under a cheap PGD); only epochs of "
                        "the final regime count",
                        default="auto")
    select_norm: str = _help("norm of the robust selection PGD (linf or l2)", default="linf")
    select_eps: float = _help("budget of the robust selection PGD (0 = the adversarial "
                              "regime's adv_eps)", default=0.0)
    select_steps: int = _help("steps of the robust selection PGD", default=10)
    select_n: int = _help("robust selection on a fixed seeded subset of N validation images (0 = all)",
                          default=256)

    precision: Precision = _help("training arithmetic: fp32, or bf16 autocast of the "
                                 "regime's forward passes (weights, optimiser, evaluation "
                                 "and attacks stay fp32)", default=Precision.FP32)
    channels_last: bool = _help("model and batches in channels_last (NHWC) memory format",
                                default=False)
    compile: bool = _help("torch.compile the network (falls back to eager with a warning "
                          "where it cannot compile)", default=False)
    cudnn_benchmark: bool = _help("let cuDNN benchmark convolution algorithms "
                                  "(torch.backends.cudnn.benchmark)", default=False)
    resident_data: bool = _help("keep train/validation data on the accelerator when they "
                                "fit in half its free memory; batches and augmentation are "
                                "then made there (no effect on the CPU)", default=True)

    def __post_init__(self) -> None:
        object.__setattr__(self, "precision", _enum(Precision, self.precision, "precision"))
        _require(self.epochs >= 1, f"epochs={self.epochs} must be >= 1")
        _require(self.batch_size >= 1, f"batch_size={self.batch_size} must be >= 1")
        _require(self.pass_budget >= 0, f"pass_budget={self.pass_budget} must be >= 0 (0 = off)")
        _require(math.isfinite(self.lr) and self.lr > 0, f"lr={self.lr} must be > 0")
        _require(self.weight_decay >= 0, f"weight_decay={self.weight_decay} must be >= 0")
        _require(0 <= self.warmup_epochs < self.epochs or self.warmup_epochs == 0,
                 f"warmup_epochs={self.warmup_epochs} must be < epochs={self.epochs}")
        _require(0.0 <= self.final_lr_ratio <= 1.0,
                 f"final_lr_ratio={self.final_lr_ratio} must be in [0, 1]")
        _require(self.grad_clip >= 0, f"grad_clip={self.grad_clip} must be >= 0 (0 = off)")
        _require(self.eval_batch_size >= 1, "eval_batch_size must be >= 1")
        _require(self.device == "auto" or self.device == "cpu" or self.device.startswith("cuda"),
                 f"device={self.device!r} must be auto, cpu or cuda[:N]")
        _require(self.select in ("auto", "last", "clean", "robust"),
                 f"select={self.select!r} must be auto, last, clean or robust")
        _require(self.select_norm.lower() in ("linf", "l2"),
                 f"select_norm={self.select_norm!r} must be linf or l2")
        _require(self.select_eps >= 0, f"select_eps={self.select_eps} must be >= 0")
        _require(self.select_steps >= 1, f"select_steps={self.select_steps} must be >= 1")
        _require(self.select_n >= 0, f"select_n={self.select_n} must be >= 0 (0 = all)")
        r = self.regime
        adversarial = r.regime.endswith("_adv") or (r.regime == "hybrid"
                                                    and r.start_adv_epoch >= 0)
        _require(not (self.select == "robust" and self.select_eps == 0 and not adversarial),
                 f"select=robust needs a PGD budget: set select_eps (e.g. 0.1 or 8/255 as a "
                 f"number) for regime {r.regime!r}, which has no training budget to use")
        if r.regime == "hybrid":
            _require(1 <= r.switch_epoch < self.epochs,
                     f"switch_epoch={r.switch_epoch} must be in [1, epochs={self.epochs}) "
                     "for the hybrid regime (SL for switch_epoch epochs, then RL)")
        if r.regime.endswith("_adv") or r.regime == "hybrid":
            _require(r.start_adv_epoch <= self.epochs,
                     f"start_adv_epoch={r.start_adv_epoch} must be <= epochs={self.epochs}")

    # -- flat view ---------------------------------------------------------------
    # The CLI, the search spaces and the checkpoints use a flat {name: value} view; the
    # names are unique across the nested configs.
    def to_flat(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if dataclasses.is_dataclass(v):
                for sf in dataclasses.fields(v):
                    sv = getattr(v, sf.name)
                    out[sf.name] = sv.value if isinstance(sv, enum.Enum) else sv
            else:
                out[f.name] = v.value if isinstance(v, enum.Enum) else v
        return out

    @classmethod
    def from_flat(cls, values: Mapping[str, Any]) -> "TrainConfig":
        """Build from a flat mapping; unknown keys raise ConfigError listing the known."""
        groups = {name: {} for name in _SUBCONFIGS}
        top: dict[str, Any] = {}
        for k, v in values.items():
            owner = _FLAT_OWNER.get(k)
            if owner is None:
                raise ConfigError(f"unknown config key {k!r}; known keys: "
                                  f"{', '.join(sorted(_FLAT_OWNER))}")
            (top if owner == "" else groups[owner])[k] = v
        subs = {name: sub_cls(**groups[name]) for name, sub_cls in _SUBCONFIGS.items()}
        return cls(**subs, **top)

    def replace(self, **flat: Any) -> "TrainConfig":
        return TrainConfig.from_flat({**self.to_flat(), **flat})


_SUBCONFIGS: dict[str, type] = {"data": DataConfig, "model": ModelConfig,
                                "regime": RegimeConfig}


def flat_fields() -> dict[str, dataclasses.Field]:
    """All leaf fields of TrainConfig by flat name (for the CLI and search spaces)."""
    out: dict[str, dataclasses.Field] = {}
    for f in dataclasses.fields(TrainConfig):
        if f.name in _SUBCONFIGS:
            for sf in dataclasses.fields(_SUBCONFIGS[f.name]):
                out[sf.name] = sf
        else:
            out[f.name] = f
    return out


_FLAT_OWNER: dict[str, str] = {
    **{sf.name: name for name, c in _SUBCONFIGS.items() for sf in dataclasses.fields(c)},
    **{f.name: "" for f in dataclasses.fields(TrainConfig) if f.name not in _SUBCONFIGS},
}
