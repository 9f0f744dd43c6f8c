"""The shared base of the detector family: images in, scores and maps out.

Every method is split as ``sklearn.covariance`` splits EllipticEnvelope from
MinCovDet:

- a **head** is a model on embeddings (``PatchGaussian``, ``PatchMemoryBank``,
  a flow); it has no threshold. Its one scoring hook is
  ``head.score_batch(features, *, sample_ids=None) -> (patch_scores,
  image_scores)``: torch tensors on the features' device, ``patch_scores`` of
  shape (B, h, w) or None, ``image_scores`` of shape (B,) or None (then the
  image score is the maximum of the smoothed map). ``sample_ids`` (int64, one
  per image) marks training images, which must be scored honestly (never
  against themselves). ``head.input_kind`` says what it consumes from the
  extractor: "concat" (one tensor) or "taps" (a list, one per layer).
- a **detector** is an outlier detector on images: its parameters, its
  docstring and one hook, ``_fit_head``. Everything else lives here: input
  checks, lazy image sets, batching, the joblib/Dask map over chunks, the
  threshold from honest training scores, maps, run-time ``set_params``,
  persistence.
"""

from __future__ import annotations

import math
import numbers
from abc import ABCMeta, abstractmethod

import numpy as np
import torch
from joblib import effective_n_jobs
from sklearn.base import BaseEstimator, OutlierMixin, _fit_context
from sklearn.utils._param_validation import Interval
from sklearn.utils.metaestimators import available_if
from sklearn.utils.validation import check_is_fitted

from ._cache import FeatureCache
from ._features import PatchFeatureExtractor, resolve_device
from ._images import check_images
from ._maps import image_scores, patch_scores_to_maps, to_input_frames
from ._parallel import map_chunks, torch_threads
from ._persistence import VersionedStateMixin
from ._resources import check_fit_memory
from ._scratch import reuse_buffers
from .backbones import get_backbone_spec

# Parameters that change how a fitted model runs, not what it learned: they
# apply to a fitted detector at once. Every other parameter takes effect at
# the next fit (a fitted model keeps computing with the values it was fitted
# with, so its scores and its threshold never disagree).
RUNTIME_PARAMS = ("device", "batch_size", "precision", "verbose", "n_jobs")

# The detector parameters handed to the PatchFeatureExtractor as they are.
_EXTRACTOR_PARAMS = tuple(
    name
    for name in PatchFeatureExtractor._get_param_names()
    if name not in ("layers", "n_features", "patch_size", "upsampling")
)

_SHARED_CONSTRAINTS = {
    **{
        name: PatchFeatureExtractor._parameter_constraints[name]
        for name in (*_EXTRACTOR_PARAMS, "layers", "n_features")
    },
    "contamination": [Interval(numbers.Real, 0, 0.5, closed="right")],
    "n_jobs": [numbers.Integral, None],
}


