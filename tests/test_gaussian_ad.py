"""GaussianADDetector against scikit-learn's LedoitWolf on tiny inputs.

The reference pools the raw backbone taps (the network rebuilt from the
fitted weights) with numpy, fits ``sklearn.covariance.LedoitWolf`` per level
and sums the square roots of its (squared) Mahalanobis distances; the
cross-fitted training scores are checked against refitting LedoitWolf
without each image.
"""

import numpy as np
import pytest
import torch
from sklearn.covariance import LedoitWolf
from test_detector import paste_patches
from test_spade import raw_taps
from threadpoolctl import threadpool_limits

from skpadim import GaussianADDetector
from skpadim._gaussian_ad import LevelGaussians

from conftest import smooth_texture

SIZE = 48
LAYERS = ("layer1", "layer2", "layer3", "layer4")  # strides 4 to 32
BASE = dict(
    backbone="resnet18",
    weights=None,
    image_size=SIZE,
    random_state=0,
    batch_size=8,
    device="cpu",
)


def pooled(det, X):
    """Global average of each raw tap over (h, w), numpy: list of (n, C_l)."""
    return [tap.mean(axis=(2, 3)) for tap in raw_taps(det, X, LAYERS)]


def reference_scores(train_levels, test_levels):
    """Sum over levels of sqrt LedoitWolf Mahalanobis distances."""
    total = 0.0
    for train, test in zip(train_levels, test_levels):
        total = total + np.sqrt(LedoitWolf().fit(train).mahalanobis(test))
    return total


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
    train = smooth_texture(rng, 10, size=SIZE)
    normal = smooth_texture(rng, 3, size=SIZE)
    defective, _ = paste_patches(rng, smooth_texture(rng, 3, size=SIZE), size=16)
    return train, np.concatenate([normal, defective])


@pytest.fixture(scope="module")
def det(data):
    return GaussianADDetector(**BASE).fit(data[0])


@pytest.fixture(scope="module")
def levels(det, data):
    return pooled(det, data[0]), pooled(det, data[1])


def test_taps_are_every_stride_of_the_backbone(det):
    assert det.feature_extractor_.layers_ == LAYERS
    assert [len(m) for m in det.gaussians_.locations] == [64, 128, 256, 512]


def test_level_gaussians_are_ledoit_wolf(levels):
    train = levels[0]
    head = LevelGaussians.fit(train)
    for x, location, precision in zip(train, head.locations, head.precisions):
        lw = LedoitWolf().fit(x)
        np.testing.assert_allclose(location, lw.location_, rtol=1e-6, atol=1e-7)
        scale = np.abs(lw.precision_).max()
        np.testing.assert_allclose(precision, lw.precision_, atol=1e-5 * scale)
        assert lw.shrinkage_ < 1  # not a multiple of the identity


def test_fitted_gaussians_are_ledoit_wolf_of_the_pooled_taps(det, levels):
    head = det.gaussians_
    for x, location, precision in zip(levels[0], head.locations, head.precisions):
        lw = LedoitWolf().fit(x)
        np.testing.assert_allclose(
            location, lw.location_, atol=1e-5 * np.abs(lw.location_).max()
        )
        scale = np.abs(lw.precision_).max()
        np.testing.assert_allclose(precision, lw.precision_, atol=1e-3 * scale)


def test_score_is_the_sum_of_sqrt_mahalanobis_distances(det, data, levels):
    expected = reference_scores(*levels)
    np.testing.assert_allclose(-det.score_samples(data[1]), expected, rtol=1e-4)
    # The defects move the pooled features away from the training ones.
    assert expected[3:].min() > expected[:3].max()


def test_training_scores_are_exact_leave_one_out(det, levels):
    train = levels[0]
    n = len(train[0])
    assert n == 10  # KFold(n_splits=min(10, n)): one image per fold
    expected = np.array(
        [
            reference_scores(
                [x[np.arange(n) != i] for x in train], [x[i : i + 1] for x in train]
            )[0]
            for i in range(n)
        ]
    )
    np.testing.assert_allclose(-det.train_scores_, expected, rtol=1e-4)
    in_sample = reference_scores(train, train)
    assert np.all(expected > in_sample)
    # The 1% quantile of the honest scores (less a rounding margin).
    assert det.offset_ == pytest.approx(np.percentile(-expected, 1), rel=1e-3)


def test_identical_training_images_give_a_usable_threshold(data):
    # No spread at all: only the ridge keeps the covariance invertible. The
    # threshold must be finite, and the training image must pass it however
    # it is batched (the backbone's float32 rounding varies with the batch),
    # with every channel of every level; other images must not.
    same = np.repeat(data[0][:1], 5, axis=0)
    det = GaussianADDetector(**BASE).fit(same)
    assert np.all(np.isfinite(det.train_scores_)) and np.isfinite(det.offset_)
    np.testing.assert_array_equal(det.predict(same), 1)
    assert det.predict(same[:1])[0] == 1
    assert det.predict(same[:2])[1] == 1
    scores = det.score_samples(np.concatenate([data[0][1:4], data[1]]))
    assert np.all(np.isfinite(scores)) and np.all(scores < det.offset_)


def test_one_test_image_and_batch_size_do_not_change_scores(det, data):
    test = data[1]
    together = det.score_samples(test)
    alone = [det.score_samples(test[i : i + 1])[0] for i in range(6)]
    np.testing.assert_allclose(alone, together, rtol=1e-5)
    one = GaussianADDetector(**{**BASE, "batch_size": 1}).fit(data[0])
    np.testing.assert_allclose(one.train_scores_, det.train_scores_, rtol=1e-4)
    np.testing.assert_allclose(one.score_samples(test), together, rtol=1e-4)
