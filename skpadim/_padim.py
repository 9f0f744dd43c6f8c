"""PadimDetector: PaDiM as a scikit-learn outlier detector on images."""

from __future__ import annotations

import numbers

from joblib import effective_n_jobs
from sklearn.utils._param_validation import Interval

from ._base import BasePatchDetector, iter_features
from ._docstrings import fill_doc
from ._gaussian import PatchGaussian
from ._moments import PatchMoments, positions_first
from ._parallel import map_chunks, torch_threads, tree_reduce


@fill_doc
class PadimDetector(BasePatchDetector):
    """PaDiM: patch distribution modelling for anomaly detection and localization.

    Fitted on normal images only, the detector models the pretrained-CNN
    embedding of every patch position with a Gaussian. A test image's patches
    are scored by their Mahalanobis distance to the Gaussian of their
    position; the upsampled, smoothed distances form a pixel anomaly map and
    its maximum is the image's anomaly score (Defard et al., ICPR 2021).

    Training streams over the images: memory holds one batch and the
    per-position statistics (``h * w * n_features**2`` floats), whatever the
    number of images. The backbone runs once per training image; the
    embeddings needed to score the training images for ``offset_`` are kept
    in a bounded cache: a sixteenth of scikit-learn's ``working_memory`` in
    RAM (64 MiB by default), the rest in a temporary directory.

    Parameters
    ----------
    {backbone}
    layers : tuple of str or None, default=None
        Tapped layers; None uses the backbone's PaDiM default (ResNets:
        ``("layer1", "layer2", "layer3")``). Coarser taps are upsampled
        (nearest) to the finest tap's grid.
    n_features : int or None, default=None
        Embedding dimensions kept; None uses the backbone's default (100 for
        resnet18 and efficientnet_lite0, 550 for wide_resnet50_2).
    reduction : {"random", "pca"}, default="random"
        Random dimension selection (the paper's Rd) or PCA (its ablation).
    {random_state}
    epsilon : float, default=0.01
        Added to the diagonal of every covariance matrix.
    {sigma}
    {image}
    {contamination}
    {runtime}

    Attributes
    ----------
    {fitted}
    gaussian_ : PatchGaussian
        The fitted per-position Gaussians (the head).

    See Also
    --------
    PatchCoreDetector : Nearest-neighbour patch memory; not tied to positions.
    PatchGaussian : The per-position Gaussian model on its own.

    Examples
    --------
    >>> import numpy as np
    >>> from skpadim import PadimDetector
    >>> rng = np.random.default_rng(0)
    >>> X = rng.integers(100, 156, size=(8, 64, 64, 3), dtype=np.uint8)
    >>> det = PadimDetector(backbone="resnet18", weights=None, image_size=64,
    ...                     n_features=20, random_state=0).fit(X)
    >>> det.anomaly_maps(X[:2]).shape
    (2, 64, 64)
    >>> det.predict(X[:2]).shape
    (2,)
    """

    _parameter_constraints: dict = {
        **BasePatchDetector._parameter_constraints,
        "epsilon": [Interval(numbers.Real, 0, None, closed="neither")],
    }
    _head_attribute = "gaussian_"
    _keep_all_channels = False
    _supports_partial_fit = True

    def __init__(
        self,
        *,
        backbone="efficientnet_lite0",
        weights="DEFAULT",
        layers=None,
        n_features=None,
        reduction="random",
        random_state=None,
        epsilon=0.01,
        sigma=4.0,
        image_size=224,
        crop_size=None,
        contamination=0.01,
        batch_size=32,
        device="auto",
        precision="float32",
        n_jobs=None,
        verbose=0,
    ):
        self.backbone = backbone
        self.weights = weights
        self.layers = layers
        self.n_features = n_features
        self.reduction = reduction
        self.random_state = random_state
        self.epsilon = epsilon
        self.sigma = sigma
        self.image_size = image_size
        self.crop_size = crop_size
        self.contamination = contamination
        self.batch_size = batch_size
        self.device = device
        self.precision = precision
        self.n_jobs = n_jobs
        self.verbose = verbose

    def _fit_head(
        self, images, extractor, frame_shape, *, previous=None, partial=False
    ):
        if previous is not None and previous.moments_ is None:
            raise ValueError(
                "This PadimDetector was loaded from a file without its streaming "
                "statistics and cannot continue partial_fit; fit a new detector."
            )
        cache = self._new_cache(extractor)
        parts = map_chunks(
            _chunk_moments,
            images,
            extractor,
            frame_shape,
            n_jobs=self.n_jobs,
            cache=cache,
        )
        moments = tree_reduce([moments for moments, _ in parts], PatchMoments.merge)
        if previous is not None:
            moments = previous.moments_.merge(moments)  # a new object
        head = PatchGaussian(epsilon=self.epsilon)
        return head.set_moments(moments, parts[0][1]), cache

    def _fit_nbytes(self, grid_shape, n_features, n_images):
        # Each job accumulates a float64 scatter and a float32 block of
        # pending sums (see PatchMoments), 12 bytes per entry. The block is
        # freed before the merged scatter is factored into float32 whitening
        # matrices, so the end of the fit (8 + 4 bytes) is no higher.
        entries = grid_shape[0] * grid_shape[1] * n_features**2
        return entries * 12 * effective_n_jobs(self.n_jobs)


def _chunk_moments(
    images, extractor, frame_shape, *, n_threads=None, start=0, cache=None
):
    """Stream a chunk of images into moments; return (moments, feature_shape)."""
    moments, feature_shape = None, None
    with torch_threads(n_threads):
        features = iter_features(images, extractor, frame_shape, "concat", cache=cache)
        for embeddings in features:
            x = positions_first(embeddings)
            if moments is None:
                moments = PatchMoments.empty(x.shape[0], x.shape[2], device=x.device)
                feature_shape = tuple(embeddings.shape[1:])
            moments.update(x)
    if n_threads is not None:  # in a worker: hand back plain CPU tensors
        moments = moments.to("cpu")
    return moments, feature_shape
