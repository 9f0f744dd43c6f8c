"""Memory guard: refuse a fit that cannot fit, before any network is built."""

from __future__ import annotations

import os

import torch

GIB = 2**30


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


def check_fit_memory(needed, device, *, what, advice):
    """Raise a ValueError with the numbers and the ways out if ``needed`` won't fit.

    Parameters
    ----------
    needed : int
        Bytes the fit will allocate at its peak.
    device : torch.device
        Where they are allocated.
    what : str
        What the bytes are, for the message (e.g. "the per-position statistics
        (56x56 positions x 100^2 features x 12 bytes)").
    advice : str
        What the user can change, for the message.

    Returns
    -------
    needed : int
        The bytes, unchanged, when they fit (or free memory is unknown).
    """
    free = available_memory(device)
    if free is None or needed <= free:
        return needed
    raise ValueError(
        f"Fitting needs about {needed / GIB:.1f} GiB for {what} but only "
        f"{free / GIB:.1f} GiB are free on {device}. {advice}"
    )
