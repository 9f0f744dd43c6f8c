"""PadimDetector: PaDiM as a scikit-learn outlier detector on images."""

from __future__ import annotations

import numbers
from contextlib import contextmanager

import numpy as np
import torch
from joblib import Parallel, delayed, effective_n_jobs
from sklearn.base import BaseEstimator, OutlierMixin, _fit_context
from sklearn.utils._param_validation import Interval
from sklearn.utils.validation import check_is_fitted

from ._features import PatchFeatureExtractor
from ._gaussian import PatchGaussian, PatchMoments, leave_one_out, positions_first
from ._images import check_images
from ._maps import distances_to_maps, image_scores
from ._memory import check_statistics_memory
from ._persistence import VersionedStateMixin

# The parameters PadimDetector hands to its PatchFeatureExtractor.
_EXTRACTOR_PARAMS = (
    "backbone",
    "weights",
    "layers",
    "n_features",
    "reduction",
    "image_size",
    "crop_size",
    "batch_size",
    "device",
    "precision",
    "random_state",
    "verbose",
)


# Parameters that change how a fitted model runs, not what it learned.
_RUNTIME_PARAMS = ("device", "batch_size", "precision", "verbose")


class PadimDetector(VersionedStateMixin, OutlierMixin, BaseEstimator):
    """PaDiM: patch distribution modelling for anomaly detection and localization.

    Fitted on normal images only, the detector models the pretrained-CNN
    embedding of every patch position with a Gaussian. A test image's patches
    are scored by their Mahalanobis distance to the Gaussian of their
    position; the upsampled, smoothed distances form a pixel anomaly map and
    its maximum is the image's anomaly score (Defard et al., ICPR 2021).

    Training streams over the images: memory holds one batch and the
    per-position statistics (``h * w * n_features**2`` floats), whatever the
    number of images. Fitting reads the training images twice: once for the
    statistics and once to score them for ``offset_``.

    Parameters
    ----------
    backbone : str, default="efficientnet_lite0"
        CNN from :func:`skpadim.backbones.available_backbones`: the paper's
        "resnet18" and "wide_resnet50_2" (and "resnet34", "resnet50"), or
        "efficientnet_lite0", whose ImageNet weights ship with the package so
        the default works offline.
    weights : "DEFAULT", path-like or None, default="DEFAULT"
        "DEFAULT": pretrained ImageNet weights; a path: a local state-dict file
        (e.g. torchvision's checkpoint, for machines without network access);
        None: random initialisation, for tests only.
    layers : tuple of str or None, default=None
        Tapped layers; None uses the backbone's PaDiM default (ResNets:
        ``("layer1", "layer2", "layer3")``).
    n_features : int or None, default=None
        Embedding dimensions kept; None uses the backbone's default (100 for
        resnet18 and efficientnet_lite0, 550 for wide_resnet50_2).
    reduction : {"random", "pca"}, default="random"
        Random dimension selection (the paper's Rd) or PCA (its ablation).
    random_state : int, RandomState instance or None, default=None
        Seeds the random dimension selection: the same seed and data give
        identical scores.
    epsilon : float, default=0.01
        Added to the diagonal of every covariance matrix.
    sigma : float, default=4.0
        Gaussian smoothing of the anomaly maps, in pixels of the preprocessed
        image; 0 disables it.
    image_size : int, (int, int) or None, default=224
        Images are resized to (image_size, image_size) or to the given
        (height, width); None keeps the input size (all images must match).
    crop_size : int, (int, int) or None, default=None
        Centre crop after resizing, as in the paper's protocol
        (``image_size=256, crop_size=224``); None analyses the whole image.
    contamination : float in (0, 0.5], default=0.01
        Fraction of normal images to flag: ``offset_`` is that quantile of
        the training images' leave-one-out scores, an unbiased stand-in for
        the scores of new normal images.
    batch_size : int, default=32
        Images per forward pass.
    device : str, default="auto"
        Torch device; "auto" picks CUDA when available.
    precision : {"float32", "float16", "bfloat16"}, default="float32"
        Precision of the backbone's forward pass (``torch.autocast``); the
        statistics and the scoring always run in float64 / float32.
    n_jobs : int or None, default=None
        Parallel jobs for fitting and scoring: the images are cut into
        contiguous chunks, each job runs the backbone on its chunk, and the
        partial statistics are merged exactly. None means 1 unless in a
        ``joblib.parallel_config`` context; -1 uses all processors. Under
        ``joblib.parallel_config(backend="dask")`` the jobs run on a Dask
        cluster.
    verbose : int, default=0
        Show progress bars when > 0.

    Attributes
    ----------
    feature_extractor_ : PatchFeatureExtractor
        The fitted embedding stage (backbone weights, kept channels).
    gaussian_ : PatchGaussian
        The fitted per-position Gaussians.
    frame_shape_ : tuple of int
        (height, width) of the preprocessed images the backbone sees.
    offset_ : float
        ``decision_function = score_samples - offset_``.
    train_scores_ : ndarray of shape (n_samples,)
        Leave-one-out ``score_samples`` of the training images: each image is
        scored by the Gaussians fitted without it (a closed-form rank-one
        downdate, no refit). In-sample scores would be optimistic, and a
        threshold taken from them would flag far too many new normal images.
        ``offset_`` is their ``contamination`` quantile.
    n_samples_seen_ : int
        Number of training images.

    See Also
    --------
    PatchFeatureExtractor : The embedding stage on its own.
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

    _parameter_constraints = {
        **PatchFeatureExtractor._parameter_constraints,
        "epsilon": [Interval(numbers.Real, 0, None, closed="neither")],
        "sigma": [Interval(numbers.Real, 0, None, closed="left")],
        "contamination": [Interval(numbers.Real, 0, 0.5, closed="right")],
        "n_jobs": [numbers.Integral, None],
    }

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

    # ------------------------------------------------------------------ fit
    def _new_extractor(self, images):
        """An unfitted extractor with our parameters, validated without data.

        Also checks that the statistics will fit in memory, so an impossible
        fit fails before any network is built.
        """
        params = {name: getattr(self, name) for name in _EXTRACTOR_PARAMS}
        extractor = PatchFeatureExtractor(**params)
        spec, layers, n_features, preprocessing, device = extractor.check_config()
        (first_shape,) = images.image_shapes(limit=1)
        stride = min(spec.taps[layer].stride for layer in layers)
        check_statistics_memory(
            preprocessing.frame_shape(first_shape), stride, n_features, device
        )
        return extractor

    @_fit_context(prefer_skip_nested_validation=True)
    def fit(self, X, y=None):
        """Fit the per-position Gaussians on normal images.

        Parameters
        ----------
        X : array of shape (n, H, W[, C]) or list of arrays, paths or PIL images
            Normal (defect-free) training images, uint8 or float in [0, 1].
        y : Ignored
            Not used, present for API consistency.

        Returns
        -------
        self : PadimDetector
            The fitted detector.
        """
        self._fit(X)
        return self

    def _fit(self, X):
        """Fit from scratch and return the training scores."""
        images = check_images(X, min_samples=2)
        extractor = self._new_extractor(images)
        extractor._fit(images)
        moments, frame_shape, feature_shape = self._statistics(extractor, images)
        gaussian = PatchGaussian(epsilon=self.epsilon, contamination=self.contamination)
        gaussian.set_moments(moments, feature_shape)
        scores = -self._image_scores(
            images, extractor, gaussian, frame_shape, training=True
        )

        self.feature_extractor_ = extractor
        self.gaussian_ = gaussian
        self.frame_shape_ = frame_shape
        self.n_samples_seen_ = moments.count
        self._set_threshold(scores)
        return scores

    @_fit_context(prefer_skip_nested_validation=True)
    def partial_fit(self, X, y=None):
        """Add normal images to the statistics, one batch at a time.

        The first call sets up the feature extractor; later calls merge their
        images' statistics exactly (the result equals ``fit`` on all images).
        ``offset_`` comes from the scores each image got right after the
        update that included it.

        Parameters
        ----------
        X : array of shape (n, H, W[, C]) or list of arrays, paths or PIL images
            Normal training images.
        y : Ignored
            Not used, present for API consistency.

        Returns
        -------
        self : PadimDetector
            The updated detector.
        """
        first = not hasattr(self, "gaussian_")
        images = check_images(X, min_samples=2 if first else 1)
        if first:
            extractor = self._new_extractor(images)
            extractor._fit(images)
            moments, frame_shape, feature_shape = self._statistics(extractor, images)
        else:
            if self.gaussian_.moments_ is None:
                raise ValueError(
                    "This PadimDetector was loaded from a file without its "
                    "streaming statistics and cannot continue partial_fit; fit a "
                    "new detector."
                )
            extractor, frame_shape = self.feature_extractor_, self.frame_shape_
            feature_shape = self.gaussian_.feature_shape_
            new, _, _ = self._statistics(extractor, images, frame_shape)
            moments = self.gaussian_.moments_.merge(new)  # a new object
        gaussian = PatchGaussian(epsilon=self.epsilon, contamination=self.contamination)
        gaussian.set_moments(moments, feature_shape)
        scores = -self._image_scores(
            images, extractor, gaussian, frame_shape, training=True
        )
        previous = getattr(self, "train_scores_", np.empty(0))

        self.feature_extractor_ = extractor
        self.gaussian_ = gaussian
        self.frame_shape_ = frame_shape
        self.n_samples_seen_ = moments.count
        self._set_threshold(np.concatenate([previous, scores]))
        return self

    def _set_threshold(self, train_scores):
        self.train_scores_ = train_scores
        self.offset_ = float(np.percentile(train_scores, 100.0 * self.contamination))

    def _statistics(self, extractor, images, frame_shape=None):
        """Moments of all images: one streaming pass, or a map-reduce over jobs."""
        parts = self._map_chunks(
            _chunk_moments, images, extractor, frame_shape=frame_shape
        )
        frame_shapes = {part[1] for part in parts}
        if len(frame_shapes) > 1:
            raise ValueError(
                "Preprocessed images differ in size across chunks "
                f"({sorted(frame_shapes)}); with image_size=None all images must "
                "have the same size."
            )
        moments = _merge_pairwise([part[0] for part in parts])
        return moments, parts[0][1], parts[0][2]

    def _map_chunks(self, job, images, *args, **kwargs):
        """Run ``job(images_chunk, *args, **kwargs)`` over contiguous chunks.

        With ``n_jobs`` 1 the job runs once, here, on all images; otherwise the
        chunks go through ``joblib.Parallel``, so that a
        ``joblib.parallel_config(backend="dask")`` context sends them to a Dask
        cluster. Results come back in input order.
        """
        n_jobs = effective_n_jobs(self.n_jobs)
        if n_jobs == 1 or len(images) < 2:
            return [job(images, *args, **kwargs)]
        chunks = np.array_split(np.arange(len(images)), min(n_jobs, len(images)))
        # Share the cores between the jobs instead of oversubscribing them.
        threads = max(1, torch.get_num_threads() // n_jobs)
        return Parallel(n_jobs=self.n_jobs)(
            delayed(job)(images.subset(chunk), *args, n_threads=threads, **kwargs)
            for chunk in chunks
        )

    # -------------------------------------------------------------- scoring
    def _image_scores(
        self, images, extractor=None, gaussian=None, frame_shape=None, training=False
    ):
        """Image anomaly scores; ``training=True`` scores the training images
        leave-one-out (see ``skpadim._gaussian.leave_one_out``)."""
        if extractor is None:
            extractor, gaussian = self.feature_extractor_, self.gaussian_
            frame_shape = self.frame_shape_
        parts = self._map_chunks(
            _chunk_scores,
            images,
            extractor,
            gaussian,
            frame_shape,
            self.sigma,
            training=training,
        )
        return np.concatenate(parts).astype(np.float64)

    def score_samples(self, X):
        """Opposite of the image anomaly score (the maximum of its map).

        Parameters
        ----------
        X : array of shape (n, H, W[, C]) or list of arrays, paths or PIL images
            Images to score.

        Returns
        -------
        scores : ndarray of shape (n,)
            Higher is more normal.
        """
        check_is_fitted(self)
        images = check_images(X)
        return -self._image_scores(images)

    def decision_function(self, X):
        """``score_samples(X) - offset_``: negative for anomalous images.

        Parameters
        ----------
        X : array of shape (n, H, W[, C]) or list of arrays, paths or PIL images
            Images to score.

        Returns
        -------
        decision : ndarray of shape (n,)
            With labels +1 normal / -1 anomalous, ``roc_auc_score(y,
            decision_function(X))`` is the image AUROC.
        """
        return self.score_samples(X) - self.offset_

    def predict(self, X):
        """+1 for normal images, -1 for anomalous ones.

        Parameters
        ----------
        X : array of shape (n, H, W[, C]) or list of arrays, paths or PIL images
            Images to classify.

        Returns
        -------
        labels : ndarray of shape (n,)
            1 where ``decision_function(X) >= 0``, else -1.
        """
        return np.where(self.decision_function(X) >= 0, 1, -1)

    def fit_predict(self, X, y=None):
        """Fit on ``X`` and label its images as if each had been left out.

        The labels come from the leave-one-out ``train_scores_``, so exactly
        a ``contamination`` fraction of the images is flagged. This differs
        from ``fit(X).predict(X)``, which scores images the model has seen
        (in-sample, optimistic) and so flags fewer of them.

        Parameters
        ----------
        X : array of shape (n, H, W[, C]) or list of arrays, paths or PIL images
            Training images.
        y : Ignored
            Not used, present for API consistency.

        Returns
        -------
        labels : ndarray of shape (n,)
            +1 normal, -1 anomalous.
        """
        self.fit(X)
        return np.where(self.train_scores_ - self.offset_ >= 0, 1, -1)

    def anomaly_maps(self, X, *, resolution="input"):
        """Pixel anomaly maps; higher is more anomalous.

        Parameters
        ----------
        X : array of shape (n, H, W[, C]) or list of arrays, paths or PIL images
            Images to analyse.
        resolution : {"input", "model"}, default="input"
            "input": each map is on the pixel grid of the image as passed in,
            ready to overlay; the maps are resampled (bilinear) from the
            model frame, and pixels outside the analysed centre crop (when
            ``crop_size`` is set) are NaN. "model": maps on the preprocessed
            frame the backbone saw (after resize and crop), ``frame_shape_``.

        Returns
        -------
        maps : ndarray of shape (n, H, W) or list of ndarray, float32
            A list when the input images differ in size (with
            ``resolution="input"``).
        """
        check_is_fitted(self)
        if resolution not in ("input", "model"):
            raise ValueError(
                f"resolution must be 'input' or 'model'; got {resolution!r}."
            )
        images = check_images(X)
        maps = self._map_chunks(
            _chunk_maps,
            images,
            self.feature_extractor_,
            self.gaussian_,
            self.frame_shape_,
            self.sigma,
        )
        maps = np.concatenate(maps)
        if resolution == "model":
            return maps
        return self._to_input_frames(images, maps)

    def predict_masks(self, X, threshold, *, resolution="input"):
        """Per-pixel defect masks: where the anomaly map reaches ``threshold``.

        Parameters
        ----------
        X : array of shape (n, H, W[, C]) or list of arrays, paths or PIL images
            Images to segment.
        threshold : float
            Pixel anomaly score at and above which a pixel is defective; take
            it from held-out normal images
            (:func:`skpadim.metrics.threshold_from_normal` on their maps) or,
            with labelled masks, :func:`skpadim.metrics.f1_optimal_threshold`,
            never from the test images.
        resolution : {"input", "model"}, default="input"
            As in :meth:`anomaly_maps`; pixels outside an analysed crop are False.

        Returns
        -------
        masks : ndarray of bool of shape (n, H, W) or list of ndarray
            True on defective pixels.
        """
        from .metrics import anomaly_masks

        return anomaly_masks(self.anomaly_maps(X, resolution=resolution), threshold)

    def _to_input_frames(self, images, maps):
        preprocessing = self.feature_extractor_.preprocessing_
        shapes = images.image_shapes()
        out = [
            preprocessing.to_input_frame(torch.from_numpy(m[None]), shape)[0].numpy()
            for m, shape in zip(maps, shapes)
        ]
        if len({o.shape for o in out}) == 1:
            return np.stack(out)
        return out

    def set_params(self, **params):
        """Set parameters; run-time ones also reach the fitted extractor.

        ``device``, ``batch_size``, ``precision`` and ``verbose`` change how a
        fitted model runs, not what it learned, so they apply at once (e.g.
        ``set_params(device="cpu")`` on a model fitted on a GPU). Any other
        change takes effect at the next ``fit``.

        Parameters
        ----------
        **params : dict
            Estimator parameters.

        Returns
        -------
        self : PadimDetector
            This estimator.
        """
        super().set_params(**params)
        runtime = {k: v for k, v in params.items() if k in _RUNTIME_PARAMS}
        if runtime and hasattr(self, "feature_extractor_"):
            self.feature_extractor_.set_params(**runtime)
        return self

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.input_tags.three_d_array = True
        tags.non_deterministic = False
        return tags


def _check_frame(batch, frame_shape):
    shape = tuple(batch.shape[-2:])
    if frame_shape is not None and shape != tuple(frame_shape):
        raise ValueError(
            f"Preprocessed images have size {shape} but the detector works on "
            f"{tuple(frame_shape)}. With image_size=None all images must have "
            "the training size; set image_size to resize them."
        )
    return shape


def _merge_pairwise(parts):
    """Merge partial moments as a balanced tree (fewer, evener merges)."""
    while len(parts) > 1:
        merged = [a.merge(b) for a, b in zip(parts[::2], parts[1::2])]
        parts = merged + ([parts[-1]] if len(parts) % 2 else [])
    return parts[0]


@contextmanager
def _torch_threads(n_threads):
    if n_threads is None:
        yield
        return
    previous = torch.get_num_threads()
    torch.set_num_threads(n_threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


# The jobs below are module-level functions so that joblib (and Dask) can
# ship them to worker processes by reference.


def _chunk_moments(images, extractor, *, frame_shape=None, n_threads=None):
    """Stream images into moments; return (moments, frame_shape, feature_shape)."""
    moments, feature_shape = None, None
    with _torch_threads(n_threads):
        for batch, embeddings in extractor.embed_batches(images, desc="fit"):
            frame_shape = _check_frame(batch, frame_shape)
            x = positions_first(embeddings)
            if moments is None:
                moments = PatchMoments.empty(x.shape[0], x.shape[2], device=x.device)
                feature_shape = tuple(embeddings.shape[1:])
            moments.update(x)
    if n_threads is not None:  # in a worker: hand back plain CPU tensors
        moments = moments.to("cpu")
    return moments, frame_shape, feature_shape


def _iter_maps(images, extractor, gaussian, frame_shape, sigma, training=False):
    """Yield model-frame anomaly maps (B, H, W) on the device, in order."""
    for batch, embeddings in extractor.embed_batches(images, desc="score"):
        _check_frame(batch, frame_shape)
        with torch.inference_mode():
            distances = gaussian.distances(embeddings)
            if training:
                distances = leave_one_out(distances, gaussian.n_samples_seen_)
            yield distances_to_maps(distances, frame_shape, sigma)


def _chunk_scores(
    images, extractor, gaussian, frame_shape, sigma, n_threads=None, training=False
):
    """Image anomaly scores (maxima of the maps) of a chunk of images."""
    with _torch_threads(n_threads):
        maps = _iter_maps(images, extractor, gaussian, frame_shape, sigma, training)
        return np.concatenate([image_scores(m).cpu().numpy() for m in maps])


def _chunk_maps(images, extractor, gaussian, frame_shape, sigma, n_threads=None):
    """Model-frame anomaly maps of a chunk of images, as one numpy array."""
    with _torch_threads(n_threads):
        maps = _iter_maps(images, extractor, gaussian, frame_shape, sigma)
        return np.concatenate([m.cpu().numpy() for m in maps])
