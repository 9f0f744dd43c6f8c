"""k_center_greedy against brute-force k-center and a float64 greedy check."""

import itertools

import numpy as np
import pytest
import torch
from scipy.spatial.distance import cdist

import skpadim._coreset as coreset
from skpadim._coreset import covering_radius, k_center_greedy


def radius(points, chosen):
    """Covering radius by brute force in float64."""
    return cdist(points, points[list(chosen)]).min(axis=1).max()


def assert_farthest_point_run(points, selected, rtol=1e-5):
    """Each pick after the first is a farthest point from the earlier picks."""
    points = np.asarray(points, np.float64)
    nearest = np.full(len(points), np.inf)
    for step, index in enumerate(selected):
        if step:
            assert nearest[index] >= nearest.max() * (1 - rtol), step
        nearest = np.minimum(nearest, np.linalg.norm(points - points[index], axis=1))


def features(seed, n=10, d=3):
    rng = np.random.default_rng(seed)
    return torch.tensor(rng.normal(size=(n, d)), dtype=torch.float32)


@pytest.mark.parametrize("seed", range(8))
def test_within_twice_the_optimal_radius(seed):
    x = features(seed)
    points = x.double().numpy()
    best = min(radius(points, c) for c in itertools.combinations(range(10), 3))
    selected = k_center_greedy(x, 3, projection_dim=None, random_state=seed)
    assert radius(points, selected.tolist()) <= 2 * best * (1 + 1e-6)
    assert_farthest_point_run(points, selected.tolist())


@pytest.fixture
def projections(monkeypatch):
    """The projection matrices k_center_greedy draws, in order."""
    used = []
    make = coreset._projection_matrix

    def spy(*args):
        used.append(make(*args))
        return used[-1]

    monkeypatch.setattr(coreset, "_projection_matrix", spy)
    return used


@pytest.mark.parametrize("seed", range(4))
def test_projected_run_is_greedy_in_projected_space(seed, projections):
    x = features(seed, n=60, d=16)
    selected = k_center_greedy(x, 12, projection_dim=5, random_state=seed)
    projection = projections[0]
    assert projection.shape == (16, 5)
    projected = x.double().numpy() @ projection.double().numpy()
    assert_farthest_point_run(projected, selected.tolist())
    # The 2-approximation holds in projected space too (checked on 8 points).
    small = projected[:8]
    sub = k_center_greedy(x[:8], 3, projection_dim=5, random_state=seed)
    best = min(radius(small, c) for c in itertools.combinations(range(8), 3))
    assert radius(small, sub.tolist()) <= 2 * best * (1 + 1e-6)


def test_projection_matrix_is_scaled_gaussian():
    generator = torch.Generator().manual_seed(0)
    matrix = coreset._projection_matrix(60, 500, generator).double().numpy()
    assert abs(matrix.mean()) < 0.01 / np.sqrt(500) * 10
    assert matrix.std() == pytest.approx(1 / np.sqrt(500), rel=0.02)
    # Johnson-Lindenstrauss: pairwise distances roughly kept.
    x = np.random.default_rng(0).normal(size=(15, 60))
    ratio = (
        cdist(x @ matrix, x @ matrix)[np.triu_indices(15, 1)]
        / cdist(x, x)[np.triu_indices(15, 1)]
    )
    assert ratio.min() > 0.8 and ratio.max() < 1.2


def test_seeded_and_deterministic():
    x = features(0, n=50, d=8)
    first = k_center_greedy(x, 10, projection_dim=4, random_state=3)
    assert torch.equal(first, k_center_greedy(x, 10, projection_dim=4, random_state=3))
    rs_a = k_center_greedy(x, 10, random_state=np.random.RandomState(1))
    rs_b = k_center_greedy(x, 10, random_state=np.random.RandomState(1))
    assert torch.equal(rs_a, rs_b)
    starts = {int(k_center_greedy(x, 2, random_state=s)[0]) for s in range(20)}
    assert len(starts) > 5  # the first row is random ...
    # ... and part of the selection, which is distinct and in range.
    for seed in (None, 0, 1):
        selected = k_center_greedy(x, 10, random_state=seed)
        assert selected.dtype == torch.int64 and selected.shape == (10,)
        assert len(set(selected.tolist())) == 10
        assert selected.min() >= 0 and selected.max() < 50
        assert_farthest_point_run(x.numpy(), selected.tolist())


