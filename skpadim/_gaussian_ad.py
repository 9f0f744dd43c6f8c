"""GaussianADDetector: Gaussian AD / "Mahalanobis AD" (Rippel et al., ICPR 2020)."""

from __future__ import annotations

import numpy as np
import torch
from sklearn.covariance import ledoit_wolf_shrinkage
from sklearn.model_selection import KFold
from sklearn.utils import check_random_state

from ._base import BaseImageDetector, iter_features
from ._docstrings import fill_doc
from ._parallel import map_chunks, torch_threads


class LevelGaussians:
    """One Gaussian per tapped level, on globally average-pooled features.

    The head of :class:`GaussianADDetector`: a location and a shrunk precision
    matrix per level (scikit-learn's :class:`~sklearn.covariance.LedoitWolf`).
    An image's score is the sum over levels of its (not squared) Mahalanobis
    distances. It scores whole images only: no patch scores, no maps.

    Parameters
    ----------
    locations : list of ndarray of shape (n_channels_l,)
    precisions : list of ndarray of shape (n_channels_l, n_channels_l)
    """

    input_kind = "taps"

    def __init__(self, locations, precisions):
        self.locations = [np.asarray(m, dtype=np.float32) for m in locations]
        self.precisions = [np.asarray(p, dtype=np.float32) for p in precisions]

    @classmethod
    def fit(cls, levels):
        """Fit one Ledoit-Wolf Gaussian per level of pooled features (n, C_l)."""
        fitted = [shrunk_gaussian(x) for x in levels]
        return cls([mean for mean, _ in fitted], [prec for _, prec in fitted])

    def distances(self, levels):
        """Summed per-level Mahalanobis distances of pooled features, numpy."""
        total = 0.0
        for x, mean, precision in zip(levels, self.locations, self.precisions):
            centred = np.asarray(x, dtype=np.float64) - mean
            squared = np.einsum("ni,ij,nj->n", centred, precision, centred)
            total = total + np.sqrt(np.maximum(squared, 0.0))
        return total

    def score_batch(self, taps, *, sample_ids=None, patches=True):
        """Image scores of a batch of taps (see ``skpadim._base``): (None, (B,))."""
        total = 0.0
        for tap, mean, precision in zip(taps, self.locations, self.precisions):
            centred = pool(tap).double() - torch.as_tensor(mean, device=tap.device)
            precision = torch.as_tensor(precision, device=tap.device).double()
            squared = ((centred @ precision) * centred).sum(dim=1)
            total = total + squared.clamp_min(0).sqrt()
        return None, total.float()

    def __sizeof__(self):
        arrays = self.locations + self.precisions
        return object.__sizeof__(self) + sum(a.nbytes for a in arrays)


def shrunk_gaussian(x):
    """Mean and precision of the Ledoit-Wolf shrunk covariance of ``x`` (n, d).

    The same estimate as :class:`sklearn.covariance.LedoitWolf`, whose
    shrinkage it uses, but inverted through a Cholesky factor instead of an
    eigendecomposition (``pinvh``): ten times faster at d = 512, which matters
    because cross-fitted training scores fit ten of them per level. The
    shrunk matrix is positive definite unless every feature is constant (a
    ridge keeps even that case finite).
    """
    x = np.asarray(x, dtype=np.float64)
    mean = x.mean(axis=0)
    centred = x - mean
    covariance = centred.T @ centred / len(x)
    shrinkage = ledoit_wolf_shrinkage(centred, assume_centered=True)
    mu = np.trace(covariance) / len(covariance)
    shrunk = (1.0 - shrinkage) * covariance
    # Features with (numerically) no variance, e.g. identical training images,
    # get a ridge of their mean square: a standard deviation as large as the
    # features themselves, so that the backbone's float32 rounding (which
    # varies with the batch) stays a distance well below offset_'s 1e-4
    # margin even with every channel of every level (a 1e-2 ridge still
    # flagged the training image scored alone). Otherwise a 1e-9 relative
    # ridge only guards rounding.
    scale = float(np.mean(x**2))
    ridge = scale if mu <= 1e-9 * scale else 1e-9 * mu
    shrunk.flat[:: len(shrunk) + 1] += shrinkage * mu + max(ridge, 1e-30)
    factor = torch.linalg.cholesky(torch.from_numpy(shrunk))
    precision = torch.cholesky_inverse(factor).numpy()
    return mean, precision


