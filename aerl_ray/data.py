"""Datasets: one registry, one code path.

Every dataset ends up as the seed code's ``.npz`` format (``X_train, y_train, X_test,
y_test``; uint8 HWC images, int labels).  Loaders for downloadable datasets fetch once,
under a file lock (several Ray workers may ask at once), convert to ``.npz`` in the cache
dir and reuse it from then on.  :func:`load_splits` then gives float tensors in [0, 1]
(NCHW) with a stratified, seeded train/validation split.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np
import torch
import torch.nn.functional as F
from filelock import FileLock

from aerl_ray.registry import Registry

logger = logging.getLogger(__name__)


class DatasetUnavailableError(RuntimeError):
    """The data is not on disk and could not be downloaded; says what to put where."""


@dataclass(frozen=True)
class DatasetInfo:
    """Facts about a dataset; the model's normalisation layer uses mean/std."""

    name: str
    num_classes: int
    in_channels: int
    image_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]


# One table of per-dataset facts.  CIFAR statistics are the true per-channel std (the
# paper's code used the common 0.2023/0.1994/0.2010 values).
DATASET_FACTS: dict[str, dict] = {
    "digits": dict(num_classes=10, in_channels=1, image_size=8, mean=(0.3063,), std=(0.3831,)),
    "cifar10": dict(num_classes=10, in_channels=3, image_size=32,
                    mean=(0.4914, 0.4822, 0.4465), std=(0.2470, 0.2435, 0.2616)),
    "cifar100": dict(num_classes=100, in_channels=3, image_size=32,
                     mean=(0.5071, 0.4867, 0.4408), std=(0.2675, 0.2565, 0.2761)),
    "imagenet100": dict(num_classes=100, in_channels=3, image_size=32,
                        mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225)),
}

# name -> function(cache_dir, data_cfg) -> path of the converted .npz
DATASETS: Registry[Callable[[Path, "object"], Path]] = Registry("dataset")


def default_cache_dir() -> Path:
    return Path(os.environ.get("AERL_DATA_DIR") or Path.home() / ".cache" / "aerl_ray")


def _save_npz_atomic(path: Path, **arrays: np.ndarray) -> None:
    tmp = path.with_suffix(".tmp.npz")
    np.savez_compressed(tmp, **arrays)
    os.replace(tmp, path)


@DATASETS.register("digits")
def _digits(cache: Path, cfg) -> Path:
    """scikit-learn's bundled 8x8 digits (1797 images): works offline."""
    path = cache / "digits.npz"
    if path.exists():
        return path
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    x = np.round(d.images * (255.0 / 16.0)).astype(np.uint8)[..., None]  # HWC, 1 channel
    x_tr, x_te, y_tr, y_te = train_test_split(x, d.target, test_size=0.2, random_state=0,
                                              stratify=d.target)
    _save_npz_atomic(path, X_train=x_tr, y_train=y_tr.astype(np.int64), X_test=x_te,
                     y_test=y_te.astype(np.int64))
    return path


def _probe(url: str, timeout: float = 5.0) -> None:
    """Raise OSError quickly when ``url``'s host cannot be reached."""
    import socket
    from urllib.parse import urlparse

    u = urlparse(url)
    with socket.create_connection((u.hostname, u.port or 443), timeout=timeout):
        pass


def _torchvision_cifar(name: str, cls_name: str, url_hint: str):
    def loader(cache: Path, cfg) -> Path:
        path = cache / f"{name}.npz"
        if path.exists():
            return path
        import torchvision

        raw = cache / "raw"
        cls = getattr(torchvision.datasets, cls_name)
        try:  # already extracted into raw/ (downloaded before, or placed by hand)?
            tr, te = cls(root=str(raw), train=True), cls(root=str(raw), train=False)
        except Exception:  # noqa: BLE001 - not there: download below
            tr = te = None
        try:
            if tr is None:
                _probe(url_hint)  # offline: fail in seconds, not after urllib's retries
                tr = cls(root=str(raw), train=True, download=True)
                te = cls(root=str(raw), train=False, download=True)
        except Exception as e:  # network errors surface as URLError/OSError/RuntimeError
            raise DatasetUnavailableError(
                f"could not download {name} ({type(e).__name__}: {e}). Download {url_hint} "
                f"and extract it into {raw}/ (torchvision layout), or convert it yourself to "
                f"{path} (X_train, y_train, X_test, y_test; uint8 HWC) and run again; "
                f"any such file also works as --dataset npz:FILE") from e
        _save_npz_atomic(path, X_train=np.asarray(tr.data, np.uint8),
                         y_train=np.asarray(tr.targets, np.int64),
                         X_test=np.asarray(te.data, np.uint8),
                         y_test=np.asarray(te.targets, np.int64))
        return path

    return loader


DATASETS.register("cifar10")(_torchvision_cifar(
    "cifar10", "CIFAR10", "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"))
DATASETS.register("cifar100")(_torchvision_cifar(
    "cifar100", "CIFAR100", "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz"))


