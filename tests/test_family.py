"""Behaviour every detector of the family shares, end to end on images.

The scikit-learn contract lives in test_common.py; this module checks what a
user of any detector relies on: it finds pasted defects, the same seed gives
the same scores, an image's score does not depend on the batch it is in,
training scores are honest, and the API says what a method can do.
"""

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score
from test_detector import paste_patches

from skpadim import (
    CflowDetector,
    GaussianADDetector,
    PadimDetector,
    PatchCoreDetector,
    SpadeDetector,
)

from conftest import smooth_texture

BASE = dict(
    backbone="resnet18",
    weights=None,
    image_size=64,
    random_state=0,
    batch_size=8,
    device="cpu",
)
DETECTORS = {
    PadimDetector: {"n_features": 16},
    PatchCoreDetector: {"coreset_size": 0.25},
    SpadeDetector: {"n_neighbors": 5},
    GaussianADDetector: {},
    # Half the images held out for the threshold: 16 images leave only 2 at
    # the default validation_fraction, too few for a stable quantile.
    CflowDetector: {
        "max_iter": 2,
        "n_coupling_blocks": 2,
        "condition_dim": 16,
        "validation_fraction": 0.5,
    },
}
PARAMS = [
    pytest.param(cls, {**BASE, **kw}, id=cls.__name__) for cls, kw in DETECTORS.items()
]


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(0)
    train = smooth_texture(rng, 16)
    normal = smooth_texture(rng, 6)
    defective, masks = paste_patches(rng, smooth_texture(rng, 6))
    return train, normal, defective, masks


@pytest.fixture(scope="module")
def fitted(data):
    train = data[0]
    return {cls: cls(**{**BASE, **kw}).fit(train) for cls, kw in DETECTORS.items()}


@pytest.mark.parametrize("cls", DETECTORS)
def test_finds_pasted_defects(cls, fitted, data):
    _, normal, defective, masks = data
    det = fitted[cls]
    X = np.concatenate([normal, defective])
    y = np.r_[np.ones(len(normal)), -np.ones(len(defective))]
    assert roc_auc_score(y, det.decision_function(X)) > 0.9
    if hasattr(det, "anomaly_maps"):
        maps = det.anomaly_maps(defective)
        assert maps.shape == masks.shape
        assert roc_auc_score(masks.ravel(), maps.ravel()) > 0.85


@pytest.mark.parametrize("cls", DETECTORS)
def test_new_normal_images_pass_the_fitted_threshold(cls, fitted, data):
    # offset_ comes from honest training scores, so new normal images of the
    # same texture mostly pass it (16 training images make the 1% quantile
    # about their minimum, hence the loose bound); a threshold taken from
    # in-sample training scores is stricter, and would flag more.
    det = fitted[cls]
    new = det.score_samples(data[1])
    assert np.mean(new >= det.offset_) >= 0.5
    if cls is not CflowDetector:  # CFLOW's offset_ is from held-out images
        in_sample_offset = np.percentile(det.score_samples(data[0]), 1)
        assert det.offset_ < in_sample_offset


@pytest.mark.parametrize(("cls", "params"), PARAMS)
def test_same_seed_same_scores(cls, params, fitted, data):
    train, normal = data[0], data[1]
    again = cls(**params).fit(train)
    np.testing.assert_array_equal(
        again.score_samples(normal), fitted[cls].score_samples(normal)
    )
    np.testing.assert_array_equal(again.train_scores_, fitted[cls].train_scores_)
    other = cls(**{**params, "random_state": 1}).fit(train)
    assert not np.array_equal(other.score_samples(normal), again.score_samples(normal))


@pytest.mark.parametrize("cls", DETECTORS)
def test_an_image_scores_the_same_alone_or_in_a_batch(cls, fitted, data):
    det = fitted[cls]
    X = np.concatenate([data[1], data[2]])
    together = det.score_samples(X)
    alone = np.array([det.score_samples(X[i : i + 1])[0] for i in range(len(X))])
    np.testing.assert_allclose(alone, together, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("cls", DETECTORS)
def test_training_scores_are_honest(cls, fitted, data):
    # Scored in-sample, training images look more normal than they are; the
    # honest scores must be lower (more anomalous) for most images.
    det = fitted[cls]
    # CFLOW scores the images it held out of training (validation_fraction).
    held = getattr(det, "validation_indices_", np.arange(len(data[0])))
    in_sample = det.score_samples(data[0])[held]
    assert det.train_scores_.shape == in_sample.shape
    if cls is CflowDetector:
        np.testing.assert_allclose(det.train_scores_, in_sample, rtol=1e-5)
        return  # never trained on: their honest scores are their scores
    assert np.mean(det.train_scores_ < in_sample - 1e-6) >= 0.75


def test_only_localising_detectors_have_maps():
    assert not hasattr(GaussianADDetector(), "anomaly_maps")
    assert not hasattr(GaussianADDetector(), "predict_masks")
    for cls in (PadimDetector, PatchCoreDetector, SpadeDetector, CflowDetector):
        assert hasattr(cls(), "anomaly_maps")


def test_partial_fit_only_where_the_model_can_grow_exactly():
    assert hasattr(PadimDetector(), "partial_fit")
    assert hasattr(CflowDetector(), "partial_fit")  # one more epoch
    for cls in (PatchCoreDetector, SpadeDetector, GaussianADDetector):
        assert not hasattr(cls(), "partial_fit")


@pytest.mark.parametrize("cls", DETECTORS)
def test_a_decision_of_exactly_zero_is_normal(cls, fitted, data):
    det = fitted[cls]
    X = data[1][:2]
    scores = det.score_samples(X)
    boundary = det.__class__.__new__(det.__class__)
    boundary.__dict__.update(det.__dict__)
    boundary.offset_ = float(scores[0])  # image 0 sits exactly on the threshold
    assert boundary.decision_function(X)[0] == 0.0
    assert boundary.predict(X)[0] == 1
    boundary.offset_ = float(np.nextafter(scores[0], np.inf))
    assert boundary.predict(X)[0] == -1
