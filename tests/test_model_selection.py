"""Novelty-detection splitters: split properties, errors, and scikit-learn use."""

import pickle

import numpy as np
import pytest
from sklearn.base import clone
from sklearn.model_selection import (
    GridSearchCV,
    KFold,
    check_cv,
    cross_val_score,
    cross_validate,
)
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import FunctionTransformer

from skpadim import PadimDetector
from skpadim.datasets import make_synthetic_defects
from skpadim.model_selection import NoveltyKFold, NoveltyShuffleSplit

# --------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------


def labels(n_normal, n_anomalous, seed=None):
    """+1/-1 labels, interleaved at random when a seed is given."""
    y = np.array([1] * n_normal + [-1] * n_anomalous)
    return y if seed is None else np.random.default_rng(seed).permutation(y)


class NoArraySequence:
    """A sequence of paths that fails if anything converts it to an array."""

    def __init__(self, n):
        self._items = [f"image_{i}.png" for i in range(n)]

    def __len__(self):
        return len(self._items)

    def __getitem__(self, i):
        return self._items[i]

    def __array__(self, *args, **kwargs):
        raise AssertionError("the splitter converted X to an array")


def crop_border(X):
    """Drop an 8-pixel border; module-level so that pipelines pickle."""
    return X[:, 8:-8, 8:-8]


def detector(**params):
    """The small random-init detector of these tests (fast on 2 CPU cores)."""
    defaults = dict(
        backbone="resnet18",
        weights=None,
        image_size=64,
        random_state=0,
        device="cpu",
        batch_size=16,
        n_features=16,
    )
    return PadimDetector(**{**defaults, **params})


@pytest.fixture(scope="module")
def synthetic():
    return make_synthetic_defects(24, 8, image_size=64, random_state=0)


KFOLD_CASES = [
    dict(n_splits=2),
    dict(n_splits=5),
    dict(n_splits=3, shuffle=True, random_state=0),
    dict(n_splits=4, anomalies="split"),
    dict(n_splits=3, shuffle=True, random_state=1, anomalies="split"),
]


# --------------------------------------------------------------------------
# NoveltyKFold: split properties
# --------------------------------------------------------------------------


@pytest.mark.parametrize("params", KFOLD_CASES)
@pytest.mark.parametrize("n_normal", [17, 20])
def test_kfold_trains_on_normal_and_tests_each_normal_once(params, n_normal):
    y = labels(n_normal, 7, seed=0)
    splits = list(NoveltyKFold(**params).split(np.zeros(len(y)), y))
    assert len(splits) == params["n_splits"]
    tested_normal = []
    for train, test in splits:
        assert (y[train] == 1).all()
        assert np.intersect1d(train, test).size == 0
        assert (np.diff(train) > 0).all() and (np.diff(test) > 0).all()
        # Train plus the normal test images are exactly the normal images.
        test_normal = test[y[test] == 1]
        np.testing.assert_array_equal(
            np.sort(np.concatenate([train, test_normal])), np.flatnonzero(y == 1)
        )
        assert (y[test] == -1).any()
        tested_normal.extend(test_normal)
    np.testing.assert_array_equal(np.sort(tested_normal), np.flatnonzero(y == 1))


def test_kfold_anomalies_all_are_in_every_test_fold():
    y = labels(12, 5, seed=3)
    for _, test in NoveltyKFold(4).split(np.zeros(len(y)), y):
        np.testing.assert_array_equal(test[y[test] == -1], np.flatnonzero(y == -1))


@pytest.mark.parametrize("shuffle, seed", [(False, None), (True, 0)])
def test_kfold_anomalies_split_tests_each_anomaly_once(shuffle, seed):
    y = labels(12, 7, seed=3)
    cv = NoveltyKFold(3, shuffle=shuffle, random_state=seed, anomalies="split")
    tested = [test[y[test] == -1] for _, test in cv.split(np.zeros(len(y)), y)]
    # Folds as even as KFold's: 7 anomalies over 3 folds is 3, 2, 2.
    assert sorted(len(t) for t in tested) == [2, 2, 3]
    np.testing.assert_array_equal(
        np.sort(np.concatenate(tested)), np.flatnonzero(y == -1)
    )


