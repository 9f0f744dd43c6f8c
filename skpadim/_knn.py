"""Exact brute-force nearest neighbours in bounded memory (PatchCore, SPADE).

The distances are found block by block with the ``|q|² + |b|² - 2 q·b``
matrix-product form, which is fast and exportable (``torch.cdist`` is not
ONNX-exportable), but loses precision when two points are close compared with
their norms. So the blocks only *propose* a few more candidates than asked for;
the candidates' distances are then recomputed directly as ``||q - b||`` and
re-ranked, which makes the returned distances exact to float32 rounding.
"""

from __future__ import annotations

import numbers

import torch

# Size of one block of approximate distances when ``chunk_size`` is None. The
# temporaries around it (the centred bank rows, a boolean mask) add at most
# about as much again, whatever the number of queries and bank entries.
_BLOCK_BYTES = 64 * 2**20

# Candidates proposed beyond ``n_neighbors`` for the exact re-ranking: close
# calls that the matrix-product form gets wrong are resolved among these.
_MARGIN = 8


def nearest_neighbors(
    queries,
    bank,
    *,
    n_neighbors=1,
    query_groups=None,
    bank_groups=None,
    chunk_size=None,
):
    """Find the ``n_neighbors`` nearest bank entries of each query, exactly.

    Brute force in blocks, so that memory stays bounded whatever the numbers
    of queries and bank entries (a bank of millions of entries is fine).

    Parameters
    ----------
    queries : torch.Tensor of shape (n_queries, n_features)
        Floating-point query vectors, on any device.
    bank : torch.Tensor of shape (n_bank, n_features)
        Floating-point bank vectors, on the device of ``queries``.
    n_neighbors : int, default=1
        Number of neighbours per query; at most ``n_bank``.
    query_groups : torch.Tensor of shape (n_queries,), default=None
        Integer group of each query (e.g. its training image). Given together
        with ``bank_groups``, a bank entry of the query's own group is never
        returned, so that training patches are scored honestly.
    bank_groups : torch.Tensor of shape (n_bank,), default=None
        Integer group of each bank entry.
    chunk_size : int, default=None
        Number of query rows, and of bank rows, compared at once: memory is
        then about ``chunk_size**2`` floats. None chooses blocks of about
        64 MiB of float32 distances.

    Returns
    -------
    distances : torch.Tensor of shape (n_queries, n_neighbors)
        Euclidean (not squared) distances, float32, ascending along each row.
    indices : torch.Tensor of shape (n_queries, n_neighbors)
        int64 row indices into ``bank``. Among entries at exactly the same
        distance, the lowest index comes first.

    Raises
    ------
    ValueError
        If ``n_neighbors`` exceeds the number of bank entries, or, with
        groups, the number of bank entries outside some query's group.

    Examples
    --------
    >>> import torch
    >>> bank = torch.tensor([[0.0, 0.0], [3.0, 4.0], [1.0, 0.0]])
    >>> distances, indices = nearest_neighbors(torch.tensor([[0.0, 1.0]]), bank)
    >>> distances, indices
    (tensor([[1.]]), tensor([[0]]))
    """
    _check_pair(queries, bank)
    n_queries, n_bank = queries.shape[0], bank.shape[0]
    _check_n_neighbors(n_neighbors, n_bank)
    query_groups, bank_groups = _check_groups(query_groups, bank_groups, queries, bank)
    distances = torch.empty((n_queries, n_neighbors), device=queries.device)
    indices = torch.empty(
        (n_queries, n_neighbors), dtype=torch.int64, device=queries.device
    )
    if n_queries == 0:
        return distances, indices
    if query_groups is not None:
        _check_eligible(query_groups, bank_groups, n_neighbors)
    n_candidates = min(n_bank, n_neighbors + _MARGIN)
    q_rows, b_rows = _block_rows(
        n_queries, n_bank, bank.shape[1], n_candidates, chunk_size
    )
    with torch.no_grad():
        # Centring on the bank mean shrinks the norms, hence the rounding error
        # of the matrix-product form; distances do not change.
        centre = bank.mean(dim=0, dtype=torch.float32)
        for start in range(0, n_queries, q_rows):
            rows = slice(start, min(start + q_rows, n_queries))
            groups = None if query_groups is None else query_groups[rows]
            candidates = _propose(
                queries[rows].float() - centre,
                bank,
                centre,
                groups,
                bank_groups,
                n_candidates,
                b_rows,
            )
            distances[rows], indices[rows] = _rerank(
                queries[rows], bank, candidates, groups, bank_groups, n_neighbors
            )
    return distances, indices


