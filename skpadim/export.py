"""ONNX export of fitted detectors: the whole pipeline in one graph.

:func:`to_onnx` writes a fitted detector as an ONNX model that takes uint8
RGB images already at the detector's frame size and does everything else
inside the graph, so a deployment needs only an ONNX runtime:

1. ``/ 255`` and the backbone's mean/std normalisation;
2. the backbone, with BatchNorm folded into the convolutions
   (:func:`skpadim.backbones._inference.fuse_conv_bn`);
3. the channel selection or PCA projection of the taps, their local
   averaging (``patch_size``) and their upsampling to the finest grid;
4. the head's patch scores (PaDiM's Mahalanobis distances, PatchCore's and
   SPADE's nearest-neighbour distances);
5. the maps, ``A_y @ patch @ A_x^T``, with the detector's bilinear upsampling
   and Gaussian smoothing as two constant matrices;
6. the image scores.

Inputs and outputs
------------------
``images``
    uint8, shape (N, H, W, 3), RGB, with (H, W) = ``detector.frame_shape_``;
    N is dynamic (``batch_size_dynamic=True``) or 1.
``scores``
    float32, shape (N,): the image anomaly scores, ``-score_samples``.
    An image is anomalous (``predict`` gives -1) where ``scores >
    threshold``, with ``threshold = -detector.offset_``; the value is also
    stored in the model's metadata under ``"threshold"``.
``maps``
    float32, shape (N, H, W): ``anomaly_maps(X, resolution="model")``.
    Not produced for :class:`~skpadim.GaussianADDetector`, which has no maps.

Bringing images to the frame
----------------------------
The graph does not resize: the caller brings each image to the frame the
detector analyses, exactly as its preprocessing does. With ``image_size``
set, that is a bilinear, antialiased resize of the whole image to
``image_size`` (height, width), then, with ``crop_size`` set, the centre
crop of that size (top = (height - crop_height) // 2, left likewise). With
``image_size=None`` the images must have the training size. Grayscale is
replicated to three channels; an alpha channel is dropped; files are turned
upright by their EXIF orientation.

Where skpadim is installed, :func:`frame_images` does exactly that with the
detector's own code. Without it, Pillow's antialiased bilinear resize
computes the same filter (up to the rounding to uint8)::

    import numpy as np
    from PIL import Image, ImageOps

    def to_frame(path, image_size, crop_size=None):
        image = ImageOps.exif_transpose(Image.open(path)).convert("RGB")
        height, width = image_size
        image = image.resize((width, height), Image.Resampling.BILINEAR)
        if crop_size is not None:
            crop_h, crop_w = crop_size
            top, left = (height - crop_h) // 2, (width - crop_w) // 2
            image = image.crop((left, top, left + crop_w, top + crop_h))
        return np.asarray(image)  # (H, W, 3) uint8

    scores, maps = session.run(None, {"images": np.stack([...])})

Images handed over as uint8 are scored exactly as the Python detector scores
them; resizing in float (as the detector does) and rounding to uint8 moves a
pixel by at most half a grey level, which changes scores far less than any
real defect does.

Running the model
-----------------
With ONNX Runtime::

    import onnxruntime

    session = onnxruntime.InferenceSession("padim.onnx")
    scores, maps = session.run(None, {"images": frames})

PaDiM's whitening factors are unpacked by the graph from their packed
storage; ONNX Runtime turns that into a constant when it loads the model,
but only up to 1 GiB by default. Larger factors (e.g. wide_resnet50_2 with
550 features at 224 px: 3.8 GB) would then be unpacked at every run; raise
the limit when creating the session::

    options = onnxruntime.SessionOptions()
    options.add_session_config_entry(
        "optimization.constant_folding_max_output_size_in_bytes", str(2**33)
    )
    session = onnxruntime.InferenceSession("padim.onnx", options)

Which detectors export
----------------------
- :class:`~skpadim.PadimDetector`: the whitening factors are stored packed,
  as in the joblib file, and unpacked in the graph; the file is about the
  size of the joblib file.
- :class:`~skpadim.PatchCoreDetector`: the coreset bank, exact 1-NN
  distances, and the paper's re-weighting of the image score (the
  neighbourhoods of the bank entries are precomputed).
- :class:`~skpadim.SpadeDetector`: the whole gallery (every training
  image's feature pyramid) is a constant of the graph. Scoring is one
  matrix of distances per level, without the blocking the detector does:
  about ``4 * N * (h*w) * K * (h*w)`` bytes for a level of h x w positions
  with ``K = n_neighbors``, e.g. 2 GB per image for a 56 x 56 level with
  K = 50. Use small batches, or fewer neighbours.
- :class:`~skpadim.GaussianADDetector`: pooled features and the sum of the
  per-level Mahalanobis distances; ``scores`` only.
- ``CflowDetector``: the flows, on the fibers of every level, with their
  positional encodings as constants.

The graph always computes in float32: a detector fitted with
``precision="float16"`` or ``"bfloat16"`` runs its backbone in that
precision under Python, so its scores differ slightly from the graph's.

Memory of the nearest-neighbour heads: PatchCore builds a matrix of
``N * h * w * M`` float32 distances (M bank entries) in one piece, e.g.
``784 * 16000 * 4`` bytes = 50 MB per image for a 28 x 28 grid and a bank of
16000 entries.
"""

