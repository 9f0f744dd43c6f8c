"""Map-reduce over contiguous chunks of images, locally or on a Dask cluster.

Fitting and scoring are embarrassingly parallel over images: each job runs the
backbone on its own chunk and hands back a small partial result (moments, a
sub-sampled patch bank, scores), merged here. Going through
``joblib.Parallel`` means ``joblib.parallel_config(backend="dask")`` sends the
jobs to a Dask cluster with no code of ours involved.
"""

from __future__ import annotations

from contextlib import contextmanager

import numpy as np
import torch
from joblib import Parallel, delayed, effective_n_jobs


def map_chunks(job, images, *args, n_jobs=None, **kwargs):
    """Run ``job(chunk, *args, n_threads=..., start=..., **kwargs)`` over chunks.

    Parameters
    ----------
    job : callable
        A module-level function (so that worker processes can import it).
    images : ImageSet
        The images, cut into ``n_jobs`` contiguous chunks.
    *args, **kwargs
        Passed to every call, with ``n_threads`` (torch threads for the job, or
        None to leave them) and ``start`` (the chunk's first index in
        ``images``).
    n_jobs : int or None
        As in scikit-learn; 1 (or a single image) runs ``job`` once, here, on
        all images with ``n_threads=None``.

    Returns
    -------
    results : list
        One result per chunk, in input order.
    """
    n_jobs_ = effective_n_jobs(n_jobs)
    if n_jobs_ == 1 or len(images) < 2:
        return [job(images, *args, n_threads=None, start=0, **kwargs)]
    chunks = chunk_indices(len(images), n_jobs_)
    # Share the cores between the jobs instead of oversubscribing them.
    threads = max(1, torch.get_num_threads() // n_jobs_)
    return Parallel(n_jobs=n_jobs)(
        delayed(job)(
            images.subset(chunk),
            *args,
            n_threads=threads,
            start=int(chunk[0]),
            **kwargs,
        )
        for chunk in chunks
    )


def chunk_indices(n_samples, n_chunks):
    """Contiguous index arrays splitting ``range(n_samples)`` into ``n_chunks``."""
    return np.array_split(np.arange(n_samples), min(n_chunks, n_samples))


def tree_reduce(parts, merge):
    """Merge partial results as a balanced binary tree (fewer, evener merges).

    Parameters
    ----------
    parts : list
        At least one partial result.
    merge : callable
        ``merge(a, b)`` -> the result of both; need not be commutative (order
        is kept).

    Returns
    -------
    result
        The merge of all parts.
    """
    parts = list(parts)
    while len(parts) > 1:
        merged = [merge(a, b) for a, b in zip(parts[::2], parts[1::2])]
        parts = merged + ([parts[-1]] if len(parts) % 2 else [])
    return parts[0]


@contextmanager
def torch_threads(n_threads):
    """Temporarily set torch's intra-op thread count (None: leave it)."""
    if n_threads is None:
        yield
        return
    previous = torch.get_num_threads()
    torch.set_num_threads(n_threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)