def _check_pair(queries, bank):
    """Check that queries and bank are finite 2-D float tensors that match."""
    for name, value in (("queries", queries), ("bank", bank)):
        if not torch.is_tensor(value) or value.ndim != 2:
            raise ValueError(f"{name} must be a 2-D torch.Tensor.")
        if not value.is_floating_point():
            raise ValueError(f"{name} must be floating point, got {value.dtype}.")
        if not bool(torch.isfinite(value).all()):
            raise ValueError(f"{name} contains NaN or infinite values.")
    if queries.shape[1] != bank.shape[1]:
        raise ValueError(
            f"queries have {queries.shape[1]} features but the bank has "
            f"{bank.shape[1]}."
        )
    if queries.device != bank.device:
        raise ValueError(
            f"queries are on {queries.device} but the bank is on {bank.device}."
        )


def _check_n_neighbors(n_neighbors, n_bank):
    if not isinstance(n_neighbors, numbers.Integral) or isinstance(n_neighbors, bool):
        raise ValueError(f"n_neighbors must be an int, got {n_neighbors!r}.")
    if n_neighbors < 1:
        raise ValueError(f"n_neighbors must be at least 1, got {n_neighbors}.")
    if n_neighbors > n_bank:
        raise ValueError(
            f"n_neighbors={n_neighbors} is greater than the number of bank "
            f"entries ({n_bank})."
        )


def _check_groups(query_groups, bank_groups, queries, bank):
    """Return both group tensors on the queries' device, or both None."""
    if query_groups is None and bank_groups is None:
        return None, None
    if query_groups is None or bank_groups is None:
        raise ValueError("Give both query_groups and bank_groups, or neither.")
    checked = []
    for name, groups, points in (
        ("query_groups", query_groups, queries),
        ("bank_groups", bank_groups, bank),
    ):
        groups = torch.as_tensor(groups, device=queries.device)
        if (
            groups.is_floating_point()
            or groups.is_complex()
            or groups.dtype == torch.bool
        ):
            raise ValueError(f"{name} must hold integers, got {groups.dtype}.")
        if groups.shape != (points.shape[0],):
            raise ValueError(
                f"{name} must have shape ({points.shape[0]},), got "
                f"{tuple(groups.shape)}."
            )
        checked.append(groups)
    return tuple(checked)


def _check_eligible(query_groups, bank_groups, n_neighbors):
    """Raise if some query has fewer than n_neighbors entries outside its group."""
    ordered = torch.sort(bank_groups).values
    own = torch.searchsorted(ordered, query_groups, right=True) - torch.searchsorted(
        ordered, query_groups
    )
    eligible = bank_groups.shape[0] - own
    short = torch.nonzero(eligible < n_neighbors).flatten()
    if short.numel():
        i = int(short[0])
        raise ValueError(
            f"Query {i} (group {int(query_groups[i])}) has only {int(eligible[i])} "
            f"bank entries outside its own group, fewer than "
            f"n_neighbors={n_neighbors}."
        )


