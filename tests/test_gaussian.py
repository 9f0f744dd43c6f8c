"""PatchGaussian and PatchMoments against straightforward numpy references."""

import pickle

import numpy as np
import pytest
import torch

from skpadim import PatchGaussian, PatchMoments
from skpadim._gaussian import leave_one_out, positions_first, whitening_factors


def reference_moments(X):
    """Per-position mean and np.cov of (n, d, h, w) data, position-major."""
    n, d = X.shape[:2]
    per_position = X.reshape(n, d, -1).transpose(2, 0, 1)  # (P, n, d)
    means = per_position.mean(axis=1)
    covs = np.stack([np.cov(p, rowvar=False) for p in per_position])
    return means, covs


def reference_mahalanobis(X, means, covs, epsilon):
    """Distances with an explicit inverse per position, one at a time."""
    n, d = X.shape[:2]
    per_position = X.reshape(n, d, -1).transpose(2, 0, 1)
    out = np.empty((per_position.shape[0], n))
    for p, (x, mu, cov) in enumerate(zip(per_position, means, covs)):
        precision = np.linalg.inv(cov + epsilon * np.eye(d))
        diff = x - mu
        out[p] = np.sqrt(np.einsum("nd,de,ne->n", diff, precision, diff))
    return out.T.reshape((n,) + X.shape[2:])


def assert_rel_close(actual, desired, rtol):
    scale = np.abs(desired).max()
    np.testing.assert_allclose(actual, desired, rtol=0, atol=rtol * scale)


@pytest.mark.parametrize("offset", [0.0, 1e6])
def test_streaming_moments_match_numpy_cov(offset):
    rng = np.random.default_rng(0)
    X = offset + rng.normal(size=(37, 5, 3, 4)) * rng.uniform(0.5, 2, size=(1, 5, 1, 1))
    means, covs = reference_moments(X)
    moments = PatchMoments.empty(12, 5)
    for chunk in np.split(X, [1, 4, 5, 20, 36]):  # uneven, including size 1
        moments.update(positions_first(torch.from_numpy(chunk)))
    assert moments.count == 37
    assert_rel_close(moments.mean.numpy(), means, 1e-12)
    # Relative to the covariance's own scale: the offset must not cost digits.
    assert_rel_close(moments.scatter.numpy() / 36, covs, 1e-9)


@pytest.mark.parametrize("offset", [0.0, 300.0])
def test_float32_batches_match_numpy_cov_across_flushes(monkeypatch, offset):
    # float32 batches are summed in float32 around a reference and merged into
    # float64 every FLUSH_SAMPLES samples: a small threshold makes this data
    # cross several merges, one of them inside a batch.
    monkeypatch.setattr(PatchMoments, "FLUSH_SAMPLES", 16)
    rng = np.random.default_rng(10)
    scale = rng.uniform(0.5, 2, size=(1, 5, 1, 1))
    X = (offset + rng.normal(size=(70, 5, 3, 4)) * scale).astype(np.float32)
    means, covs = reference_moments(X.astype(np.float64))
    moments = PatchMoments.empty(12, 5)
    for chunk in np.split(X, [1, 4, 5, 20, 36, 50]):
        moments.update(positions_first(torch.from_numpy(chunk)))
    assert moments.count == 70
    assert_rel_close(moments.mean.numpy(), means, 1e-6)
    assert_rel_close(moments.scatter.numpy() / 69, covs, 1e-5)
    assert moments.mean.dtype == moments.scatter.dtype == torch.float64


