"""Patch embeddings against numpy/scipy references built from the raw taps.

The raw tap outputs of the backbone are taken from the fitted extractor's
network; the embedding is then rebuilt independently: channel selection by
fancy indexing, nearest upsampling by pixel repetition, bilinear upsampling
(half-pixel centres) and zero-padded local averaging by explicit formulas.
"""

import numpy as np
import pytest
from scipy import ndimage

from skpadim import PatchFeatureExtractor
from skpadim._images import check_images

ALL = 448  # resnet18 layer1-3: 64 + 128 + 256 channels


def embed_with_taps(extractor, X):
    """(embeddings, raw taps) of X, as numpy float64 arrays."""
    runtime = extractor._get_runtime()
    [(batch, parts)] = list(extractor.embed_batches(check_images(X)))
    taps = [t.double().numpy() for t in runtime.forward(batch)]
    return parts.double().numpy(), taps


def fitted(X, **params):
    base = dict(
        backbone="resnet18",
        weights=None,
        image_size=64,
        n_features=ALL,
        random_state=0,
        device="cpu",
    )
    return PatchFeatureExtractor(**{**base, **params}).fit(X)


def repeat_upsample(tap, size):
    factor = size // tap.shape[-1]
    return np.repeat(np.repeat(tap, factor, axis=2), factor, axis=3)


def bilinear_upsample(tap, size):
    """Bilinear resize with half-pixel centres (PIL/OpenCV/torch default)."""
    n = tap.shape[-1]
    src = np.clip((np.arange(size) + 0.5) * n / size - 0.5, 0, n - 1)
    low = np.floor(src).astype(int)
    high = np.minimum(low + 1, n - 1)
    frac = src - low
    rows = (
        tap[:, :, low, :] * (1 - frac)[None, None, :, None]
        + tap[:, :, high, :] * frac[None, None, :, None]
    )
    return rows[:, :, :, low] * (1 - frac) + rows[:, :, :, high] * frac


@pytest.fixture(scope="module")
def X():
    return np.random.default_rng(0).integers(0, 255, (2, 64, 64, 3), dtype=np.uint8)


def test_selected_channels_are_the_indexed_channels_of_the_nearest_upsampled_taps(X):
    ext = fitted(X)
    # The first and last channel of every tap, and some in between.
    chosen = np.array([0, 5, 63, 64, 100, 191, 192, 300, 447])
    ext.channel_indices_ = chosen
    ext.n_features_ = len(chosen)
    ext._runtime = None  # rebuilt from the fitted arrays
    embeddings, taps = embed_with_taps(ext, X)
    full = np.concatenate([repeat_upsample(t, 16) for t in taps], axis=1)
    assert embeddings.shape == (2, len(chosen), 16, 16)
    np.testing.assert_allclose(embeddings, full[:, chosen], rtol=1e-6, atol=1e-6)


def test_bilinear_upsampling_uses_half_pixel_centres(X):
    ext = fitted(X, upsampling="bilinear")
    embeddings, taps = embed_with_taps(ext, X)
    full = np.concatenate([bilinear_upsample(t, 16) for t in taps], axis=1)
    np.testing.assert_allclose(embeddings, full, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("patch_size", [3, 5])
def test_patch_averaging_counts_the_zero_padding(X, patch_size):
    ext = fitted(X, patch_size=patch_size)
    embeddings, taps = embed_with_taps(ext, X)
    averaged = [
        ndimage.uniform_filter(
            t, size=(1, 1, patch_size, patch_size), mode="constant", cval=0.0
        )
        for t in taps
    ]
    full = np.concatenate([repeat_upsample(t, 16) for t in averaged], axis=1)
    np.testing.assert_allclose(embeddings, full, rtol=1e-5, atol=1e-5)