from __future__ import annotations

import os
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch
from sklearn.utils.validation import check_is_fitted

from ._images import Preprocessing, check_images, check_size
from ._maps import _axis_operator
from .backbones import get_backbone_spec
from .backbones._inference import fuse_conv_bn

__all__ = ["frame_images", "to_onnx"]

# Default opset: the newest the TorchScript exporter writes for every operator
# used here, and read by every ONNX Runtime release of the last years.
DEFAULT_OPSET = 17

# ONNX files are protobuf messages, which cannot exceed 2 GiB; beyond this many
# bytes of constants (a margin left for the graph itself), the constants go to
# a side file.
EXTERNAL_DATA_THRESHOLD = 2**31 - 2**26


def to_onnx(
    detector,
    path,
    *,
    opset=None,
    batch_size_dynamic=True,
    external_data_threshold=EXTERNAL_DATA_THRESHOLD,
):
    """Export a fitted detector to an ONNX file: uint8 frames in, scores out.

    The graph takes uint8 RGB images of shape (N, H, W, 3) at the detector's
    frame size, ``frame_shape_``, and computes everything the detector does
    from there (see the module docstring): ``scores`` (N,), the image
    anomaly scores ``-score_samples``, and ``maps`` (N, H, W), the model-
    frame anomaly maps (not for :class:`~skpadim.GaussianADDetector`).

    Parameters
    ----------
    detector : PadimDetector, PatchCoreDetector, SpadeDetector, \
GaussianADDetector or CflowDetector
        A fitted detector.
    path : str or path-like
        The ``.onnx`` file to write (overwritten).
    opset : int or None, default=None
        ONNX opset version; None uses 17. At least 14.
    batch_size_dynamic : bool, default=True
        Whether N is a dynamic axis; False fixes N to 1 (for runtimes that
        need static shapes).
    external_data_threshold : int, default=2**31 - 2**26
        When the graph's constants take more bytes than this, they are
        written to a side file ``<name>.data`` next to ``path`` (ONNX's
        external data), since a single ONNX file cannot exceed 2 GiB. Keep
        the two files together; ONNX Runtime finds the side file by itself.

    Returns
    -------
    path : pathlib.Path
        The written ONNX file.

    Raises
    ------
    sklearn.exceptions.NotFittedError
        If the detector is not fitted.
    TypeError
        If ``detector`` is not a detector of this package.
    ValueError
        For an invalid ``opset`` or ``external_data_threshold``.
    NotImplementedError
        For a detector whose scoring the exporter does not know (a subclass
        with its own head).
    ImportError
        If ``onnx`` is not installed (``pip install 'skpadim[onnx]'``).

    Notes
    -----
    The exported module is built from the fitted arrays (not traced from the
    detector's own scoring code, which is written for blocked, bounded-memory
    evaluation) and written by PyTorch's TorchScript-based exporter. The
    graph computes in float32 whatever the detector's ``precision``.

    Examples
    --------
    >>> import numpy as np
    >>> from skpadim import PadimDetector
    >>> from skpadim.export import to_onnx
    >>> X = np.random.default_rng(0).integers(0, 255, (8, 64, 64, 3), np.uint8)
    >>> det = PadimDetector(backbone="resnet18", weights=None, image_size=64,
    ...                     n_features=20, random_state=0).fit(X)
    >>> path = to_onnx(det, "padim.onnx")  # doctest: +SKIP
    >>> import onnxruntime  # doctest: +SKIP
    >>> session = onnxruntime.InferenceSession(path)  # doctest: +SKIP
    >>> scores, maps = session.run(None, {"images": X[:2]})  # doctest: +SKIP
    """
    opset = DEFAULT_OPSET if opset is None else opset
    if isinstance(opset, bool) or not isinstance(opset, int) or opset < 14:
        raise ValueError(f"opset must be an int >= 14 or None; got {opset!r}.")
    if isinstance(external_data_threshold, bool) or not isinstance(
        external_data_threshold, int
    ):
        raise ValueError(
            "external_data_threshold must be an int number of bytes; got "
            f"{external_data_threshold!r}."
        )
    import onnx  # an optional dependency: imported only when exporting

    module = _build_module(detector)
    height, width = detector.frame_shape_
    example = torch.zeros((1, height, width, 3), dtype=torch.uint8)
    outputs = ["scores", "maps"] if module.with_maps else ["scores"]
    dynamic_axes = None
    if batch_size_dynamic:
        dynamic_axes = {"images": {0: "N"}, **{name: {0: "N"} for name in outputs}}
    path = Path(path)
    with tempfile.TemporaryDirectory() as folder:
        traced = os.path.join(folder, "model.onnx")
        with warnings.catch_warnings():
            # The TorchScript exporter is deprecated in favour of the
            # torch.export one, which needs onnxscript and still trips over
            # data-dependent indexing; the TracerWarnings are about shapes
            # that are static here (H and W are fixed).
            warnings.simplefilter("ignore", DeprecationWarning)
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            # Shape inference notes that it leaves a reversed Slice unfolded,
            # which is what do_constant_folding=False asks for anyway.
            warnings.filterwarnings("ignore", "Constant folding", UserWarning)
            torch.onnx.export(
                module,
                (example,),
                traced,
                input_names=["images"],
                output_names=outputs,
                dynamic_axes=dynamic_axes,
                opset_version=opset,
                # Folding would unpack PaDiM's packed whitening factors into
                # full matrices in the file, doubling it; ONNX Runtime folds
                # them in memory when it loads the model instead.
                do_constant_folding=False,
                dynamo=False,
            )
        del module  # its constants are in the file now: free them first
        model = onnx.load(traced)  # loads a side file too, for > 2 GiB models
    _describe(model, detector)
    _save(onnx, model, path, external_data_threshold)
    return path