def test_kfold_normal_folds_match_kfold_on_the_normal_images():
    y = labels(11, 3, seed=5)
    normal = np.flatnonzero(y == 1)
    ours = NoveltyKFold(4).split(np.zeros(len(y)), y)
    theirs = KFold(4).split(normal)
    for (train, _), (ref_train, _) in zip(ours, theirs, strict=True):
        np.testing.assert_array_equal(train, normal[ref_train])


def test_kfold_is_deterministic_with_random_state():
    y = labels(15, 6, seed=2)
    X = np.zeros(len(y))

    def splits(cv):
        return [np.concatenate([tr, te]) for tr, te in cv.split(X, y)]

    def make(seed):
        return NoveltyKFold(3, shuffle=True, random_state=seed, anomalies="split")

    first, again, other = splits(make(0)), splits(make(0)), splits(make(1))
    for a, b in zip(first, again, strict=True):
        np.testing.assert_array_equal(a, b)
    assert any(not np.array_equal(a, b) for a, b in zip(first, other))
    # An unshuffled splitter ignores the order of calls altogether.
    plain = NoveltyKFold(3)
    for a, b in zip(splits(plain), splits(plain), strict=True):
        np.testing.assert_array_equal(a, b)


# --------------------------------------------------------------------------
# NoveltyShuffleSplit: split properties
# --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "test_size, anomalies, n_test, n_anom",
    [(0.2, "all", 4, 6), (5, "all", 5, 6), (0.25, 0.5, 5, 3), (3, 2, 3, 2)],
)
def test_shuffle_split_sizes_and_normal_training(test_size, anomalies, n_test, n_anom):
    y = labels(18, 6, seed=1)
    cv = NoveltyShuffleSplit(
        7, test_size=test_size, anomalies=anomalies, random_state=0
    )
    splits = list(cv.split(np.zeros(len(y)), y))
    assert len(splits) == cv.get_n_splits() == 7
    for train, test in splits:
        assert (y[train] == 1).all()
        assert len(train) == 18 - n_test
        assert np.intersect1d(train, test).size == 0
        assert (y[test] == 1).sum() == n_test
        assert (y[test] == -1).sum() == n_anom
    # The held-out normal images change from split to split.
    assert len({tuple(train) for train, _ in splits}) > 1


def test_shuffle_split_is_deterministic_with_random_state():
    y = labels(10, 4)
    X = ["x.png"] * len(y)

    def splits(seed):
        cv = NoveltyShuffleSplit(5, anomalies=2, random_state=seed)
        return [np.concatenate(pair) for pair in cv.split(X, y)]

    for a, b in zip(splits(0), splits(0), strict=True):
        np.testing.assert_array_equal(a, b)
    rng = np.random.RandomState(0)
    # A RandomState instance advances: two calls give different splits.
    cv = NoveltyShuffleSplit(5, random_state=rng)
    assert not all(
        np.array_equal(a[0], b[0])
        for a, b in zip(cv.split(X, y), cv.split(X, y), strict=True)
    )


# --------------------------------------------------------------------------
# Both splitters: inputs, API, errors
# --------------------------------------------------------------------------

SPLITTERS = [NoveltyKFold(3), NoveltyShuffleSplit(3, random_state=0)]


@pytest.mark.parametrize("cv", SPLITTERS, ids=repr)
def test_x_is_only_measured_and_indexed_never_converted(cv):
    y = labels(9, 3, seed=0)
    splits = list(cv.split(NoArraySequence(len(y)), y))
    assert len(splits) == 3
    # A plain list of paths and y given as a list work too.
    assert len(list(cv.split([f"{i}.png" for i in range(12)], y.tolist()))) == 3


