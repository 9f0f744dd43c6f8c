"""Backbone registry: a name maps to everything PaDiM needs to know about a CNN.

A backbone entry says which intermediate layers ("taps") it can expose, how many
channels and what stride each has, how to build a random-init network truncated
after the last requested tap, and where its pretrained ImageNet weights come from.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class Tap:
    """An intermediate feature map of a backbone: its channel count and stride.

    Parameters
    ----------
    channels : int
        Number of channels of the feature map.
    stride : int
        Downsampling factor of the feature map relative to the input image.
    """

    channels: int
    stride: int


@dataclass(frozen=True)
class BackboneSpec:
    """Everything PaDiM needs to know about one CNN.

    Parameters
    ----------
    name : str
        Registry key, e.g. ``"resnet18"``.
    build : callable
        ``build(layers) -> nn.Module``: a random-init network that runs only up
        to the last of ``layers`` and whose ``forward(x)`` returns the list of
        tap outputs, in the order of ``layers``. Its ``state_dict`` keys are a
        subset of the full network's, so full checkpoints load into it.
    taps : mapping of str to Tap
        The layers that can be tapped, in network order.
    default_layers : tuple of str
        The taps used when the user passes ``layers=None``.
    default_n_features : int
        The number of kept embedding dimensions when ``n_features=None``.
    load_pretrained : callable
        ``load_pretrained() -> dict``: the full network's ImageNet state dict.
        Must raise a ``RuntimeError`` that says how to supply the weights
        offline when they cannot be had.
    mean, std : tuple of float
        Input normalisation the pretrained weights expect (RGB in [0, 1]).
    description : str, default=""
        A line about the network and the source of its weights, for people
        browsing the registry; ignored when comparing specs.
    """

    name: str
    build: Callable[[Sequence[str]], nn.Module]
    taps: Mapping[str, Tap]
    default_layers: tuple[str, ...]
    default_n_features: int
    load_pretrained: Callable[[], dict]
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    description: str = field(default="", compare=False)

    def check_layers(self, layers):
        """Return ``layers`` as a tuple in network order, or raise ValueError.

        Parameters
        ----------
        layers : str, sequence of str or None
            Tap names; None means ``default_layers``.

        Returns
        -------
        layers : tuple of str
            The taps, in network order.

        Raises
        ------
        ValueError
            If ``layers`` is empty, repeats a tap or names an unknown one.
        """
        if layers is None:
            return self.default_layers
        if isinstance(layers, str):
            layers = (layers,)
        layers = tuple(layers)
        unknown = [layer for layer in layers if layer not in self.taps]
        if not layers or unknown:
            raise ValueError(
                f"layers must be a non-empty subset of {list(self.taps)} for "
                f"backbone {self.name!r}; got {list(layers)!r}."
            )
        if len(set(layers)) != len(layers):
            raise ValueError(f"layers must not repeat a layer; got {list(layers)!r}.")
        order = list(self.taps)
        return tuple(sorted(layers, key=order.index))

    def n_channels(self, layers):
        """Total embedding dimension of the concatenated taps.

        Parameters
        ----------
        layers : str, sequence of str or None
            Tap names; None means ``default_layers``.

        Returns
        -------
        n_channels : int
            The sum of the taps' channels.
        """
        return sum(self.taps[layer].channels for layer in self.check_layers(layers))


_REGISTRY: dict[str, BackboneSpec] = {}


def register_backbone(spec):
    """Add a backbone to the registry (overwriting an entry of the same name).

    Parameters
    ----------
    spec : BackboneSpec
        The backbone; ``spec.name`` becomes a valid ``backbone`` parameter.

    Returns
    -------
    spec : BackboneSpec
        The registered spec, unchanged.

    Raises
    ------
    TypeError
        If ``spec`` is not a :class:`BackboneSpec`.
    """
    if not isinstance(spec, BackboneSpec):
        raise TypeError(f"spec must be a BackboneSpec; got {type(spec).__name__}.")
    _REGISTRY[spec.name] = spec
    return spec


def available_backbones():
    """Return the names of the registered backbones, sorted.

    Returns
    -------
    names : list of str
        The values accepted by the ``backbone`` parameter.
    """
    return sorted(_REGISTRY)


def get_backbone_spec(name):
    """Look up a backbone by name, with a helpful error for unknown names.

    Parameters
    ----------
    name : str
        A registered name, see :func:`available_backbones`.

    Returns
    -------
    spec : BackboneSpec
        The registry entry.

    Raises
    ------
    TypeError
        If ``name`` is not a str.
    ValueError
        If no backbone of that name is registered; the message lists them.
    """
    if not isinstance(name, str):
        raise TypeError(f"backbone must be a str; got {type(name).__name__}.")
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(
            f"Unknown backbone {name!r}; expected one of {available_backbones()}."
        ) from None


def _read_state_dict_file(path):
    """Read a checkpoint file into a flat state dict of tensors."""
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ValueError(
            f"Could not read weights file {os.fspath(path)!r} as a PyTorch "
            f"state dict: {exc}"
        ) from exc
    # Accept the usual wrappers around a state dict.
    for key in ("state_dict", "model"):
        if isinstance(obj, Mapping) and isinstance(obj.get(key), Mapping):
            obj = obj[key]
    if not isinstance(obj, Mapping) or not all(
        isinstance(v, torch.Tensor) for v in obj.values()
    ):
        raise ValueError(
            f"Weights file {os.fspath(path)!r} does not hold a state dict "
            f"(a mapping of names to tensors)."
        )
    return {k.removeprefix("module."): v for k, v in obj.items()}


def load_into(module, state_dict, *, source):
    """Load the entries of ``state_dict`` that ``module`` needs, strictly.

    Extra keys (the layers after the last tap, the classifier) are ignored;
    a missing key or a shape mismatch means the weights belong to another
    architecture, which is a ValueError naming both.
    """
    own = module.state_dict()
    missing = [k for k in own if k not in state_dict]
    mismatched = [
        f"{k}: expected {tuple(own[k].shape)}, got {tuple(state_dict[k].shape)}"
        for k in own
        if k in state_dict and tuple(own[k].shape) != tuple(state_dict[k].shape)
    ]
    if missing or mismatched:
        details = "; ".join(
            ([f"missing {len(missing)} keys, e.g. {missing[:3]}"] if missing else [])
            + ([f"shape mismatch {mismatched[:3]}"] if mismatched else [])
        )
        raise ValueError(
            f"The weights from {source} do not fit the network expected here "
            f"({details})."
        )
    module.load_state_dict({k: state_dict[k] for k in own}, strict=True)
    return module


def build_uninitialised(spec, layers):
    """Build a backbone's network with uninitialised weights, on the CPU.

    The modules are created on the "meta" device, so their constructors'
    random initialisation draws nothing from the global torch RNG (a fit must
    not move the caller's random stream); every weight is then loaded or
    initialised from a local generator.
    """
    with torch.device("meta"):
        module = spec.build(layers)
    return module.to_empty(device="cpu")


def seeded_init(network, generator):
    """Initialise a network's weights and buffers in place from ``generator``.

    The scheme torchvision uses for ResNets (Kaiming normal, fan-out, for
    convolutions; BatchNorm scale 1, shift 0, running statistics of a unit
    Gaussian; uniform linear layers), drawing from ``generator`` only.
    """
    with torch.no_grad():
        for module in network.modules():
            if isinstance(module, nn.Conv2d):
                kernel = module.kernel_size[0] * module.kernel_size[1]
                fan_out = module.out_channels * kernel // module.groups
                module.weight.normal_(0.0, (2.0 / fan_out) ** 0.5, generator=generator)
                if module.bias is not None:
                    module.bias.zero_()
            elif isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.weight.fill_(1.0)
                module.bias.zero_()
                module.running_mean.zero_()
                module.running_var.fill_(1.0)
                module.num_batches_tracked.zero_()
            elif isinstance(module, nn.Linear):
                bound = 1.0 / module.in_features**0.5
                module.weight.uniform_(-bound, bound, generator=generator)
                if module.bias is not None:
                    module.bias.uniform_(-bound, bound, generator=generator)
    return network


def build_feature_network(name, layers=None, weights="DEFAULT", *, generator=None):
    """Build the truncated, eval-mode feature network of a registered backbone.

    Parameters
    ----------
    name : str
        A registered backbone name.
    layers : sequence of str or None
        Taps to return; None means the backbone's defaults.
    weights : {"DEFAULT"}, path-like, dict or None
        ``"DEFAULT"``: the pretrained ImageNet weights; a path: a local
        state-dict file of the full (or truncated) network; a dict: a state
        dict; None: random initialisation (for tests), from ``generator``.
    generator : torch.Generator or None, default=None
        Draws the random initialisation (``weights=None``); None uses a
        fresh generator with torch's default seed.

    Returns
    -------
    module : torch.nn.Module
        Eval-mode network whose forward returns the list of tap outputs.
    """
    spec = get_backbone_spec(name)
    layers = spec.check_layers(layers)
    module = build_uninitialised(spec, layers)
    if weights is None:
        seeded_init(module, generator or torch.Generator())
    elif isinstance(weights, str) and weights == "DEFAULT":
        load_into(module, spec.load_pretrained(), source=f"{name} pretrained")
    elif isinstance(weights, Mapping):
        load_into(module, dict(weights), source="the given state dict")
    elif isinstance(weights, (str, os.PathLike)):
        if not os.path.isfile(weights):
            raise ValueError(
                f"weights must be 'DEFAULT', None or the path of an existing "
                f"state-dict file; got {os.fspath(weights)!r}, which does not exist."
            )
        load_into(
            module,
            _read_state_dict_file(weights),
            source=f"file {os.fspath(weights)!r}",
        )
    else:
        raise TypeError(
            "weights must be 'DEFAULT', None, a path or a state dict; got "
            f"{type(weights).__name__}."
        )
    return module.eval().requires_grad_(False)