def _block_rows(n_queries, n_bank, n_features, n_candidates, chunk_size):
    """Rows of queries and of bank per block."""
    if chunk_size is not None:
        if not isinstance(chunk_size, numbers.Integral) or chunk_size < 1:
            raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}.")
        return min(chunk_size, n_queries), min(chunk_size, n_bank)
    budget = _BLOCK_BYTES // 4
    # About a thousand query rows per block keeps the matrix product efficient;
    # the bank rows fill the rest of the budget (their centred copy included).
    b_rows = min(n_bank, max(1, budget // (1024 + n_features)))
    # The exact re-ranking holds n_candidates differences per query row.
    per_query = b_rows + (n_candidates + 1) * n_features
    q_rows = min(n_queries, max(1, budget // per_query))
    return q_rows, b_rows


def _propose(queries, bank, centre, query_groups, bank_groups, n_candidates, b_rows):
    """Indices of the n_candidates nearest bank rows by approximate distance.

    ``queries`` are already centred. Bank blocks are visited in index order
    and the running selection stays ordered by (distance, index), so that
    ties go to the lowest index.
    """
    best_d = best_i = None
    for start in range(0, bank.shape[0], b_rows):
        stop = min(start + b_rows, bank.shape[0])
        block = bank[start:stop].float() - centre
        # |b|² - 2 q·b: the squared distance less |q|², which is the same for
        # every entry of a row and so cannot change its ranking.
        squared = torch.addmm(block.square().sum(dim=1), queries, block.T, alpha=-2)
        if query_groups is not None:
            own = query_groups[:, None] == bank_groups[None, start:stop]
            squared.masked_fill_(own, float("inf"))
        block_d, block_i = _smallest(squared, min(n_candidates, stop - start))
        block_i += start
        if best_d is None:
            best_d, best_i = block_d, block_i
            continue
        # Earlier blocks come first, so a stable sort keeps the lower index
        # ahead among equal distances.
        merged_d = torch.cat([best_d, block_d], dim=1)
        merged_i = torch.cat([best_i, block_i], dim=1)
        merged_d, order = torch.sort(merged_d, dim=1, stable=True)
        best_d = merged_d[:, :n_candidates]
        best_i = merged_i.gather(1, order[:, :n_candidates])
    return best_i


def _smallest(values, k):
    """The k smallest of each row, ordered by (value, column), ties to low columns."""
    if k == values.shape[1]:
        return _sort_pairs(*torch.sort(values, dim=1))
    # One more than asked: topk breaks ties arbitrarily, so where the k-th
    # value equals the (k+1)-th, a tied column may have been left out; redo
    # those rows with a stable sort. Infinite values (excluded entries) never
    # end up among the neighbours, so skip them.
    found, columns = torch.topk(values, k + 1, dim=1, largest=False)
    kth = found[:, k - 1]
    crowded = (found[:, k] == kth) & torch.isfinite(kth)
    found, columns = found[:, :k], columns[:, :k]
    rows = torch.nonzero(crowded).flatten()
    if rows.numel():
        redone, order = torch.sort(values[rows], dim=1, stable=True)
        found[rows], columns[rows] = redone[:, :k], order[:, :k]
    return _sort_pairs(found, columns)


def _sort_pairs(values, indices):
    """Sort each row by value, ties by index (sort by index, then stably by value)."""
    indices, order = torch.sort(indices, dim=1)
    values = values.gather(1, order)
    values, order = torch.sort(values, dim=1, stable=True)
    return values, indices.gather(1, order)


def _rerank(queries, bank, candidates, query_groups, bank_groups, n_neighbors):
    """Exact distances to the candidates, the n_neighbors nearest first."""
    # The direct difference keeps the precision the matrix-product form lost.
    differences = bank[candidates].float() - queries.float()[:, None, :]
    exact = torch.linalg.vector_norm(differences, dim=2)
    if query_groups is not None:
        # With few eligible entries, excluded ones fill up the candidates.
        own = bank_groups[candidates] == query_groups[:, None]
        exact.masked_fill_(own, float("inf"))
    exact, candidates = _sort_pairs(exact, candidates)
    return exact[:, :n_neighbors], candidates[:, :n_neighbors]
