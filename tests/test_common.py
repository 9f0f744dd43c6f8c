"""The family's contract: scikit-learn's estimator checks on every estimator.

The heads that take tables (PatchGaussian, PatchMemoryBank) pass the whole
suite. The detectors and PatchFeatureExtractor take images, so the checks that
feed them 2-D tables are expected to fail at input validation; each is mapped
to an image-native test below that checks the same property on images, run
over every detector of the family (``DETECTORS``): a new detector added there
inherits the whole contract.
"""

import sys

import numpy as np
import pytest
from sklearn.base import clone
from sklearn.exceptions import NotFittedError
from sklearn.pipeline import make_pipeline
from sklearn.utils.estimator_checks import parametrize_with_checks
from sklearn.utils.validation import check_is_fitted

from skpadim import (
    CflowDetector,
    GaussianADDetector,
    PadimDetector,
    PatchCoreDetector,
    PatchFeatureExtractor,
    PatchGaussian,
    PatchMemoryBank,
    SpadeDetector,
)

from conftest import smooth_texture

SMALL = dict(
    backbone="resnet18",
    weights=None,
    image_size=32,
    n_features=8,
    random_state=0,
    device="cpu",
)

# Every detector of the family, with its small test setup.
DETECTORS = {
    PadimDetector: {},
    PatchCoreDetector: {"coreset_size": 0.5},
    SpadeDetector: {"n_neighbors": 3},
    GaussianADDetector: {},
    # One tiny epoch; nothing held out, so that every training image gets an
    # honest-or-in-sample score (held-out thresholds: test_cflow.py).
    CflowDetector: {
        "max_iter": 1,
        "n_coupling_blocks": 2,
        "condition_dim": 8,
        "validation_fraction": 0.0,
    },
}


def small(cls):
    """The small, fast setup of an estimator class."""
    return {**SMALL, **DETECTORS.get(cls, {})}


# check name -> the image-native test (in this module) of the same property.
IMAGE_NATIVE = {
    "check_fit_score_takes_y": "test_fit_accepts_and_ignores_y",
    "check_estimators_overwrite_params": "test_fit_leaves_params_alone",
    "check_dont_overwrite_parameters": "test_fit_leaves_params_alone",
    "check_estimators_fit_returns_self": "test_fit_returns_self",
    "check_readonly_memmap_input": "test_dtypes_layouts_and_readonly_memmaps",
    "check_n_features_in_after_fitting": "test_image_shape_bookkeeping",
    "check_n_features_in": "test_image_shape_bookkeeping",
    "check_fit2d_predict1d": "test_image_shape_bookkeeping",
    "check_positive_only_tag_during_fit": "test_pixel_range_is_enforced",
    "check_estimators_dtypes": "test_dtypes_layouts_and_readonly_memmaps",
    "check_complex_data": "test_pixel_range_is_enforced",
    "check_dtype_object": "test_pixel_range_is_enforced",
    "check_f_contiguous_array_estimator": "test_dtypes_layouts_and_readonly_memmaps",
    "check_estimators_empty_data_messages": "test_empty_and_single_image_inputs",
    "check_fit2d_1sample": "test_empty_and_single_image_inputs",
    "check_fit2d_1feature": "test_grayscale_single_channel_images",
    "check_pipeline_consistency": "test_pipeline_consistency",
    "check_estimators_nan_inf": "test_nan_and_inf_are_rejected",
    "check_estimator_sparse_tag": "test_non_image_containers_are_rejected",
    "check_estimator_sparse_array": "test_non_image_containers_are_rejected",
    "check_estimator_sparse_matrix": "test_non_image_containers_are_rejected",
    "check_classifier_data_not_an_array": "test_non_image_containers_are_rejected",
    "check_transformer_data_not_an_array": "test_non_image_containers_are_rejected",
    "check_estimators_pickle": "test_pickle_round_trip",
    "check_outliers_fit_predict": "test_outliers_train_and_contamination",
    "check_outliers_train": "test_outliers_train_and_contamination",
    "check_methods_sample_order_invariance": "test_sample_order_invariance",
    "check_methods_subset_invariance": "test_subset_invariance",
    "check_dict_unchanged": "test_predicting_leaves_the_estimator_unchanged",
    "check_fit_idempotent": "test_fit_idempotent",
    "check_fit_check_is_fitted": "test_check_is_fitted",
    "check_transformer_general": "test_transformer_general",
    "check_transformer_preserve_dtypes": "test_transformer_general",
    "check_non_transformer_estimators_n_iter": "test_iterative_fit_records_n_iter",
}


