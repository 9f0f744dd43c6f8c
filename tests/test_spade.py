"""SpadeDetector against a slow, obvious numpy/scipy reference on tiny inputs.

The reference takes the raw backbone taps (the network rebuilt from the fitted
weights), pools the deepest with numpy, finds the K nearest training images
with scipy's cdist, and scores each pixel of each level by cdist to the same
level's pixels of those K images; the level maps are upsampled bilinearly to
the finest grid (torch's F.interpolate, the resize only) and averaged.
"""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.spatial.distance import cdist
from test_detector import paste_patches
from threadpoolctl import threadpool_limits

from skpadim import SpadeDetector
from skpadim.backbones import build_feature_network

from conftest import smooth_texture

SIZE = 48  # layer1 12x12, layer2 6x6, layer3 3x3
LAYERS = ("layer1", "layer2", "layer3")
BASE = dict(
    backbone="resnet18",
    weights=None,
    image_size=SIZE,
    random_state=0,
    batch_size=8,
    device="cpu",
    sigma=0.0,
)
MEAN = np.array([0.485, 0.456, 0.406])
STD = np.array([0.229, 0.224, 0.225])


# ------------------------------------------------------------- references
def raw_taps(det, X, layers):
    """The backbone's taps (float64 numpy), from a network rebuilt with the
    fitted weights: no fused BatchNorm, no channels-last, one batch."""
    state = {
        k: torch.from_numpy(np.array(v))
        for k, v in det.feature_extractor_.backbone_state_.items()
    }
    network = build_feature_network(det.backbone, layers, weights=state).eval()
    x = ((X / 255.0 - MEAN) / STD).transpose(0, 3, 1, 2).astype(np.float32)
    with torch.no_grad():
        return [t.double().numpy() for t in network(torch.tensor(x))]


def resize(maps, size):
    """(h, w) -> size, bilinear, half-pixel centres."""
    if maps.shape == tuple(size):
        return maps
    up = F.interpolate(torch.from_numpy(maps)[None, None], size=size, mode="bilinear")
    return up[0, 0].numpy()


def reference_spade(test, train, n_neighbors, n_pixel_neighbors=1, loo=False):
    """Image scores (n,), pixel scores (n, h0, w0) and neighbour sets.

    ``loo``: ``test`` is ``train``, and no image is its own neighbour.
    """
    pooled_test = test[-1].mean(axis=(2, 3))
    pooled_train = train[-1].mean(axis=(2, 3))
    distances = cdist(pooled_test, pooled_train)
    if loo:
        np.fill_diagonal(distances, np.inf)
    k = min(n_neighbors, len(pooled_train) - loo)
    nearest = np.argsort(distances, axis=1, kind="stable")[:, :k]
    image = np.take_along_axis(distances, nearest, axis=1).mean(axis=1)
    finest = test[0].shape[-2:]
    pixel = []
    for i, chosen in enumerate(nearest):
        levels = []
        for query, gallery in zip(test, train):
            c, h, w = query.shape[1:]
            q = query[i].reshape(c, -1).T
            g = gallery[chosen].transpose(0, 2, 3, 1).reshape(-1, c)
            d = np.sort(cdist(q, g), axis=1)[:, :n_pixel_neighbors].mean(axis=1)
            levels.append(resize(d.reshape(h, w), finest))
        pixel.append(np.mean(levels, axis=0))
    return image, np.array(pixel), nearest


def upsample(pixel):
    up = F.interpolate(
        torch.from_numpy(pixel)[:, None], size=(SIZE, SIZE), mode="bilinear"
    )
    return up[:, 0].numpy()


# --------------------------------------------------------------- fixtures
@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    # Tiny tensors: on a shared, loaded machine, extra OpenMP/BLAS threads
    # only spin (a module runs several times faster on one thread).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with threadpool_limits(1):
            yield
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(0)
    train = smooth_texture(rng, 8, size=SIZE)
    normal = smooth_texture(rng, 3, size=SIZE)
    defective, _ = paste_patches(rng, smooth_texture(rng, 3, size=SIZE), size=12)
    return train, np.concatenate([normal, defective])


@pytest.fixture(scope="module")
def det(data):
    return SpadeDetector(**BASE, n_neighbors=3).fit(data[0])


@pytest.fixture(scope="module")
def taps(det, data):
    return raw_taps(det, data[0], LAYERS), raw_taps(det, data[1], LAYERS)


def head_scores(det, taps, sample_ids=None):
    features = [torch.from_numpy(t.astype(np.float32)) for t in taps]
    patch, image = det.gallery_.score_batch(features, sample_ids=sample_ids)
    return patch.numpy(), image.numpy()


