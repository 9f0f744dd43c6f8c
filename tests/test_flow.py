"""The CFLOW-AD flow against independent references.

Log-determinants are checked against autograd Jacobians, densities against
closed forms and numerical integration, the positional encoding against a
loop transcription of its formula.
"""

import math

import numpy as np
import pytest
import torch
from scipy.stats import norm

from skpadim import _flow as flow_module
from skpadim._flow import (
    ConditionalFlow,
    CouplingBlock,
    FlowPyramid,
    positional_encoding,
)


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny matrices: threads only add overhead, and the CPUs are shared."""
    n_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n_threads)


def perturb(module, seed, std=0.3):
    """Add Gaussian noise to every parameter, so no block is the identity."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in module.parameters():
            noise = torch.randn(parameter.shape, generator=generator)
            parameter.add_(std * noise.to(parameter.dtype))
    return module


def random_inputs(n, n_features, condition_dim, seed, dtype=torch.float32):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(n, n_features, generator=generator, dtype=dtype)
    cond = torch.randn(n, condition_dim, generator=generator, dtype=dtype)
    return x, cond


def autograd_log_det(module, x, cond):
    """log|det J| of module(x, cond)[0] at each row of x, one row at a time."""
    out = []
    for row, c in zip(x, cond):
        jacobian = torch.autograd.functional.jacobian(
            lambda v, c=c: module(v[None], c[None])[0][0], row
        )
        out.append(torch.linalg.slogdet(jacobian).logabsdet)
    return torch.stack(out)


# --- positional encoding ---------------------------------------------------


def reference_encoding(condition_dim, height, width):
    """cflow-ad's positionalencoding2d, written entry by entry."""
    half = condition_dim // 2
    out = np.empty((condition_dim, height, width))
    for d in range(condition_dim):
        channel = d if d < half else d - half
        frequency = 10000.0 ** (-(channel - channel % 2) / half)
        for i in range(height):
            for j in range(width):
                position = j if d < half else i
                wave = np.sin if channel % 2 == 0 else np.cos
                out[d, i, j] = wave(position * frequency)
    return out


