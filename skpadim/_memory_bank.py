"""PatchMemoryBank: normal patch features, a greedy coreset, nearest-neighbour scores.

The head of :class:`PatchCoreDetector`. A test patch's score is its distance
to the nearest patch of the bank, wherever that patch came from: unlike
PaDiM, nothing ties a patch to its position.
"""

from __future__ import annotations

import math
import numbers

import numpy as np
import torch
from sklearn.base import BaseEstimator, _fit_context
from sklearn.utils import check_random_state
from sklearn.utils._param_validation import Interval
from sklearn.utils.validation import check_is_fitted, validate_data

from ._coreset import k_center_greedy
from ._knn import nearest_neighbors
from ._persistence import VersionedStateMixin


def coreset_target(coreset_size, n_patches):
    """Number of bank entries kept out of ``n_patches`` (at least one)."""
    if isinstance(coreset_size, numbers.Integral):
        return max(1, min(int(coreset_size), n_patches))
    return max(1, min(math.ceil(coreset_size * n_patches), n_patches))


def seed_of(random_state):
    """An int seed drawn from ``random_state`` (None gives a fresh one)."""
    return int(check_random_state(random_state).randint(2**31 - 1))


class PatchMemoryBank(VersionedStateMixin, BaseEstimator):
    """Memory bank of normal patch features, reduced by a greedy coreset.

    Fitted on patch features (a table of patches, or embeddings whose every
    position is a patch), it keeps a subset of them chosen by greedy k-center
    selection on a seeded random projection (PatchCore's coreset). A patch is
    scored by the Euclidean distance to its nearest bank entry; an image by
    the largest patch score, re-weighted by how isolated that patch's nearest
    bank entry is among its own ``n_neighbors`` neighbours (Roth et al., eq. 7).

    Parameters
    ----------
    coreset_size : float in (0, 1] or int >= 1, default=0.1
        Bank size: a fraction of the training patches, or a count.
    n_neighbors : int, default=9
        Bank neighbours of the best-matching entry used to re-weight the image
        score (the paper's b; anomalib's default 9). 1 turns re-weighting off:
        the image score is the largest patch score.
    projection_dim : int or None, default=128
        Dimension of the random projection the coreset is selected on; None
        selects on the features themselves.
    random_state : int, RandomState instance or None, default=None
        Seeds the projection and the first coreset entry.

    Attributes
    ----------
    bank_ : ndarray of shape (n_bank, n_features), float32
        The kept patch features.
    bank_sources_ : ndarray of shape (n_bank,), int64
        Index of the training sample (image) each entry came from, so training
        patches are never matched with patches of their own image.
    n_patches_seen_ : int
        Number of training patches the coreset was selected from.
    n_features_in_ : int
        Number of features per patch.

    Examples
    --------
    >>> import numpy as np
    >>> from skpadim import PatchMemoryBank
    >>> X = np.random.default_rng(0).normal(size=(500, 8)).astype(np.float32)
    >>> bank = PatchMemoryBank(coreset_size=0.2, random_state=0).fit(X)
    >>> bank.bank_.shape
    (100, 8)
    >>> bank.kneighbors(X[:3])[0].shape
    (3, 1)
    """

    _parameter_constraints = {
        "coreset_size": [
            Interval(numbers.Real, 0, 1, closed="right"),
            Interval(numbers.Integral, 1, None, closed="left"),
        ],
        "n_neighbors": [Interval(numbers.Integral, 1, 1000, closed="both")],
        "projection_dim": [Interval(numbers.Integral, 1, None, closed="left"), None],
        "random_state": ["random_state"],
    }
    # What the head consumes from the feature extractor (see skpadim._base).
    input_kind = "concat"

    def __init__(
        self, *, coreset_size=0.1, n_neighbors=9, projection_dim=128, random_state=None
    ):
        self.coreset_size = coreset_size
        self.n_neighbors = n_neighbors
        self.projection_dim = projection_dim
        self.random_state = random_state

    @_fit_context(prefer_skip_nested_validation=True)
    def fit(self, X, y=None):
        """Select the bank from a table of patches.

        Parameters
        ----------
        X : array-like of shape (n_patches, n_features)
            Normal patch features.
        y : Ignored
            Not used, present for API consistency.

        Returns
        -------
        self : PatchMemoryBank
            The fitted bank.
        """
        X = validate_data(self, X, dtype=np.float32, ensure_min_samples=2)
        patches = torch.from_numpy(np.array(X, dtype=np.float32))
        return self.set_patches(patches, torch.arange(len(patches)), len(patches))

    def set_patches(self, patches, sources, n_patches_seen):
        """Set the bank from candidate patches: the coreset of them.

        Parameters
        ----------
        patches : tensor of shape (n, n_features)
            Candidate patches (all training patches, or the union of coresets
            of chunks of them).
        sources : tensor of shape (n,), int64
            The training sample each came from.
        n_patches_seen : int
            Number of training patches behind the candidates; the bank keeps
            ``coreset_size`` of them.

        Returns
        -------
        self : PatchMemoryBank
            The fitted bank.
        """
        target = coreset_target(self.coreset_size, n_patches_seen)
        keep = k_center_greedy(
            patches,
            target,
            projection_dim=self.projection_dim,
            random_state=seed_of(self.random_state),
        )
        keep = keep.sort().values.cpu()  # training order: deterministic ties
        self.bank_ = patches.cpu()[keep].numpy()
        self.bank_sources_ = sources.cpu()[keep].numpy().astype(np.int64)
        self.n_patches_seen_ = int(n_patches_seen)
        self.n_features_in_ = patches.shape[1]
        self.__dict__.pop("_device_bank", None)
        return self

    def kneighbors(self, X, n_neighbors=1):
        """Find the nearest bank entries of patches: distances and indices.

        Parameters
        ----------
        X : array-like of shape (n_patches, n_features)
            Query patches.
        n_neighbors : int, default=1
            Neighbours per patch.

        Returns
        -------
        distances : ndarray of shape (n_patches, n_neighbors), float32
            Euclidean distances, ascending.
        indices : ndarray of shape (n_patches, n_neighbors), int64
            Rows of ``bank_``.
        """
        check_is_fitted(self)
        X = validate_data(self, X, dtype=np.float32, reset=False)
        queries = torch.from_numpy(np.array(X, dtype=np.float32))
        distances, indices = nearest_neighbors(
            queries, self._bank_on(queries.device), n_neighbors=n_neighbors
        )
        return distances.numpy(), indices.numpy()

    def score_batch(self, embeddings, *, sample_ids=None, patches=True):
        """Patch scores and re-weighted image scores of a batch.

        Parameters
        ----------
        embeddings : tensor of shape (B, n_features, h, w)
            Patch embeddings.
        sample_ids : tensor of shape (B,) or None
            For training images: their indices, so that no patch is matched
            with an entry of its own image.
        patches : bool, default=True
            Whether the caller needs the patch scores; ignored here, as the
            re-weighted image score needs every patch's nearest entry.

        Returns
        -------
        patch_scores : tensor of shape (B, h, w)
            Distance of each patch to its nearest (eligible) bank entry.
        image_scores : tensor of shape (B,)
            The largest patch score, re-weighted (paper's eq. 7).
        """
        n, d, h, w = embeddings.shape
        device = embeddings.device
        queries = embeddings.permute(0, 2, 3, 1).reshape(-1, d).float()
        bank = self._bank_on(device)
        groups = bank_groups = None
        if sample_ids is not None:
            groups = sample_ids.to(device).repeat_interleave(h * w)
            bank_groups = self._sources_on(device)
        distances, nearest = nearest_neighbors(
            queries, bank, query_groups=groups, bank_groups=bank_groups
        )
        patch_scores = distances[:, 0].view(n, h * w)
        nearest = nearest[:, 0].view(n, h * w)
        image_scores = self._reweighted(
            queries.view(n, h * w, d), patch_scores, nearest, sample_ids
        )
        return patch_scores.view(n, h, w), image_scores

    def _reweighted(self, patches, patch_scores, nearest, sample_ids):
        """Image score: the largest patch score s* times 1 - softmax weight of
        its nearest entry m* among m*'s ``n_neighbors`` bank neighbours."""
        best_score, best = patch_scores.max(dim=1)
        if self.n_neighbors == 1:
            return best_score
        rows = torch.arange(len(best), device=best.device)
        test_patch = patches[rows, best]  # (B, d)
        bank = self._bank_on(patches.device)
        anchor = bank[nearest[rows, best]]  # m*, (B, d)
        groups = bank_groups = None
        if sample_ids is not None:
            groups, bank_groups = (
                sample_ids.to(bank.device),
                self._sources_on(bank.device),
            )
        # The support is capped per image by the entries it may use (a
        # training image: those of the other images), so that an image's
        # score does not depend on the other images of its batch.
        eligible = self._n_eligible(groups, bank_groups, len(best), bank.device)
        caps = eligible.clamp_max(self.n_neighbors)
        weight = torch.empty_like(best_score)
        for cap in caps.unique().tolist():
            part = caps == cap
            _, support = nearest_neighbors(
                anchor[part],
                bank,
                n_neighbors=cap,
                query_groups=None if groups is None else groups[part],
                bank_groups=bank_groups,
            )
            # (b,) distances of the test patch to N_b(m*), m* first.
            distances = (test_patch[part].unsqueeze(1) - bank[support]).norm(dim=2)
            weight[part] = 1 - torch.softmax(distances, dim=1)[:, 0]
        return weight * best_score

    def _n_eligible(self, groups, bank_groups, n_images, device):
        """Bank entries each image may be matched with, (n_images,) int64."""
        n_bank = len(self.bank_)
        if groups is None:
            return torch.full((n_images,), n_bank, dtype=torch.int64, device=device)
        counts = torch.bincount(bank_groups)
        own = counts[groups.clamp_max(len(counts) - 1)] * (groups < len(counts))
        return n_bank - own

    def _bank_on(self, device):
        cache = self.__dict__.setdefault("_device_bank", {})
        if device not in cache:
            cache[device] = (
                torch.as_tensor(self.bank_, device=device),
                torch.as_tensor(self.bank_sources_, device=device),
            )
        return cache[device][0]

    def _sources_on(self, device):
        self._bank_on(device)
        return self._device_bank[device][1]

    def __sizeof__(self):
        return object.__sizeof__(self) + getattr(self, "bank_", np.empty(0)).nbytes

    def __getstate__(self):
        state = dict(super().__getstate__())
        state.pop("_device_bank", None)
        return state
