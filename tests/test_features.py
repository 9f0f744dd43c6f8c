"""PatchFeatureExtractor against independent references: taps, PCA, inputs."""

import numpy as np
import pytest
import torch
from sklearn.decomposition import PCA

from skpadim import PatchFeatureExtractor
from skpadim.backbones import get_backbone_spec

from conftest import smooth_texture

X = smooth_texture(np.random.default_rng(0), 6)
BASE = dict(weights=None, image_size=64, random_state=0, device="cpu")


@pytest.mark.parametrize(
    ("backbone", "layers"),
    [("resnet18", ("layer2", "layer1")), ("efficientnet_lite0", ("block4", "block2"))],
)
def test_taps_given_out_of_order_are_put_in_network_order(backbone, layers):
    shuffled = PatchFeatureExtractor(backbone=backbone, layers=layers, **BASE).fit(X)
    ordered = PatchFeatureExtractor(
        backbone=backbone, layers=tuple(reversed(layers)), **BASE
    ).fit(X)
    assert shuffled.layers_ == tuple(reversed(layers))
    np.testing.assert_array_equal(shuffled.transform(X), ordered.transform(X))
    # The grid is the finest tap's: stride 4 on 64 px images.
    assert shuffled.transform(X).shape[-2:] == (16, 16)


def test_grid_is_the_finest_taps_even_when_none_of_its_channels_is_kept():
    # Seed 0 keeps 8 channels, all from block4 (stride 8): the embedding must
    # still live on block2's (stride 4) grid, as PaDiM's upsampling defines.
    ext = PatchFeatureExtractor(
        backbone="efficientnet_lite0", layers=("block2", "block4"), n_features=8, **BASE
    ).fit(X)
    assert ext.channel_indices_.min() >= 24  # block2 has channels 0-23
    assert ext.transform(X).shape == (6, 8, 16, 16)


def test_pca_keeps_the_leading_principal_directions():
    full = PatchFeatureExtractor(backbone="resnet18", n_features=448, **BASE).fit(X)
    pca_ext = PatchFeatureExtractor(
        backbone="resnet18", n_features=5, reduction="pca", **BASE
    ).fit(X)
    # Independent reference: scikit-learn's PCA on every patch of the full
    # embedding (all 448 channels, in channel order).
    patches = full.transform(X).transpose(0, 2, 3, 1).reshape(-1, 448)
    reference = PCA(n_components=5, svd_solver="full").fit(patches.astype(np.float64))
    for got, want in zip(pca_ext.components_, reference.components_):
        cosine = abs(float(np.dot(got, want))) / np.linalg.norm(got)
        assert cosine > 0.999
    np.testing.assert_allclose(pca_ext.pca_mean_, reference.mean_, rtol=1e-4, atol=1e-5)


def test_input_normalisation_is_subtract_mean_divide_std():
    ext = PatchFeatureExtractor(backbone="resnet18", **BASE).fit(X)
    preprocessing = ext.preprocessing_
    grey = np.full((64, 64, 3), 0.5, dtype=np.float32)
    batch = preprocessing([grey], torch.device("cpu"))
    spec = get_backbone_spec("resnet18")
    expected = (0.5 - np.array(spec.mean)) / np.array(spec.std)  # ImageNet's
    np.testing.assert_allclose(batch[0, :, 0, 0].numpy(), expected, rtol=1e-6)
    assert not np.allclose(expected, (0.5 - np.array(spec.std)) / np.array(spec.mean))


def test_random_init_backbones_build_for_every_registered_backbone():
    # Depthwise convolutions (Lite0) have groups == channels: the seeded
    # initialisation must not divide by zero, and the weights must be drawn.
    for backbone in ("resnet18", "efficientnet_lite0"):
        ext = PatchFeatureExtractor(backbone=backbone, n_features=8, **BASE).fit(X)
        weights = [w for k, w in ext.backbone_state_.items() if k.endswith("weight")]
        assert all(np.isfinite(w).all() for w in weights)
        assert np.std(weights[0]) > 0
