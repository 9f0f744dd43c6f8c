"""From patch distances to pixel anomaly maps: upsampling and Gaussian smoothing."""

from __future__ import annotations

import functools

import numpy as np
import torch
import torch.nn.functional as F


def gaussian_kernel(sigma, truncate=4.0, *, dtype=torch.float32, device="cpu"):
    """Normalised 1-D Gaussian kernel of radius ``round(truncate * sigma)``.

    The same radius and weights as :func:`scipy.ndimage.gaussian_filter`.
    """
    radius = int(truncate * sigma + 0.5)
    offsets = torch.arange(-radius, radius + 1, dtype=torch.float64)
    kernel = torch.exp(-0.5 * (offsets / sigma) ** 2)
    return (kernel / kernel.sum()).to(dtype=dtype, device=device)


def _symmetric_indices(size, radius, device):
    """Indices that pad a length-``size`` axis by ``radius`` with half-sample
    symmetric reflection (``d c b a | a b c d | d c b a``), any radius.

    This is scipy.ndimage's default "reflect" mode; torch's own "reflect" pad
    is the whole-sample variant and refuses radii larger than the axis.
    """
    positions = torch.arange(-radius, size + radius, device=device)
    period = positions.remainder(2 * size)
    return torch.where(period < size, period, 2 * size - 1 - period)


def gaussian_blur(maps, sigma, truncate=4.0):
    """Separable Gaussian smoothing of (B, H, W) maps, matching scipy's default.

    Parameters
    ----------
    maps : tensor of shape (B, H, W)
    sigma : float
        Standard deviation in pixels; 0 returns the maps unchanged.
    truncate : float, default=4.0
        The kernel is cut at ``truncate * sigma``.

    Returns
    -------
    tensor of shape (B, H, W)
    """
    if sigma == 0:
        return maps
    kernel = gaussian_kernel(sigma, truncate, dtype=maps.dtype, device=maps.device)
    radius = (len(kernel) - 1) // 2
    height, width = maps.shape[-2:]
    x = maps.unsqueeze(1)
    x = x.index_select(2, _symmetric_indices(height, radius, maps.device))
    x = F.conv2d(x, kernel.view(1, 1, -1, 1))
    x = x.index_select(3, _symmetric_indices(width, radius, maps.device))
    x = F.conv2d(x, kernel.view(1, 1, 1, -1))
    return x.squeeze(1)


def blur_matrix(size, sigma, truncate=4.0):
    """The (size, size) matrix of 1-D Gaussian smoothing with scipy's "reflect"
    boundary: ``blur_matrix(n, s) @ v`` equals ``gaussian_filter1d(v, s)``."""
    if sigma == 0:
        return torch.eye(size, dtype=torch.float64)
    kernel = gaussian_kernel(sigma, truncate, dtype=torch.float64)
    radius = (len(kernel) - 1) // 2
    sources = _symmetric_indices(size, radius, "cpu")
    rows = torch.arange(size)
    matrix = torch.zeros(size, size, dtype=torch.float64)
    for tap, weight in enumerate(kernel):
        # Reflected taps can land on the same pixel: accumulate, don't overwrite.
        matrix.index_put_(
            (rows, sources[rows + tap]), weight.expand(size), accumulate=True
        )
    return matrix


def upsampling_matrix(size_in, size_out):
    """The (size_out, size_in) matrix of 1-D linear interpolation with
    half-pixel centres, as ``F.interpolate(..., align_corners=False)``."""
    eye = torch.eye(size_in, dtype=torch.float64).unsqueeze(0)
    return F.interpolate(eye, size=size_out, mode="linear", align_corners=False)[0].T


@functools.lru_cache(maxsize=64)
def _axis_operator(size_in, size_out, sigma, device, dtype):
    operator = blur_matrix(size_out, sigma) @ upsampling_matrix(size_in, size_out)
    return operator.to(device=device, dtype=dtype)


def distances_to_maps(distances, frame_shape, sigma):
    """Upsample patch distances to the image frame and smooth them.

    Bilinear upsampling and Gaussian smoothing are both linear and separable,
    so each axis is done by one precomputed (out, in) matrix, ``A_y D A_x^T``:
    exactly the same numbers as upsampling then blurring, at a small fraction
    of the cost of a 33-tap convolution over the full-size map.

    Parameters
    ----------
    distances : tensor of shape (B, h, w)
        Mahalanobis distance of each patch.
    frame_shape : (int, int)
        (H, W) of the preprocessed image the backbone saw.
    sigma : float
        Gaussian smoothing in frame pixels (PaDiM: 4), truncated at 4 sigma,
        with scipy's default "reflect" boundary.

    Returns
    -------
    tensor of shape (B, H, W)
    """
    (h, w), (height, width) = distances.shape[-2:], frame_shape
    key = (float(sigma), distances.device, distances.dtype)
    rows = _axis_operator(h, height, *key)
    cols = _axis_operator(w, width, *key)
    return rows @ distances @ cols.T


# The name used by the family's heads, which score patches by other means
# than a distance (a log-likelihood, a kNN distance).
patch_scores_to_maps = distances_to_maps


def to_input_frames(preprocessing, shapes, maps):
    """Resample model-frame maps onto each input image's pixel grid.

    Parameters
    ----------
    preprocessing : Preprocessing
        The fitted resize / crop.
    shapes : list of (int, int)
        (H, W) of each image as passed in.
    maps : ndarray of shape (n, h, w)
        Model-frame maps.

    Returns
    -------
    ndarray of shape (n, H, W), or a list of arrays when sizes differ
        NaN outside an analysed centre crop.
    """
    out = [
        preprocessing.to_input_frame(torch.from_numpy(m[None]), shape)[0].numpy()
        for m, shape in zip(maps, shapes)
    ]
    if len({o.shape for o in out}) == 1:
        return np.stack(out)
    return out


def image_scores(maps):
    """Image anomaly score: the maximum of each map (B, H, W) -> (B,)."""
    return maps.flatten(1).amax(dim=1)