def _describe(model, detector):
    """Record what a deployment needs besides the graph in its metadata."""
    from . import __version__

    height, width = detector.frame_shape_
    preprocessing = _preprocessing(detector.feature_extractor_)
    entries = {
        "skpadim_version": __version__,
        "detector": type(detector).__name__,
        "frame_shape": f"{height},{width}",
        "image_size": _shape_text(preprocessing.image_size),
        "crop_size": _shape_text(preprocessing.crop_size),
        # scores > threshold <=> predict(X) == -1
        "threshold": repr(-float(detector.offset_)),
    }
    del model.metadata_props[:]
    for key, value in entries.items():
        model.metadata_props.add(key=key, value=value)
    model.producer_name = "skpadim"
    model.producer_version = __version__
    model.doc_string = (
        f"{type(detector).__name__} exported by skpadim {__version__}: uint8 RGB "
        f"images (N, {height}, {width}, 3) -> scores (N,)"
        + (", maps (N, H, W)" if len(model.graph.output) > 1 else "")
    )


def _shape_text(shape):
    return "none" if shape is None else f"{shape[0]},{shape[1]}"


def _save(onnx, model, path, threshold):
    """Write ``model`` to ``path``, its constants to a side file if large."""
    data_name = path.name + ".data"
    data_path = path.with_name(data_name)
    # onnx appends to an existing side file: never reuse a stale one.
    if data_path.exists():
        data_path.unlink()
    constants = sum(_tensor_nbytes(t) for t in model.graph.initializer)
    if constants > threshold:
        onnx.save_model(
            model,
            os.fspath(path),
            save_as_external_data=True,
            all_tensors_to_one_file=True,
            location=data_name,
            size_threshold=1024,
        )
    else:
        onnx.save_model(model, os.fspath(path))
    onnx.checker.check_model(os.fspath(path))