def test_float32_sums_are_merged_before_pickling_and_merging():
    rng = np.random.default_rng(11)
    x = torch.from_numpy(rng.normal(size=(4, 30, 3)).astype(np.float32))
    reference = PatchMoments.from_batch(x.double())
    pending = PatchMoments.from_batch(x)  # below FLUSH_SAMPLES: nothing merged
    assert pending._pending is not None and pending.count == 30
    restored = pickle.loads(pickle.dumps(pending))
    assert restored._pending is None
    np.testing.assert_allclose(restored.scatter, reference.scatter, rtol=1e-5)
    half = PatchMoments.from_batch(x[:, :10]).merge(PatchMoments.from_batch(x[:, 10:]))
    np.testing.assert_allclose(half.scatter, reference.scatter, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(half.mean, reference.mean, rtol=1e-6, atol=1e-6)


def test_partial_fit_uneven_batches_matches_fit_and_numpy():
    rng = np.random.default_rng(1)
    X = 1e4 + rng.normal(size=(40, 6, 2, 3))
    means, covs = reference_moments(X)
    streamed = PatchGaussian()
    for chunk in np.split(X, [3, 10, 11, 33]):
        streamed.partial_fit(chunk)
    full = PatchGaussian().fit(X)
    assert streamed.n_samples_seen_ == 40
    assert_rel_close(streamed.moments_.scatter.numpy() / 39, covs, 1e-6)
    assert_rel_close(streamed.moments_.mean.numpy(), means, 1e-6)
    np.testing.assert_allclose(
        streamed.whitening_, full.whitening_, rtol=1e-5, atol=1e-6
    )


@pytest.mark.parametrize("split", [[1], [5, 6], [2, 17, 18]])
def test_merge_of_any_split_equals_whole(split):
    rng = np.random.default_rng(2)
    x = torch.from_numpy(rng.normal(size=(4, 20, 3)) + 50)
    whole = PatchMoments.from_batch(x)
    parts = [PatchMoments.from_batch(p) for p in torch.tensor_split(x, split, dim=1)]
    merged = parts[0]
    for part in parts[1:]:
        merged = merged.merge(part)
    assert merged.count == whole.count
    np.testing.assert_allclose(merged.mean, whole.mean, rtol=1e-12)
    np.testing.assert_allclose(merged.scatter, whole.scatter, rtol=1e-9, atol=1e-9)


def test_merge_rejects_other_shapes():
    a = PatchMoments.from_batch(torch.zeros(2, 3, 4))
    b = PatchMoments.from_batch(torch.zeros(2, 3, 5))
    with pytest.raises(ValueError, match="different shapes"):
        a.merge(b)


def test_whitening_factor_whitens_the_covariance():
    rng = np.random.default_rng(3)
    moments = PatchMoments.from_batch(torch.from_numpy(rng.normal(size=(6, 30, 8))))
    w = whitening_factors(moments, 0.01, chunk_size=4).double()
    sigma = moments.covariance(0.01)
    identity = w @ sigma @ w.transpose(1, 2)
    np.testing.assert_allclose(
        identity, np.broadcast_to(np.eye(8), (6, 8, 8)), atol=1e-5
    )
    assert torch.equal(w, w.tril())


@pytest.mark.parametrize("n_samples", [5, 60])  # fewer and more samples than dims
def test_mahalanobis_matches_explicit_inverse(n_samples):
    rng = np.random.default_rng(4)
    X = rng.normal(size=(n_samples, 10, 3, 3)).astype(np.float32)
    gaussian = PatchGaussian(epsilon=0.01).fit(X)
    X_test = (rng.normal(size=(7, 10, 3, 3)) * 2).astype(np.float32)
    means, covs = reference_moments(X.astype(np.float64))
    expected = reference_mahalanobis(X_test.astype(np.float64), means, covs, 0.01)
    np.testing.assert_allclose(gaussian.mahalanobis(X_test), expected, rtol=1e-4)
    score = -expected.reshape(7, -1).max(axis=1)
    np.testing.assert_allclose(gaussian.score_samples(X_test), score, rtol=1e-4)


def test_two_d_input_is_a_single_gaussian():
    rng = np.random.default_rng(5)
    X = rng.normal(size=(300, 3))
    det = PatchGaussian(epsilon=1e-9).fit(X)
    assert det.location_.shape == (1, 3)
    # Against sklearn's own single Gaussian (it returns squared distances).
    from sklearn.covariance import EmpiricalCovariance

    reference = EmpiricalCovariance().fit(X)
    n = len(X)
    # sklearn's covariance is the biased one (divided by n, ours by n - 1).
    expected = np.sqrt(reference.mahalanobis(X) * (n - 1) / n)
    np.testing.assert_allclose(det.mahalanobis(X), expected, rtol=1e-4)
    np.testing.assert_allclose(det.score_samples(X), -expected, rtol=1e-4)


def test_the_head_has_no_threshold():
    # The detectors own contamination / offset_ / predict (EmpiricalCovariance
    # vs EllipticEnvelope).
    head = PatchGaussian().fit(np.random.default_rng(0).normal(size=(20, 2)))
    assert "contamination" not in head.get_params()
    for name in ("offset_", "predict", "decision_function"):
        assert not hasattr(head, name)


def test_pickle_stores_half_the_factor_and_scores_identically():
    rng = np.random.default_rng(6)
    X = rng.normal(size=(30, 12, 2, 2))
    det = PatchGaussian().fit(X)
    blob = pickle.dumps(det)
    assert len(blob) < det.whitening_.nbytes * 0.6 + det.location_.nbytes + 10_000
    loaded = pickle.loads(blob)
    np.testing.assert_array_equal(loaded.whitening_, det.whitening_)
    np.testing.assert_array_equal(loaded.score_samples(X), det.score_samples(X))
    assert loaded.moments_ is None
    with pytest.raises(ValueError, match="cannot continue partial_fit"):
        loaded.partial_fit(X)


@pytest.mark.parametrize("chunk_size", [None, 3])
def test_factors_are_stored_as_contiguous_transposes_also_after_loading(chunk_size):
    # Scoring multiplies by W^T: contiguous, it is a faster operand (and it is
    # the layout LAPACK leaves the factors in).
    rng = np.random.default_rng(7)
    moments = PatchMoments.from_batch(torch.from_numpy(rng.normal(size=(5, 20, 6))))
    w = whitening_factors(moments, 0.01, chunk_size=chunk_size)
    assert w.mT.is_contiguous() and torch.equal(w, w.tril())
    head = PatchGaussian().fit(rng.normal(size=(20, 6, 2, 2)))
    loaded = pickle.loads(pickle.dumps(head))
    for model in (head, loaded):
        assert model.whitening_.transpose(0, 2, 1).flags["C_CONTIGUOUS"]
    np.testing.assert_array_equal(loaded.whitening_, head.whitening_)


def test_partial_fit_rejects_other_feature_shapes():
    det = PatchGaussian().partial_fit(
        np.zeros((3, 4, 2, 2)) + np.arange(3)[:, None, None, None]
    )
    with pytest.raises(ValueError, match="expected"):
        det.partial_fit(np.zeros((3, 4, 3, 3)))


@pytest.mark.parametrize("epsilon, rtol", [(1e-9, 1e-5), (0.01, 5e-3)])
def test_leave_one_out_equals_refitting_without_the_sample(epsilon, rtol):
    rng = np.random.default_rng(7)
    X = rng.normal(size=(30, 5, 2, 2)) * rng.uniform(0.3, 2, size=(1, 5, 1, 1))
    gaussian = PatchGaussian(epsilon=epsilon).fit(X)
    in_sample = torch.from_numpy(gaussian.mahalanobis(X).astype(np.float64))
    loo = leave_one_out(in_sample, 30).numpy()
    for i in range(4):
        refit = PatchGaussian(epsilon=epsilon).fit(np.delete(X, i, axis=0))
        np.testing.assert_allclose(
            loo[i], refit.mahalanobis(X[i : i + 1])[0], rtol=rtol
        )
    assert torch.equal(leave_one_out(in_sample, 2), in_sample)


def test_empty_batch_leaves_moments_unchanged():
    moments = PatchMoments.empty(3, 4)
    moments.update(torch.zeros(3, 0, 4))
    assert moments.count == 0 and not torch.isnan(moments.mean).any()
    moments.update(torch.ones(3, 2, 4)).update(torch.zeros(3, 0, 4))
    assert moments.count == 2 and torch.equal(
        moments.mean, torch.ones(3, 4, dtype=torch.float64)
    )


@pytest.mark.parametrize(
    "factor", ["_lapack_inverse_cholesky", "_torch_inverse_cholesky"]
)
def test_both_factorisations_agree_and_refuse_singular_matrices(factor):
    from skpadim import _gaussian

    rng = np.random.default_rng(12)
    moments = PatchMoments.from_batch(torch.from_numpy(rng.normal(size=(5, 40, 6))))
    covariance = moments.covariance(0.01)
    out = torch.empty(5, 6, 6)
    assert getattr(_gaussian, factor)(covariance.clone(), out)
    expected = np.linalg.inv(np.linalg.cholesky(covariance.numpy()))
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-6)
    # Too few samples and no regulariser: singular, refused rather than NaN.
    singular = PatchMoments.from_batch(torch.from_numpy(rng.normal(size=(2, 3, 6))))
    assert not getattr(_gaussian, factor)(
        singular.covariance(0.0), torch.empty(2, 6, 6)
    )
    with pytest.raises(ValueError, match="not positive definite"):
        whitening_factors(singular, 0.0)


def test_pending_sums_never_read_their_uninitialised_buffer(monkeypatch):
    # The float32 block is allocated uninitialised and the first batch
    # overwrites it (beta=0): poison it to prove nothing of it leaks through.
    from skpadim import _moments

    init = _moments._PendingSums.__init__

    def poisoned(self, reference):
        init(self, reference)
        self.scatter.fill_(float("nan"))

    monkeypatch.setattr(_moments._PendingSums, "__init__", poisoned)
    rng = np.random.default_rng(13)
    x = rng.normal(size=(3, 20, 4)).astype(np.float32)
    moments = PatchMoments.from_batch(torch.from_numpy(x))
    expected = PatchMoments.from_batch(torch.from_numpy(x.astype(np.float64)))
    np.testing.assert_allclose(moments.scatter, expected.scatter, rtol=1e-5, atol=1e-6)
