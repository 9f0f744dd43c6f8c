"""Greedy k-center coreset selection (PatchCore's memory-bank subsampling).

Farthest-point selection: start from a random row, then repeatedly take the
row farthest from the rows already taken. It is a 2-approximation of the
optimal k-center covering radius. One step costs one matrix-vector product
over a running vector of squared distances, never an N x N matrix. Selection
runs on a Gaussian random projection (Johnson-Lindenstrauss), which keeps the
distances, and hence the choices, nearly the same at a fraction of the cost.
"""

from __future__ import annotations

import math
import numbers

import torch
from sklearn.utils import check_random_state

from ._knn import nearest_neighbors

# Floats of input converted and projected at once: bounds the temporaries of
# the projection whatever the number of rows.
_CHUNK_FLOATS = 2**22


def k_center_greedy(x, n_samples, *, projection_dim=128, random_state=None):
    """Select rows of ``x`` by greedy k-center (farthest-point) selection.

    The first row is drawn at random and is part of the selection; each next
    row is the one with the largest distance to its nearest selected row.

    Parameters
    ----------
    x : torch.Tensor of shape (n_rows, n_features)
        Floating-point feature vectors, on any device.
    n_samples : int
        Number of rows to select. ``n_samples >= n_rows`` selects all rows.
    projection_dim : int or None, default=128
        Selection runs on a seeded Gaussian random projection of ``x`` to this
        many dimensions. None, or a value of at least ``n_features``, selects
        on ``x`` itself.
    random_state : int, RandomState instance or None, default=None
        Seeds the first row and the projection. Pass an int for reproducible
        results.

    Returns
    -------
    indices : torch.Tensor of shape (min(n_samples, n_rows),)
        Distinct int64 row indices in selection order, on the device of ``x``.

    Examples
    --------
    >>> import torch
    >>> x = torch.tensor([[0.0], [1.0], [10.0], [11.0]])
    >>> k_center_greedy(x, 2, random_state=0).sort().values.tolist() in (
    ...     [0, 2], [0, 3], [1, 2], [1, 3])
    True
    """
    _check_features(x)
    n_samples = _check_n_samples(n_samples)
    projection_dim = _check_projection_dim(projection_dim)
    n_rows, n_features = x.shape
    if n_samples >= n_rows:
        return torch.arange(n_rows, device=x.device)
    generator = _generator(random_state)
    # Drawn before the projection, so the first row depends on the seed only.
    start = torch.randint(n_rows, (1,), generator=generator).to(x.device)
    projection = None
    if projection_dim is not None and projection_dim < n_features:
        projection = _projection_matrix(n_features, projection_dim, generator)
        projection = projection.to(x.device)
    with torch.no_grad():
        return _greedy(_augmented_points(x, projection), n_samples, start)


def covering_radius(x, indices):
    """Largest distance from a row of ``x`` to its nearest selected row.

    Parameters
    ----------
    x : torch.Tensor of shape (n_rows, n_features)
        Floating-point feature vectors.
    indices : torch.Tensor of shape (n_selected,)
        Selected row indices (at least one).

    Returns
    -------
    radius : float
        ``max_i min_j ||x[i] - x[indices[j]]||``; 0.0 when ``x`` has no rows.
    """
    _check_features(x)
    indices = torch.as_tensor(indices, device=x.device)
    if indices.numel() == 0:
        raise ValueError("covering_radius needs at least one selected row.")
    if x.shape[0] == 0:
        return 0.0
    distances, _ = nearest_neighbors(x, x[indices], n_neighbors=1)
    return float(distances.max())


def _check_features(x):
    if not torch.is_tensor(x) or x.ndim != 2:
        raise ValueError("x must be a 2-D torch.Tensor.")
    if not x.is_floating_point():
        raise ValueError(f"x must be floating point, got {x.dtype}.")
    if not bool(torch.isfinite(x).all()):
        raise ValueError("x contains NaN or infinite values.")