def _tensor_nbytes(tensor):
    if tensor.raw_data:
        return len(tensor.raw_data)
    for entry in tensor.external_data:
        if entry.key == "length":
            return int(entry.value)
    return 4 * int(np.prod(tensor.dims, dtype=np.int64))


# --------------------------------------------------------------------------
# From a fitted detector to a torch module


def _build_module(detector):
    """The :class:`skpadim._onnx_graph.Pipeline` of a fitted detector.

    Parameters
    ----------
    detector : fitted detector of this package

    Returns
    -------
    module : torch.nn.Module
        Maps uint8 images (N, H, W, 3) to ``scores`` (and ``maps``); in eval
        mode, on the CPU, float32.
    """
    from ._base import BaseImageDetector

    if not isinstance(detector, BaseImageDetector):
        raise TypeError(
            "to_onnx exports skpadim's detectors (PadimDetector, "
            "PatchCoreDetector, SpadeDetector, GaussianADDetector, "
            f"CflowDetector); got {type(detector).__name__}."
        )
    check_is_fitted(detector)
    head = detector._fitted_head()
    builder = _head_builder(head)
    if builder is None:
        raise NotImplementedError(
            f"to_onnx does not know how {type(detector).__name__} scores "
            f"(its head is a {type(head).__name__}); it exports PadimDetector, "
            "PatchCoreDetector, SpadeDetector, GaussianADDetector and "
            "CflowDetector."
        )
    from . import _onnx_graph as graph

    extractor = detector.feature_extractor_
    features = _features_module(extractor, head.input_kind, detector.frame_shape_)
    # The grids as the graph will see them: run the features once on a blank
    # frame rather than re-deriving each backbone's padding rules.
    height, width = detector.frame_shape_
    with torch.no_grad():
        blank = features(torch.zeros(1, 3, height, width))
    blank = blank if head.input_kind == "taps" else [blank]
    shapes = [tuple(int(s) for s in tap.shape[-2:]) for tap in blank]
    # Patch scores live on the first (finest) grid.
    grid = shapes[0]
    head_module, with_maps = builder(head, grid, shapes)
    spec = get_backbone_spec(extractor.backbone)
    preprocess = graph.Preprocess(spec.mean, spec.std)
    rows = cols = None
    if with_maps:
        key = (float(detector.sigma_), torch.device("cpu"), torch.float32)
        rows = _axis_operator(grid[0], height, *key).numpy()
        cols = _axis_operator(grid[1], width, *key).numpy()
    module = graph.Pipeline(preprocess, features, head_module, rows, cols)
    return module.eval().requires_grad_(False)


def _head_builder(head):
    from ._gaussian import PatchGaussian
    from ._gaussian_ad import LevelGaussians
    from ._memory_bank import PatchMemoryBank
    from ._spade import SpadeGallery

    builders = {
        PatchGaussian: _padim_head,
        PatchMemoryBank: _patchcore_head,
        SpadeGallery: _spade_head,
        LevelGaussians: _gaussian_ad_head,
    }
    builder = builders.get(type(head))
    if builder is None and type(head).__name__ == "_FlowHead":
        builder = _cflow_head
    return builder


def _padim_head(head, grid, shapes):
    from ._gaussian import pack_lower
    from ._onnx_graph import PadimHead

    return PadimHead(head.location_, pack_lower(head.whitening_), grid), True


def _patchcore_head(head, grid, shapes):
    from ._knn import nearest_neighbors
    from ._onnx_graph import PatchCoreHead

    bank = np.asarray(head.bank_, dtype=np.float32)
    support = None
    if head.n_neighbors > 1:
        # The same kNN, on the same rows, as the detector runs for each
        # image's best-matching entry: the neighbourhoods are identical.
        tensor = torch.from_numpy(bank)
        n_support = min(head.n_neighbors, len(bank))
        support = nearest_neighbors(tensor, tensor, n_neighbors=n_support)[1]
        support = support.numpy()
    return PatchCoreHead(bank, support, grid), True


def _spade_head(head, grid, shapes):
    from ._onnx_graph import SpadeHead

    module = SpadeHead(
        head.pooled, head.levels, head.n_neighbors, head.n_pixel_neighbors
    )
    return module, True


