"""SpadeDetector: SPADE (Cohen & Hoshen, 2020), kNN over images, then pixels."""

from __future__ import annotations

import numbers

import numpy as np
import torch
import torch.nn.functional as F
from joblib import effective_n_jobs
from sklearn.utils._param_validation import Interval

from ._base import BasePatchDetector, iter_features
from ._docstrings import fill_doc
from ._gaussian_ad import pool
from ._knn import nearest_neighbors
from ._parallel import map_chunks, torch_threads


class SpadeGallery:
    """The training images' pooled features and feature pyramids (SPADE's head).

    Parameters
    ----------
    pooled : ndarray of shape (n_images, n_channels)
        Globally pooled deepest tap of each training image (image stage).
    levels : list of ndarray of shape (n_images, C_l, h_l, w_l)
        Each tapped level's feature maps (pixel stage).
    n_neighbors : int
        Nearest training images per test image (the paper's K).
    n_pixel_neighbors : int
        Nearest gallery pixels averaged into a pixel score (the paper's kappa).
    """

    input_kind = "taps"

    def __init__(self, pooled, levels, n_neighbors, n_pixel_neighbors):
        self.pooled = np.asarray(pooled, dtype=np.float32)
        self.levels = [np.asarray(level, dtype=np.float32) for level in levels]
        self.n_neighbors = n_neighbors
        self.n_pixel_neighbors = n_pixel_neighbors

    def score_batch(self, taps, *, sample_ids=None, patches=True):
        """Pixel kNN scores among each image's nearest training images, and
        the image kNN score (see ``skpadim._base``); ``patches=False`` skips
        the pixel stage (None instead of patch scores)."""
        device = taps[0].device
        bank = torch.as_tensor(self.pooled, device=device)
        n_train = len(bank)
        groups = bank_groups = None
        if sample_ids is not None:  # never match a training image with itself
            groups = sample_ids.to(device)
            bank_groups = torch.arange(n_train, device=device)
        k = min(self.n_neighbors, n_train - (sample_ids is not None))
        distances, nearest = nearest_neighbors(
            pool(taps[-1]).float(),
            bank,
            n_neighbors=k,
            query_groups=groups,
            bank_groups=bank_groups,
        )
        image_scores = distances.mean(dim=1)
        if not patches:  # the image score needs no pixel stage
            return None, image_scores
        size = taps[0].shape[-2:]
        patch_scores = torch.stack(
            [self._pixel_scores(taps, b, nearest[b], size) for b in range(len(nearest))]
        )
        return patch_scores, image_scores

    def _pixel_scores(self, taps, b, neighbours, size):
        """Mean over levels of each pixel's distance to its nearest pixels of the
        selected training images' same level, on the finest grid."""
        chosen = neighbours.cpu().numpy()
        maps = []
        for tap, level in zip(taps, self.levels):
            c, h, w = tap.shape[1:]
            queries = tap[b].reshape(c, -1).T.float()
            gallery = torch.as_tensor(level[chosen], device=tap.device)
            gallery = gallery.permute(0, 2, 3, 1).reshape(-1, c)
            k = min(self.n_pixel_neighbors, len(gallery))
            distances, _ = nearest_neighbors(queries, gallery, n_neighbors=k)
            level_map = distances.mean(dim=1).view(1, 1, h, w)
            if (h, w) != tuple(size):
                level_map = F.interpolate(
                    level_map, size=size, mode="bilinear", align_corners=False
                )
            maps.append(level_map[0, 0])
        return torch.stack(maps).mean(dim=0)

    def __sizeof__(self):
        arrays = [self.pooled, *self.levels]
        return object.__sizeof__(self) + sum(a.nbytes for a in arrays)


