"""BatchNorm folding and the inference layout, against the unmodified networks."""

import copy
import functools

import pytest
import torch
from torch import nn

from skpadim.backbones import available_backbones, build_feature_network
from skpadim.backbones._inference import (
    fuse_conv_bn,
    optimize_for_inference,
    preferred_memory_format,
)

# The fewest taps that reach every kind of conv-BN pair: the stem, plain and
# downsampling blocks (a Bottleneck's layer1 has one already), and Lite0's
# expand/depthwise/project convs with stride 1 and 2.
LAYERS = {
    "efficientnet_lite0": ("block2", "block4"),
    "resnet50": ("layer1",),
    "wide_resnet50_2": ("layer1",),
}
RESNET_LAYERS = ("layer1", "layer2")
# Odd sizes, so Lite0's stride-2 convs need TF's asymmetric "SAME" padding.
HEIGHT, WIDTH = 45, 38


def randomize_batchnorms(module, seed=0):
    """Give every BatchNorm non-trivial statistics and affine parameters.

    Random-init BatchNorms are identities up to ``eps``, so a wrong fold of the
    mean, the shift or the scale would go unnoticed with their defaults.
    """
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, nn.BatchNorm2d) and m.track_running_stats:
                n = m.num_features
                m.running_mean.copy_(torch.randn(n, generator=gen))
                var = torch.rand(n, generator=gen) * 2 + 0.1
                var[::7] = 0.0  # as in Lite0's checkpoint: eps sets the scale
                m.running_var.copy_(var)
                # A per-channel scale of about +-1 keeps the deep maps finite.
                scale = torch.randn(n, generator=gen)
                m.weight.copy_(scale * torch.sqrt(var + m.eps))
                m.bias.copy_(torch.randn(n, generator=gen))
    return module


@functools.cache
def _feature_network(name):
    torch.manual_seed(0)
    layers = LAYERS.get(name, RESNET_LAYERS)
    return randomize_batchnorms(build_feature_network(name, layers, weights=None))


def feature_network(name):
    """A random-init network with random BatchNorms, built once per backbone."""
    return copy.deepcopy(_feature_network(name))


def max_relative_error(outputs, references):
    """Largest tap-wise max |difference| relative to the reference's max |value|."""
    assert len(outputs) == len(references)
    errors = []
    for out, ref in zip(outputs, references):
        assert out.shape == ref.shape and out.dtype == ref.dtype == torch.float32
        errors.append(((out - ref).abs().max() / ref.abs().max()).item())
    return max(errors)


def images(n=3, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, HEIGHT, WIDTH, generator=gen)