class BaseImageDetector(
    VersionedStateMixin, OutlierMixin, BaseEstimator, metaclass=ABCMeta
):
    """Base class of the image anomaly detectors on pretrained features.

    Warning: This class should not be used directly. Use the derived classes.

    Subclasses set the class attributes below and implement ``_fit_head``.
    """

    _parameter_constraints: dict = dict(_SHARED_CONSTRAINTS)

    # The fewest training images the method can work with.
    _min_train_images = 2
    # Name of the fitted head attribute ("gaussian_", "memory_bank_", ...).
    _head_attribute = None
    # Strides of the default taps (the last tap of each stride), or None for
    # the backbone's default (PaDiM's) taps.
    _default_strides = None
    # n_features=None keeps every channel of the taps, or (False) uses the
    # backbone's PaDiM default.
    _keep_all_channels = True
    # How the extractor brings coarser taps onto the finest grid.
    _upsampling = "nearest"
    # Whether a fitted head can take more images (gates partial_fit).
    _supports_partial_fit = False

    # ------------------------------------------------------------ hooks
    @abstractmethod
    def _fit_head(
        self, images, extractor, frame_shape, *, previous=None, partial=False
    ):
        """Fit the head on validated images; return ``(head, cache)``.

        ``previous`` is the fitted head to update (``partial_fit``);
        ``partial`` says the call comes from ``partial_fit``, also the first
        one (a head trained in epochs then runs a single epoch). ``cache``
        is what ``_training_scores`` needs besides the head: by default a
        :class:`FeatureCache` of the images' features in order, reused to
        score the training images without a second backbone pass, or None
        (the images are embedded again). It is closed after use if it has a
        ``close`` method.
        """

    def _fit_nbytes(self, grid_shape, n_features, n_images):
        """Peak bytes of the head's own structures while fitting."""
        return 0

    # ------------------------------------------------------------- setup
    def _resolve_layers(self, spec):
        if self.layers is not None or self._default_strides is None:
            return spec.check_layers(self.layers)
        last_of_stride = {tap.stride: name for name, tap in spec.taps.items()}
        wanted = [
            last_of_stride[s] for s in self._default_strides if s in last_of_stride
        ]
        return spec.check_layers(wanted or None)

    def _new_extractor(self, images):
        """An unfitted extractor with our parameters, validated without data,
        after checking the fit fits in memory (before any network is built)."""
        spec = get_backbone_spec(self.backbone)
        layers = self._resolve_layers(spec)
        n_features = self.n_features
        if n_features is None:
            n_channels = spec.n_channels(layers)
            n_features = (
                n_channels
                if self._keep_all_channels
                else min(spec.default_n_features, n_channels)
            )
        extractor = PatchFeatureExtractor(
            **{name: getattr(self, name) for name in _EXTRACTOR_PARAMS},
            layers=layers,
            n_features=n_features,
            patch_size=getattr(self, "patch_size", 1),
            upsampling=self._upsampling,
        )
        _, layers, n_features, preprocessing, device = extractor.check_config()
        (first_shape,) = images.image_shapes(limit=1)
        frame_shape = preprocessing.frame_shape(first_shape)
        self._check_memory(spec, layers, n_features, frame_shape, len(images), device)
        return extractor, frame_shape

    def _check_memory(self, spec, layers, n_features, frame_shape, n_images, device):
        stride = min(spec.taps[layer].stride for layer in layers)
        grid = (math.ceil(frame_shape[0] / stride), math.ceil(frame_shape[1] / stride))
        n_jobs = effective_n_jobs(self.n_jobs)
        head = self._fit_nbytes(grid, n_features, n_images)
        # Backbone activations: a few live copies of each tapped map per image.
        pixels = frame_shape[0] * frame_shape[1]
        taps = sum(
            spec.taps[name].channels * pixels / spec.taps[name].stride ** 2
            for name in layers
        )
        activations = int(4 * 4 * self.batch_size * (taps + 3 * pixels))
        needed = head + activations * n_jobs
        check_fit_memory(
            needed,
            device,
            what=(
                f"the {type(self).__name__} fit ({head / 2**30:.2f} GiB for the "
                f"model on a {grid[0]}x{grid[1]} grid of {n_features} features, "
                f"{activations / 2**30:.2f} GiB of backbone activations per job "
                f"x {n_jobs} jobs)"
            ),
            advice=(
                "Reduce n_features, image_size or crop_size, batch_size or "
                "n_jobs, or tap coarser layers."
            ),
        )

    # --------------------------------------------------------------- fit
    @_fit_context(prefer_skip_nested_validation=True)
    def fit(self, X, y=None):
        """Fit the detector on normal images.

        Parameters
        ----------
        X : array of shape (n, H, W[, C]) or list of arrays, paths or PIL images
            Normal (defect-free) training images, uint8 or float in [0, 1].
        y : Ignored
            Not used, present for API consistency.

        Returns
        -------
        self : object
            The fitted detector.
        """
        images = check_images(X, min_samples=self._min_train_images)
        return self._fit_images(images, previous=None)

    def _partial_fit_available(self):
        return self._supports_partial_fit

    @available_if(_partial_fit_available)
    @_fit_context(prefer_skip_nested_validation=True)
    def partial_fit(self, X, y=None):
        """Add normal images to a fitted detector (or fit a new one).

        Parameters
        ----------
        X : array of shape (n, H, W[, C]) or list of arrays, paths or PIL images
            Normal training images.
        y : Ignored
            Not used, present for API consistency.

        Returns
        -------
        self : object
            The updated detector.
        """
        first = not hasattr(self, "offset_")
        images = check_images(X, min_samples=self._min_train_images if first else 1)
        return self._fit_images(images, previous=None if first else self, partial=True)

    def _fit_images(self, images, *, previous, partial=False):
        """Fit (``previous=None``) or update; attributes are set at the end only,
        so a failure leaves a fitted detector as it was."""
        if previous is None:
            extractor, frame_shape = self._new_extractor(images)
            extractor._fit(images)
            head = None
        else:
            extractor, frame_shape = self.feature_extractor_, self.frame_shape_
            head = getattr(self, self._head_attribute)
        head, cache = self._fit_head(
            images, extractor, frame_shape, previous=head, partial=partial
        )
        try:
            scores = self._training_scores(images, extractor, head, frame_shape, cache)
        finally:
            if hasattr(cache, "close"):
                cache.close()
        seen = 0 if previous is None else self.n_samples_seen_
        earlier = np.empty(0) if previous is None else self.train_scores_

        self.feature_extractor_ = extractor
        setattr(self, self._head_attribute, head)
        self.frame_shape_ = tuple(frame_shape)
        self.n_samples_seen_ = seen + len(images)
        self.sigma_ = float(getattr(self, "sigma", 0.0))
        self._set_offset(np.concatenate([earlier, scores]))
        return self

    def _training_scores(self, images, extractor, head, frame_shape, cache):
        """Honest ``score_samples`` of the training images: each image is
        scored as if it had been left out of the fit."""
        sigma = float(getattr(self, "sigma", 0.0))
        if cache is not None:
            ids = torch.arange(len(images), dtype=torch.int64)
            scores, start = [], 0
            with reuse_buffers():
                for features in cache:
                    batch_ids = ids[start : start + _batch_len(features)]
                    start += len(batch_ids)
                    image, _ = score_features(
                        head, features, frame_shape, sigma, sample_ids=batch_ids
                    )
                    scores.append(image.cpu().numpy())
            return -np.concatenate(scores).astype(np.float64)
        parts = map_chunks(
            _chunk_outputs,
            images,
            extractor,
            head,
            frame_shape,
            sigma,
            n_jobs=self.n_jobs,
            training=True,
        )
        return -np.concatenate([p[0] for p in parts]).astype(np.float64)

    def _set_offset(self, train_scores):
        self.train_scores_ = train_scores
        quantile = float(np.percentile(train_scores, 100.0 * self.contamination))
        # Lowered by a relative 1e-4 (at least 1e-4): float32 rounding, which
        # varies with the batch an image is in, must never flag an image that
        # scores like the training images (e.g. a training set of identical
        # images, whose scores are all rounding noise around 0).
        self.offset_ = quantile - 1e-4 * (1.0 + abs(quantile))

    def _new_cache(self, extractor):
        """A cache for a one-pass fit, or None when jobs run elsewhere (each
        chunk's features live in its worker; the scores then re-embed)."""
        if effective_n_jobs(self.n_jobs) != 1:
            return None
        return FeatureCache(device=extractor.device_)

    # ----------------------------------------------------------- scoring
    def _outputs(self, X, *, maps):
        check_is_fitted(self)
        images = check_images(X)
        head = getattr(self, self._head_attribute)
        parts = map_chunks(
            _chunk_outputs,
            images,
            self.feature_extractor_,
            head,
            self.frame_shape_,
            self.sigma_,
            n_jobs=self.n_jobs,
            maps=maps,
        )
        return images, parts

    def score_samples(self, X):
        """Opposite of the image anomaly score.

        Parameters
        ----------
        X : array of shape (n, H, W[, C]) or list of arrays, paths or PIL images
            Images to score.

        Returns
        -------
        scores : ndarray of shape (n,)
            Higher is more normal.
        """
        _, parts = self._outputs(X, maps=False)
        return -np.concatenate([p[0] for p in parts]).astype(np.float64)

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

        The labels come from the honest ``train_scores_``, so a
        ``contamination`` fraction of the images is flagged. This differs
        from ``fit(X).predict(X)``, which scores images the model has seen.

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

    # ----------------------------------------------------------- params
    def set_params(self, **params):
        """Set parameters; run-time ones also reach the fitted model.

        ``device``, ``batch_size``, ``precision``, ``verbose`` and ``n_jobs``
        change how a fitted model runs, not what it learned, so they apply at
        once (e.g. ``set_params(device="cpu")`` on a model fitted on a GPU).
        Every other parameter takes effect at the next ``fit``: until then
        the fitted model keeps computing with the values it was fitted with,
        so its scores, maps and ``offset_`` stay consistent. On a fitted
        detector every value is validated at once (and an invalid one is
        refused, leaving the parameters as they were).

        Parameters
        ----------
        **params : dict
            Estimator parameters.

        Returns
        -------
        self : object
            This estimator.
        """
        previous = self.get_params(deep=False)
        super().set_params(**params)
        if not hasattr(self, "offset_"):
            return self  # unfitted: validated at fit, as scikit-learn does
        try:
            # Fitted: run-time values apply at once, so they are checked now.
            self._validate_params()
            if "device" in params:
                resolve_device(self.device)
        except (ValueError, TypeError):
            super().set_params(**previous)  # never keep an invalid value
            raise
        runtime = {k: v for k, v in params.items() if k in RUNTIME_PARAMS}
        runtime.pop("n_jobs", None)
        if runtime and hasattr(self, "feature_extractor_"):
            self.feature_extractor_.set_params(**runtime)
        return self

    def __setstate__(self, state):
        # Release 0.1 had no sigma_: it scored with the sigma parameter.
        if "offset_" in state and "sigma_" not in state:
            state = {**state, "sigma_": float(state.get("sigma", 0.0))}
        super().__setstate__(state)

    def __sizeof__(self):
        # Lets joblib's Dask backend see a fitted model is large and scatter it.
        parts = (getattr(self, "feature_extractor_", None), self._fitted_head())
        return object.__sizeof__(self) + sum(
            part.__sizeof__() for part in parts if part is not None
        )

    def _fitted_head(self):
        return getattr(self, self._head_attribute, None)

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.input_tags.three_d_array = True
        tags.non_deterministic = False
        return tags


