"""The threshold and training-score rules of the shared base, pinned down.

- ``fit_predict`` labels +1 where ``train_scores_ - offset_ >= 0`` (a score
  exactly at the threshold is normal), checked with an exact quantile.
- ``partial_fit`` keeps the earlier honest training scores.
- Training images scored in parallel chunks are excluded from their own
  matches by their position in the whole training set.
"""

import numpy as np

from skpadim import PadimDetector, PatchCoreDetector

from conftest import smooth_texture


class ExactQuantile(PadimDetector):
    """The offset is the quantile itself (no safety margin), so that a
    training score lies exactly on it."""

    def _set_offset(self, train_scores):
        self.train_scores_ = train_scores
        self.offset_ = float(np.percentile(train_scores, 100.0 * self.contamination))


def test_fit_predict_counts_a_score_on_the_threshold_as_normal(small_params):
    X = smooth_texture(np.random.default_rng(3), 11)
    # 10% of 11 images: the quantile falls exactly on the second-lowest score.
    det = ExactQuantile(**small_params, contamination=0.1)
    labels = det.fit_predict(X)
    order = np.argsort(det.train_scores_)
    assert det.offset_ == det.train_scores_[order[1]]
    expected = np.ones(11, dtype=int)
    expected[order[0]] = -1
    np.testing.assert_array_equal(labels, expected)


def test_offset_lies_just_below_the_contamination_quantile(small_params):
    X = smooth_texture(np.random.default_rng(4), 11)
    det = PadimDetector(**small_params, contamination=0.1).fit(X)
    quantile = np.sort(det.train_scores_)[1]
    assert quantile - 1e-3 * (1 + abs(quantile)) < det.offset_ < quantile
    # fit_predict flags the images below the quantile only.
    labels = PadimDetector(**small_params, contamination=0.1).fit_predict(X)
    assert (labels == -1).sum() == 1


def test_partial_fit_keeps_the_earlier_training_scores(small_params):
    X = smooth_texture(np.random.default_rng(2), 14)
    det = PadimDetector(**small_params).partial_fit(X[:8])
    first = det.train_scores_.copy()
    det.partial_fit(X[8:])
    assert det.n_samples_seen_ == 14
    assert det.train_scores_.shape == (14,)
    np.testing.assert_array_equal(det.train_scores_[:8], first)


def test_parallel_training_scores_exclude_each_images_own_patches(small_params):
    X = smooth_texture(np.random.default_rng(6), 8)
    params = {**small_params, "n_features": None, "batch_size": 2}
    params.pop("n_features")
    serial = PatchCoreDetector(**params, coreset_size=0.5).fit(X)
    parallel = PatchCoreDetector(**params, coreset_size=0.5, n_jobs=2).fit(X)
    np.testing.assert_allclose(parallel.train_scores_, serial.train_scores_, rtol=1e-5)