@fill_doc
class SpadeDetector(BasePatchDetector):
    """SPADE: semantic pyramid anomaly detection by nearest neighbours.

    Two stages (Cohen & Hoshen, "Sub-image anomaly detection with deep
    pyramid correspondences", 2020). The image stage finds the
    ``n_neighbors`` training images nearest to a test image in globally
    pooled deep features; their mean distance is the image anomaly score.
    The pixel stage scores every test pixel, at every tapped level, by its
    distance to the nearest pixels of those images' same level, anywhere in
    them; the levels' maps are upsampled (bilinear) to the finest grid,
    averaged, upsampled to the image and smoothed.

    SPADE keeps every training image's feature pyramid: its model grows with
    the number of training images (about 0.5 MiB per image with the default
    backbone at 224 px) and scoring costs grow with ``n_neighbors``. Prefer
    :class:`PatchCoreDetector` for large training sets.

    Parameters
    ----------
    {backbone}
    layers : tuple of str or None, default=None
        Tapped levels of the pixel stage; the image stage pools the deepest.
        None uses the backbone's default pyramid (ResNets: layer1-3). The
        paper pools the network's final layer for the image stage; pooling
        the deepest tap instead spares running the layers after it.
    {n_features}
        None keeps every channel.
    {reduction}
    {random_state}
    n_neighbors : int, default=50
        Nearest training images per test image (the paper's K: 50 on MVTec
        AD); capped at the number of training images (less one while scoring
        the training images).
    n_pixel_neighbors : int, default=1
        Nearest gallery pixels averaged into a pixel score (the paper's kappa).
    {sigma}
    {image}
    {contamination}
    {runtime}

    Attributes
    ----------
    {fitted}
    gallery_ : SpadeGallery
        The training images' pooled features and pyramids (the head).

    See Also
    --------
    PatchCoreDetector : A coreset of patches instead of whole pyramids.

    Notes
    -----
    ``train_scores_`` are honest: each training image is scored against the
    other training images only (leave-one-out).

    Examples
    --------
    >>> import numpy as np
    >>> from skpadim import SpadeDetector
    >>> rng = np.random.default_rng(0)
    >>> X = rng.integers(100, 156, size=(8, 64, 64, 3), dtype=np.uint8)
    >>> det = SpadeDetector(backbone="resnet18", weights=None, image_size=64,
    ...                     n_neighbors=3, random_state=0).fit(X)
    >>> det.anomaly_maps(X[:2]).shape
    (2, 64, 64)
    """

    _parameter_constraints: dict = {
        **BasePatchDetector._parameter_constraints,
        "n_neighbors": [Interval(numbers.Integral, 1, 10_000, closed="both")],
        "n_pixel_neighbors": [Interval(numbers.Integral, 1, 1000, closed="both")],
    }
    _head_attribute = "gallery_"

    def __init__(
        self,
        *,
        backbone="efficientnet_lite0",
        weights="DEFAULT",
        layers=None,
        n_features=None,
        reduction="random",
        random_state=None,
        n_neighbors=50,
        n_pixel_neighbors=1,
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
        self.n_neighbors = n_neighbors
        self.n_pixel_neighbors = n_pixel_neighbors
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
        parts = map_chunks(
            _chunk_pyramids, images, extractor, frame_shape, n_jobs=self.n_jobs
        )
        pooled = np.concatenate([p for p, _ in parts])
        levels = [np.concatenate(level) for level in zip(*(lv for _, lv in parts))]
        head = SpadeGallery(pooled, levels, self.n_neighbors, self.n_pixel_neighbors)
        return head, _GalleryFeatures(head)

    def _fit_nbytes(self, grid_shape, n_features, n_images):
        # Every image's pyramid (bounded above by n_features channels on the
        # finest grid), once gathered and once per job while embedding.
        pyramid = n_features * grid_shape[0] * grid_shape[1] * 4
        return n_images * pyramid * (1 + effective_n_jobs(self.n_jobs))


class _GalleryFeatures:
    """The training features for ``_training_scores``: the gallery holds them
    already, so the training images are scored without a second pass."""

    def __init__(self, head, batch_size=16):
        self.head, self.batch_size = head, batch_size

    def __iter__(self):
        n = len(self.head.pooled)
        for start in range(0, n, self.batch_size):
            rows = slice(start, start + self.batch_size)
            yield [torch.from_numpy(level[rows]) for level in self.head.levels]


def _chunk_pyramids(images, extractor, frame_shape, *, n_threads=None, start=0):
    """Pooled deepest tap (n, C) and every level's maps of a chunk, numpy."""
    pooled, levels = [], []
    with torch_threads(n_threads):
        for taps in iter_features(images, extractor, frame_shape, "taps"):
            pooled.append(pool(taps[-1]).float().cpu().numpy())
            levels.append([tap.float().cpu().numpy() for tap in taps])
    return np.concatenate(pooled), [np.concatenate(lv) for lv in zip(*levels)]