def _gaussian_ad_head(head, grid, shapes):
    from ._onnx_graph import GaussianADHead

    return GaussianADHead(head.locations, head.precisions), False


def _cflow_head(head, grid, shapes):
    from ._onnx_graph import CflowHead

    return CflowHead(head, shapes), True


def _network(extractor, frame_shape):
    """The extractor's backbone, rebuilt from its fitted weights and fused, on
    the CPU in the default memory format (what the exporter traces best),
    with its padding fixed for the frame."""
    from ._onnx_graph import static_padding

    spec = get_backbone_spec(extractor.backbone)
    network = spec.build(extractor.layers_)
    network.load_state_dict(
        {k: torch.from_numpy(np.array(v)) for k, v in extractor.backbone_state_.items()}
    )
    network = fuse_conv_bn(network.eval().requires_grad_(False))
    return static_padding(network, frame_shape)


def _features_module(extractor, kind, frame_shape):
    """Mirror of the extractor's ``reduce_taps`` / ``concat`` as a module."""
    from ._onnx_graph import Features

    spec = get_backbone_spec(extractor.backbone)
    offsets = np.cumsum(
        [0] + [spec.taps[layer].channels for layer in extractor.layers_]
    )
    indices, components = extractor.channel_indices_, extractor.components_
    reductions = []
    for start, stop in zip(offsets[:-1], offsets[1:]):
        if components is not None:
            reductions.append(("pca", components[:, start:stop]))
        elif indices is None:
            reductions.append(("all", None))
        else:
            local = indices[(indices >= start) & (indices < stop)] - start
            if len(local) == 0:
                reductions.append(("skip", None))
            elif len(local) == stop - start:
                reductions.append(("all", None))
            else:
                reductions.append(("index", local))
    pca_shift = None
    if components is not None:
        pca_shift = np.asarray(components, np.float32) @ np.asarray(
            extractor.pca_mean_, np.float32
        )
    return Features(
        _network(extractor, frame_shape),
        reductions,
        pca_shift,
        extractor.patch_size,
        extractor.upsampling,
        kind,
    )


# --------------------------------------------------------------------------
# Bringing images to the frame


def frame_images(detector, X):
    """Resize and crop images to a detector's frame, as the graph's uint8 input.

    The detector's own preprocessing without its normalisation: each image
    is read as the detector reads it (grayscale to RGB, EXIF orientation),
    resized (bilinear, antialiased) to ``image_size`` and centre-cropped to
    ``crop_size``, then rounded to uint8.

    Parameters
    ----------
    detector : fitted detector
        Its ``image_size`` and ``crop_size`` decide the frame.
    X : array of shape (n, H, W[, C]) or list of arrays, paths or PIL images
        Images, as for ``detector.score_samples``.

    Returns
    -------
    frames : ndarray of shape (n, H, W, 3), uint8
        With (H, W) = ``detector.frame_shape_``; the ``images`` input of the
        exported graph.
    """
    check_is_fitted(detector)
    images = check_images(X)
    preprocessing = _preprocessing(detector.feature_extractor_)
    frame_shape = tuple(detector.frame_shape_)
    out = np.empty((len(images), *frame_shape, 3), dtype=np.uint8)
    position = 0
    for batch in images.batches(32):
        for image in batch:
            frame = preprocessing._frame(image, torch.device("cpu"))[0]
            if tuple(frame.shape[-2:]) != frame_shape:
                raise ValueError(
                    f"Image {position} gives a frame of size "
                    f"{tuple(frame.shape[-2:])} but the detector works on "
                    f"{frame_shape}. With image_size=None all images must have "
                    "the training size."
                )
            pixels = frame.permute(1, 2, 0).numpy() * 255.0
            out[position] = np.clip(np.rint(pixels), 0, 255).astype(np.uint8)
            position += 1
    return out


def _preprocessing(extractor):
    """The extractor's resize and crop, without building its network (as its
    ``preprocessing_`` would on a freshly loaded model)."""
    spec = get_backbone_spec(extractor.backbone)
    return Preprocessing(
        check_size(extractor.image_size, "image_size"),
        check_size(extractor.crop_size, "crop_size"),
        spec.mean,
        spec.std,
    )