@pytest.mark.parametrize("condition_dim, height, width", [(4, 3, 5), (16, 7, 2)])
def test_positional_encoding_matches_formula(condition_dim, height, width):
    actual = positional_encoding(condition_dim, height, width, dtype=torch.float64)
    assert actual.shape == (condition_dim, height, width)
    expected = reference_encoding(condition_dim, height, width)
    np.testing.assert_allclose(actual.numpy(), expected, rtol=0, atol=1e-12)
    single = positional_encoding(condition_dim, height, width)
    assert single.dtype == torch.float32
    np.testing.assert_allclose(single.numpy(), expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("condition_dim", [2, 6, 130, 0])
def test_positional_encoding_rejects_bad_dim(condition_dim):
    with pytest.raises(ValueError, match="multiple of 4"):
        positional_encoding(condition_dim, 2, 2)
    with pytest.raises(ValueError, match="multiple of 4"):
        FlowPyramid([3], condition_dim=condition_dim)


# --- invertibility and log-determinants -------------------------------------


@pytest.mark.parametrize("n_features", [1, 4, 5])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_flow_inverse_undoes_forward(n_features, seed):
    flow = perturb(ConditionalFlow(n_features, 4, generator=seed), seed + 10)
    x, cond = random_inputs(16, n_features, 4, seed)
    with torch.no_grad():
        z, log_det = flow(x, cond)
        assert log_det.std() > 1e-2  # the subnets are active, not the identity
        np.testing.assert_allclose(flow.inverse(z, cond), x, rtol=1e-5, atol=1e-5)
        # and the other way round
        np.testing.assert_allclose(flow(flow.inverse(x, cond), cond)[0], x, atol=1e-5)


def test_block_inverse_undoes_forward():
    block = perturb(CouplingBlock(5, 4, generator=3), 4, std=1.0)
    x, cond = random_inputs(16, 5, 4, 5)
    with torch.no_grad():
        y, _ = block(x, cond)
        np.testing.assert_allclose(block.inverse(y, cond), x, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("n_features", [5, 4])
def test_block_log_det_matches_autograd_jacobian(n_features):
    block = perturb(CouplingBlock(n_features, 4, generator=0), 1, std=1.0).double()
    x, cond = random_inputs(6, n_features, 4, 2, dtype=torch.float64)
    _, log_det = block(x, cond)
    expected = autograd_log_det(block, x, cond)
    assert log_det.shape == (6,)
    # the clamp is active: scales differ across samples
    assert expected.std() > 0.1
    np.testing.assert_allclose(log_det.detach(), expected, rtol=1e-10, atol=1e-10)


def test_flow_log_det_matches_autograd_jacobian():
    flow = ConditionalFlow(5, 4, n_coupling_blocks=4, generator=0).double()
    flow = perturb(flow, 1, std=0.5)
    x, cond = random_inputs(6, 5, 4, 2, dtype=torch.float64)
    _, log_det = flow(x, cond)
    expected = autograd_log_det(flow, x, cond)
    np.testing.assert_allclose(log_det.detach(), expected, rtol=1e-10, atol=1e-10)


def test_soft_clamp_bounds_log_scale():
    """With huge subnet weights each block's coupling log-scale stays in +-clamp."""
    block = CouplingBlock(2, 4, clamp=0.7, generator=0).double()
    with torch.no_grad():
        block.subnet[-1].weight.normal_(0, 1e4, generator=torch.Generator())
    x, cond = random_inputs(64, 2, 4, 0, dtype=torch.float64)
    _, log_det = block(x, cond)
    # C = 2: one coupled channel, global scale still 1
    assert log_det.abs().max() <= 0.7 + 1e-6
    assert log_det.abs().max() > 0.69


def test_wrong_shapes_raise():
    flow = ConditionalFlow(3, 4, n_coupling_blocks=1, generator=0)
    x, cond = random_inputs(5, 3, 4, 0)
    with pytest.raises(ValueError, match=r"x of shape \(N, 3\)"):
        flow(x[:, :2], cond)
    with pytest.raises(ValueError, match="cond of shape"):
        flow.inverse(x, cond[:4])


# --- densities ---------------------------------------------------------------


@pytest.mark.parametrize("n_features", [3, 8])
def test_initial_flow_is_standard_normal(n_features):
    flow = ConditionalFlow(n_features, 4, generator=0)
    x, cond = random_inputs(10, n_features, 4, 0)
    with torch.no_grad():
        z, log_det = flow(x, cond)
        log_prob = flow.log_prob(x, cond)
    # identity up to a permutation
    np.testing.assert_allclose(np.sort(z, axis=1), np.sort(x, axis=1), atol=1e-6)
    np.testing.assert_allclose(log_det, 0, atol=1e-5)
    expected = norm.logpdf(x.numpy()).sum(axis=1) / n_features
    np.testing.assert_allclose(log_prob, expected, rtol=1e-5, atol=1e-5)


def test_density_integrates_to_one():
    """exp(C * log_prob) of a perturbed 2-D flow integrates to 1 (change of vars)."""
    flow = ConditionalFlow(2, 4, n_coupling_blocks=3, generator=0).double()
    flow = perturb(flow, 1, std=0.5)
    grid = torch.linspace(-12, 12, 321, dtype=torch.float64)
    xx, yy = torch.meshgrid(grid, grid, indexing="ij")
    points = torch.stack([xx.ravel(), yy.ravel()], dim=1)
    cond = torch.linspace(-1, 1, 4, dtype=torch.float64).expand(len(points), 4)
    with torch.no_grad():
        density = torch.exp(2 * flow.log_prob(points, cond))
    step = (grid[1] - grid[0]).item()
    assert density.sum().item() * step**2 == pytest.approx(1.0, abs=2e-3)
    # and the density is not the base one
    base = torch.exp(torch.distributions.Normal(0, 1).log_prob(points).sum(1))
    assert (density - base).abs().max() > 1e-2


# --- determinism and checkpoints ---------------------------------------------


def state_dicts_equal(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_same_seed_same_state_and_no_global_rng():
    before = torch.random.get_rng_state()
    first = FlowPyramid([3, 5], condition_dim=4, random_state=7).state_dict()
    assert torch.equal(torch.random.get_rng_state(), before)
    second = FlowPyramid([3, 5], condition_dim=4, random_state=7).state_dict()
    assert state_dicts_equal(first, second)
    generator = torch.Generator().manual_seed(7)
    third = ConditionalFlow(5, 4, generator=generator).state_dict()
    assert state_dicts_equal(third, ConditionalFlow(5, 4, generator=7).state_dict())


def test_different_seed_different_permutations():
    def permutations(seed):
        flow = ConditionalFlow(6, 4, generator=seed)
        return torch.stack([block.permutation for block in flow.blocks])

    assert not torch.equal(permutations(0), permutations(1))
    for row in permutations(0):
        assert sorted(row.tolist()) == list(range(6))
    # blocks of one flow differ from each other too
    assert len({tuple(row.tolist()) for row in permutations(0)}) > 1


def test_state_dict_is_tensors_only_and_round_trips():
    pyramid = perturb(FlowPyramid([3, 5], condition_dim=4, random_state=0), 1)
    state = pyramid.state_dict()
    assert all(isinstance(value, torch.Tensor) for value in state.values())
    permutation_keys = [k for k in state if k.endswith("permutation")]
    assert len(permutation_keys) == 2 * 8
    for key in permutation_keys:
        assert state[key].dtype == torch.long and state[key].shape in [(3,), (5,)]
    n_parameters = sum(1 for _ in pyramid.parameters())
    assert len(state) == n_parameters + len(permutation_keys)

    rebuilt = FlowPyramid([3, 5], condition_dim=4, random_state=99)
    rebuilt.load_state_dict(state)
    features = torch.randn(2, 5, 3, 4, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = pyramid.level_log_prob(1, features)
        assert torch.equal(rebuilt.level_log_prob(1, features), expected)


# --- pyramid -----------------------------------------------------------------


def test_level_log_prob_matches_per_position_flow():
    pyramid = perturb(FlowPyramid([3, 5], condition_dim=8, random_state=0), 1)
    features = torch.randn(2, 5, 3, 4, generator=torch.Generator().manual_seed(0))
    encoding = positional_encoding(8, 3, 4)
    with torch.no_grad():
        actual = pyramid.level_log_prob(1, features)
        assert actual.shape == (2, 3, 4)
        for b in range(2):
            for i in range(3):
                for j in range(4):
                    one = pyramid.flows[1].log_prob(
                        features[b, :, i, j][None], encoding[:, i, j][None]
                    )
                    assert actual[b, i, j].item() == pytest.approx(one.item(), abs=1e-5)
    assert len(pyramid._encodings) == 1
    pyramid.level_log_prob(1, features[:1])
    assert len(pyramid._encodings) == 1


def test_fiber_loss_is_mean_negative_log_sigmoid():
    pyramid = perturb(FlowPyramid([3], condition_dim=4, random_state=0), 1).double()
    fibers, conds = random_inputs(32, 3, 4, 0, dtype=torch.float64)
    loss = pyramid.fiber_loss(0, 3 * fibers, conds)
    log_prob = pyramid.flows[0].log_prob(3 * fibers, conds).detach().numpy()
    expected = np.mean(np.log1p(np.exp(-log_prob)))
    assert loss.ndim == 0
    assert loss.item() == pytest.approx(expected, rel=1e-12)


# --- training ----------------------------------------------------------------


def correlated_gaussian(n, generator):
    """4-D Gaussian far from the base: mean 2, correlated, scales 0.2 to 3."""
    mixing = torch.tensor(
        [
            [3.0, 0.0, 0.0, 0.0],
            [2.0, 0.5, 0.0, 0.0],
            [0.0, 0.3, 0.2, 0.0],
            [1.0, 0.0, 1.0, 1.0],
        ]
    )
    return torch.randn(n, 4, generator=generator) @ mixing.T + 2.0, mixing


def test_training_lowers_held_out_nll():
    generator = torch.Generator().manual_seed(0)
    train, mixing = correlated_gaussian(2048, generator)
    test, _ = correlated_gaussian(1024, generator)
    pyramid = FlowPyramid([4], condition_dim=4, n_coupling_blocks=2, random_state=0)
    cond = positional_encoding(4, 1, 1).flatten()[None]

    def held_out_nll():
        with torch.no_grad():
            return -pyramid.flows[0].log_prob(test, cond.expand(len(test), 4)).mean()

    initial = held_out_nll().item()
    optimizer = torch.optim.Adam(pyramid.parameters(), lr=2e-2)
    for _ in range(100):
        batch = train[torch.randint(len(train), (128,), generator=generator)]
        loss = pyramid.fiber_loss(0, batch, cond.expand(len(batch), 4))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    final = held_out_nll().item()
    # per-dim entropies: of the data (a lower bound on the expected NLL) and of
    # the best Gaussian with independent channels (beaten only by learning the
    # correlations, which a global affine alone cannot)
    half_log_2pi_e = 0.5 * math.log(2 * math.pi * math.e)
    entropy = half_log_2pi_e + mixing.det().log().item() / 4
    independent = half_log_2pi_e + mixing.norm(dim=1).log().mean().item()
    assert final < initial - 1.0  # nats per dimension
    assert entropy - 0.1 < final < independent - 0.2


# --- fast paths: the training loss's backward, the scoring path -------------


def reference_loss(flow, x, cond):
    """CFLOW-AD's loss through the modules' forward and autograd."""
    return -torch.nn.functional.logsigmoid(flow.log_prob(x, cond)).mean()


@pytest.mark.parametrize("n_features, condition_dim", [(5, 4), (8, 8), (33, 12)])
def test_loss_and_its_gradients_match_autograd(n_features, condition_dim):
    flow = ConditionalFlow(n_features, condition_dim, n_coupling_blocks=3, generator=0)
    flow = perturb(flow.double(), 1, std=0.5)
    x, cond = random_inputs(37, n_features, condition_dim, 2, dtype=torch.float64)
    x = 2 * x  # some fibers fit badly, some well: both sides of the sigmoid
    parameters = list(flow.parameters())
    expected = reference_loss(flow, x, cond)
    expected_grads = torch.autograd.grad(expected, parameters)
    actual = flow.loss(x, cond)
    assert actual.ndim == 0 and actual.grad_fn is not None
    actual_grads = torch.autograd.grad(actual, parameters)
    assert actual.item() == pytest.approx(expected.item(), rel=1e-12)
    for a, e in zip(actual_grads, expected_grads):
        assert a.shape == e.shape
        np.testing.assert_allclose(a, e, rtol=1e-9, atol=1e-12)
    assert min(e.abs().max().item() for e in expected_grads) > 1e-4


@pytest.mark.parametrize("use_onednn", [True, False])
def test_float32_loss_gradients_match_autograd(monkeypatch, use_onednn):
    monkeypatch.setattr(flow_module, "USE_ONEDNN", use_onednn)
    flow = perturb(ConditionalFlow(24, 8, n_coupling_blocks=2, generator=0), 1)
    x, cond = random_inputs(64, 24, 8, 3)
    parameters = list(flow.parameters())
    expected = torch.autograd.grad(reference_loss(flow, x, cond), parameters)
    actual = torch.autograd.grad(flow.loss(x, cond), parameters)
    for a, e in zip(actual, expected):
        np.testing.assert_allclose(a, e, rtol=1e-4, atol=1e-5 * e.abs().max().item())


def test_loss_differentiable_in_its_inputs_takes_the_autograd_path():
    flow = perturb(ConditionalFlow(5, 4, n_coupling_blocks=2, generator=0), 1)
    x, cond = random_inputs(8, 5, 4, 0)
    x.requires_grad_(True)
    (grad,) = torch.autograd.grad(flow.loss(x, cond), [x])
    assert grad.shape == x.shape and grad.abs().max() > 0
    with pytest.raises(ValueError, match="cond of shape"):
        flow.loss(x, cond[:, :3])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("n_features", [5, 16])
def test_grid_log_prob_matches_log_prob(dtype, n_features):
    pyramid = FlowPyramid([n_features], condition_dim=8, random_state=0).to(dtype)
    pyramid = perturb(pyramid, 1)
    features = torch.randn(
        3, n_features, 4, 5, generator=torch.Generator().manual_seed(0)
    )
    features = features.to(dtype)
    fibers, conds = pyramid.to_fibers(features)
    with torch.no_grad():
        expected = pyramid.flows[0].log_prob(fibers, conds).reshape(3, 4, 5)
        actual = pyramid.level_log_prob(0, features)
    assert actual.dtype == dtype
    assert expected.std() > 0.1
    tolerance = 1e-12 if dtype == torch.float64 else 2e-5
    np.testing.assert_allclose(actual, expected, rtol=tolerance, atol=tolerance)


def test_grid_log_prob_of_an_image_is_the_same_alone_or_in_a_batch():
    pyramid = perturb(FlowPyramid([64, 32], condition_dim=16, random_state=0), 1)
    generator = torch.Generator().manual_seed(0)
    for level, (channels, size) in enumerate([(64, 14), (32, 7)]):
        features = torch.randn(5, channels, size, size, generator=generator)
        with torch.no_grad():
            together = pyramid.level_log_prob(level, features)
            for i in range(5):
                alone = pyramid.level_log_prob(level, features[i : i + 1])[0]
                assert torch.equal(alone, together[i])


def test_scoring_follows_weight_updates():
    """A trained flow scores with its current weights (fused Adam updates in
    place without bumping version counters), a frozen one after an in-place
    change too."""
    pyramid = FlowPyramid([6], condition_dim=4, n_coupling_blocks=2, random_state=0)
    features = torch.randn(2, 6, 3, 3, generator=torch.Generator().manual_seed(0))
    fibers, conds = pyramid.to_fibers(features)

    def check():
        with torch.no_grad():
            expected = pyramid.flows[0].log_prob(fibers, conds).reshape(2, 3, 3)
            actual = pyramid.level_log_prob(0, features)
        np.testing.assert_allclose(actual, expected, rtol=1e-5, atol=1e-5)
        return actual

    before = check()
    optimizer = torch.optim.Adam(pyramid.parameters(), lr=0.1, fused=True)
    for _ in range(2):
        loss = pyramid.fiber_loss(0, fibers, conds)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        after = check()
        assert not torch.equal(after, before)
        before = after
    pyramid.requires_grad_(False)
    check()
    with torch.no_grad():
        pyramid.flows[0].blocks[1].global_offset.add_(0.5)
    assert not torch.equal(check(), before)