def expected_failed_checks(estimator):
    if isinstance(estimator, (PatchGaussian, PatchMemoryBank)):
        return {}
    checks = dict(IMAGE_NATIVE)
    if not hasattr(estimator, "max_iter"):  # only run on iterative estimators
        checks.pop("check_non_transformer_estimators_n_iter")
    return {
        check: f"feeds a 2-D table; the same property on images: {test}"
        for check, test in checks.items()
    }


@parametrize_with_checks(
    [
        PatchGaussian(),
        PatchMemoryBank(random_state=0),
        PatchFeatureExtractor(**SMALL),
        *(cls(**small(cls)) for cls in DETECTORS),
    ],
    expected_failed_checks=expected_failed_checks,
    # An expected failure that passes is an error: the map above must say
    # exactly which checks images cannot take.
    xfail_strict=True,
)
def test_sklearn_compatible_estimator(estimator, check):
    check(estimator)


def test_every_mapped_check_has_its_image_native_test():
    module = sys.modules[__name__]
    assert all(callable(getattr(module, name, None)) for name in IMAGE_NATIVE.values())


# ------------------------------------------------------------------ images
X = smooth_texture(np.random.default_rng(0), 10, size=32)
ESTIMATORS = [*DETECTORS, PatchFeatureExtractor]


def _output(est, X):
    if hasattr(est, "score_samples"):
        return est.score_samples(X)
    return est.transform(X)


@pytest.mark.parametrize("cls", ESTIMATORS)
def test_fit_returns_self(cls):
    est = cls(**small(cls))
    assert est.fit(X) is est


@pytest.mark.parametrize("cls", ESTIMATORS)
def test_fit_accepts_and_ignores_y(cls):
    a = cls(**small(cls)).fit(X)
    b = cls(**small(cls)).fit(X, np.arange(len(X)))
    np.testing.assert_array_equal(_output(a, X), _output(b, X))


@pytest.mark.parametrize("cls", ESTIMATORS)
def test_fit_leaves_params_alone(cls):
    est = cls(**small(cls))
    before = clone(est).get_params()
    est.fit(X)
    assert est.get_params() == before


@pytest.mark.parametrize("cls", ESTIMATORS)
def test_fit_idempotent(cls):
    est = cls(**small(cls))
    first = _output(est.fit(X), X)
    np.testing.assert_array_equal(_output(est.fit(X), X), first)


@pytest.mark.parametrize("cls", ESTIMATORS)
def test_check_is_fitted(cls):
    est = cls(**small(cls))
    with pytest.raises(NotFittedError):
        check_is_fitted(est)
    check_is_fitted(est.fit(X))


@pytest.mark.parametrize("cls", ESTIMATORS)
def test_dtypes_layouts_and_readonly_memmaps(cls, tmp_path):
    est = cls(**small(cls)).fit(X)
    expected = _output(est, X)
    memmap = np.lib.format.open_memmap(
        tmp_path / "x.npy", mode="w+", shape=X.shape, dtype=X.dtype
    )
    memmap[:] = X
    readonly = np.load(tmp_path / "x.npy", mmap_mode="r")
    for variant in (X / np.float32(255), X / 255.0, np.asfortranarray(X), readonly):
        np.testing.assert_allclose(
            _output(est, variant), expected, rtol=1e-4, atol=1e-5
        )
    cls(**small(cls)).fit(readonly)  # fitting on a read-only memmap works too


@pytest.mark.parametrize("cls", ESTIMATORS)
def test_image_shape_bookkeeping(cls):
    est = cls(**small(cls)).fit(X)
    # Inputs of any size are resized to the fitted frame; outputs follow it.
    bigger = smooth_texture(np.random.default_rng(1), 2, size=48)
    out = _output(est, bigger)
    assert out.shape[0] == 2
    if cls is PatchFeatureExtractor:
        assert out.shape == (2, 8, 8, 8)
    else:
        assert est.frame_shape_ == (32, 32)
        assert out.shape == (2,)
    if hasattr(est, "anomaly_maps"):
        assert est.anomaly_maps(bigger).shape == (2, 48, 48)
    with pytest.raises(ValueError, match="shape"):
        _output(est, X[0, :, :, 0].ravel()[None])  # a flat 1-D image


@pytest.mark.parametrize("cls", ESTIMATORS)
def test_pixel_range_is_enforced(cls):
    est = cls(**small(cls))
    with pytest.raises(ValueError, match=r"in \[0, 1\]"):
        est.fit(X / 255.0 - 0.5)
    with pytest.raises(TypeError, match="dtype uint8"):
        est.fit(X.astype(np.complex64))
    with pytest.raises(TypeError, match="dtype uint8"):
        est.fit(X.astype(object))


