"""Registry of CNN backbones that PaDiM taps for patch features."""

from . import _efficientnet_lite, _resnet  # noqa: F401  (register the built-ins)
from ._registry import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    BackboneSpec,
    Tap,
    available_backbones,
    build_feature_network,
    get_backbone_spec,
    register_backbone,
)

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "BackboneSpec",
    "Tap",
    "available_backbones",
    "build_feature_network",
    "get_backbone_spec",
    "register_backbone",
]