class BasePatchDetector(BaseImageDetector):
    """Base class of the detectors that also localise: pixel anomaly maps.

    Warning: This class should not be used directly. Use the derived classes.
    """

    _parameter_constraints: dict = {
        **BaseImageDetector._parameter_constraints,
        "sigma": [Interval(numbers.Real, 0, 64, closed="both")],
    }

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
        if resolution not in ("input", "model"):
            raise ValueError(
                f"resolution must be 'input' or 'model'; got {resolution!r}."
            )
        images, parts = self._outputs(X, maps=True)
        maps = np.concatenate([p[1] for p in parts])
        if resolution == "model":
            return maps
        preprocessing = self.feature_extractor_.preprocessing_
        return to_input_frames(preprocessing, images.image_shapes(), maps)

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


# -------------------------------------------------------------------- jobs
# Module-level functions, so that joblib (and Dask) ship them by reference.


def check_frame(batch, frame_shape):
    """Refuse a batch whose preprocessed size differs from the fitted frame."""
    shape = tuple(batch.shape[-2:])
    if tuple(frame_shape) != shape:
        raise ValueError(
            f"Preprocessed images have size {shape} but the detector works on "
            f"{tuple(frame_shape)}. With image_size=None all images must have "
            "the training size; set image_size to resize them."
        )