@pytest.fixture
def one_thread():
    """Run on one thread: these maps are tiny, and on a loaded machine threads
    mostly wait for each other. The fold's arithmetic does not depend on it."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("name", available_backbones())
def test_fuse_conv_bn_matches_the_unmodified_network(name, one_thread):
    network = feature_network(name)
    before = {k: v.clone() for k, v in network.state_dict().items()}
    x = images()
    with torch.inference_mode():
        expected = network(x)

    fused = fuse_conv_bn(network)

    assert type(fused) is type(network)
    # Every BatchNorm of these networks follows a convolution.
    assert not any(isinstance(m, nn.BatchNorm2d) for m in fused.modules())
    convs = [m for m in network.modules() if isinstance(m, nn.Conv2d)]
    fused_convs = [m for m in fused.modules() if isinstance(m, nn.Conv2d)]
    # Same conv classes, in the same places: Lite0's keep their padding.
    assert [type(m) for m in fused_convs] == [type(m) for m in convs]
    with torch.inference_mode():
        assert max_relative_error(fused(x), expected) < 1e-4
    # The input network is untouched.
    after = network.state_dict()
    assert after.keys() == before.keys()
    assert all(torch.equal(after[k], v) for k, v in before.items())
    assert sum(isinstance(m, nn.BatchNorm2d) for m in network.modules()) == len(convs)


def test_fuse_conv_bn_folds_a_conv_bias_and_keeps_other_batchnorms():
    torch.manual_seed(0)

    class AddOne(nn.Module):
        """Unknown structure: conv and bn, but not chained directly."""

        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(4, 4, 3, padding=1)
            self.bn = nn.BatchNorm2d(4)

        def forward(self, x):
            return self.bn(self.conv(x) + 1)

    class OtherConv(nn.Conv2d):
        def forward(self, x):
            return super().forward(x).flip(1)

    network = nn.Sequential(
        nn.BatchNorm2d(3),  # first: nothing precedes it
        nn.Conv2d(3, 4, 3, bias=True),
        nn.BatchNorm2d(4),  # folded, with the conv's bias
        nn.Conv2d(4, 4, 1, bias=False),
        nn.ReLU(),
        nn.BatchNorm2d(4),  # after a ReLU
        AddOne(),
        OtherConv(4, 4, 1),
        nn.BatchNorm2d(4),  # after an unknown conv class
        nn.Conv2d(4, 4, 1),
        nn.BatchNorm2d(4, track_running_stats=False),  # batch statistics
    )
    randomize_batchnorms(network).eval()
    with torch.no_grad():
        network[1].bias.normal_()
    x = torch.randn(2, 3, 9, 9)
    with torch.inference_mode():
        expected = network(x)

    fused = fuse_conv_bn(network)

    kinds = [type(m).__name__ for m in fused]
    assert kinds[:6] == ["BatchNorm2d", "Conv2d", "Identity", "Conv2d", "ReLU"] + [
        "BatchNorm2d"
    ]
    assert isinstance(fused[6].bn, nn.BatchNorm2d)
    assert kinds[8] == kinds[10] == "BatchNorm2d"
    with torch.inference_mode():
        assert max_relative_error([fused(x)], [expected]) < 1e-4


def test_fuse_conv_bn_leaves_shared_modules_alone():
    conv, bn = nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3)
    network = randomize_batchnorms(nn.Sequential(conv, bn, conv, bn)).eval()
    x = torch.randn(2, 3, 5, 5)
    with torch.inference_mode():
        expected = network(x)
        fused = fuse_conv_bn(network)
        assert isinstance(fused[1], nn.BatchNorm2d)
        assert max_relative_error([fused(x)], [expected]) < 1e-4


def test_fuse_conv_bn_rejects_training_mode():
    with pytest.raises(ValueError, match="eval"):
        fuse_conv_bn(nn.Sequential(nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3)))


@pytest.mark.parametrize("name", ["resnet18", "efficientnet_lite0"])
def test_optimize_for_inference(name):
    network = feature_network(name)
    reference = copy.deepcopy(network)
    x = images(n=5)
    with torch.inference_mode():
        expected = reference(x)

    optimized, memory_format = optimize_for_inference(network, "cpu")

    assert memory_format == preferred_memory_format("cpu")
    batch = x.contiguous(memory_format=memory_format)
    with torch.inference_mode():
        first = optimized(batch)
        again = optimized(batch.clone())
        alone = [optimized(batch[i : i + 1]) for i in range(len(x))]
    assert max_relative_error(first, expected) < 1e-4
    # Deterministic: the same input gives the same bits.
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    # An image's features barely depend on the batch it is in (oneDNN may
    # pick other kernels for another batch size).
    for i, single in enumerate(alone):
        assert max_relative_error([t[i : i + 1] for t in first], single) < 1e-5
    # The input network is untouched.
    with torch.inference_mode():
        assert all(torch.equal(a, b) for a, b in zip(network(x), expected))


# Toggling oneDNN warns that TF32 on oneDNN needs an Intel GPU: irrelevant here.
@pytest.mark.filterwarnings("ignore:TF32:UserWarning")
def test_preferred_memory_format():
    assert preferred_memory_format("cuda") == torch.channels_last
    expected = (
        torch.channels_last
        if torch.backends.mkldnn.is_available()
        else torch.contiguous_format
    )
    assert preferred_memory_format(torch.device("cpu")) == expected
    with torch.backends.mkldnn.flags(enabled=False):
        assert preferred_memory_format("cpu") == torch.contiguous_format
    assert preferred_memory_format("meta") == torch.contiguous_format
