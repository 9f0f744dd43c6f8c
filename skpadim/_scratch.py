"""Scratch buffers reused from one batch to the next while scoring.

A scoring loop makes the same large temporaries for every batch: the
(h, w, n, d) embedding and the (h * w, n, d) whitened product are 40 MB each
for 32 images at PaDiM's default sizes. On the CPU a fresh tensor that large
comes straight from the operating system, zero-filled page by page, and the
page faults cost about a third of the matrix product that fills it. Inside
:func:`reuse_buffers` the loop gets the same memory back instead; outside it
(fitting, where a batch's embedding is kept in the cache) every call returns a
new tensor, so nothing can be overwritten behind a caller's back.

The buffers belong to the ``with`` block of one thread (a ``ContextVar``), so
threads scoring in parallel never share one, and they are freed when the
block ends.
"""

from __future__ import annotations

import contextlib
import math
from contextvars import ContextVar

import torch

_BUFFERS: ContextVar[dict | None] = ContextVar("skpadim_scratch", default=None)


@contextlib.contextmanager
def reuse_buffers():
    """Let :func:`scratch` hand back the same memory within this block.

    Only for loops that are done with a batch's temporaries before they ask
    for the next batch's. A block inside another joins it: its buffers then
    live as long as the outer block's (give them names of their own).
    """
    if _BUFFERS.get() is not None:
        yield
        return
    token = _BUFFERS.set({})
    try:
        yield
    finally:
        _BUFFERS.reset(token)


def scratch(name, shape, *, dtype=torch.float32, device="cpu"):
    """An uninitialised tensor of ``shape``, reused within :func:`reuse_buffers`.

    Parameters
    ----------
    name : str
        What the buffer is for: two temporaries alive at once need two names.
    shape : tuple of int
        The shape wanted.
    dtype : torch.dtype, default=torch.float32
    device : str or torch.device, default="cpu"

    Returns
    -------
    tensor of ``shape``, contiguous, with arbitrary contents
    """
    buffers = _BUFFERS.get()
    if buffers is None:
        return torch.empty(shape, dtype=dtype, device=device)
    numel = math.prod(shape)
    key = (name, dtype, torch.device(device))
    buffer = buffers.get(key)
    if buffer is None or buffer.numel() < numel:
        buffer = buffers[key] = torch.empty(numel, dtype=dtype, device=device)
    return buffer[:numel].view(shape)
