"""PadimDetector's epsilon reaches its Gaussians: distances against numpy."""

import numpy as np
import pytest

from skpadim import PadimDetector

from conftest import smooth_texture
from test_gaussian import reference_mahalanobis, reference_moments


@pytest.mark.parametrize("epsilon", [0.5, 3.0])
def test_epsilon_regularises_every_covariance(small_params, epsilon):
    X = smooth_texture(np.random.default_rng(7), 10)
    test = smooth_texture(np.random.default_rng(8), 2)
    params = {**small_params, "n_features": 6}
    det = PadimDetector(**params, epsilon=epsilon).fit(X)
    train = det.feature_extractor_.transform(X).astype(np.float64)
    means, covs = reference_moments(train)
    embedded = det.feature_extractor_.transform(test)
    expected = reference_mahalanobis(embedded.astype(np.float64), means, covs, epsilon)
    np.testing.assert_allclose(
        det.gaussian_.mahalanobis(embedded), expected, rtol=2e-4, atol=1e-5
    )
