"""nearest_neighbors against a brute-force float64 reference (scipy cdist)."""

import numpy as np
import pytest
import torch
from scipy.spatial.distance import cdist

from skpadim._knn import nearest_neighbors


def reference(queries, bank, k, query_groups=None, bank_groups=None):
    """Exact float64 distances; ties to the lowest index (stable argsort)."""
    d = cdist(np.asarray(queries, np.float64), np.asarray(bank, np.float64))
    if query_groups is not None:
        own = np.asarray(query_groups)[:, None] == np.asarray(bank_groups)[None, :]
        d[own] = np.inf
    order = np.argsort(d, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(d, order, axis=1), order


@pytest.fixture(autouse=True, params=["float32", "bfloat16"])
def screening(request, monkeypatch):
    """Run every test with each precision of the proposals, whatever this CPU
    would choose (bfloat16 products are emulated where they are not native)."""
    import skpadim._knn as knn

    dtype = getattr(torch, request.param)
    monkeypatch.setattr(knn, "_screening_dtype", lambda device: dtype)
    return dtype


def tensors(rng, *shapes, scale=1.0):
    return [
        torch.tensor(scale * rng.normal(size=s), dtype=torch.float32) for s in shapes
    ]


def check(queries, bank, k, rtol=1e-5, atol=1e-6, **kwargs):
    groups = {
        key: kwargs[key] for key in ("query_groups", "bank_groups") if key in kwargs
    }
    distances, indices = nearest_neighbors(queries, bank, n_neighbors=k, **kwargs)
    assert distances.dtype == torch.float32 and indices.dtype == torch.int64
    assert distances.shape == indices.shape == (queries.shape[0], k)
    want_d, want_i = reference(
        queries.numpy(),
        bank.numpy(),
        k,
        *(g.numpy() for g in groups.values()),
    )
    np.testing.assert_array_equal(indices.numpy(), want_i)
    np.testing.assert_allclose(distances.numpy(), want_d, rtol=rtol, atol=atol)


@pytest.mark.parametrize("k", [1, 3, 7])
@pytest.mark.parametrize("chunk_size", [None, 1, 3, 4, 100])
def test_matches_brute_force(k, chunk_size):
    # M=10, K=7 with chunk_size=3 or 4 leaves remainders on both sides.
    queries, bank = tensors(np.random.default_rng(k), (10, 5), (7, 5))
    check(queries, bank, k, chunk_size=chunk_size)


def test_default_blocks_split_both_sides(monkeypatch):
    import skpadim._knn as knn

    # A budget of a few floats forces many blocks of queries and of bank rows.
    monkeypatch.setattr(knn, "_BLOCK_BYTES", 4 * 40)
    queries, bank = tensors(np.random.default_rng(0), (23, 3), (17, 3))
    assert knn._block_rows(23, 17, 3, 9, None)[1] < 17
    check(queries, bank, 4)


def test_single_bank_entry_and_single_query():
    queries, bank = tensors(np.random.default_rng(1), (1, 4), (1, 4))
    check(queries, bank, 1)
    check(queries, torch.cat([bank, bank]), 2)


def test_ties_go_to_the_lowest_index():
    # Integer grid: many exact ties, more of them than the candidate margin.
    rng = np.random.default_rng(2)
    bank = torch.tensor(rng.integers(0, 2, size=(40, 2)), dtype=torch.float32)
    queries = torch.tensor(rng.integers(0, 2, size=(9, 2)), dtype=torch.float32)
    for chunk_size in (None, 3, 7):
        check(queries, bank, 5, chunk_size=chunk_size)
    # All bank rows identical: more tied rows than candidates kept per block
    # (torch.topk itself picks arbitrary ones among ties) ...
    check(queries, torch.ones(30, 2), 2)
    check(queries, torch.ones(30, 2), 4, chunk_size=4)
    # ... and ties spread over blocks, merged in long rows.
    check(queries, torch.ones(200, 2), 60, chunk_size=50)


def test_near_duplicates_are_exact():
    # Points far from the origin on both sides (the bank mean is near zero, so
    # centring does not help), queries 1e-3 away from some of them, and close
    # rivals: |q|^2+|b|^2-2qb alone is off by ~0.1 in squared distance here.
    rng = np.random.default_rng(3)
    anchors = 1000.0 * np.sign(rng.normal(size=(6, 1))) + rng.normal(size=(6, 8))
    rivals = anchors[:, None, :] + 2e-3 * rng.normal(size=(6, 4, 8))
    bank = np.concatenate([anchors, rivals.reshape(-1, 8)])
    queries = bank[rng.integers(0, len(bank), 12)] + 1e-3 * rng.normal(size=(12, 8))
    bank = torch.tensor(bank, dtype=torch.float32)
    queries = torch.tensor(queries, dtype=torch.float32)
    # Inputs rounded to float32 first, then compared in float64: exact to
    # float32 rounding.
    check(queries, bank, 3, rtol=1e-5, atol=0)
    check(queries, bank, 1, rtol=1e-5, atol=0, chunk_size=2)


def test_distances_are_euclidean_not_squared():
    distances, indices = nearest_neighbors(
        torch.tensor([[0.0, 0.0]]),
        torch.tensor([[3.0, 4.0], [6.0, 8.0]]),
        n_neighbors=2,
    )
    assert distances.tolist() == [[5.0, 10.0]]
    assert indices.tolist() == [[0, 1]]


@pytest.mark.parametrize("chunk_size", [None, 2, 5])
def test_exclusion_groups(chunk_size):
    rng = np.random.default_rng(4)
    queries, bank = tensors(rng, (12, 3), (15, 3))
    query_groups = torch.tensor(rng.integers(0, 4, 12))
    bank_groups = torch.tensor(rng.integers(0, 4, 15))
    check(
        queries,
        bank,
        3,
        query_groups=query_groups,
        bank_groups=bank_groups,
        chunk_size=chunk_size,
    )


def test_exclusion_of_a_query_in_the_bank():
    # Training patches against their own bank: never their own image's patches.
    rng = np.random.default_rng(5)
    (points,) = tensors(rng, (20, 2))
    groups = torch.arange(20) // 5  # 4 images of 5 patches
    check(points, points, 15, query_groups=groups, bank_groups=groups)
    _, indices = nearest_neighbors(
        points, points, query_groups=groups, bank_groups=groups
    )
    assert (groups[indices[:, 0]] != groups).all()


def test_too_few_eligible_entries():
    bank = torch.zeros(5, 2)
    bank_groups = torch.tensor([0, 0, 0, 1, 1])
    with pytest.raises(
        ValueError, match=r"Query 1 \(group 0\) has only 2 .*n_neighbors=3"
    ):
        nearest_neighbors(
            torch.zeros(2, 2),
            bank,
            n_neighbors=3,
            query_groups=torch.tensor([1, 0]),
            bank_groups=bank_groups,
        )
    with pytest.raises(ValueError, match="has only 0 "):
        nearest_neighbors(
            torch.zeros(1, 2),
            bank,
            query_groups=torch.tensor([7]),
            bank_groups=torch.full((5,), 7),
        )


def test_empty_queries():
    distances, indices = nearest_neighbors(
        torch.zeros(0, 3), torch.ones(4, 3), n_neighbors=2
    )
    assert distances.shape == indices.shape == (0, 2)
    assert distances.dtype == torch.float32 and indices.dtype == torch.int64


def test_errors():
    bank = torch.zeros(3, 2)
    with pytest.raises(ValueError, match=r"n_neighbors=4 .* bank entries \(3\)"):
        nearest_neighbors(torch.zeros(1, 2), bank, n_neighbors=4)
    with pytest.raises(ValueError, match="at least 1"):
        nearest_neighbors(torch.zeros(1, 2), bank, n_neighbors=0)
    with pytest.raises(ValueError, match="features"):
        nearest_neighbors(torch.zeros(1, 3), bank)
    with pytest.raises(ValueError, match="2-D"):
        nearest_neighbors(torch.zeros(2), bank)
    with pytest.raises(ValueError, match="floating"):
        nearest_neighbors(torch.zeros(1, 2, dtype=torch.int64), bank)
    with pytest.raises(ValueError, match="NaN"):
        nearest_neighbors(torch.full((1, 2), float("nan")), bank)
    with pytest.raises(ValueError, match="both"):
        nearest_neighbors(torch.zeros(1, 2), bank, query_groups=torch.zeros(1))
    with pytest.raises(ValueError, match="shape"):
        nearest_neighbors(
            torch.zeros(1, 2),
            bank,
            query_groups=torch.zeros(2, dtype=torch.int64),
            bank_groups=torch.zeros(3, dtype=torch.int64),
        )
    with pytest.raises(ValueError, match="chunk_size"):
        nearest_neighbors(torch.zeros(1, 2), bank, chunk_size=0)


def test_float64_and_float16_inputs_give_float32():
    rng = np.random.default_rng(6)
    queries, bank = tensors(rng, (6, 3), (5, 3))
    distances, _ = nearest_neighbors(queries.double(), bank.double(), n_neighbors=2)
    assert distances.dtype == torch.float32
    check(queries.half().float(), bank.half().float(), 2)
    distances, indices = nearest_neighbors(queries.half(), bank.half(), n_neighbors=2)
    want_d, want_i = reference(
        queries.half().float().numpy(), bank.half().float().numpy(), 2
    )
    np.testing.assert_array_equal(indices.numpy(), want_i)


# --- bfloat16 proposals: verified, or redone in float32 ------------------------


@pytest.fixture
def float32_redos(monkeypatch):
    """The numbers of bfloat16-proposed rows that failed verification (and
    were therefore proposed again in float32)."""
    import skpadim._knn as knn

    counts = []
    original = knn._verified

    def spy(*args):
        verified = original(*args)
        counts.append(int((~verified).sum()))
        return verified

    monkeypatch.setattr(knn, "_verified", spy)
    return counts


def near_rivals(rng, n_queries, n_features=8):
    """Clusters far from the origin on both sides (centring cannot help), each
    with rivals 2e-3 apart, and queries 1e-3 from some of them: bfloat16
    products (8 bits) cannot rank these, float32 ones can."""
    anchors = 1000.0 * np.sign(rng.normal(size=(6, 1))) + rng.normal(
        size=(6, n_features)
    )
    rivals = anchors[:, None, :] + 2e-3 * rng.normal(size=(6, 4, n_features))
    bank = np.concatenate([anchors, rivals.reshape(-1, n_features)])
    picks = rng.integers(0, len(bank), n_queries)
    queries = bank[picks] + 1e-3 * rng.normal(size=(n_queries, n_features))
    return (torch.tensor(queries, dtype=torch.float32),) + (
        torch.tensor(bank, dtype=torch.float32),
    )


def test_unverifiable_bfloat16_rows_are_redone_in_float32(
    screening, float32_redos, monkeypatch
):
    import skpadim._knn as knn

    queries, bank = near_rivals(np.random.default_rng(7), 20)
    # Two spare candidates among five rivals: only the verification can
    # notice a wrong proposal.
    monkeypatch.setattr(knn, "_MARGIN", {torch.float32: 8, torch.bfloat16: 2})
    check(queries, bank, 1, rtol=1e-5, atol=0)
    if screening == torch.bfloat16:
        assert sum(float32_redos) == 20  # none of these can be verified
    else:
        assert float32_redos == []  # float32 proposals are not verified


def test_bfloat16_proposals_of_separated_points_are_verified(screening, float32_redos):
    queries, bank = tensors(np.random.default_rng(8), (300, 16), (400, 16))
    check(queries, bank, 2)
    assert sum(float32_redos) == 0
    assert len(float32_redos) == (screening == torch.bfloat16)


def test_product_error_bounds_bfloat16_rounding():
    """The bound holds where the rounding errors all have the same sign: inputs
    just below halfway between bfloat16 numbers (rounded down by 2^-8), and a
    sum (385) that bfloat16 rounds down too; the worst case is not far below
    the bound."""
    from skpadim._knn import _product_error

    n_features = 385
    ratios = []
    for value in (1 + 2**-8 - 2**-20, 0.3, 1 - 3 * 2**-10):
        q = torch.full((1, n_features), value)
        b = torch.full((3, n_features), value) * torch.tensor([[1.0], [0.5], [-1.0]])
        exact = (b.double().square().sum(1) - 2 * (q.double() @ b.double().T))[0]
        products = (q.bfloat16() @ b.bfloat16().T).float()
        approximate = (b.square().sum(1) - 2 * products)[0].double()
        q_norm = torch.linalg.vector_norm(q, dim=1)
        bound = _product_error(q_norm, n_features, torch.bfloat16).double()
        bound = bound * torch.linalg.vector_norm(b, dim=1).double()
        ratios.append(((approximate - exact).abs() / bound).max().item())
    assert max(ratios) <= 1
    assert max(ratios) > 0.6  # a bound half as large would not hold


def test_bfloat16_proposal_values_are_lower_bounds():
    """What the verification relies on: the value ``_propose`` ranks by (and
    returns for the last candidate) is at most the exact |b|² - 2 q·b."""
    from skpadim._knn import _product_error, _propose

    queries, bank = near_rivals(np.random.default_rng(9), 40)
    centre = bank.mean(dim=0)
    centred = queries - centre
    slack = _product_error(
        torch.linalg.vector_norm(centred, dim=1), bank.shape[1], torch.bfloat16
    )
    for n_candidates in (1, 3):
        candidates, last = _propose(
            centred, bank, centre, None, None, n_candidates, len(bank), slack
        )
        kept = bank[candidates[:, -1]].double() - centre.double()
        exact = kept.square().sum(1) - 2 * (centred.double() * kept).sum(1)
        assert (last.double() <= exact + 1e-3 * exact.abs()).all()