@pytest.mark.parametrize("cv", SPLITTERS, ids=repr)
def test_splitters_are_scikit_learn_cross_validators(cv):
    assert check_cv(cv) is cv
    assert cv.get_n_splits() == 3
    assert repr(cv).startswith(type(cv).__name__ + "(")
    assert "n_splits=3" in repr(cv)
    y = labels(6, 2)
    with pytest.warns(UserWarning, match="groups parameter is ignored"):
        list(cv.split(np.zeros(8), y, groups=np.arange(8)))


@pytest.mark.parametrize("cv", SPLITTERS, ids=repr)
@pytest.mark.parametrize(
    "y, match",
    [
        (None, "needs the labels y"),
        (np.array([1, 1, 1, 0, 0, 0]), r"got the values \[0, 1\]"),
        (np.array([True] * 5 + [False]), r"got the values \[False, True\]"),
        (np.array(["good"] * 5 + ["bad"]), r"'bad', 'good'"),
        (np.array([1, 1, 1, 1, -1, 2]), r"values \[-1, 1, 2\]"),
        (np.ones((6, 1)), "y must be 1-D"),
        (np.array([1, 1, 1, 1, -1]), "same length; got 6 images and 5"),
        (np.ones(6), "at least one anomalous image"),
    ],
)
def test_invalid_labels_are_rejected(cv, y, match):
    with pytest.raises(ValueError, match=match):
        list(cv.split(np.zeros(6), y))


@pytest.mark.parametrize("cv", SPLITTERS, ids=repr)
def test_missing_labels_fail_clearly_even_through_grid_search(cv):
    with pytest.raises(ValueError, match="needs the labels y"):
        list(cv.split(np.zeros(6)))
    # GridSearchCV splits before fitting anything, so this costs no fit.
    search = GridSearchCV(detector(), {"n_features": [8]}, scoring="roc_auc", cv=cv)
    with pytest.raises(ValueError, match="needs the labels y"):
        search.fit(np.zeros((6, 64, 64, 3), dtype=np.uint8))


def test_float_labels_are_accepted():
    y = np.array([1.0] * 6 + [-1.0] * 2)
    assert len(list(NoveltyKFold(2).split(np.zeros(8), y))) == 2


@pytest.mark.parametrize(
    "cv, y, match",
    [
        (NoveltyKFold(5), labels(4, 2), "cannot split 4 normal images"),
        (NoveltyKFold(2), labels(3, 2), r"only 1 normal image\(s\)"),
        (NoveltyKFold(3, anomalies="split"), labels(9, 2), "at least n_splits=3"),
        (NoveltyShuffleSplit(test_size=3), labels(4, 1), "only 1 normal"),
        (NoveltyShuffleSplit(test_size=9), labels(8, 1), "asks for 9 images"),
        (NoveltyShuffleSplit(anomalies=4), labels(8, 3), "asks for 4 images"),
    ],
    ids=repr,
)
def test_too_few_images_are_rejected(cv, y, match):
    with pytest.raises(ValueError, match=match):
        list(cv.split(np.zeros(len(y)), y))