@DATASETS.register("imagenet100")
def _imagenet100(cache: Path, cfg) -> Path:
    """ImageNet-100 from Hugging Face ``datasets``, resized once to image_size."""
    size = cfg.image_size
    path = cache / f"imagenet100_{size}.npz"
    if path.exists():
        return path
    try:
        import datasets as hf

        ds = hf.load_dataset(cfg.hf_dataset_id)
    except Exception as e:
        raise DatasetUnavailableError(
            f"could not load Hugging Face dataset {cfg.hf_dataset_id!r} ({type(e).__name__}: "
            f"{e}). Run once on a machine with internet (or set HF_DATASETS_CACHE to a copy), "
            f"or provide {path} yourself (X_train, y_train, X_test, y_test; uint8 HWC "
            f"{size}x{size}x3)") from e
    from PIL import Image

    def convert(split):
        xs = [np.asarray(im.convert("RGB").resize((size, size), Image.BILINEAR), np.uint8)
              for im in split["image"]]
        return np.stack(xs), np.asarray(split["label"], np.int64)

    test_split = "validation" if "validation" in ds else "test"
    x_tr, y_tr = convert(ds["train"])
    x_te, y_te = convert(ds[test_split])
    _save_npz_atomic(path, X_train=x_tr, y_train=y_tr, X_test=x_te, y_test=y_te)
    return path


def _read_npz(path: Path) -> dict[str, np.ndarray]:
    if not path.exists():
        raise DatasetUnavailableError(
            f"dataset file {path} does not exist; give an .npz with X_train, y_train, X_test, "
            "y_test (uint8 HWC images, integer labels)")
    with np.load(path, allow_pickle=False) as z:
        missing = {"X_train", "y_train", "X_test", "y_test"} - set(z.files)
        if missing:
            raise DatasetUnavailableError(f"{path} lacks arrays {sorted(missing)}; it needs "
                                          "X_train, y_train, X_test, y_test")
        arrays = {k: z[k] for k in ("X_train", "y_train", "X_test", "y_test")}
    for k in ("X_train", "X_test"):
        x = arrays[k]
        if x.ndim == 3:  # grayscale HW -> HWC
            arrays[k] = x = x[..., None]
        if x.ndim != 4 or x.dtype != np.uint8:
            raise DatasetUnavailableError(f"{path}:{k} must be uint8 with shape (N, H, W, C); "
                                          f"got {x.dtype} {x.shape}")
    return arrays


def dataset_arrays(cfg) -> tuple[dict[str, np.ndarray], DatasetInfo]:
    """The raw uint8 arrays and the :class:`DatasetInfo` of ``cfg.dataset``."""
    if cfg.dataset.startswith("npz:"):
        path = Path(cfg.dataset[4:]).expanduser()
        arrays = _read_npz(path)
        x = arrays["X_train"].astype(np.float32) / 255.0
        info = DatasetInfo(name=cfg.dataset, num_classes=int(arrays["y_train"].max()) + 1,
                           in_channels=x.shape[3], image_size=x.shape[1],
                           mean=tuple(float(m) for m in x.mean(axis=(0, 1, 2))),
                           std=tuple(float(s) + 1e-6 for s in x.std(axis=(0, 1, 2))))
        return arrays, info
    cache = Path(cfg.cache_dir).expanduser() if cfg.cache_dir else default_cache_dir()
    cache.mkdir(parents=True, exist_ok=True)
    with FileLock(str(cache / f".{cfg.dataset}.lock")):
        path = DATASETS.get(cfg.dataset)(cache, cfg)
    arrays = _read_npz(path)
    facts = dict(DATASET_FACTS[cfg.dataset])
    facts["image_size"] = arrays["X_train"].shape[1]
    return arrays, DatasetInfo(name=cfg.dataset, **facts)