def pool(tap):
    """Global average pooling: (B, C, h, w) -> (B, C)."""
    return tap.mean(dim=(2, 3))


@fill_doc
class GaussianADDetector(BaseImageDetector):
    """Gaussian AD: a multivariate Gaussian per level of pooled deep features.

    Every tapped feature map is globally average-pooled into one vector per
    image; each level gets a Gaussian with a Ledoit-Wolf shrunk covariance,
    and an image's anomaly score is the sum over levels of its Mahalanobis
    distances (Rippel et al., "Modeling the distribution of normal data in
    pre-trained deep features for anomaly detection", ICPR 2020). It scores
    whole images: there are no anomaly maps (``hasattr(det, "anomaly_maps")``
    is False). Cheap to fit, it suits aligned or unaligned parts whose defects
    change the global appearance; it cannot say where a defect is.

    Parameters
    ----------
    {backbone}
    layers : tuple of str or None, default=None
        Tapped levels; None taps the last layer of every stride the backbone
        offers (ResNets: layer1-4; EfficientNet-Lite0: blocks 0, 2, 4, 10,
        15). The paper taps every block of an EfficientNet-B4.
    {n_features}
        None keeps every channel.
    {reduction}
    {random_state}
    {image}
    {contamination}
    {runtime}

    Attributes
    ----------
    {fitted}
    gaussians_ : LevelGaussians
        The per-level locations and shrunk precisions (the head).

    See Also
    --------
    PadimDetector : One Gaussian per patch position: localises defects.
    sklearn.covariance.EllipticEnvelope : The same idea on a table.

    Notes
    -----
    ``train_scores_`` are cross-fitted: the training images are split into
    up to ten folds, and each fold is scored by Gaussians fitted on the other
    folds, so ``offset_`` is not taken from optimistic in-sample distances.
    Fitting keeps the pooled features of all training images (a few KiB
    each), never their feature maps.

    Examples
    --------
    >>> import numpy as np
    >>> from skpadim import GaussianADDetector
    >>> rng = np.random.default_rng(0)
    >>> X = rng.integers(100, 156, size=(12, 64, 64, 3), dtype=np.uint8)
    >>> det = GaussianADDetector(backbone="resnet18", weights=None, image_size=64,
    ...                          random_state=0).fit(X)
    >>> det.predict(X[:2]).shape
    (2,)
    >>> hasattr(det, "anomaly_maps")
    False
    """

    _head_attribute = "gaussians_"
    _default_strides = (2, 4, 8, 16, 32)
    _min_train_images = 3

    def __init__(
        self,
        *,
        backbone="efficientnet_lite0",
        weights="DEFAULT",
        layers=None,
        n_features=None,
        reduction="random",
        random_state=None,
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
        parts = map_chunks(
            _chunk_pooled, images, extractor, frame_shape, n_jobs=self.n_jobs
        )
        levels = [np.concatenate(level) for level in zip(*parts)]
        return LevelGaussians.fit(levels), levels

    def _training_scores(self, images, extractor, head, frame_shape, levels):
        """Cross-fitted scores: each fold scored by Gaussians fitted without it."""
        n = len(levels[0])
        seed = check_random_state(self.random_state).randint(2**31 - 1)
        folds = KFold(n_splits=min(10, n), shuffle=True, random_state=seed)
        scores = np.empty(n)
        for train, held_out in folds.split(levels[0]):
            fold_head = LevelGaussians.fit([x[train] for x in levels])
            scores[held_out] = fold_head.distances([x[held_out] for x in levels])
        return -scores

    def _fit_nbytes(self, grid_shape, n_features, n_images):
        # The pooled features of every image plus a d x d matrix per level
        # (bounded above by one of the full width).
        return 8 * (n_images * n_features + 4 * n_features**2)


def _chunk_pooled(images, extractor, frame_shape, *, n_threads=None, start=0):
    """Pooled per-level features of a chunk: a list of (n, C_l) float64 arrays."""
    pooled = []
    with torch_threads(n_threads):
        for taps in iter_features(images, extractor, frame_shape, "taps"):
            pooled.append([pool(tap).double().cpu().numpy() for tap in taps])
    return [np.concatenate(level) for level in zip(*pooled)]
