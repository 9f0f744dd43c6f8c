"""Map post-processing against scipy."""

import numpy as np
import pytest
import torch
from scipy import ndimage

from skpadim._maps import distances_to_maps, gaussian_blur, image_scores


@pytest.mark.parametrize("shape", [(40, 56), (5, 7), (1, 30)])
@pytest.mark.parametrize("sigma", [4.0, 1.5])
def test_gaussian_blur_matches_scipy(shape, sigma):
    maps = np.random.default_rng(0).normal(size=(2, *shape))
    ours = gaussian_blur(torch.from_numpy(maps), sigma).numpy()
    expected = np.stack([ndimage.gaussian_filter(m, sigma=sigma) for m in maps])
    np.testing.assert_allclose(ours, expected, rtol=1e-10, atol=1e-12)


def test_sigma_zero_is_identity_and_maps_have_frame_size():
    d = torch.rand(3, 8, 6)
    assert torch.equal(gaussian_blur(d, 0), d)
    maps = distances_to_maps(d, (32, 24), sigma=0)
    assert maps.shape == (3, 32, 24)
    # Bilinear upsampling of a constant stays constant; max is preserved order.
    const = distances_to_maps(torch.full((1, 4, 4), 2.5), (16, 16), sigma=4)
    np.testing.assert_allclose(const.numpy(), 2.5, rtol=1e-6)


def test_image_score_is_map_maximum():
    maps = torch.rand(4, 10, 10)
    np.testing.assert_array_equal(image_scores(maps), maps.flatten(1).max(1).values)


@pytest.mark.parametrize(
    "sizes", [((14, 9), (56, 36)), ((16, 16), (64, 64)), ((3, 2), (5, 7))]
)
@pytest.mark.parametrize("sigma", [4.0, 0.0])
def test_matrix_maps_equal_upsampling_then_blurring(sizes, sigma):
    (h, w), frame = sizes
    d = torch.rand(3, h, w, dtype=torch.float64)
    up = torch.nn.functional.interpolate(
        d[:, None], size=frame, mode="bilinear", align_corners=False
    )[:, 0]
    expected = np.stack([ndimage.gaussian_filter(m, sigma) for m in up.numpy()])
    np.testing.assert_allclose(distances_to_maps(d, frame, sigma), expected, atol=1e-12)