def _check_n_samples(n_samples):
    if not isinstance(n_samples, numbers.Integral) or isinstance(n_samples, bool):
        raise ValueError(f"n_samples must be an int, got {n_samples!r}.")
    if n_samples < 1:
        raise ValueError(f"n_samples must be at least 1, got {n_samples}.")
    return int(n_samples)


def _check_projection_dim(projection_dim):
    if projection_dim is None:
        return None
    if (
        not isinstance(projection_dim, numbers.Integral)
        or isinstance(projection_dim, bool)
        or projection_dim < 1
    ):
        raise ValueError(
            f"projection_dim must be a positive int or None, got {projection_dim!r}."
        )
    return int(projection_dim)


def _generator(random_state):
    """A CPU torch.Generator seeded from ``random_state`` (global RNGs untouched)."""
    seed = check_random_state(random_state).randint(2**31 - 1)
    return torch.Generator().manual_seed(int(seed))


def _projection_matrix(n_features, projection_dim, generator):
    """Gaussian JL matrix (n_features, projection_dim), entries N(0, 1/projection_dim).

    The scale keeps squared distances unchanged in expectation; the selection
    itself would not change with any other scale.
    """
    matrix = torch.randn(n_features, projection_dim, generator=generator)
    return matrix.div_(math.sqrt(projection_dim))


def _augmented_points(x, projection):
    """Columns ``[z, |z|², 1]`` of the centred (projected) points ``z``.

    With the centre written as ``[-2c, 1, |c|²]``, one vector-matrix product
    then gives every squared distance ``|z|² - 2 z·c + |c|²`` at once. The
    points are stored one per column, shape (n_dims + 2, n_rows): the product
    then streams along contiguous rows, about 2.5x faster on CPU than with one
    point per row.
    """
    n_rows, n_features = x.shape
    width = n_features if projection is None else projection.shape[1]
    points = torch.empty((width + 2, n_rows), device=x.device)
    coords = points[:width]
    step = max(1, _CHUNK_FLOATS // max(n_features, width, 1))
    for start in range(0, n_rows, step):
        chunk = x[start : start + step].float()
        if projection is not None:
            chunk = chunk @ projection
        coords[:, start : start + step] = chunk.T
    # Centring shrinks the norms, hence the rounding error of the expanded
    # form; distances do not change.
    coords -= coords.mean(dim=1, keepdim=True)
    for start in range(0, n_rows, step):
        block = coords[:, start : start + step]
        points[width, start : start + step] = block.square().sum(dim=0)
    points[width + 1] = 1.0
    return points


def _greedy(points, n_samples, start):
    """Farthest-point selection on augmented points, from point ``start``.

    One step: a vector-matrix product for the squared distances to the newest
    centre, an in-place running minimum, an argmax. All buffers are
    preallocated and nothing is read back to Python inside the loop, so a GPU
    never waits for the host.
    """
    width, n_rows = points.shape
    dims = width - 2
    device = points.device
    selected = torch.empty(n_samples, dtype=torch.int64, device=device)
    selected[:1] = start
    min_sq = torch.full((n_rows,), float("inf"), device=device)
    sq = torch.empty(n_rows, device=device)
    column = torch.empty((width, 1), device=device)
    centre = torch.zeros(width, device=device)
    centre[dims] = 1.0
    best = torch.empty(1, device=device)
    for i in range(1, n_samples):
        newest = selected[i - 1 : i]
        torch.index_select(points, 1, newest, out=column)
        torch.mul(column[:dims, 0], -2.0, out=centre[:dims])
        centre[dims + 1 :] = column[dims, :]
        torch.mv(points.T, centre, out=sq)
        torch.minimum(min_sq, sq, out=min_sq)
        # Rounding can leave a selected point a tiny positive distance; -inf
        # makes sure it is never selected again (duplicates included).
        min_sq.index_fill_(0, newest, float("-inf"))
        torch.max(min_sq, 0, keepdim=True, out=(best, selected[i : i + 1]))
    return selected
