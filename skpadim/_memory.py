"""Memory guard: refuse a fit whose statistics cannot fit, before it starts."""

from __future__ import annotations

import math
import os

import torch

# Per position and pair of features: the float64 scatter accumulated while
# fitting plus the float32 whitening factor made from it.
BYTES_PER_ENTRY = 8 + 4


def statistics_nbytes(n_positions, n_features):
    """Bytes of the per-position statistics (scatter + whitening factor)."""
    return n_positions * n_features**2 * BYTES_PER_ENTRY


def available_memory(device):
    """Free bytes on ``device``, or None when it cannot be told."""
    device = torch.device(device)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def check_statistics_memory(frame_shape, stride, n_features, device):
    """Raise a ValueError, with the numbers and the ways out, if the fit cannot fit.

    Parameters
    ----------
    frame_shape : (int, int)
        (height, width) of the preprocessed images.
    stride : int
        Stride of the finest tapped layer (the patch grid spacing).
    n_features : int
        Embedding dimensions kept.
    device : torch.device
        Where the statistics live.
    """
    grid = (math.ceil(frame_shape[0] / stride), math.ceil(frame_shape[1] / stride))
    needed = statistics_nbytes(grid[0] * grid[1], n_features)
    free = available_memory(device)
    if free is None or needed <= free:
        return needed
    gib = 2**30
    smaller = max(1, int(n_features * math.sqrt(free / needed) * 0.9))
    raise ValueError(
        f"Fitting needs about {needed / gib:.1f} GiB for the per-position statistics "
        f"({grid[0]}x{grid[1]} positions x {n_features}^2 features x "
        f"{BYTES_PER_ENTRY} bytes) but only {free / gib:.1f} GiB are free on "
        f"{device}. Reduce n_features (about {smaller} would fit), reduce "
        "image_size or crop_size, or tap coarser layers."
    )
