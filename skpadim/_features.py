"""Patch embeddings from a pretrained CNN: the first stage of PaDiM."""

from __future__ import annotations

import contextlib
import numbers
import os
import warnings

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.base import BaseEstimator, TransformerMixin, _fit_context
from sklearn.utils import check_random_state
from sklearn.utils._param_validation import Interval, StrOptions
from sklearn.utils.validation import check_is_fitted
from tqdm.auto import tqdm

from ._images import Preprocessing, check_images, check_size
from ._moments import PatchMoments, positions_first
from ._persistence import VersionedStateMixin
from ._scratch import scratch
from .backbones import build_feature_network, get_backbone_spec
from .backbones._inference import optimize_for_inference
from .backbones._registry import build_uninitialised


def resolve_device(device):
    """``"auto"`` -> CUDA when available, else CPU; validate anything else."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(
            f"device must be 'auto', 'cpu', 'cuda' or 'cuda:N'; got {device!r}."
        ) from exc
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={device!r} was asked for but CUDA is not available.")
    return resolved


def _loaded_model_device(device):
    """The device for a fitted model: like resolve_device, but a model fitted
    on a GPU and loaded on a machine without one falls back to the CPU."""
    try:
        return resolve_device(device)
    except ValueError:
        if torch.cuda.is_available() or "cuda" not in str(device):
            raise
        warnings.warn(
            f"This model was set up for device={device!r}, which is not available "
            "here; it runs on the CPU. Use set_params(device='cpu') to silence this.",
            UserWarning,
            stacklevel=3,
        )
        return torch.device("cpu")


def _check_weights(weights):
    """Cheap checks of the ``weights`` parameter, before anything is loaded."""
    if weights is None or weights == "DEFAULT" or isinstance(weights, dict):
        return
    if not os.path.isfile(weights):
        raise ValueError(
            "weights must be 'DEFAULT', None, a state dict or the path of an "
            f"existing state-dict file; got {os.fspath(weights)!r}."
        )


class PatchFeatureExtractor(VersionedStateMixin, TransformerMixin, BaseEstimator):
    """Images -> PaDiM patch embeddings of shape (n, n_features, h, w).

    The backbone's tapped feature maps are reduced to ``n_features`` channels
    (a random subset, or a PCA projection), the coarser maps are upsampled
    (nearest) to the finest tap's grid, and the results are concatenated. The
    channels are selected before upsampling, so the full-width embedding is
    never built (except while fitting the PCA).

    Parameters
    ----------
    backbone : str, default="efficientnet_lite0"
        A name from :func:`skpadim.backbones.available_backbones`.
    weights : "DEFAULT", path-like or None, default="DEFAULT"
        ``"DEFAULT"`` for the pretrained ImageNet weights, the path of a local
        state-dict file, or None for a random initialisation (tests only).
    layers : tuple of str or None, default=None
        Tapped layers; None uses the backbone's default (PaDiM: layer1-3).
    n_features : int or None, default=None
        Embedding dimensions kept; None uses the backbone's default (100 for
        resnet18, 550 for wide_resnet50_2).
    reduction : {"random", "pca"}, default="random"
        Random dimension selection (PaDiM's Rd) or PCA (its ablation).
    patch_size : int, default=1
        Local aggregation: each tap is averaged over a ``patch_size`` x
        ``patch_size`` neighbourhood (stride 1, zero padding counted, as
        PatchCore's locally aware features); 1 leaves the taps as they are.
    upsampling : {"nearest", "bilinear"}, default="nearest"
        How coarser taps are brought to the finest tap's grid (PaDiM: nearest;
        PatchCore: bilinear).
    image_size : int, (int, int) or None, default=224
        Images are resized to this (height, width); None keeps their size.
    crop_size : int, (int, int) or None, default=None
        Centre crop after resizing; None analyses the whole image.
    batch_size : int, default=32
        Images per forward pass.
    device : str, default="auto"
        Torch device; "auto" picks CUDA when available.
    precision : {"float32", "float16", "bfloat16"}, default="float32"
        Precision of the backbone's forward pass, through ``torch.autocast``;
        the embeddings are returned in float32.
    random_state : int, RandomState instance or None, default=None
        Seeds the random channel selection.
    verbose : int, default=0
        Show a progress bar when > 0.

    Attributes
    ----------
    layers_ : tuple of str
        The tapped layers, in network order.
    n_features_ : int
        Embedding dimensions kept.
    n_channels_ : int
        Width of the full concatenated embedding (e.g. 448 for resnet18).
    channel_indices_ : ndarray of shape (n_features,) or None
        Kept channels of the concatenation ("random" reduction).
    components_ : ndarray of shape (n_features, n_channels) or None
        PCA directions ("pca" reduction).
    pca_mean_ : ndarray of shape (n_channels,) or None
        Mean of the full-width embeddings ("pca" reduction).
    backbone_state_ : dict of str to ndarray
        Weights of the truncated backbone, so a fitted extractor is
        self-contained.

    Examples
    --------
    >>> import numpy as np
    >>> from skpadim import PatchFeatureExtractor
    >>> X = np.random.default_rng(0).integers(0, 255, (4, 64, 64, 3), dtype=np.uint8)
    >>> ext = PatchFeatureExtractor(backbone="resnet18", weights=None,
    ...                             image_size=64, n_features=20, random_state=0)
    >>> ext.fit_transform(X).shape
    (4, 20, 16, 16)
    """

    _parameter_constraints = {
        # Checked against the registry at fit time, so that backbones
        # registered after import are accepted too.
        "backbone": [str],
        "weights": [str, os.PathLike, dict, None],
        "layers": [tuple, list, str, None],
        "n_features": [Interval(numbers.Integral, 1, None, closed="left"), None],
        "reduction": [StrOptions({"random", "pca"})],
        "patch_size": [Interval(numbers.Integral, 1, 15, closed="both")],
        "upsampling": [StrOptions({"nearest", "bilinear"})],
        "image_size": [
            Interval(numbers.Integral, 1, None, closed="left"),
            tuple,
            list,
            None,
        ],
        "crop_size": [
            Interval(numbers.Integral, 1, None, closed="left"),
            tuple,
            list,
            None,
        ],
        "batch_size": [Interval(numbers.Integral, 1, None, closed="left")],
        "device": [str, torch.device],
        "precision": [StrOptions({"float32", "float16", "bfloat16"})],
        "random_state": ["random_state"],
        "verbose": ["verbose"],
    }

    def __init__(
        self,
        *,
        backbone="efficientnet_lite0",
        weights="DEFAULT",
        layers=None,
        n_features=None,
        reduction="random",
        patch_size=1,
        upsampling="nearest",
        image_size=224,
        crop_size=None,
        batch_size=32,
        device="auto",
        precision="float32",
        random_state=None,
        verbose=0,
    ):
        self.backbone = backbone
        self.weights = weights
        self.layers = layers
        self.n_features = n_features
        self.reduction = reduction
        self.patch_size = patch_size
        self.upsampling = upsampling
        self.image_size = image_size
        self.crop_size = crop_size
        self.batch_size = batch_size
        self.device = device
        self.precision = precision
        self.random_state = random_state
        self.verbose = verbose

    # ------------------------------------------------------------------ fit
    def check_config(self):
        """Validate the parameters that need no data or network.

        Returns
        -------
        spec : BackboneSpec
            The backbone's registry entry.
        layers : tuple of str
            The taps, in network order.
        n_features : int
            The number of embedding dimensions to keep.
        preprocessing : Preprocessing
            Resize, crop and normalisation of the images.
        device : torch.device
            The device to run on.
        """
        spec = get_backbone_spec(self.backbone)
        layers = spec.check_layers(self.layers)
        n_channels = spec.n_channels(layers)
        if self.n_features is None:  # the backbone's default, capped by fewer layers
            n_features = min(spec.default_n_features, n_channels)
        else:
            n_features = self.n_features
        if not 1 <= n_features <= n_channels:
            raise ValueError(
                f"n_features must be between 1 and {n_channels}, the number of "
                f"channels of {self.backbone} layers {list(layers)}; got {n_features}."
            )
        preprocessing = Preprocessing(
            check_size(self.image_size, "image_size"),
            check_size(self.crop_size, "crop_size"),
            spec.mean,
            spec.std,
        )
        if preprocessing.image_size is not None:
            preprocessing.crop_box(preprocessing.image_size)
        _check_weights(self.weights)
        return spec, layers, n_features, preprocessing, resolve_device(self.device)

    @_fit_context(prefer_skip_nested_validation=True)
    def fit(self, X, y=None):
        """Load the backbone and choose the kept embedding dimensions.

        Parameters
        ----------
        X : array of shape (n, H, W[, C]) or list of arrays, paths or PIL images
            Training images (used by the "pca" reduction only, but validated).
        y : Ignored
            Not used, present for API consistency.

        Returns
        -------
        self : PatchFeatureExtractor
            The fitted extractor.
        """
        images = check_images(X)
        self._fit(images)
        return self

    def _fit(self, images):
        """Fit from a validated ImageSet; attributes are set only at the end."""
        spec, layers, n_features, preprocessing, device = self.check_config()
        rng = check_random_state(self.random_state)
        # Random-init backbones (weights=None) draw from a local generator:
        # the global torch RNG is shared by every thread, and is the caller's.
        generator = torch.Generator().manual_seed(int(rng.randint(2**31 - 1)))
        network = build_feature_network(
            spec.name, layers, self.weights, generator=generator
        )
        offsets = np.cumsum([0] + [spec.taps[layer].channels for layer in layers])
        channel_indices = components = pca_mean = None
        if self.reduction == "random":
            chosen = rng.choice(offsets[-1], size=n_features, replace=False)
            channel_indices = np.sort(chosen)
        # Numpy views of the weights (no copy): the fitted state to pickle.
        state = {k: v.detach().cpu().numpy() for k, v in network.state_dict().items()}
        runtime = self._new_runtime(network, preprocessing, device, offsets)
        if self.reduction == "pca":
            components, pca_mean = self._fit_pca(images, runtime, n_features)
        runtime.set_reduction(channel_indices, components, pca_mean)

        self.layers_ = layers
        self.n_features_ = n_features
        self.n_channels_ = int(offsets[-1])
        self.channel_indices_ = channel_indices
        self.components_ = components
        self.pca_mean_ = pca_mean
        self.backbone_state_ = state
        self._runtime = runtime

    def _new_runtime(self, network, preprocessing, device, offsets):
        return _Runtime(
            network,
            preprocessing,
            device,
            offsets,
            self.precision,
            patch_size=self.patch_size,
            upsampling=self.upsampling,
        )

    def _fit_pca(self, images, runtime, n_features):
        """Principal directions of the pooled full-width patch embeddings."""
        moments = None
        for batch in self._batches(images, runtime, desc="PCA"):
            full = runtime.reduce(runtime.forward(batch))
            x = positions_first(full).reshape(1, -1, full.shape[1])
            part = PatchMoments.from_batch(x)
            moments = part if moments is None else moments.merge(part)
        covariance = (moments.scatter[0] / max(moments.count - 1, 1)).cpu().numpy()
        _, eigvecs = np.linalg.eigh(covariance)
        components = eigvecs[:, ::-1][:, :n_features].T
        # Fix each direction's sign (largest entry positive) for reproducibility.
        signs = np.sign(components[np.arange(n_features), np.abs(components).argmax(1)])
        components = components * signs[:, None]
        mean = moments.mean[0].cpu().numpy()
        return components.astype(np.float32), mean.astype(np.float32)

    # ------------------------------------------------------------ transform
    def transform(self, X):
        """Patch embeddings of images.

        Parameters
        ----------
        X : array of shape (n, H, W[, C]) or list of arrays, paths or PIL images
            Images, as for :meth:`fit`.

        Returns
        -------
        embeddings : ndarray of shape (n, n_features, h, w), float32
            Patch embeddings on the grid of the finest tap.
        """
        check_is_fitted(self)
        images = check_images(X)
        embeddings = [e.cpu().numpy() for _, e in self.embed_batches(images)]
        return np.concatenate(embeddings, axis=0)

    def embed_batches(self, images, desc="embed", *, kind="concat"):
        """Yield (preprocessed batch, embeddings) pairs of tensors on the device.

        Parameters
        ----------
        images : ImageSet
            Validated images (see ``skpadim._images.check_images``).
        desc : str
            Progress-bar label.
        kind : {"concat", "taps"}, default="concat"
            "concat": one (B, n_features, h, w) tensor on the finest tap's
            grid; "taps": the list of reduced taps, each on its own grid (the
            kept channels of each layer, in network order; a layer with no
            kept channel is left out).

        Yields
        ------
        batch : tensor of shape (B, 3, H, W)
            The preprocessed images.
        embeddings : tensor of shape (B, n_features, h, w) or list of tensors
            Their patch embeddings.
        """
        runtime = self._get_runtime()
        for batch in self._batches(images, runtime, desc=desc):
            taps = runtime.forward(batch)
            parts = runtime.reduce_taps(taps)
            if kind == "concat":
                parts = runtime.concat(parts, taps[0].shape[-2:])
            yield batch, parts

    @property
    def preprocessing_(self):
        """The fitted :class:`~skpadim._images.Preprocessing`."""
        return self._get_runtime().preprocessing

    @property
    def device_(self):
        """The torch device the network runs on."""
        return self._get_runtime().device

    def _batches(self, images, runtime, desc):
        total = -(-len(images) // self.batch_size)
        batches = images.batches(self.batch_size)
        if self.verbose:
            batches = tqdm(batches, total=total, desc=desc, unit="batch")
        for arrays in batches:
            yield runtime.preprocessing(arrays, runtime.device, runtime.memory_format)

    def _get_runtime(self):
        """The runtime state, rebuilt from the fitted arrays after unpickling."""
        check_is_fitted(self)
        if getattr(self, "_runtime", None) is None:
            spec = get_backbone_spec(self.backbone)
            preprocessing = Preprocessing(
                check_size(self.image_size, "image_size"),
                check_size(self.crop_size, "crop_size"),
                spec.mean,
                spec.std,
            )
            device = _loaded_model_device(self.device)
            network = build_uninitialised(spec, self.layers_)
            weights = {
                k: torch.from_numpy(np.array(v))
                for k, v in self.backbone_state_.items()
            }
            network.load_state_dict(weights)
            network = network.eval().requires_grad_(False).to(device)
            offsets = np.cumsum(
                [0] + [spec.taps[layer].channels for layer in self.layers_]
            )
            runtime = self._new_runtime(network, preprocessing, device, offsets)
            runtime.set_reduction(
                self.channel_indices_, self.components_, self.pca_mean_
            )
            self._runtime = runtime
        return self._runtime

    def __sklearn_is_fitted__(self):
        return hasattr(self, "backbone_state_")

    def __sizeof__(self):
        # Lets joblib's Dask backend see the weights are large and scatter
        # them to the workers once, instead of shipping them in every task.
        weights = getattr(self, "backbone_state_", {})
        return object.__sizeof__(self) + sum(v.nbytes for v in weights.values())

    def __getstate__(self):
        state = dict(super().__getstate__())  # a copy: never touch the live object
        # The torch module and the device are rebuilt on load: the pickle holds
        # plain numpy arrays only, so it loads on a machine without a GPU.
        state.pop("_runtime", None)
        return state

    def __setstate__(self, state):
        # Parameters added after release 0.1, at the values it used.
        state = {"patch_size": 1, "upsampling": "nearest", **state}
        super().__setstate__(state)

    def set_params(self, **params):
        # A changed parameter invalidates the cached network and device.
        self.__dict__.pop("_runtime", None)
        return super().set_params(**params)

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.input_tags.three_d_array = True
        tags.requires_fit = True
        tags.non_deterministic = False
        return tags


class _Runtime:
    """What a fitted extractor needs to run: network, preprocessing, reduction.

    Kept out of pickles and rebuilt from the fitted numpy arrays on demand.
    """

    def __init__(
        self,
        network,
        preprocessing,
        device,
        layer_offsets,
        precision,
        *,
        patch_size=1,
        upsampling="nearest",
    ):
        self.patch_size = patch_size
        self.upsampling = upsampling
        # A copy with BatchNorm folded into the convolutions, in the device's
        # fastest memory layout (channels-last on CPU with oneDNN and on
        # CUDA); the fitted, pickled weights stay the unfused ones.
        self.network, self.memory_format = optimize_for_inference(network, device)
        self.precision = precision
        self.preprocessing = preprocessing
        self.device = device
        self.layer_offsets = layer_offsets
        self.channel_indices = self.components = self.pca_shift = None

    def set_reduction(self, channel_indices, components, pca_mean):
        """Use a channel subset, a PCA projection, or (both None) all channels."""
        self.channel_indices = channel_indices
        if components is not None:
            components = torch.as_tensor(components, device=self.device)
            pca_mean = torch.as_tensor(pca_mean, device=self.device)
            self.pca_shift = (components @ pca_mean).view(1, -1, 1, 1)
        self.components = components

    def forward(self, batch):
        """Tap outputs of the network, in float32 whatever the precision."""
        batch = batch.contiguous(memory_format=self.memory_format)
        with torch.inference_mode(), self._autocast():
            taps = self.network(batch)
        return [tap.float() for tap in taps]

    def _autocast(self):
        if self.precision == "float32":
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=getattr(torch, self.precision))

    def reduce(self, taps):
        """Tap outputs -> (B, n_features, h, w) on the finest tap's grid."""
        return self.concat(self.reduce_taps(taps), taps[0].shape[-2:])

    def reduce_taps(self, taps):
        """Reduce each tap to its kept channels (or PCA block), then aggregate
        each over its local neighbourhood (``patch_size``), on its own grid.

        Reducing first gives the same result as reducing the upsampled
        concatenation, because resampling and local averaging commute with
        per-pixel linear maps, at a fraction of the memory.
        """
        bounds = zip(self.layer_offsets[:-1], self.layer_offsets[1:])
        parts = []
        with torch.inference_mode():
            for tap, (start, stop) in zip(taps, bounds):
                tap = self._reduce_tap(tap, start, stop)
                if tap is None:
                    continue
                if self.patch_size > 1:
                    tap = F.avg_pool2d(
                        tap, self.patch_size, stride=1, padding=self.patch_size // 2
                    )
                parts.append(tap)
        return parts

    def concat(self, parts, size):
        """Reduced taps -> one (B, n_features, h, w) tensor on the ``size`` grid
        (the finest tap's, even when none of its channels was kept).

        The result is a view of a positions-first (h, w, B, n_features)
        buffer: that is the layout the per-position statistics and scores
        work in, so they need no further copy, and each tap is written into
        it once, upsampled on the way (see :func:`upsample_into`).
        """
        with torch.inference_mode():
            if self.components is not None:
                parts = [self._upsample(part, size) for part in parts]
                return sum(parts) - self.pca_shift
            n_images = parts[0].shape[0]
            n_features = sum(part.shape[1] for part in parts)
            buffer = scratch(
                "embedding",
                (*size, n_images, n_features),
                dtype=parts[0].dtype,
                device=parts[0].device,
            )
            embeddings = buffer.permute(2, 3, 0, 1)
            start = 0
            for part in parts:
                stop = start + part.shape[1]
                upsample_into(embeddings[:, start:stop], part, self.upsampling)
                start = stop
            return embeddings

    def _upsample(self, tap, size):
        if tap.shape[-2:] == size:
            return tap
        if self.upsampling == "nearest":
            return F.interpolate(tap, size=size, mode="nearest")
        return F.interpolate(tap, size=size, mode="bilinear", align_corners=False)

    def _reduce_tap(self, tap, start, stop):
        if self.components is not None:
            return torch.einsum("kc,bchw->bkhw", self.components[:, start:stop], tap)
        if self.channel_indices is None:
            return tap
        indices = self.channel_indices
        local = indices[(indices >= start) & (indices < stop)] - start
        if len(local) == 0:
            return None
        if len(local) == stop - start:  # every channel kept: no copy
            return tap
        local = torch.as_tensor(local, device=tap.device)
        # A scratch buffer per tap (they are alive together), reused while
        # scoring like the embedding they are copied into.
        shape = (tap.shape[0], len(local), *tap.shape[2:])
        kept = scratch(f"kept_{start}", shape, dtype=tap.dtype, device=tap.device)
        return torch.index_select(tap, 1, local, out=kept)


def upsample_into(out, tap, mode):
    """Write ``tap`` (B, k, h, w), upsampled to ``out``'s grid, into ``out``.

    Nearest upsampling by a power-of-two factor is a block repetition, done
    as a broadcast copy straight into ``out``, with no upsampled temporary;
    other cases go through :func:`torch.nn.functional.interpolate`. (With a
    power of two the scale is exact in floating point, so the source index
    ``floor(i / factor)`` is the one ``interpolate`` picks.)
    """
    height, width = out.shape[-2:]
    tap_height, tap_width = tap.shape[-2:]
    if (tap_height, tap_width) == (height, width):
        out.copy_(tap)
        return
    fy, fx = height // tap_height, width // tap_width
    if (
        mode == "nearest"
        and (fy * tap_height, fx * tap_width) == (height, width)
        and _is_power_of_two(fy)
        and _is_power_of_two(fx)
    ):
        blocks = out.unflatten(3, (tap_width, fx)).unflatten(2, (tap_height, fy))
        blocks.copy_(tap[:, :, :, None, :, None].expand_as(blocks))
        return
    align = None if mode == "nearest" else False
    out.copy_(F.interpolate(tap, size=(height, width), mode=mode, align_corners=align))


def _is_power_of_two(n):
    return n > 0 and n & (n - 1) == 0
