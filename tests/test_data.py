import numpy as np
import pytest
import torch

from aerl_ray.config import DataConfig
from aerl_ray.data import DatasetUnavailableError, augment, dataset_arrays, load_splits


def test_digits_splits_are_stratified_unit_range(digits_splits):
    s = digits_splits
    assert s.x_train.shape[1:] == (1, 8, 8) and s.x_train.dtype == torch.float32
    assert 0.0 <= float(s.x_train.min()) and float(s.x_train.max()) <= 1.0
    n_trval = len(s.y_train) + len(s.y_val)
    assert abs(len(s.y_val) - 0.1 * n_trval) <= 1
    # stratified: every class has roughly its share in validation
    tr = torch.bincount(s.y_train, minlength=10).float() / len(s.y_train)
    va = torch.bincount(s.y_val, minlength=10).float() / len(s.y_val)
    assert float((tr - va).abs().max()) < 0.02
    assert s.info.num_classes == 10 and s.info.in_channels == 1


def test_split_is_seeded(tmp_path):
    a = load_splits(DataConfig(dataset="digits", split_seed=0))
    b = load_splits(DataConfig(dataset="digits", split_seed=0))
    c = load_splits(DataConfig(dataset="digits", split_seed=1))
    assert torch.equal(a.y_val, b.y_val) and not torch.equal(a.y_val, c.y_val)


def _write_npz(path, n=40, size=12, channels=3, classes=4):
    rng = np.random.default_rng(0)
    np.savez(path, X_train=rng.integers(0, 256, (n, size, size, channels), dtype=np.uint8),
             y_train=np.arange(n) % classes,
             X_test=rng.integers(0, 256, (10, size, size, channels), dtype=np.uint8),
             y_test=np.arange(10) % classes)


def test_user_npz(tmp_path):
    p = tmp_path / "mine.npz"
    _write_npz(p)
    s = load_splits(DataConfig(dataset=f"npz:{p}"))
    assert s.x_train.shape[1:] == (3, 12, 12) and s.info.num_classes == 4
    assert len(s.info.mean) == 3 and all(0 < v < 1 for v in s.info.std)


def test_bad_npz_errors(tmp_path):
    with pytest.raises(DatasetUnavailableError, match="does not exist"):
        dataset_arrays(DataConfig(dataset=f"npz:{tmp_path / 'missing.npz'}"))
    p = tmp_path / "bad.npz"
    np.savez(p, X_train=np.zeros((2, 4, 4, 1), np.uint8))
    with pytest.raises(DatasetUnavailableError, match="lacks arrays"):
        dataset_arrays(DataConfig(dataset=f"npz:{p}"))
    p2 = tmp_path / "float.npz"
    np.savez(p2, X_train=np.zeros((2, 4, 4, 1), np.float32), y_train=np.zeros(2),
             X_test=np.zeros((2, 4, 4, 1), np.float32), y_test=np.zeros(2))
    with pytest.raises(DatasetUnavailableError, match="must be uint8"):
        dataset_arrays(DataConfig(dataset=f"npz:{p2}"))


def test_offline_download_gives_clear_error(tmp_path, monkeypatch):
    """Downloads fail here (no internet); the error says what to download and where."""
    import torchvision

    def offline(*a, **k):
        raise OSError("[Errno 101] Network is unreachable")

    monkeypatch.setattr(torchvision.datasets.CIFAR10, "download", offline)
    with pytest.raises(DatasetUnavailableError, match=r"cifar-10-python.tar.gz.*raw"):
        dataset_arrays(DataConfig(dataset="cifar10", cache_dir=str(tmp_path)))
    assert (tmp_path / ".cifar10.lock").exists()  # downloads run under a file lock


def test_cached_npz_is_used_for_cifar(tmp_path):
    _write_npz(tmp_path / "cifar10.npz", size=32, classes=10)
    arrays, info = dataset_arrays(DataConfig(dataset="cifar10", cache_dir=str(tmp_path)))
    assert info.image_size == 32 and info.num_classes == 10 and info.mean[0] == pytest.approx(0.4914)


def test_augment_keeps_range_and_is_seeded(digits_splits):
    x = digits_splits.x_train[:16]
    a = augment(x, torch.Generator().manual_seed(0))
    b = augment(x, torch.Generator().manual_seed(0))
    assert torch.equal(a, b) and a.shape == x.shape
    assert float(a.min()) >= 0 and float(a.max()) <= 1
    assert not torch.equal(a, x)
    flips_only = augment(x, torch.Generator().manual_seed(1), translate=0.0)
    # flips permute pixels: per-image pixel sums are unchanged
    assert torch.allclose(flips_only.sum((1, 2, 3)), x.sum((1, 2, 3)), atol=1e-4)
