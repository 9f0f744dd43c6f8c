"""Blur radius: round(truncate * sigma), as scipy, also when it is not whole."""

import numpy as np
import pytest
import torch
from scipy import ndimage

from skpadim._maps import blur_matrix, gaussian_blur


# 4 * sigma = 4.8, 2.8, 9.2: rounding and truncation give different radii.
@pytest.mark.parametrize("sigma", [1.2, 0.7, 2.3])
def test_blur_matches_scipy_for_fractional_radii(sigma):
    maps = np.random.default_rng(1).normal(size=(2, 23, 31))
    ours = gaussian_blur(torch.from_numpy(maps), sigma).numpy()
    expected = np.stack([ndimage.gaussian_filter(m, sigma=sigma) for m in maps])
    np.testing.assert_allclose(ours, expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("sigma", [1.2, 0.7])
def test_blur_matrix_matches_scipy_for_fractional_radii(sigma):
    v = np.random.default_rng(2).normal(size=17)
    ours = blur_matrix(17, sigma).numpy() @ v
    np.testing.assert_allclose(
        ours, ndimage.gaussian_filter1d(v, sigma), rtol=1e-10, atol=1e-12
    )
