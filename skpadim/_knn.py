"""Exact brute-force nearest neighbours in bounded memory (PatchCore, SPADE).

The distances are found block by block with the ``|q|² + |b|² - 2 q·b``
matrix-product form, which is fast and exportable (``torch.cdist`` is not
ONNX-exportable), but loses precision when two points are close compared with
their norms. So the blocks only *propose* a few more candidates than asked for;
the candidates' distances are then recomputed directly as ``||q - b||`` and
re-ranked, which makes the returned distances exact to float32 rounding.

On CPUs that multiply bfloat16 natively (AVX512-BF16, AMX) the products run
in bfloat16, about 3.5 times faster than in float32, and the proposal is
*verified*: each approximate value is lowered by a rounding-error bound of its
own, and a row is kept only if no entry left out can then be as near as the
last neighbour kept. The few rows that fail are proposed again in float32, as
everywhere else. A verified row has the neighbours the float32 proposal finds,
with the same exact distances.
"""

from __future__ import annotations

import numbers

import torch

from ._scratch import reuse_buffers, scratch

# Size of one block of approximate distances when ``chunk_size`` is None. The
# temporaries around it (the centred bank rows, a boolean mask) add at most
# about as much again, whatever the number of queries and bank entries.
_BLOCK_BYTES = 64 * 2**20

# Candidates proposed beyond ``n_neighbors`` for the exact re-ranking, by
# precision of the proposal: close calls that the matrix-product form may get
# wrong are resolved among these. With patch features (PatchCore's resnet18
# bank of 4704 x 384), 16 bfloat16 candidates verify for 99 % of the queries.
_MARGIN = {torch.float32: 8, torch.bfloat16: 15}

# Query rows re-ranked at once: their gathered candidates (16 x 384 floats a
# row for PatchCore) stay in the CPU's cache for the subtraction and the norm.
_RERANK_ROWS = 64

# Unit roundoff of float32, for the error bounds.
_U32 = 2.0**-24


def _screening_dtype(device):
    """bfloat16 for the proposals on CPUs that multiply it natively."""
    if device.type != "cpu":
        return torch.float32
    native = getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)
    amx = getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    return torch.bfloat16 if native() or amx() else torch.float32


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
    screening = _screening_dtype(queries.device)
    n_candidates = min(n_bank, n_neighbors + _MARGIN[screening])
    q_rows, b_rows = _block_rows(
        n_queries, n_bank, bank.shape[1], n_candidates, chunk_size
    )
    with torch.no_grad(), reuse_buffers():
        # Centring on the bank mean shrinks the norms, hence the rounding error
        # of the matrix-product form; distances do not change.
        centre = bank.mean(dim=0, dtype=torch.float32)
        search = _Search(bank, centre, bank_groups, n_neighbors, b_rows)
        for start in range(0, n_queries, q_rows):
            rows = slice(start, min(start + q_rows, n_queries))
            groups = None if query_groups is None else query_groups[rows]
            distances[rows], indices[rows] = search(queries[rows], groups, screening)
    return distances, indices


class _Search:
    """Propose and re-rank; with bfloat16 proposals, verify and redo the rows
    that fail in float32."""

    def __init__(self, bank, centre, bank_groups, n_neighbors, b_rows):
        self.bank, self.centre, self.bank_groups = bank, centre, bank_groups
        self.n_neighbors, self.b_rows = n_neighbors, b_rows

    def __call__(self, queries, groups, screening):
        n_candidates = min(self.bank.shape[0], self.n_neighbors + _MARGIN[screening])
        centred = queries.float() - self.centre
        slack = None
        if screening != torch.float32:
            q_norm = torch.linalg.vector_norm(centred, dim=1)
            slack = _product_error(q_norm, centred.shape[1], screening)
        candidates, last = _propose(
            centred,
            self.bank,
            self.centre,
            groups,
            self.bank_groups,
            n_candidates,
            self.b_rows,
            slack,
        )
        distances, indices = _rerank(
            queries, self.bank, candidates, groups, self.bank_groups, self.n_neighbors
        )
        if slack is None:  # float32 proposals are taken as they are
            return distances, indices
        unsure = ~_verified(distances[:, -1], q_norm, last, self.bank.shape[1])
        if unsure.any():
            rows = torch.nonzero(unsure).flatten()
            part = None if groups is None else groups[rows]
            redone = self(queries[rows], part, torch.float32)
            distances[rows], indices[rows] = redone
        return distances, indices


