"""Inference-only rewrites of the feature networks: fewer ops, faster layouts.

PaDiM never trains its backbone, so every BatchNorm after a convolution is an
affine map per channel with fixed statistics, which can be folded into that
convolution's weights and bias: one pass over the feature map fewer per
layer, and one intermediate tensor fewer. :func:`optimize_for_inference`
applies that fold and picks the input memory format that is fastest for the
device.

The fold is plain module surgery on structures known to chain a convolution
straight into a BatchNorm (torchvision's ResNet stem and blocks, our
EfficientNet-Lite0 stem and blocks, and consecutive children of a plain
``nn.Sequential``). Reading those pairs from the module tree rather than from
a ``torch.fx`` trace keeps each module's class, attributes and ``forward``
(the TF-SAME padding of Lite0's convolutions included), and it cannot misread
a ``forward`` with control flow: modules not listed are left as they are.
"""

from __future__ import annotations

import copy
import sys
from collections import Counter

import torch
from torch import nn

from ._efficientnet_lite import (
    EfficientNetLite0,
    EfficientNetLite0Pyramid,
    _MBConv,
    _SameConv2d,
    _Trunk,
)
from ._resnet import ResNetPyramid

# (conv, bn) attribute pairs of modules whose ``forward`` feeds the output of
# the conv to the BatchNorm and to nothing else. Keyed by exact class: a
# subclass may override ``forward`` and break the chain.
_PAIRS = {
    ResNetPyramid: (("conv1", "bn1"),),
    _Trunk: (("_conv_stem", "_bn0"),),
    EfficientNetLite0Pyramid: (("_conv_stem", "_bn0"),),
    EfficientNetLite0: (("_conv_stem", "_bn0"), ("_conv_head", "_bn1")),
    _MBConv: (
        ("_expand_conv", "_bn0"),
        ("_depthwise_conv", "_bn1"),
        ("_project_conv", "_bn2"),
    ),
}

# torchvision's classes, looked up by name so that this module does not import
# torchvision (seconds) for networks that do not use it.
_TORCHVISION_PAIRS = {
    "ResNet": (("conv1", "bn1"),),
    "BasicBlock": (("conv1", "bn1"), ("conv2", "bn2")),
    "Bottleneck": (("conv1", "bn1"), ("conv2", "bn2"), ("conv3", "bn3")),
}

# Convolutions whose forward is ``conv(x, weight) + bias`` (after padding the
# input), so that scaling the weight and setting the bias is the whole fold.
_FOLDABLE_CONVS = (nn.Conv2d, _SameConv2d)


def _known_pairs(module):
    """The (conv, bn) attribute pairs that ``module``'s forward chains."""
    cls = type(module)
    if cls in _PAIRS:
        return _PAIRS[cls]
    resnet = sys.modules.get("torchvision.models.resnet")
    if resnet is not None:
        for name, pairs in _TORCHVISION_PAIRS.items():
            if cls is getattr(resnet, name, None):
                return pairs
    if cls is nn.Sequential:
        # A plain Sequential calls its children in order, each on the output
        # of the previous one only.
        names = list(module._modules)
        return tuple(zip(names[:-1], names[1:]))
    return ()


def _can_fold(conv, bn):
    return (
        type(conv) in _FOLDABLE_CONVS
        and type(bn) is nn.BatchNorm2d
        and not bn.training
        # Without running statistics, BatchNorm normalises by the batch's own.
        and bn.running_mean is not None
        and bn.running_var is not None
        and bn.num_features == conv.out_channels
    )


def _float64(tensor, n, default):
    """``tensor`` in float64 on the CPU, or ``n`` times ``default`` if None."""
    if tensor is None:
        return torch.full((n,), default, dtype=torch.float64)
    return tensor.detach().to("cpu", torch.float64)


@torch.no_grad()
def _fold(conv, bn):
    """Fold the eval-mode ``bn`` into ``conv`` in place."""
    # Work in float64 (on the CPU, as some devices lack it): the folded
    # weights are then the exact products rounded once to the conv's dtype,
    # which keeps the fused outputs at float32 rounding.
    n = conv.out_channels
    scale = _float64(bn.weight, n, 1.0) / torch.sqrt(
        _float64(bn.running_var, n, None) + bn.eps
    )
    shift = _float64(bn.bias, n, 0.0) - _float64(bn.running_mean, n, None) * scale
    weight = _float64(conv.weight, n, None)
    weight = weight * scale.view((-1,) + (1,) * (weight.dim() - 1))
    bias = _float64(conv.bias, n, 0.0) * scale + shift
    like = dict(device=conv.weight.device, dtype=conv.weight.dtype)
    conv.weight.copy_(weight.to(**like))
    conv.bias = nn.Parameter(bias.to(**like), requires_grad=conv.weight.requires_grad)


