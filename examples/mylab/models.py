"""A two-hidden-layer MLP, registered as ``mlp2``.

A model constructor takes ``(in_channels, image_size, num_classes)`` and returns the network
on *normalised* inputs; aerl-ray wraps it with the dataset's normalisation, so attacks work
on images in [0, 1] (``aerl_ray.models.build_model``).
"""
from torch import nn

from aerl_ray.models import MODELS


@MODELS.register("mlp2")
def mlp2(in_channels: int, image_size: int, num_classes: int) -> nn.Module:
    d = in_channels * image_size * image_size
    return nn.Sequential(nn.Flatten(), nn.Linear(d, 256), nn.ReLU(), nn.Dropout(0.2),
                         nn.Linear(256, 128), nn.ReLU(), nn.Linear(128, num_classes))
