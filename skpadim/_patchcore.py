"""PatchCoreDetector: PatchCore (Roth et al., CVPR 2022) on the family base."""

from __future__ import annotations

import numbers

import torch
from joblib import effective_n_jobs
from sklearn.utils._param_validation import Interval

from ._base import BasePatchDetector, iter_features
from ._cache import working_memory_bytes
from ._coreset import k_center_greedy
from ._docstrings import fill_doc
from ._memory_bank import PatchMemoryBank, coreset_target, seed_of
from ._parallel import map_chunks, torch_threads


@fill_doc
class PatchCoreDetector(BasePatchDetector):
    """PatchCore: a coreset memory bank of locally aware patch features.

    Each patch feature is the concatenation of two mid-level taps, each
    averaged over its 3x3 neighbourhood (``patch_size``), the deeper one
    upsampled (bilinear) to the finer grid. The training patches are reduced
    to a coreset by greedy k-center selection, and a test patch is scored by
    the distance to its nearest bank entry, wherever in the image that entry
    came from: unlike PaDiM, PatchCore does not need aligned images. The
    upsampled, smoothed patch scores form the anomaly map; the image score is
    the largest patch score, re-weighted as in the paper (Roth et al.,
    "Towards total recall in industrial anomaly detection", CVPR 2022).

    Fitting needs bounded memory whatever the number of images: patches are
    buffered up to scikit-learn's ``working_memory``, and each full buffer is
    reduced to its own coreset; the bank is the coreset of the union of those
    (with ``n_jobs``, each job reduces its chunk the same way, which makes a
    Dask fit a map-reduce).

    Parameters
    ----------
    {backbone}
    layers : tuple of str or None, default=None
        Tapped layers; None taps the last layers of stride 8 and 16 (ResNets:
        ``("layer2", "layer3")``; EfficientNet-Lite0: blocks 4 and 10).
    {n_features}
        None keeps every channel (384 for resnet18, 152 for
        efficientnet_lite0, 1536 for wide_resnet50_2).
    {reduction}
    {random_state}
    coreset_size : float in (0, 1] or int >= 1, default=0.1
        Memory bank size: a fraction of the training patches (the paper's
        PatchCore-10%) or a number of patches.
    n_neighbors : int, default=9
        Bank neighbours used to re-weight the image score (the paper's b);
        1 disables re-weighting (image score = largest patch score, as the
        reference code does).
    patch_size : int, default=3
        Neighbourhood over which each tap is averaged (the paper's p).
    {sigma}
    {image}
    {contamination}
    {runtime}

    Attributes
    ----------
    {fitted}
    memory_bank_ : PatchMemoryBank
        The coreset of training patches (the head).

    See Also
    --------
    PadimDetector : One Gaussian per position: smaller and faster to score,
        but needs aligned images.
    PatchMemoryBank : The memory bank on its own.

    Notes
    -----
    ``train_scores_`` are honest: a training image's patches are matched only
    with bank entries that came from other images. ``partial_fit`` is not
    available: a coreset cannot be updated exactly.

    Examples
    --------
    >>> import numpy as np
    >>> from skpadim import PatchCoreDetector
    >>> rng = np.random.default_rng(0)
    >>> X = rng.integers(100, 156, size=(8, 64, 64, 3), dtype=np.uint8)
    >>> det = PatchCoreDetector(backbone="resnet18", weights=None, image_size=64,
    ...                         random_state=0).fit(X)
    >>> det.anomaly_maps(X[:2]).shape
    (2, 64, 64)
    """

    _parameter_constraints: dict = {
        **BasePatchDetector._parameter_constraints,
        **{
            name: PatchMemoryBank._parameter_constraints[name]
            for name in ("coreset_size", "n_neighbors")
        },
        "patch_size": [Interval(numbers.Integral, 1, 15, closed="both")],
    }
    _head_attribute = "memory_bank_"
    _default_strides = (8, 16)
    _upsampling = "bilinear"

    def __init__(
        self,
        *,
        backbone="efficientnet_lite0",
        weights="DEFAULT",
        layers=None,
        n_features=None,
        reduction="random",
        random_state=None,
        coreset_size=0.1,
        n_neighbors=9,
        patch_size=3,
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
        self.coreset_size = coreset_size
        self.n_neighbors = n_neighbors
        self.patch_size = patch_size
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
        head = PatchMemoryBank(
            coreset_size=self.coreset_size,
            n_neighbors=self.n_neighbors,
            random_state=self.random_state,
        )
        cache = self._new_cache(extractor)
        seed = seed_of(self.random_state)
        parts = map_chunks(
            _chunk_coreset,
            images,
            extractor,
            frame_shape,
            self.coreset_size,
            seed,
            n_jobs=self.n_jobs,
            cache=cache,
        )
        patches = torch.cat([p for p, _, _ in parts])
        sources = torch.cat([s for _, s, _ in parts])
        n_seen = sum(n for _, _, n in parts)
        head.set_patches(patches, sources, n_seen)
        if len(torch.unique(sources)) > 1 and len(set(head.bank_sources_)) < 2:
            # Its own image could only be matched with itself: no honest score.
            if cache is not None:
                cache.close()
            raise ValueError(
                f"coreset_size={self.coreset_size!r} keeps {len(head.bank_)} bank "
                "entries, all from one training image, which then cannot be "
                "scored honestly (against other images); increase coreset_size."
            )
        return head, cache

    def _fit_nbytes(self, grid_shape, n_features, n_images):
        # Per job: the buffer of raw patches (bounded by working_memory) and
        # its projection; then the bank.
        n_patches = n_images * grid_shape[0] * grid_shape[1]
        raw = min(n_patches * n_features * 4, working_memory_bytes())
        bank = coreset_target(self.coreset_size, n_patches) * n_features * 4
        return effective_n_jobs(self.n_jobs) * 2 * raw + 2 * bank


def _chunk_coreset(
    images,
    extractor,
    frame_shape,
    coreset_size,
    seed,
    *,
    n_threads=None,
    start=0,
    cache=None,
):
    """Candidate bank entries of a chunk: all its patches while they fit the
    buffer budget, else the union of coresets of buffer-sized blocks of them.

    Returns (patches (m, d) float32 CPU, source image ids (m,), patches seen).
    """
    budget = working_memory_bytes()
    kept, buffer = [], []
    buffered = seen = 0
    image_id = start
    with torch_threads(n_threads):
        features = iter_features(images, extractor, frame_shape, "concat", cache=cache)
        for embeddings in features:
            n, d, h, w = embeddings.shape
            patches = embeddings.permute(0, 2, 3, 1).reshape(-1, d).float().cpu()
            ids = torch.arange(image_id, image_id + n).repeat_interleave(h * w)
            image_id += n
            buffer.append((patches, ids))
            buffered += patches.numel() * 4
            seen += len(patches)
            if buffered > budget:
                kept.append(_reduce(buffer, coreset_size, seed + len(kept)))
                buffer, buffered = [], 0
    if buffer:
        # Reduce the last block only if earlier ones were: the union must be
        # reduced evenly, and a single block is selected once, by the head.
        last = _reduce(buffer, coreset_size, seed + len(kept)) if kept else None
        kept.append(last or _stack(buffer))
    patches, ids = _stack(kept)
    return patches, ids, seen


def _stack(pairs):
    return torch.cat([p for p, _ in pairs]), torch.cat([i for _, i in pairs])


def _reduce(buffer, coreset_size, seed):
    """Coreset of one block, twice as large as its share of the bank, so the
    final selection over the union still has room to choose."""
    patches, ids = _stack(buffer)
    target = 2 * coreset_target(coreset_size, len(patches))
    keep = k_center_greedy(patches, target, random_state=seed).sort().values
    return patches[keep], ids[keep]