def test_two_normal_training_images_per_fold_are_enough():
    # 3 normal images in 3 folds: 2 to train on, 1 to test, in every split.
    y = labels(3, 1)
    for cv in (NoveltyKFold(3), NoveltyShuffleSplit(3, test_size=1)):
        assert all(len(train) == 2 for train, _ in cv.split(np.zeros(4), y))


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: NoveltyKFold(1), "n_splits must be an int >= 2"),
        (lambda: NoveltyKFold(2.0), "n_splits must be an int"),
        (lambda: NoveltyKFold(True), "n_splits must be an int"),
        (lambda: NoveltyKFold(3, random_state=0), "shuffle is False"),
        (lambda: NoveltyKFold(3, anomalies="some"), "'all' or 'split'"),
        (lambda: NoveltyShuffleSplit(0), "n_splits must be an int >= 1"),
        (lambda: NoveltyShuffleSplit(test_size=1.0), r"float in \(0, 1\)"),
        (lambda: NoveltyShuffleSplit(test_size=0), "test_size must be >= 1"),
        (lambda: NoveltyShuffleSplit(anomalies="most"), "'all', a float"),
        (lambda: NoveltyShuffleSplit(anomalies=1.5), r"float in \(0, 1\]"),
    ],
)
def test_invalid_parameters_are_rejected(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_shuffle_must_be_a_bool():
    with pytest.raises(TypeError, match="shuffle must be True or False"):
        NoveltyKFold(3, shuffle="yes")


# --------------------------------------------------------------------------
# With PadimDetector and scikit-learn's model selection
# --------------------------------------------------------------------------


def test_cross_validate_fits_each_fold_on_its_normal_images(synthetic):
    # A list of arrays, as for paths: sklearn indexes it without stacking.
    X = list(synthetic.images[:15]) + list(synthetic.images[24:28])
    y = np.array([1] * 15 + [-1] * 4)
    result = cross_validate(
        detector(n_features=8),
        X,
        y,
        cv=NoveltyKFold(3),
        scoring="roc_auc",
        return_estimator=True,
        error_score="raise",
    )
    assert np.isfinite(result["test_score"]).all()
    assert [est.n_samples_seen_ for est in result["estimator"]] == [10, 10, 10]


def test_grid_search_scores_every_candidate_and_refits_on_normal(synthetic):
    X, y = synthetic.images, synthetic.labels
    search = GridSearchCV(
        detector(n_features=None),
        {"n_features": [8, 32]},
        scoring="roc_auc",
        cv=NoveltyKFold(3),
        refit=False,
        error_score="raise",
    ).fit(X, y)
    results = search.cv_results_
    for k in range(3):
        scores = results[f"split{k}_test_score"]
        assert np.isfinite(scores).all() and ((scores >= 0) & (scores <= 1)).all()
    assert search.best_params_["n_features"] in (8, 32)
    assert not hasattr(search, "best_estimator_")
    # The documented recipe: the best candidate, fitted on the normal images.
    best = clone(search.estimator).set_params(**search.best_params_).fit(X[y == 1])
    assert best.n_samples_seen_ == 24
    assert best.feature_extractor_.n_features_ == search.best_params_["n_features"]


def test_pipeline_with_a_crop_clones_fits_and_pickles(synthetic):
    X, y = synthetic.images, synthetic.labels
    pipe = Pipeline(
        [
            ("crop", FunctionTransformer(crop_border, validate=False)),
            ("padim", detector(image_size=None)),
        ]
    )
    assert pipe.get_params()["padim__n_features"] == 16
    pipe.set_params(padim__n_features=8)
    assert pipe.named_steps["padim"].n_features == 8
    copy = clone(pipe)
    assert copy.get_params()["padim__n_features"] == 8
    assert copy.named_steps["crop"].func is crop_border

    pipe.fit(X[:12])
    assert pipe.named_steps["padim"].frame_shape_ == (48, 48)
    assert not hasattr(copy.named_steps["padim"], "gaussian_")
    decision = pipe.decision_function(X[20:28])
    assert decision.shape == (8,) and np.isfinite(decision).all()
    assert set(np.unique(pipe.predict(X[20:28]))) <= {-1, 1}
    np.testing.assert_allclose(
        pipe.score_samples(X[20:28]) - pipe.named_steps["padim"].offset_, decision
    )
    loaded = pickle.loads(pickle.dumps(pipe))
    np.testing.assert_allclose(loaded.decision_function(X[20:28]), decision, rtol=1e-5)

    # The pipeline inherits the detector's outlier-detector tag, so the
    # "roc_auc" scorer reads its decision_function.
    subset = np.r_[0:8, 24:27]
    scores = cross_val_score(
        pipe, X[subset], y[subset], cv=NoveltyKFold(2), scoring="roc_auc"
    )
    assert np.isfinite(scores).all()