def _product_error(q_norm, n_features, dtype):
    """Per query, the factor k such that the approximate ``|b|² - 2 q·b``
    (centred) is within ``k |b|`` of the exact value for every bank row b.

    With inputs rounded to ``dtype`` (unit roundoff u), products summed in
    float32 and the result rounded to ``dtype``, ``|s̃ - q·b| <= (3u + u² +
    K u32)|q||b|`` (Higham's bound for dot products, with Cauchy-Schwarz),
    here rounded up to ``4u + 2K u32`` and doubled for the factor 2.
    """
    unit = torch.finfo(dtype).eps / 2
    return 2 * (4 * unit + 2 * n_features * _U32) * q_norm


def _verified(kth, q_norm, last, n_features):
    """Rows whose proposal provably held all of the nearest entries.

    Every entry left out has a lower bound (approximate value less its error
    bound, see :func:`_propose`) of at least ``last``, the largest among the
    candidates; it cannot compete when that exceeds the exact value of the
    last neighbour kept (strictly: a tie could go to a lower index). The
    margin covers float32 rounding in |b|², in the re-ranked distance and here.
    """
    kth, q_norm, last = kth.double(), q_norm.double(), last.double()
    rounding = 8 * n_features * _U32 * (kth.square() + 4 * q_norm.square())
    return kth.square() - q_norm.square() < last - rounding


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


def _propose(
    queries, bank, centre, query_groups, bank_groups, n_candidates, b_rows, slack=None
):
    """The n_candidates nearest bank rows by approximate distance.

    ``queries`` are already centred. Bank blocks are visited in index order
    and the running selection stays ordered by (distance, index), so that
    ties go to the lowest index. Without ``slack`` the products run in
    float32. With it (the :func:`_product_error` factors of the queries) they
    run in bfloat16, and each value is lowered by its own error bound,
    ``slack * |b|``, so that it is a lower bound of the exact one: rows are
    ranked by these, and the largest kept is returned for the verification.
    Returns the candidates' indices and, per row, the largest of their values
    (infinite when nothing was left out).
    """
    best_d = best_i = None
    if slack is not None:
        queries = queries.to(torch.bfloat16)
    for start in range(0, bank.shape[0], b_rows):
        stop = min(start + b_rows, bank.shape[0])
        block = bank[start:stop].float() - centre
        # |b|² - 2 q·b: the squared distance less |q|², which is the same for
        # every entry of a row and so cannot change its ranking.
        squared_norms = block.square().sum(dim=1)
        # Reused from block to block: a fresh one would be page-faulted in
        # (zero-filled by the kernel) every time, which costs as much as the
        # bfloat16 product that fills it.
        squared = scratch("knn_values", (queries.shape[0], stop - start))
        if slack is None:
            torch.addmm(squared_norms, queries, block.T, alpha=-2, out=squared)
        else:  # bfloat16 products, float32 sums
            shape = (queries.shape[0], stop - start)
            products = scratch("knn_products", shape, dtype=torch.bfloat16)
            torch.mm(queries, block.to(torch.bfloat16).T, out=products)
            squared.copy_(products).mul_(-2).add_(squared_norms)
            squared.addr_(slack, squared_norms.sqrt(), alpha=-1)
        if query_groups is not None:
            own = query_groups[:, None] == bank_groups[None, start:stop]
            squared.masked_fill_(own, float("inf"))
        block_d, block_i = _smallest(squared, min(n_candidates, stop - start))
        best_d, best_i = _merge(best_d, best_i, block_d, block_i + start, n_candidates)
    if n_candidates == bank.shape[0]:  # nothing left out: nothing to verify
        return best_i, torch.full_like(best_d[:, -1], float("inf"))
    return best_i, best_d[:, -1]


def _merge(best_d, best_i, block_d, block_i, k):
    """The k smallest of a running selection and a later block's, in order."""
    if best_d is None:
        return block_d, block_i
    # Earlier blocks come first, so a stable sort keeps the lower index ahead
    # among equal distances.
    merged_d = torch.cat([best_d, block_d], dim=1)
    merged_i = torch.cat([best_i, block_i], dim=1)
    merged_d, order = torch.sort(merged_d, dim=1, stable=True)
    return merged_d[:, :k], merged_i.gather(1, order[:, :k])


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
    # By slices of rows, so that the gathered rows are still in cache when
    # they are subtracted from and reduced.
    exact = torch.empty(candidates.shape, device=queries.device)
    for start in range(0, candidates.shape[0], _RERANK_ROWS):
        rows = slice(start, start + _RERANK_ROWS)
        differences = bank[candidates[rows]].float()
        differences.sub_(queries[rows].float()[:, None, :])
        torch.linalg.vector_norm(differences, dim=2, out=exact[rows])
    if query_groups is not None:
        # With few eligible entries, excluded ones fill up the candidates.
        own = bank_groups[candidates] == query_groups[:, None]
        exact.masked_fill_(own, float("inf"))
    exact, candidates = _sort_pairs(exact, candidates)
    return exact[:, :n_neighbors], candidates[:, :n_neighbors]
