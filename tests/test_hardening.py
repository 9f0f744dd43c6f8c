"""The family's safety rules: consistent state, thread-safe seeding, faithful
inputs, degenerate training sets (issue: hardening)."""

import threading

import numpy as np
import pytest
from PIL import Image

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
    image_size=48,
    n_features=16,
    random_state=0,
    device="cpu",
    batch_size=4,
)
DETECTORS = {
    PadimDetector: {},
    PatchCoreDetector: {},
    SpadeDetector: {"n_neighbors": 3},
    GaussianADDetector: {},
    CflowDetector: {"max_iter": 2, "n_coupling_blocks": 2, "condition_dim": 16},
}
X = smooth_texture(np.random.default_rng(0), 8, size=48)
TEST = smooth_texture(np.random.default_rng(1), 3, size=48)


def make(cls, **params):
    return cls(**{**BASE, **DETECTORS[cls], **params})


@pytest.fixture(scope="module")
def fitted():
    return {cls: make(cls).fit(X) for cls in DETECTORS}


@pytest.mark.parametrize("cls", DETECTORS)
def test_model_parameters_apply_at_the_next_fit_only(cls, fitted):
    det = fitted[cls]
    before = det.score_samples(TEST), det.offset_
    changed = {"contamination": 0.4}
    if "sigma" in det.get_params():
        changed["sigma"] = 0.0
    det.set_params(**changed)
    try:
        # The fitted model keeps its sigma and its threshold together.
        np.testing.assert_array_equal(det.score_samples(TEST), before[0])
        assert det.offset_ == before[1]
    finally:
        det.set_params(
            contamination=0.01, **({"sigma": 4.0} if "sigma" in changed else {})
        )


@pytest.mark.parametrize("cls", DETECTORS)
@pytest.mark.parametrize(
    "params", [{"batch_size": 0}, {"device": "tpu"}, {"precision": "float64"}]
)
def test_bad_runtime_values_are_refused_by_set_params_on_a_fitted_model(
    cls, fitted, params
):
    det = fitted[cls]
    before = det.get_params()
    with pytest.raises((ValueError, TypeError)):
        det.set_params(**params)
    assert det.get_params() == before
    assert np.isfinite(det.score_samples(TEST[:1])).all()


@pytest.mark.parametrize("cls", DETECTORS)
def test_runtime_parameters_apply_at_once(cls, fitted):
    det = fitted[cls]
    expected = det.score_samples(TEST)
    det.set_params(batch_size=1)
    try:
        assert det.feature_extractor_.batch_size == 1
        np.testing.assert_allclose(det.score_samples(TEST), expected, rtol=1e-5)
    finally:
        det.set_params(batch_size=4)


@pytest.mark.parametrize("cls", DETECTORS)
def test_fits_in_parallel_threads_reproduce_the_serial_fit(cls, fitted):
    results = [None] * 3

    def fit(i):
        results[i] = make(cls).fit(X).score_samples(TEST)

    threads = [threading.Thread(target=fit, args=(i,)) for i in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    expected = fitted[cls].score_samples(TEST)
    for scores in results:
        np.testing.assert_allclose(scores, expected, rtol=1e-5)


@pytest.mark.parametrize("cls", DETECTORS)
def test_identical_training_images_give_a_usable_threshold(cls):
    same = np.repeat(X[:1], 4, axis=0)
    det = make(cls).fit(same)
    assert np.isfinite(det.offset_) and np.isfinite(det.train_scores_).all()
    # The training image itself is normal; a different image is not.
    assert det.predict(same[:1])[0] == 1
    assert det.predict(X[3:4])[0] == -1


@pytest.mark.parametrize("cls", DETECTORS)
def test_one_picture_in_every_input_form_scores_the_same(cls, fitted, tmp_path):
    det = fitted[cls]
    gray = TEST[:, :, :, 0]
    path8, path16 = tmp_path / "g8.png", tmp_path / "g16.png"
    Image.fromarray(gray[0]).save(path8)
    Image.fromarray(gray[0].astype(np.uint16) * 257).save(path16)
    forms = {
        "uint8": gray[:1],
        "float": gray[:1] / 255.0,
        "uint16": gray[:1].astype(np.uint16) * 257,
        "path": [str(path8)],
        "16-bit png": [str(path16)],
        "pil": [Image.fromarray(gray[0])],
    }
    expected = det.score_samples(forms["uint8"])
    for name, form in forms.items():
        np.testing.assert_allclose(
            det.score_samples(form), expected, rtol=1e-5, err_msg=name
        )