def test_global_rngs_untouched():
    torch_state = torch.get_rng_state()
    numpy_state = np.random.get_state()[1].copy()  # noqa: NPY002
    k_center_greedy(features(0, n=20), 5, projection_dim=2, random_state=0)
    assert torch.equal(torch.get_rng_state(), torch_state)
    after = np.random.get_state()[1]  # noqa: NPY002
    np.testing.assert_array_equal(after, numpy_state)


def test_projection_dim_at_least_features_means_no_projection():
    x = features(1, n=30, d=4)
    plain = k_center_greedy(x, 7, projection_dim=None, random_state=5)
    assert torch.equal(k_center_greedy(x, 7, projection_dim=4, random_state=5), plain)
    assert torch.equal(k_center_greedy(x, 7, projection_dim=99, random_state=5), plain)


@pytest.mark.parametrize("projection_dim", [None, 2])
def test_far_from_the_origin(projection_dim, projections):
    # A large common offset (as non-negative CNN features have) would swamp
    # |z|^2 + |c|^2 - 2 z.c in float32 without centring.
    x = 1e4 + features(4, n=40, d=3)
    selected = k_center_greedy(x, 10, projection_dim=projection_dim)
    points = x.double().numpy()
    if projections:
        points = points @ projections[0].double().numpy()
    assert_farthest_point_run(points, selected.tolist(), rtol=1e-3)


def test_duplicates_give_distinct_indices():
    # 3 distinct points, 5 copies each: once they are covered every remaining
    # row is at distance zero, yet no index may come twice.
    x = torch.tensor([[0.0, 0.0], [5.0, 1.0], [-2.0, 7.0]]).repeat(5, 1)
    selected = k_center_greedy(x, 9, projection_dim=None, random_state=0)
    assert len(set(selected.tolist())) == 9
    assert len({tuple(x[i].tolist()) for i in selected[:3]}) == 3


def test_sizes():
    x = features(2, n=6)
    assert torch.equal(k_center_greedy(x, 6), torch.arange(6))
    assert torch.equal(k_center_greedy(x, 100), torch.arange(6))
    one = k_center_greedy(x, 1, random_state=0)
    assert one.shape == (1,) and 0 <= one[0] < 6
    assert k_center_greedy(x[:1], 1).tolist() == [0]
    assert k_center_greedy(x, 5, random_state=0).shape == (5,)


@pytest.mark.parametrize("n_samples", [0, -1, 1.5, True, "3"])
def test_bad_n_samples(n_samples):
    with pytest.raises(ValueError, match="n_samples"):
        k_center_greedy(features(0), n_samples)


def test_bad_inputs():
    with pytest.raises(ValueError, match="projection_dim"):
        k_center_greedy(features(0), 2, projection_dim=0)
    with pytest.raises(ValueError, match="2-D"):
        k_center_greedy(torch.zeros(5), 2)
    with pytest.raises(ValueError, match="NaN"):
        k_center_greedy(torch.full((4, 2), float("nan")), 2)
    with pytest.raises(ValueError, match="floating"):
        k_center_greedy(torch.zeros(4, 2, dtype=torch.int64), 2)


def test_covering_radius_matches_brute_force():
    x = features(3, n=25, d=4)
    chosen = [3, 17, 8]
    assert covering_radius(x, torch.tensor(chosen)) == pytest.approx(
        radius(x.double().numpy(), chosen), rel=1e-5
    )
    assert covering_radius(x, torch.arange(25)) == 0.0
    with pytest.raises(ValueError, match="at least one"):
        covering_radius(x, torch.tensor([], dtype=torch.int64))
