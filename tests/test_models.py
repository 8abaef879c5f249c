import pytest
import torch

from aerl_ray.data import DatasetInfo
from aerl_ray.models import MODELS, Classifier, build_model

SHAPES = {
    "digits": DatasetInfo("digits", 10, 1, 8, (0.3,), (0.4,)),
    "cifar": DatasetInfo("cifar10", 10, 3, 32, (0.49, 0.48, 0.45), (0.25, 0.24, 0.26)),
}


@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("name", MODELS.names())
def test_every_model_forward(name, shape):
    info = SHAPES[shape]
    torch.manual_seed(0)
    model = build_model(name, info).eval()
    x = torch.rand(2, info.in_channels, info.image_size, info.image_size)
    out = model(x)
    assert out.shape == (2, info.num_classes)
    assert torch.isfinite(out).all()
    # normalisation is inside the model: its first layer maps [0,1] to standardised values
    assert isinstance(model, Classifier)
    z = model.normalize(torch.full((1, info.in_channels, 2, 2), info.mean[0]))
    assert float(z[0, 0].abs().max()) < 1e-5


@pytest.mark.parametrize("name", ["tiny", "cnn4"])
def test_spectral_norm_option(name):
    info = SHAPES["digits"]
    model = build_model(name, info, spectral_norm=True)
    assert any("parametrizations" in n for n, _ in model.named_parameters())
    assert model(torch.rand(3, 1, 8, 8)).shape == (3, 10)
