"""One Gaussian per patch position: whitening factors and Mahalanobis scores.

The streaming statistics live in :mod:`skpadim._moments`; this module turns
them into per-position Cholesky whitening factors and scores embeddings with
one batched matrix product.
"""

from __future__ import annotations

import numbers

import numpy as np
import torch
from scipy.linalg import lapack
from sklearn.base import BaseEstimator, _fit_context
from sklearn.utils._param_validation import Interval
from sklearn.utils.validation import check_is_fitted, validate_data
from threadpoolctl import threadpool_limits

from ._moments import PatchMoments, positions_first
from ._persistence import VersionedStateMixin
from ._scratch import scratch


def whitening_factors(moments, epsilon, *, chunk_size=None):
    """Per-position inverse Cholesky factors W = L^-1 with W Sigma W^T = I.

    Computed in float64, a chunk of positions at a time so the float64
    temporaries stay small; no general matrix inverse is formed (batched
    ``inv`` is fragile on some CPU LAPACK builds and less accurate). On the
    CPU each position goes straight to LAPACK (``dpotrf`` then ``dtrtri``,
    in place): about twice as fast as torch's batched Cholesky and
    triangular solve there, which also materialise an identity per position.

    The factors are stored transposed (each W^T contiguous, the result a
    transposed view): that is the operand scoring multiplies by, and the
    layout LAPACK leaves them in, so storing them is a plain copy.

    Parameters
    ----------
    moments : PatchMoments
    epsilon : float
        Added to the covariances' diagonals.
    chunk_size : int or None, default=None
        Positions factorised at once; None keeps their float64 covariances
        within :data:`_CHUNK_BYTES`.

    Returns
    -------
    tensor of shape (n_positions, n_features, n_features), float32, lower triangular
    """
    n_positions, n_features = moments.shape
    device = moments.mean.device
    if chunk_size is None:
        chunk_size = max(1, min(256, _CHUNK_BYTES // (8 * n_features**2)))
    transposed = torch.empty(n_positions, n_features, n_features, device=device)
    out = transposed.mT
    factor_block = (
        _lapack_inverse_cholesky if device.type == "cpu" else _torch_inverse_cholesky
    )
    # scipy's LAPACK has its own thread pool: hold it to torch's thread count,
    # which the caller (or a worker running several jobs) has set.
    with threadpool_limits(limits=torch.get_num_threads(), user_api="blas"):
        for start in range(0, n_positions, chunk_size):
            block = slice(start, start + chunk_size)
            covariance = moments.covariance(epsilon, block)
            if not factor_block(covariance, out[block]):
                raise ValueError(
                    "A covariance matrix is not positive definite; epsilon must be "
                    f"> 0 (got {epsilon})."
                )
    return out


# float64 covariances factorised at once (27 positions at d=550, 256 at d=100).
_CHUNK_BYTES = 64 * 2**20


def _lapack_inverse_cholesky(covariance, out):
    """Write L^-1 of each float64 CPU matrix into ``out``; False if one is not
    positive definite."""
    matrices = covariance.numpy()
    target = out.numpy()
    for i, matrix in enumerate(matrices):
        # A symmetric C-ordered matrix is its own Fortran-ordered transpose,
        # so LAPACK can work on it in place.
        factor, info = lapack.dpotrf(matrix.T, lower=1, clean=1, overwrite_a=1)
        if info != 0:
            return False
        inverse, info = lapack.dtrtri(factor, lower=1, overwrite_c=1)
        if info != 0:
            return False
        target[i] = inverse  # both Fortran-ordered when out is a transposed view
    return True


def _torch_inverse_cholesky(covariance, out):
    """:func:`_lapack_inverse_cholesky` for any device, batched in torch."""
    factor, info = torch.linalg.cholesky_ex(covariance)
    if int(info.max()) > 0:
        return False
    eye = torch.eye(covariance.shape[-1], dtype=factor.dtype, device=factor.device)
    out.copy_(torch.linalg.solve_triangular(factor, eye.expand_as(factor), upper=False))
    return True


def whitened_norms(x, shift, whitening_t):
    """||x W^T - shift|| per position and sample, with ``shift = (W mean)^T``.

    Folding the mean into the shift turns centring and whitening into one
    batched ``baddbmm`` that reads the samples once, written into a scratch
    buffer (see :mod:`skpadim._scratch`).

    Parameters
    ----------
    x : tensor of shape (n_positions, n_samples, n_features)
    shift : tensor of shape (n_positions, 1, n_features)
    whitening_t : tensor of shape (n_positions, n_features, n_features)
        The transposed whitening factors, W^T.

    Returns
    -------
    tensor of shape (n_positions, n_samples)
    """
    whitened = scratch("whitened", tuple(x.shape), dtype=x.dtype, device=x.device)
    torch.baddbmm(shift, x, whitening_t, beta=-1, out=whitened)
    return torch.linalg.vector_norm(whitened, dim=2)


def leave_one_out(distances, n_samples):
    """Turn training samples' in-sample distances into leave-one-out distances.

    A training sample pulls its position's Gaussian towards itself, so its
    in-sample distance is optimistic (badly so when ``n_samples`` is not much
    larger than ``n_features``). Removing one sample is a rank-one downdate
    of the scatter, so by Sherman-Morrison, with ``c = n / (n - 1)`` and
    ``h = d_in^2 / (n - 1)``::

        d_loo^2 = c^2 (n - 2) h / (1 - c h)

    is the sample's distance to the Gaussian fitted without it. This is exact
    for ``epsilon = 0``; with ``epsilon > 0`` the only difference is that the
    regulariser was weighted by ``n - 1`` rather than ``n - 2`` samples, which
    changes each distance by at most a factor ``1 + 1 / (2 (n - 2))`` (and much
    less when the feature variances dwarf ``epsilon``).

    Parameters
    ----------
    distances : tensor
        In-sample Mahalanobis distances of training samples (any shape).
    n_samples : int
        Number of samples the Gaussians were fitted on.

    Returns
    -------
    tensor
        Leave-one-out distances, same shape; unchanged when ``n_samples < 3``.
    """
    n = n_samples
    if n < 3:
        return distances
    c = n / (n - 1)
    h = distances.double() ** 2 / (n - 1)
    # c h < 1 for any training sample; the clamp only guards rounding.
    loo = c**2 * (n - 2) * h / (1 - c * h).clamp_min(1e-12)
    return loo.sqrt().to(distances.dtype)


def pack_lower(matrices):
    """Pack the lower triangles of (P, d, d) matrices into (P, d(d+1)/2)."""
    rows, cols = np.tril_indices(matrices.shape[-1])
    return np.ascontiguousarray(matrices[:, rows, cols])


def unpack_lower(packed, n_features):
    """Inverse of :func:`pack_lower`, in the layout of :func:`whitening_factors`
    (a transposed view of contiguous upper-triangular matrices)."""
    rows, cols = np.tril_indices(n_features)
    out = np.zeros((packed.shape[0], n_features, n_features), dtype=packed.dtype)
    out[:, cols, rows] = packed
    return out.transpose(0, 2, 1)


class PatchGaussian(VersionedStateMixin, BaseEstimator):
    """One Gaussian per patch position, scored by Mahalanobis distance.

    The head of :class:`PadimDetector`, and the analogue of scikit-learn's
    :class:`~sklearn.covariance.EmpiricalCovariance` for patch embeddings: a
    model of normal data with no threshold (the detector owns ``offset_``).
    On embeddings of shape (n_samples, n_features, height, width), each of the
    height x width positions gets its own mean and regularised covariance; on a
    2-D table (n_samples, n_features) there is a single position. Statistics
    are streamed (``partial_fit``) in float64; only the mean and the whitening
    factor are kept for scoring.

    Parameters
    ----------
    epsilon : float, default=0.01
        Added to the diagonal of every covariance matrix (PaDiM's value).

    Attributes
    ----------
    location_ : ndarray of shape (n_positions, n_features), float32
        Per-position means.
    whitening_ : ndarray of shape (n_positions, n_features, n_features), float32
        Lower-triangular inverse Cholesky factors, ``W Sigma W^T = I``.
    moments_ : PatchMoments or None
        The float64 streaming statistics; needed by ``partial_fit``. They are
        left out of pickles to keep saved models small, so a reloaded
        estimator can score but not continue ``partial_fit``.
    n_samples_seen_ : int
        Number of training samples.
    feature_shape_ : tuple of int
        Shape of one sample: (n_features,) or (n_features, height, width).
    n_features_in_ : int
        Number of features (channels) per position.

    See Also
    --------
    PadimDetector : The image anomaly detector built on this head.
    sklearn.covariance.EmpiricalCovariance : One Gaussian on a table.

    Examples
    --------
    >>> import numpy as np
    >>> from skpadim import PatchGaussian
    >>> rng = np.random.default_rng(0)
    >>> X = rng.normal(size=(200, 3))
    >>> head = PatchGaussian().fit(X)
    >>> head.mahalanobis([[0.0, 0.0, 0.0], [8.0, 8.0, 8.0]]).round(1)
    array([ 0.1, 14.5], dtype=float32)
    """

    _parameter_constraints = {
        "epsilon": [Interval(numbers.Real, 0, None, closed="neither")],
    }
    # What the head consumes from the feature extractor (see skpadim._base).
    input_kind = "concat"

    def __init__(self, *, epsilon=0.01):
        self.epsilon = epsilon

    def _validate_embeddings(self, X, *, reset):
        X = validate_data(
            self,
            X,
            reset=reset,
            dtype=[np.float64, np.float32],
            allow_nd=True,
            ensure_min_samples=2 if reset else 1,
        )
        # torch refuses to wrap read-only arrays without a warning.
        return X if X.flags.writeable else X.copy()

    @_fit_context(prefer_skip_nested_validation=True)
    def fit(self, X, y=None):
        """Fit the per-position Gaussians from scratch.

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features) or (n_samples, n_features, h, w)
            Training samples, e.g. patch embeddings from
            :class:`PatchFeatureExtractor`.
        y : Ignored
            Not used, present for API consistency.

        Returns
        -------
        self : PatchGaussian
            The fitted estimator.
        """
        X = self._validate_embeddings(X, reset=True)
        self._check_ndim(X)
        moments = PatchMoments.from_batch(positions_first(torch.from_numpy(X)))
        return self.set_moments(moments, X.shape[1:])

    @_fit_context(prefer_skip_nested_validation=True)
    def partial_fit(self, X, y=None):
        """Add a batch of samples to the statistics.

        Parameters
        ----------
        X : array-like of the shape of the first fitted batch
            More training samples; only their number may differ from the
            previous batches.
        y : Ignored
            Not used, present for API consistency.

        Returns
        -------
        self : PatchGaussian
            The updated estimator.
        """
        first = not hasattr(self, "moments_")
        if not first and self.moments_ is None:
            raise ValueError(
                "This PatchGaussian was loaded without its streaming statistics "
                "and cannot continue partial_fit; fit it again."
            )
        X = self._validate_embeddings(X, reset=first)
        self._check_ndim(X)
        if not first and X.shape[1:] != self.feature_shape_:
            raise ValueError(
                f"X has samples of shape {X.shape[1:]}; expected "
                f"{self.feature_shape_} as in the previous calls."
            )
        moments = PatchMoments.from_batch(positions_first(torch.from_numpy(X)))
        if not first:
            moments = self.moments_.merge(moments)
        return self.set_moments(moments, X.shape[1:])

    def _check_ndim(self, X):
        if X.ndim not in (2, 4):
            raise ValueError(
                "X must have shape (n_samples, n_features) or (n_samples, "
                f"n_features, height, width); got shape {X.shape}."
            )

    def set_moments(self, moments, feature_shape):
        """Set the Gaussians from streaming statistics.

        Parameters
        ----------
        moments : PatchMoments
            Streaming statistics, e.g. merged from several partial fits.
        feature_shape : tuple of int
            (n_features,) or (n_features, height, width) of one sample.

        Returns
        -------
        self : PatchGaussian
            The estimator, ready to score.
        """
        moments.release()  # the fit is over: merge and free the float32 sums
        whitening = whitening_factors(moments, self.epsilon)
        self.moments_ = moments
        self.n_samples_seen_ = moments.count
        self.n_features_in_ = moments.shape[1]
        self.feature_shape_ = tuple(feature_shape)
        self.location_ = moments.mean.to(torch.float32).cpu().numpy()
        self.whitening_ = whitening.cpu().numpy()
        self.__dict__.pop("_device_params", None)
        return self

    def patch_scores(self, embeddings, *, leave_out=False):
        """Compute the Mahalanobis distances of a torch batch, on its device.

        Parameters
        ----------
        embeddings : tensor of shape (n, n_features, h, w) or (n, n_features)
            Samples of the fitted shape.
        leave_out : bool, default=False
            The samples are training samples: score each against the Gaussians
            fitted without it (see :func:`leave_one_out`).

        Returns
        -------
        tensor of shape (n, h, w) or (n,), float32
            The (not squared) distance of each sample at each position.
        """
        shift, whitening_t = self._params_on(embeddings.device)
        x = positions_first(embeddings.to(torch.float32))
        dist = whitened_norms(x, shift, whitening_t)
        dist = dist.T.reshape(embeddings.shape[:1] + embeddings.shape[2:])
        return leave_one_out(dist, self.n_samples_seen_) if leave_out else dist

    def score_batch(self, embeddings, *, sample_ids=None, patches=True):
        """Patch scores of a batch, for the detectors (see ``_base``).

        Parameters
        ----------
        embeddings : tensor of shape (n, n_features, h, w)
            Patch embeddings of a batch of images.
        sample_ids : tensor of shape (n,) or None, default=None
            Given for training images, which are then scored leave-one-out.
        patches : bool, default=True
            Whether the caller needs the patch scores; ignored here, as the
            image score is the maximum of the smoothed map made from them.

        Returns
        -------
        patch_scores : tensor of shape (n, h, w)
            Leave-one-out distances when ``sample_ids`` is given.
        image_scores : None
            The detector takes the maximum of the smoothed map.
        """
        return self.patch_scores(embeddings, leave_out=sample_ids is not None), None

    def _params_on(self, device):
        # Cache the device copies: moving them for every batch would cost
        # more than the scoring itself on a GPU.
        cache = self.__dict__.setdefault("_device_params", {})
        if device not in cache:
            mean = torch.as_tensor(self.location_, device=device)
            whitening_t = torch.as_tensor(self.whitening_, device=device).mT
            # (W mu)^T, rounded like the products x W^T it is subtracted from.
            cache[device] = (torch.bmm(mean.unsqueeze(1), whitening_t), whitening_t)
        return cache[device]

    def mahalanobis(self, X):
        """Compute the Mahalanobis distance of each sample at each position.

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features) or (n_samples, n_features, h, w)
            Samples of the fitted shape.

        Returns
        -------
        distances : ndarray of shape (n_samples,) or (n_samples, h, w), float32
            The (not squared) distance to the Gaussian of each position.
        """
        check_is_fitted(self)
        X = self._validate_embeddings(X, reset=False)
        if X.shape[1:] != self.feature_shape_:
            raise ValueError(
                f"X has samples of shape {X.shape[1:]}; expected {self.feature_shape_}."
            )
        return self.patch_scores(torch.from_numpy(X)).numpy()

    def score_samples(self, X):
        """Opposite of the largest Mahalanobis distance over positions.

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features) or (n_samples, n_features, h, w)
            Samples of the fitted shape.

        Returns
        -------
        scores : ndarray of shape (n_samples,)
            Higher is more normal.
        """
        dist = self.mahalanobis(X)
        return -dist.reshape(len(dist), -1).max(axis=1).astype(np.float64)

    def __sizeof__(self):
        # Lets joblib's Dask backend see the model is large and scatter it to
        # the workers once, instead of shipping it inside every task.
        return object.__sizeof__(self) + getattr(self, "whitening_", np.empty(0)).nbytes

    def __getstate__(self):
        state = dict(super().__getstate__())  # a copy: never touch the live object
        if "whitening_" in state:
            # The factor is triangular: store half of it, and leave the float64
            # streaming statistics out, to keep saved models small.
            state["whitening_"] = pack_lower(state["whitening_"])
            state["moments_"] = None
        state.pop("_device_params", None)
        return state

    def __setstate__(self, state):
        state = dict(state)
        # Release 0.1 gave the head a threshold; the detector owns it now.
        state.pop("contamination", None)
        state.pop("offset_", None)
        if "whitening_" in state and state["whitening_"].ndim == 2:
            n_features = state["location_"].shape[1]
            state["whitening_"] = unpack_lower(state["whitening_"], n_features)
        super().__setstate__(state)

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.input_tags.allow_nan = False
        return tags
