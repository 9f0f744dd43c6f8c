"""From patch distances to pixel anomaly maps: upsampling and Gaussian smoothing."""

from __future__ import annotations

import math

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


def distances_to_maps(distances, frame_shape, sigma):
    """Upsample patch distances to the image frame and smooth them.

    Parameters
    ----------
    distances : tensor of shape (B, h, w)
        Mahalanobis distance of each patch.
    frame_shape : (int, int)
        (H, W) of the preprocessed image the backbone saw.
    sigma : float
        Gaussian smoothing in frame pixels (PaDiM: 4).

    Returns
    -------
    tensor of shape (B, H, W)
        Bilinear upsampling (half-pixel centres), then Gaussian smoothing.
    """
    maps = F.interpolate(
        distances.unsqueeze(1),
        size=tuple(frame_shape),
        mode="bilinear",
        align_corners=False,
    ).squeeze(1)
    return gaussian_blur(maps, sigma)


def image_scores(maps):
    """Image anomaly score: the maximum of each map (B, H, W) -> (B,)."""
    return maps.flatten(1).amax(dim=1)


def check_sigma(sigma):
    """Raise ValueError unless ``sigma`` is a finite float >= 0."""
    if (
        isinstance(sigma, bool)
        or not isinstance(sigma, (int, float))
        or not (math.isfinite(sigma) and sigma >= 0)
    ):
        raise ValueError(f"sigma must be a finite number >= 0; got {sigma!r}.")