def iter_features(images, extractor, frame_shape, kind, *, cache=None):
    """Yield the features of each batch (checked against the frame), and keep
    them in ``cache`` when one is given."""
    for batch, features in extractor.embed_batches(images, "fit", kind=kind):
        check_frame(batch, frame_shape)
        if cache is not None:
            cache.append(features)
        yield features


def score_features(head, features, frame_shape, sigma, *, sample_ids=None, maps=False):
    """Image scores (B,) and, if asked, model-frame maps (B, H, W) of a batch."""
    with torch.inference_mode():
        # Without maps, a head whose image score does not come from its patch
        # scores (SPADE, Gaussian AD) may skip them.
        patch, image = head.score_batch(features, sample_ids=sample_ids, patches=maps)
        frame_maps = None
        if patch is not None and (maps or image is None):
            frame_maps = patch_scores_to_maps(patch, frame_shape, sigma)
        if image is None:
            image = image_scores(frame_maps)
    return image, frame_maps


def _batch_len(features):
    return len(features[0]) if isinstance(features, list) else len(features)


def _chunk_outputs(
    images,
    extractor,
    head,
    frame_shape,
    sigma,
    *,
    n_threads=None,
    start=0,
    training=False,
    maps=False,
):
    """Image scores (and maps) of a chunk of images, as numpy arrays.

    ``training=True`` scores training images honestly; their ids are their
    positions in the whole training set (``start`` is the chunk's first).
    """
    scores, all_maps = [], []
    position = start
    # Each batch's embeddings and temporaries are dead once its scores and
    # maps are copied out below, so the next batch may reuse their memory.
    with torch_threads(n_threads), reuse_buffers():
        for batch, features in extractor.embed_batches(
            images, "score", kind=head.input_kind
        ):
            check_frame(batch, frame_shape)
            n = len(batch)
            ids = torch.arange(position, position + n) if training else None
            position += n
            image, frame_maps = score_features(
                head, features, frame_shape, sigma, sample_ids=ids, maps=maps
            )
            scores.append(image.cpu().numpy())
            if maps:
                all_maps.append(frame_maps.cpu().numpy())
    scores = np.concatenate(scores) if scores else np.empty(0, np.float32)
    return scores, (np.concatenate(all_maps) if maps else None)
