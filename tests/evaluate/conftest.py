"""Shared toys of the evaluate tests: a tiny BatchNorm CNN encoder and images with a planted square."""

import numpy as np
import pytest
import torch
from torch import nn

from radpretrain.evaluate.inits import InitEncoder


class TinyCNN(nn.Module):
    """A tiny CNN encoder with BatchNorm (like real backbones)."""

    num_features = 8

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                                 nn.AdaptiveAvgPool2d(1), nn.Flatten())

    def forward(self, x):
        return self.net(x)


def square_images(n, seed=0, size=20):
    """uint8 images (n, 1, size, size) and labels: class 1 has a bright 8x8 square somewhere, class 0 not."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    imgs = (rng.random((n, 1, size, size)) * 80).astype(np.uint8)
    for i in np.flatnonzero(y):
        r, c = rng.integers(2, size - 10, 2)
        imgs[i, 0, r : r + 8, c : c + 8] = 250
    return torch.from_numpy(imgs), y


def tiny_encoder(mean=(0.2,), std=(0.3,), seed=None):
    """A fresh TinyCNN wrapped as evaluate wraps an init (normalisation inside); seeded when ``seed`` is given."""
    if seed is not None:
        torch.manual_seed(seed)
    return InitEncoder(TinyCNN(), list(mean), list(std))


@pytest.fixture
def toys():
    """The module's helpers as one namespace (the suite's importlib import mode has no shared test package)."""

    class Toys:
        images = staticmethod(square_images)
        encoder = staticmethod(tiny_encoder)

    return Toys