@pytest.mark.parametrize("cls", ESTIMATORS)
def test_empty_and_single_image_inputs(cls):
    with pytest.raises(ValueError, match="empty"):
        cls(**small(cls)).fit([])
    with pytest.raises(ValueError, match="Expected at least"):
        cls(**small(cls)).fit(X[:0])
    if cls is not PatchFeatureExtractor:
        n = cls._min_train_images
        with pytest.raises(ValueError, match=f"at least {n} images"):
            cls(**small(cls)).fit(X[: n - 1])


@pytest.mark.parametrize("cls", ESTIMATORS)
def test_grayscale_single_channel_images(cls):
    gray = X[..., :1]
    est = cls(**small(cls)).fit(gray)
    np.testing.assert_array_equal(_output(est, gray), _output(est, gray[..., 0]))
    np.testing.assert_allclose(
        _output(est, gray), _output(est, np.repeat(gray, 3, axis=3))
    )


@pytest.mark.parametrize("cls", ESTIMATORS)
def test_pipeline_consistency(cls):
    est = cls(**small(cls)).fit(X)
    pipe = make_pipeline(cls(**small(cls))).fit(X)
    method = "transform" if cls is PatchFeatureExtractor else "score_samples"
    np.testing.assert_array_equal(getattr(pipe, method)(X), _output(est, X))


@pytest.mark.parametrize("cls", ESTIMATORS)
def test_nan_and_inf_are_rejected(cls):
    for bad in (np.nan, np.inf, -np.inf):
        images = X / 255.0
        images[0, 0, 0, 0] = bad
        with pytest.raises(ValueError, match="NaN or infinity"):
            cls(**small(cls)).fit(images)


@pytest.mark.parametrize("cls", ESTIMATORS)
def test_non_image_containers_are_rejected(cls):
    import scipy.sparse

    with pytest.raises(TypeError, match="got csr_matrix"):
        cls(**small(cls)).fit(scipy.sparse.csr_matrix(np.eye(4)))
    with pytest.raises(TypeError, match="got dict"):
        cls(**small(cls)).fit({"images": X})


@pytest.mark.parametrize("cls", ESTIMATORS)
def test_pickle_round_trip(cls):
    import pickle

    est = cls(**small(cls)).fit(X)
    loaded = pickle.loads(pickle.dumps(est))
    np.testing.assert_array_equal(_output(loaded, X), _output(est, X))


@pytest.mark.parametrize("cls", DETECTORS)
def test_outliers_train_and_contamination(cls):
    for contamination in (0.1, 0.2, 0.5):
        det = cls(**small(cls), contamination=contamination)
        labels = det.fit_predict(X)
        assert labels.dtype.kind == "i" and set(labels) <= {-1, 1}
        assert (labels == -1).mean() == pytest.approx(contamination)
        decision = det.decision_function(X)
        np.testing.assert_array_equal(det.predict(X) == 1, decision >= 0)
        np.testing.assert_allclose(decision, det.score_samples(X) - det.offset_)


@pytest.mark.parametrize("cls", ESTIMATORS)
def test_sample_order_invariance(cls):
    est = cls(**small(cls)).fit(X)
    order = np.random.default_rng(0).permutation(len(X))
    np.testing.assert_allclose(
        _output(est, X[order]), _output(est, X)[order], rtol=1e-5, atol=1e-6
    )


@pytest.mark.parametrize("cls", ESTIMATORS)
def test_subset_invariance(cls):
    est = cls(**small(cls), batch_size=4).fit(X)
    whole = _output(est, X)
    parts = np.concatenate([_output(est, X[i : i + 3]) for i in range(0, len(X), 3)])
    np.testing.assert_allclose(parts, whole, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("cls", DETECTORS)
def test_predicting_leaves_the_estimator_unchanged(cls):
    det = cls(**small(cls)).fit(X)
    before = dict(det.__dict__)
    for method in ("predict", "score_samples", "decision_function", "anomaly_maps"):
        if hasattr(det, method):
            getattr(det, method)(X)
    assert det.__dict__.keys() == before.keys()
    assert all(det.__dict__[k] is before[k] for k in before)


def test_transformer_general():
    ext = PatchFeatureExtractor(**SMALL)
    fitted_output = ext.fit_transform(X)
    np.testing.assert_array_equal(fitted_output, ext.transform(X))
    for variant in (X, X / np.float64(255)):
        assert ext.transform(variant).dtype == np.float32


def test_iterative_fit_records_n_iter():
    det = CflowDetector(**small(CflowDetector)).fit(X)
    assert det.n_iter_ == 1 and len(det.loss_curve_) == 1
