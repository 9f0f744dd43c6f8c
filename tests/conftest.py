"""Shared fixtures: small images and a small, fast, random-init detector setup."""

import numpy as np
import pytest

# Random-init ResNet-18 on 64 px images: a forward pass costs milliseconds.
SMALL = dict(
    backbone="resnet18",
    weights=None,
    image_size=64,
    n_features=16,
    random_state=0,
    batch_size=8,
    device="cpu",
)


@pytest.fixture
def small_params():
    return dict(SMALL)


def smooth_texture(rng, n, size=64, channels=3):
    """Smooth random uint8 images (a low-pass texture), deterministic per rng."""
    base = rng.normal(size=(n, size // 8, size // 8, channels))
    up = np.kron(base, np.ones((1, 8, 8, 1)))
    noise = rng.normal(scale=0.3, size=up.shape)
    return np.clip(128 + 30 * (up + noise), 0, 255).astype(np.uint8)


@pytest.fixture
def images():
    return smooth_texture(np.random.default_rng(0), 12)


@pytest.fixture
def fitted(small_params, images):
    from skpadim import PadimDetector

    return PadimDetector(**small_params).fit(images)