@dataclass
class Splits:
    """Float tensors in [0, 1], NCHW, on the CPU; labels int64.

    ``idx_val`` / ``idx_train`` index the dataset's train arrays and ``idx_test`` its test
    arrays: which images each split holds (tests assert that the search never reads a test
    index)."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_val: torch.Tensor
    y_val: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    info: DatasetInfo
    idx_train: np.ndarray | None = None
    idx_val: np.ndarray | None = None
    idx_test: np.ndarray | None = None


def to_tensor(x: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(x).permute(0, 3, 1, 2).float().div_(255.0).contiguous()


SPLIT_KEYS = ("dataset", "cache_dir", "val_fraction", "val_size", "split_seed", "image_size",
              "hf_dataset_id")


def split_config(config: Mapping[str, Any]):
    """The DataConfig that reproduces a run's splits from its flat config (a checkpoint's
    ``config``): every setting the split depends on, and nothing else."""
    from aerl_ray.config import DataConfig

    return DataConfig(**{k: config[k] for k in SPLIT_KEYS if k in config})


def check_arrays(arrays: Mapping[str, np.ndarray], name: str) -> None:
    """Labels must be integers 0..K-1 with every class in the training data, and each
    array pair the same length; raises DatasetUnavailableError naming the problem."""
    for xs, ys in (("X_train", "y_train"), ("X_test", "y_test")):
        x, y = arrays[xs], arrays[ys]
        if y.ndim != 1 or len(y) != len(x):
            raise DatasetUnavailableError(f"{name}: {ys} must be a vector with one label per "
                                          f"image of {xs} ({len(x)}); got shape {y.shape}")
        if not np.issubdtype(y.dtype, np.integer):
            raise DatasetUnavailableError(f"{name}: {ys} must hold integer class labels, got "
                                          f"{y.dtype}")
        if len(y) and y.min() < 0:
            raise DatasetUnavailableError(f"{name}: {ys} has negative labels; use 0..K-1")
    if arrays["X_train"].shape[1:] != arrays["X_test"].shape[1:]:
        raise DatasetUnavailableError(f"{name}: train and test images differ in shape "
                                      f"({arrays['X_train'].shape[1:]} vs "
                                      f"{arrays['X_test'].shape[1:]})")
    k = int(arrays["y_train"].max()) + 1 if len(arrays["y_train"]) else 0
    present = np.unique(arrays["y_train"])
    if len(present) != k:
        missing = sorted(set(range(k)) - set(present.tolist()))
        raise DatasetUnavailableError(f"{name}: classes {missing[:10]} have no training image "
                                      f"(labels must be 0..{k - 1}, each present)")
    if len(arrays["y_test"]) and int(arrays["y_test"].max()) >= k:
        raise DatasetUnavailableError(f"{name}: y_test has labels >= {k}, the number of "
                                      "classes in y_train")


def split_indices(y: np.ndarray, cfg) -> tuple[np.ndarray, np.ndarray]:
    """The stratified, seeded (train, val) index split of the training labels: the one
    function that decides which images validate.  Raises DatasetUnavailableError (before
    any training) when the validation size leaves a class out of either part."""
    from sklearn.model_selection import train_test_split

    n, k = len(y), len(np.unique(y))
    size = int(cfg.val_size) if getattr(cfg, "val_size", 0) else float(cfg.val_fraction)
    n_val = size if isinstance(size, int) else int(np.ceil(size * n))
    what = f"val_size={size}" if isinstance(size, int) else f"val_fraction={size}"
    if n_val < k or n - n_val < k:
        raise DatasetUnavailableError(
            f"{cfg.dataset}: {what} gives {n_val} validation and {n - n_val} training images "
            f"for {k} classes, which leaves a class out of one split; use a validation size "
            f"between {k} and {n - k} images")
    counts = np.bincount(y)
    if counts[counts > 0].min() < 2:
        raise DatasetUnavailableError(f"{cfg.dataset}: a class has a single training image; "
                                      "it cannot appear in both train and validation")
    idx = np.arange(n)
    tr, va = train_test_split(idx, test_size=size, random_state=cfg.split_seed, stratify=y)
    return np.sort(tr), np.sort(va)


def load_splits(cfg) -> Splits:
    """Load a dataset and split off a stratified validation set with ``cfg.split_seed``."""
    arrays, info = dataset_arrays(cfg)
    check_arrays(arrays, cfg.dataset)
    y = arrays["y_train"].astype(np.int64)
    tr, va = split_indices(y, cfg)
    if cfg.train_limit and cfg.train_limit < len(tr):
        tr = tr[:cfg.train_limit]
    x = arrays["X_train"]
    logger.info("dataset %s: %d train, %d val, %d test, %d classes", info.name, len(tr),
                len(va), len(arrays["y_test"]), info.num_classes)
    return Splits(to_tensor(x[tr]), torch.from_numpy(y[tr]), to_tensor(x[va]),
                  torch.from_numpy(y[va]), to_tensor(arrays["X_test"]),
                  torch.from_numpy(arrays["y_test"].astype(np.int64)), info,
                  tr, va, np.arange(len(arrays["y_test"])))


def augment(x: torch.Tensor, generator: torch.Generator, translate: float = 0.1) -> torch.Tensor:
    """The paper's augmentation on a batch tensor (any device): random horizontal and
    vertical flips and up to ``translate`` x size random translation (zero fill).  The
    draws happen on ``generator``'s device (a generator on ``x``'s device: no host sync)."""
    n = x.shape[0]
    dev = x.device
    r = torch.rand(n, 4, generator=generator, device=generator.device).to(dev)
    x = torch.where((r[:, 0] < 0.5).view(n, 1, 1, 1), x.flip(-1), x)
    x = torch.where((r[:, 1] < 0.5).view(n, 1, 1, 1), x.flip(-2), x)
    if translate > 0:
        shift = (r[:, 2:] * 2 - 1) * translate * 2  # affine_grid units: 2 = full width
        theta = torch.zeros(n, 2, 3, device=dev, dtype=x.dtype)
        theta[:, 0, 0] = theta[:, 1, 1] = 1
        theta[:, :, 2] = shift.to(x.dtype)
        grid = F.affine_grid(theta, list(x.shape), align_corners=False)
        x = F.grid_sample(x, grid, mode="nearest", padding_mode="zeros", align_corners=False)
    return x