# ------------------------------------------------------------------ tests
def test_gallery_holds_the_pooled_deepest_tap_and_every_level(det, taps):
    train = taps[0]
    gallery = det.gallery_
    scale = np.abs(train[-1]).max()
    np.testing.assert_allclose(
        gallery.pooled, train[-1].mean(axis=(2, 3)), atol=1e-5 * scale
    )
    assert [level.shape for level in gallery.levels] == [t.shape for t in train]
    for level, expected in zip(gallery.levels, train):
        np.testing.assert_allclose(level, expected, atol=1e-5 * np.abs(expected).max())


def test_image_score_is_the_mean_distance_to_the_k_nearest_images(det, data, taps):
    image, _, _ = reference_spade(taps[1], taps[0], 3)
    np.testing.assert_allclose(-det.score_samples(data[1]), image, rtol=1e-4)


def test_pixel_scores_average_the_levels_nearest_gallery_pixels(det, data, taps):
    _, pixel, _ = reference_spade(taps[1], taps[0], 3)
    assert pixel.shape == (6, 12, 12)
    patch, _ = head_scores(det, taps[1])
    np.testing.assert_allclose(patch, pixel, rtol=1e-4)
    maps = det.anomaly_maps(data[1], resolution="model")
    np.testing.assert_allclose(maps, upsample(pixel), rtol=1e-4)


def test_pixel_gallery_is_the_k_nearest_images_only(det, taps):
    # Against all 8 training images the pixel scores would be lower.
    _, near, _ = reference_spade(taps[1], taps[0], 3)
    _, everywhere, _ = reference_spade(taps[1], taps[0], 8)
    assert np.all(everywhere <= near + 1e-12) and np.any(everywhere < near - 1e-6)
    patch, _ = head_scores(det, taps[1])
    assert not np.allclose(patch, everywhere, rtol=1e-4)


def test_training_scores_are_leave_one_out_in_both_stages(det, taps):
    train = taps[0]
    image, pixel, nearest = reference_spade(train, train, 3, loo=True)
    assert not np.any(nearest == np.arange(8)[:, None])
    np.testing.assert_allclose(-det.train_scores_, image, rtol=1e-4)
    patch, got = head_scores(det, train, sample_ids=torch.arange(8))
    np.testing.assert_allclose(got, image, rtol=1e-4)
    np.testing.assert_allclose(patch, pixel, rtol=1e-4)
    assert np.all(pixel > 0)  # in-sample, every pixel would score 0


def test_pixel_neighbours_average_the_k_nearest(data, taps):
    det = SpadeDetector(**BASE, n_neighbors=3, n_pixel_neighbors=4).fit(data[0])
    image, pixel, _ = reference_spade(taps[1], taps[0], 3, n_pixel_neighbors=4)
    _, one, _ = reference_spade(taps[1], taps[0], 3, n_pixel_neighbors=1)
    assert np.all(pixel > one)
    maps = det.anomaly_maps(data[1], resolution="model")
    np.testing.assert_allclose(maps, upsample(pixel), rtol=1e-4)
    np.testing.assert_allclose(-det.score_samples(data[1]), image, rtol=1e-4)
    _, loo, _ = reference_spade(taps[0], taps[0], 3, n_pixel_neighbors=4, loo=True)
    patch, _ = head_scores(det, taps[0], sample_ids=torch.arange(8))
    np.testing.assert_allclose(patch, loo, rtol=1e-4)


def test_more_neighbours_than_training_images_are_capped(data, taps):
    det = SpadeDetector(**BASE, n_neighbors=50).fit(data[0])
    image, pixel, nearest = reference_spade(taps[1], taps[0], 50)
    assert nearest.shape == (6, 8)
    np.testing.assert_allclose(-det.score_samples(data[1]), image, rtol=1e-4)
    maps = det.anomaly_maps(data[1], resolution="model")
    np.testing.assert_allclose(maps, upsample(pixel), rtol=1e-4)
    honest, _, nearest = reference_spade(taps[0], taps[0], 50, loo=True)
    assert nearest.shape == (8, 7)
    np.testing.assert_allclose(-det.train_scores_, honest, rtol=1e-4)


def test_finds_the_pasted_defects(det, data):
    scores = det.score_samples(data[1])
    assert scores[3:].max() < scores[:3].min()


def test_one_test_image_and_batch_size_do_not_change_scores(det, data):
    test = data[1]
    together = det.score_samples(test)
    maps = det.anomaly_maps(test, resolution="model")
    alone = [det.score_samples(test[i : i + 1])[0] for i in range(6)]
    np.testing.assert_allclose(alone, together, rtol=1e-5)
    one_map = det.anomaly_maps(test[2:3], resolution="model")
    assert one_map.shape == (1, SIZE, SIZE)
    np.testing.assert_allclose(one_map[0], maps[2], rtol=1e-5, atol=1e-6)
    one = SpadeDetector(**{**BASE, "batch_size": 1}, n_neighbors=3).fit(data[0])
    np.testing.assert_allclose(one.train_scores_, det.train_scores_, rtol=1e-5)
    np.testing.assert_allclose(one.score_samples(test), together, rtol=1e-5)