def fuse_conv_bn(module):
    """Fold every BatchNorm that directly follows a convolution into it.

    Parameters
    ----------
    module : torch.nn.Module
        An eval-mode network, e.g. from
        :func:`~skpadim.backbones.build_feature_network`. It is not modified.

    Returns
    -------
    fused : torch.nn.Module
        A deep copy of ``module``, of the same class, in which each such
        convolution (of the same class too, so Lite0's TF "SAME" padding is
        kept) carries the folded weights and bias, and each folded BatchNorm
        is an ``nn.Identity``. Its outputs equal those of ``module`` up to
        float32 rounding.

    Raises
    ------
    ValueError
        If ``module`` is in training mode, where BatchNorm normalises by the
        batch statistics and cannot be folded.

    Notes
    -----
    Pairs are looked for only where a module's structure guarantees that the
    convolution's output goes to the BatchNorm and nowhere else: torchvision's
    ``ResNet``, ``BasicBlock`` and ``Bottleneck``, skpadim's ResNet pyramid
    and EfficientNet-Lite0 modules, and consecutive children of a plain
    ``nn.Sequential`` (torchvision's ``downsample``). Every other BatchNorm
    is kept: one not preceded by a convolution, one in a module of unknown
    structure, one without running statistics, or one whose convolution or
    itself is shared between several places in the network.
    """
    if module.training:
        raise ValueError(
            "fuse_conv_bn needs an eval-mode network (call .eval() first): in "
            "training mode BatchNorm normalises by the batch statistics."
        )
    fused = copy.deepcopy(module)
    # A module reachable twice (shared weights) would be folded twice or feed
    # an unfolded path too, so such modules are left alone.
    uses = Counter(id(m) for _, m in fused.named_modules(remove_duplicate=False))
    for parent in list(fused.modules()):
        for conv_name, bn_name in _known_pairs(parent):
            conv = parent._modules.get(conv_name)
            bn = parent._modules.get(bn_name)
            if (
                conv is None
                or bn is None
                or uses[id(conv)] > 1
                or uses[id(bn)] > 1
                or not _can_fold(conv, bn)
            ):
                continue
            _fold(conv, bn)
            setattr(parent, bn_name, nn.Identity())
    return fused


def preferred_memory_format(device):
    """The memory format in which convolutions run fastest on ``device``.

    Parameters
    ----------
    device : torch.device or str
        Where the network runs.

    Returns
    -------
    memory_format : torch.memory_format
        ``torch.channels_last`` on CUDA (cuDNN's NHWC kernels) and on CPUs
        with oneDNN, whose NHWC convolutions ran about 1.5x (ResNet-18) and
        1.7x (EfficientNet-Lite0) faster than NCHW at 224 px, batches of 8
        to 32, BatchNorm folded or not (``benchmarks/bench_forward.py``);
        ``torch.contiguous_format`` elsewhere, where PyTorch's own kernels
        may not favour NHWC.
    """
    device = torch.device(device)
    if device.type == "cuda":
        return torch.channels_last
    if (
        device.type == "cpu"
        and torch.backends.mkldnn.is_available()
        and torch.backends.mkldnn.enabled
    ):
        return torch.channels_last
    return torch.contiguous_format


def optimize_for_inference(network, device):
    """The fastest float32 inference version of a feature network on a device.

    BatchNorm is folded into the convolutions (:func:`fuse_conv_bn`) and the
    weights are put in the device's preferred memory format
    (:func:`preferred_memory_format`). Both keep the outputs equal to the
    original network's up to float32 rounding, and deterministic: the same
    input gives bit-identical outputs on every call. ``torch.jit.freeze``,
    ``torch.compile`` and ``torch.utils.mkldnn`` were measured too and left
    out: none was faster on CPU, ``torch.compile`` took 16 s to warm up,
    oneDNN tensors lack Lite0's ReLU6, and ``torch.jit.trace`` would bake
    Lite0's input-size dependent padding into the graph.

    Parameters
    ----------
    network : torch.nn.Module
        An eval-mode feature network; it is not modified.
    device : torch.device or str
        Where the network will run.

    Returns
    -------
    network : torch.nn.Module
        A copy with BatchNorm folded into the convolutions, on ``device``
        and in ``memory_format``.
    memory_format : torch.memory_format
        The layout to give the input batches, with
        ``batch.contiguous(memory_format=memory_format)``; the output maps
        come in the same layout.
    """
    memory_format = preferred_memory_format(device)
    network = fuse_conv_bn(network).to(device)
    return network.to(memory_format=memory_format), memory_format
