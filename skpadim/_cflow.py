"""CflowDetector: CFLOW-AD as a scikit-learn outlier detector on images.

CFLOW-AD (Gudovskiy et al., WACV 2022) fits one conditional normalizing flow
per tapped feature level on the "fibers" (the channel vectors at each
position) of normal images, conditioned on a positional encoding. The flows
are :class:`skpadim._flow.FlowPyramid`; this module adds the training loop
(Adam over shuffled fibers, epochs over a bounded feature cache), the held-out
split for early stopping and the threshold, and a head that turns per-level
log-likelihoods into image-independent patch scores.
"""

from __future__ import annotations

import copy
import math
import numbers

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.utils import check_random_state
from sklearn.utils._param_validation import Interval

from ._base import BasePatchDetector, iter_features, score_features
from ._cache import FeatureCache, working_memory_bytes
from ._docstrings import fill_doc
from ._flow import FlowPyramid
from .backbones import get_backbone_spec

# Images whose fibers are shuffled together (the reference's image batch).
# Fixed, so that what is learned does not depend on the run-time batch_size.
_SHUFFLE_GROUP = 32


class _FlowHead:
    """The fitted flows of a CflowDetector, and how they score patches.

    The state is plain numpy arrays (the flows' state dict), so a pickle
    holds no torch object and loads on any device; the torch modules are
    rebuilt on first use, on the device of the features they score.

    Parameters
    ----------
    level_channels : tuple of int
        Channels of each level (tap).
    condition_dim, n_coupling_blocks, clamp
        As in :class:`~skpadim._flow.FlowPyramid`.

    Attributes
    ----------
    state_ : dict of str to ndarray
        The flows' state dict (weights and permutation indices).
    log_prob_max_ : ndarray of shape (n_levels,), float64
        ``c_l``: the largest per-dimension log-likelihood of a training
        fiber at each level, under the final flows.
    loss_curve_, n_iter_, validation_scores_, best_validation_score_,
    validation_indices_
        The training history, as on the detector.
    """

    input_kind = "taps"

    def __init__(self, level_channels, condition_dim, n_coupling_blocks, clamp):
        self.level_channels = tuple(int(c) for c in level_channels)
        self.condition_dim = int(condition_dim)
        self.n_coupling_blocks = int(n_coupling_blocks)
        self.clamp = float(clamp)
        self.state_ = None
        self.log_prob_max_ = None
        self.loss_curve_ = []
        self.n_iter_ = 0
        self.validation_scores_ = None
        self.best_validation_score_ = None
        self.validation_indices_ = np.empty(0, dtype=np.int64)
        self._pyramids = {}

    @property
    def n_levels(self):
        return len(self.level_channels)

    def new_pyramid(self, device, random_state=0):
        """A trainable FlowPyramid: fresh (drawn from ``random_state``) when
        the head holds no state, else loaded from it."""
        pyramid = FlowPyramid(
            self.level_channels,
            self.condition_dim,
            self.n_coupling_blocks,
            self.clamp,
            random_state=random_state,
        )
        if self.state_ is not None:
            pyramid.load_state_dict(
                {name: torch.from_numpy(np.array(v)) for name, v in self.state_.items()}
            )
        return pyramid.to(device)

    def _pyramid(self, device):
        """The frozen flows on ``device``, built once per device."""
        key = str(torch.device(device))
        if key not in self._pyramids:
            pyramid = self.new_pyramid(device).eval().requires_grad_(False)
            self._pyramids[key] = pyramid
        return self._pyramids[key]

    def score_batch(self, features, *, sample_ids=None, patches=True):
        """Patch scores of a batch on the finest level's grid.

        For each level l, ``s_l = exp(log p_l - c_l)`` with ``c_l`` the
        largest training log-likelihood of that level (stored, so a score
        depends on its image alone), upsampled bilinearly to the finest
        level's grid; the patch score is ``n_levels - sum_l s_l``. It is 0
        for a fiber as likely as the likeliest training fiber at every level
        and tends to ``n_levels`` for unlikely ones.

        ``sample_ids`` is ignored: the images scored for the threshold were
        held out of training (or, without a held-out split, are scored
        in-sample).
        """
        if len(features) != self.n_levels:
            raise ValueError(
                f"Expected {self.n_levels} feature levels, got {len(features)}."
            )
        pyramid = self._pyramid(features[0].device)
        size = features[0].shape[-2:]
        total = None
        for level, tap in enumerate(features):
            log_prob = pyramid.level_log_prob(level, tap)
            likelihood = torch.exp(log_prob - float(self.log_prob_max_[level]))
            if likelihood.shape[-2:] != size:
                likelihood = F.interpolate(
                    likelihood[:, None], size=size, mode="bilinear", align_corners=False
                )[:, 0]
            total = likelihood if total is None else total + likelihood
        return self.n_levels - total, None

    def set_weights(self, pyramid):
        """Store a pyramid's weights as numpy copies."""
        self.state_ = {
            name: tensor.detach().cpu().numpy().copy()
            for name, tensor in pyramid.state_dict().items()
        }
        self._pyramids = {}

    def clone_history(self, other):
        """Continue ``other``'s training history (warm start, partial_fit)."""
        self.loss_curve_ = list(other.loss_curve_)
        self.n_iter_ = other.n_iter_
        self.validation_scores_ = (
            None if other.validation_scores_ is None else list(other.validation_scores_)
        )
        self.best_validation_score_ = other.best_validation_score_
        return self

    def __getstate__(self):
        state = dict(self.__dict__)
        state.pop("_pyramids", None)  # torch modules: rebuilt on load
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._pyramids = {}

    def __sizeof__(self):
        state = self.state_ or {}
        return object.__sizeof__(self) + sum(v.nbytes for v in state.values())


def _regroup(batches, size):
    """Re-cut a stream of tap lists into groups of ``size`` images (last smaller)."""
    pending, count = [], 0
    for taps in batches:
        pending.append(taps)
        count += len(taps[0])
        while count >= size:
            merged = [torch.cat(level) for level in zip(*pending)]
            if count == size:
                yield merged
                pending, count = [], 0
            else:
                yield [tap[:size].clone() for tap in merged]
                pending, count = [[tap[size:].clone() for tap in merged]], count - size
    if count:
        yield [torch.cat(level) for level in zip(*pending)]


def _train_epoch(pyramid, optimizers, cache, fiber_batch_size, generator):
    """One pass of Adam steps over every training fiber; the mean loss.

    Within each group of images, the fibers of each level are shuffled and cut
    into ``ceil(E / fiber_batch_size)`` near-equal chunks (none dropped), one
    Adam step each. The result is the mean over levels of each level's
    fiber-weighted mean loss.
    """
    n_levels = len(pyramid.flows)
    totals = [0.0] * n_levels
    counts = [0] * n_levels
    for group in cache:
        for level, tap in enumerate(group):
            n_images, n_channels, height, width = tap.shape
            fibers = tap.permute(0, 2, 3, 1).reshape(-1, n_channels)
            if fibers.is_inference():  # a view of a cached tap (1 x 1 grids)
                fibers = fibers.clone()
            positions = pyramid.position_conditions(
                height, width, dtype=tap.dtype, device=tap.device
            )
            n_fibers = len(fibers)
            order = torch.randperm(n_fibers, generator=generator).to(fibers.device)
            # Fiber (b * h + i) * w + j is at position i * w + j.
            where = order % (height * width)
            optimizer = optimizers[level]
            n_steps = -(-n_fibers // fiber_batch_size)
            for chunk, at in zip(
                torch.tensor_split(order, n_steps), torch.tensor_split(where, n_steps)
            ):
                loss = pyramid.fiber_loss(level, fibers[chunk], positions[at])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                totals[level] = totals[level] + loss.detach() * len(chunk)
            counts[level] += n_fibers
    return float(np.mean([float(t) / c for t, c in zip(totals, counts)]))


def _adam(flow, learning_rate):
    """Adam on a flow's parameters: torch's fused kernel (one call per step
    for all parameters, the same update up to float rounding) where the
    device has it, else the default implementation."""
    try:
        return torch.optim.Adam(flow.parameters(), lr=learning_rate, fused=True)
    except (RuntimeError, ValueError):
        return torch.optim.Adam(flow.parameters(), lr=learning_rate)


def _level_log_probs(pyramid, cache):
    """Per level: (sum, count, max) of the fibers' per-dimension log p."""
    n_levels = len(pyramid.flows)
    sums = np.zeros(n_levels)
    counts = np.zeros(n_levels)
    maxima = np.full(n_levels, -np.inf)
    with torch.inference_mode():
        for features in cache:
            for level, tap in enumerate(features):
                log_prob = pyramid.level_log_prob(level, tap)
                sums[level] += float(log_prob.double().sum())
                counts[level] += log_prob.numel()
                maxima[level] = max(maxima[level], float(log_prob.max()))
    return sums, counts, maxima


def _mean_log_prob(pyramid, cache):
    """Held-out score: mean over levels of the mean per-dimension log p."""
    sums, counts, _ = _level_log_probs(pyramid, cache)
    return float(np.mean(sums / counts))


def _flow_n_parameters(n_features, condition_dim, n_coupling_blocks):
    """Trainable parameters of a ConditionalFlow (as _flow.CouplingBlock builds)."""
    split = n_features // 2
    hidden = 2 * (split + condition_dim)
    out = 2 * (n_features - split)
    block = (split + condition_dim + 1) * hidden + (hidden + 1) * out + 2 * n_features
    return n_coupling_blocks * block


def _held_out_indices(n_images, validation_fraction, seed):
    """Sorted indices of the images held out of training, by a seeded draw.

    ``ceil(validation_fraction * n)`` images, but at least one is trained on;
    none when the fraction is 0 or there is a single image.
    """
    n_held = math.ceil(validation_fraction * n_images) if validation_fraction else 0
    n_held = min(n_held, n_images - 1)
    if n_held <= 0:
        return np.empty(0, dtype=np.int64)
    order = np.random.RandomState(seed).permutation(n_images)
    return np.sort(order[:n_held]).astype(np.int64)


@fill_doc
class CflowDetector(BasePatchDetector):
    """CFLOW-AD: conditional normalizing flows on pretrained patch features.

    Fitted on normal images only, the detector trains one conditional
    normalizing flow per tapped feature level (Gudovskiy et al., WACV 2022).
    Each flow maps the channel vector ("fiber") at every position to a
    standard normal, conditioned on a sinusoidal encoding of the position, so
    it gives every fiber a log-likelihood per dimension ``log p_l``. A test
    fiber's score combines the levels (see Notes); the scores form a pixel
    anomaly map, upsampled and smoothed, whose maximum is the image's anomaly
    score.

    Training streams features through the frozen backbone once: the taps are
    kept in a bounded cache (scikit-learn's ``working_memory`` in RAM, the
    rest in a temporary file), and each epoch shuffles the fibers of each
    group of 32 images and takes one Adam step per ``fiber_batch_size``
    fibers and level, with CFLOW-AD's loss ``-log sigmoid(log p)``. Training
    is a sequential loop: ``n_jobs`` parallelises scoring only.

    Parameters
    ----------
    {backbone}
    layers : tuple of str or None, default=None
        Tapped layers, one flow each; None takes the last layer of strides
        8, 16 and 32 (ResNets: ``("layer2", "layer3", "layer4")`` as in the
        reference; efficientnet_lite0: ``("block4", "block10", "block15")``).
    n_features : int or None, default=None
        Channels kept over all taps; None keeps every channel (the
        reference). An int keeps a seeded random subset (``reduction=
        "random"``; a tap left with no channel gets no flow) or, with
        ``reduction="pca"``, projects each tap on ``n_features`` principal
        directions.
    reduction : {"random", "pca"}, default="random"
        How ``n_features`` channels are chosen.
    {random_state}
    max_iter : int, default=20
        Epochs over the training images (scikit-learn's word for them).
    learning_rate_init : float, default=1e-3
        Adam's learning rate, constant over training.
    fiber_batch_size : int, default=256
        Fibers per Adam step (the reference's N). Each level's fibers are
        cut into near-equal chunks of at most this size; none is dropped.
    n_coupling_blocks : int, default=8
        Coupling blocks per flow.
    condition_dim : int, default=128
        Channels of the positional encoding, a positive multiple of 4.
    clamp : float, default=1.9
        Bound of each coupling's log-scale (the reference's
        ``clamp_alpha``).
    early_stopping : bool, default=False
        Stop when the held-out images' mean log-likelihood has not improved
        by ``tol`` for more than ``n_iter_no_change`` epochs, and keep the
        weights of the best epoch. Needs ``validation_fraction > 0``.
    validation_fraction : float in [0, 1), default=0.1
        Fraction of the training images held out of training (a seeded
        draw, ``ceil(fraction * n)`` images, at least one left to train):
        they set ``offset_`` and, with ``early_stopping``, the stopping
        epoch. With 0 (or a single image) nothing is held out and
        ``offset_`` comes from in-sample scores of the training images,
        which are optimistic for a flow that fits its training fibers.
    n_iter_no_change : int, default=3
        Epochs without an improvement of ``tol`` (of the held-out score with
        ``early_stopping``, else of the training loss) tolerated before
        training stops, as in :class:`~sklearn.neural_network.MLPRegressor`.
    tol : float, default=1e-4
        Least improvement that counts.
    warm_start : bool, default=False
        When True, ``fit`` continues training the flows of the previous fit
        (same backbone, layers, ``condition_dim`` and ``n_coupling_blocks``)
        for ``max_iter`` more epochs; ``n_iter_`` and ``loss_curve_`` go on.
    {sigma}
    {image}
    {contamination}
    {runtime}

    Attributes
    ----------
    feature_extractor_ : PatchFeatureExtractor
        The fitted embedding stage (backbone weights, kept channels).
    frame_shape_ : tuple of int
        (height, width) of the preprocessed images the backbone sees.
    flow_ : object
        The fitted flows (the head): their weights as numpy arrays and the
        per-level normalising constants ``log_prob_max_``.
    offset_ : float
        ``decision_function = score_samples - offset_``: the
        ``contamination`` quantile of ``train_scores_``.
    train_scores_ : ndarray of shape (n_held_out,)
        ``score_samples`` of the held-out training images (never trained
        on), in the order of ``validation_indices_``; with nothing held out,
        in-sample scores of every training image. ``partial_fit`` appends
        the scores of each call's held-out images, each from the model as it
        was after that call.
    validation_indices_ : ndarray of shape (n_held_out,)
        Positions, in the images of the last ``fit`` or ``partial_fit``
        call, of the images held out of training.
    n_samples_seen_ : int
        Number of training images, held-out ones included.
    n_iter_ : int
        Epochs run, over all warm-started fits and partial_fit calls.
    loss_curve_ : list of float
        Mean training loss of each epoch.
    validation_scores_ : list of float or None
        With ``early_stopping``: the held-out images' mean log-likelihood
        per dimension (averaged over levels) after each epoch; else None.
    best_validation_score_ : float or None
        The best of ``validation_scores_`` in the last fit, whose weights
        are kept; None without ``early_stopping``.

    See Also
    --------
    PadimDetector : One Gaussian per position; no training loop.

    Notes
    -----
    **Scores.** The reference (and anomalib) subtract the maximum
    log-likelihood of the test set (or batch) before exponentiating, so a
    score depends on the other images scored with it (cflow-ad#24). Here
    the constants come from the training data: for each level l,
    ``s_l = exp(log p_l - c_l)`` with ``c_l`` the largest log-likelihood of
    a training fiber of that level, stored in ``flow_``; each ``s_l`` is
    upsampled bilinearly to the finest tap's grid and the patch score is
    ``n_levels - sum_l s_l``, a function of the image alone. The map is then
    upsampled to the frame and smoothed with ``sigma`` like the family's
    other maps; the reference does not smooth (``sigma=0`` reproduces it).

    **Departures from the reference.** The permutations are hard channel
    permutations and the subnets start at the identity
    (:mod:`skpadim._flow`); the learning rate is constant (no warm-up or
    cosine decay) and higher (the identity start and the few epochs fit
    for CPU training want it); there is no random rotation augmentation;
    early stopping uses held-out normal images, never test labels.

    **Continuing.** ``partial_fit`` runs one epoch on the images given (after
    holding out ``validation_fraction`` of them for the threshold), with a
    fresh Adam state; so does a ``fit`` with ``warm_start=True``. The
    constants ``c_l`` are recomputed from the images of the last call.

    **Determinism.** With an int ``random_state`` the split, the flows'
    initialisation and every shuffle come from local generators: the same
    data give bit-identical scores on the CPU.

    Examples
    --------
    >>> import numpy as np
    >>> from skpadim._cflow import CflowDetector
    >>> rng = np.random.default_rng(0)
    >>> X = rng.integers(100, 156, size=(8, 32, 32, 3), dtype=np.uint8)
    >>> det = CflowDetector(backbone="resnet18", weights=None, image_size=32,
    ...                     n_features=24, max_iter=1, n_coupling_blocks=2,
    ...                     condition_dim=8, random_state=0).fit(X)
    >>> det.anomaly_maps(X[:2]).shape
    (2, 32, 32)
    >>> det.train_scores_.shape  # one held-out image: ceil(0.1 * 8)
    (1,)
    """

    _parameter_constraints: dict = {
        **BasePatchDetector._parameter_constraints,
        "max_iter": [Interval(numbers.Integral, 1, None, closed="left")],
        "learning_rate_init": [Interval(numbers.Real, 0, None, closed="neither")],
        "fiber_batch_size": [Interval(numbers.Integral, 1, None, closed="left")],
        "n_coupling_blocks": [Interval(numbers.Integral, 1, None, closed="left")],
        "condition_dim": [Interval(numbers.Integral, 4, None, closed="left")],
        "clamp": [Interval(numbers.Real, 0, None, closed="neither")],
        "early_stopping": ["boolean"],
        "validation_fraction": [Interval(numbers.Real, 0, 1, closed="left")],
        "n_iter_no_change": [Interval(numbers.Integral, 1, None, closed="left")],
        "tol": [Interval(numbers.Real, 0, None, closed="left")],
        "warm_start": ["boolean"],
    }
    _head_attribute = "flow_"
    _default_strides = (8, 16, 32)
    _keep_all_channels = True
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
        max_iter=20,
        learning_rate_init=1e-3,
        fiber_batch_size=256,
        n_coupling_blocks=8,
        condition_dim=128,
        clamp=1.9,
        early_stopping=False,
        validation_fraction=0.1,
        n_iter_no_change=3,
        tol=1e-4,
        warm_start=False,
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
        self.max_iter = max_iter
        self.learning_rate_init = learning_rate_init
        self.fiber_batch_size = fiber_batch_size
        self.n_coupling_blocks = n_coupling_blocks
        self.condition_dim = condition_dim
        self.clamp = clamp
        self.early_stopping = early_stopping
        self.validation_fraction = validation_fraction
        self.n_iter_no_change = n_iter_no_change
        self.tol = tol
        self.warm_start = warm_start
        self.sigma = sigma
        self.image_size = image_size
        self.crop_size = crop_size
        self.contamination = contamination
        self.batch_size = batch_size
        self.device = device
        self.precision = precision
        self.n_jobs = n_jobs
        self.verbose = verbose

    # ------------------------------------------------------------ checks
    def _new_extractor(self, images):
        # Checks that need no network, before the base builds one.
        if self.condition_dim % 4 != 0:
            raise ValueError(
                "condition_dim must be a positive multiple of 4 (half encodes "
                f"the column, half the row, in sine/cosine pairs); got "
                f"{self.condition_dim}."
            )
        held = _held_out_indices(len(images), self.validation_fraction, 0)
        if self.early_stopping and len(held) == 0:
            raise ValueError(
                "early_stopping needs held-out images: set validation_fraction > 0 "
                f"and pass at least 2 images (got validation_fraction="
                f"{self.validation_fraction} and {len(images)} images)."
            )
        return super()._new_extractor(images)

    def _level_channels_estimate(self, n_features):
        """Channels of each flow as a fit with these parameters would have."""
        spec = get_backbone_spec(self.backbone)
        layers = self._resolve_layers(spec)
        channels = [spec.taps[name].channels for name in layers]
        strides = [spec.taps[name].stride for name in layers]
        total = sum(channels)
        if self.reduction == "pca" and n_features < total:
            channels = [n_features] * len(channels)
        elif n_features < total:  # a random subset: each tap's expected share
            channels = [max(1, round(c * n_features / total)) for c in channels]
        return channels, strides

    def _fit_nbytes(self, grid_shape, n_features, n_images):
        """Flows + gradients + Adam moments (+ the best epoch's copy with
        early stopping, + the numpy copy kept by the head), one step's
        activations, and the feature cache (bounded by working_memory)."""
        channels, strides = self._level_channels_estimate(n_features)
        n_params = sum(
            _flow_n_parameters(c, self.condition_dim, self.n_coupling_blocks)
            for c in channels
        )
        copies = 5 + bool(self.early_stopping)
        widest = max(channels)
        hidden = 2 * (widest // 2 + self.condition_dim)
        activations = (
            self.fiber_batch_size
            * self.n_coupling_blocks
            * (3 * widest + 2 * hidden + self.condition_dim)
            * 4
        )
        finest = min(strides)
        per_image = sum(
            4
            * c
            * math.ceil(grid_shape[0] * finest / s)
            * math.ceil(grid_shape[1] * finest / s)
            for c, s in zip(channels, strides)
        )
        cache = min(working_memory_bytes(), per_image * n_images)
        return 4 * n_params * copies + activations + cache

    # --------------------------------------------------------------- fit
    def partial_fit(self, X, y=None):
        """Train one more epoch on normal images (or one epoch of a new fit).

        A ``validation_fraction`` of the images is held out (when there are
        at least 2) to score for the threshold; the others are trained on
        for one epoch, with a fresh Adam state. Early stopping does not
        apply.

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
        return super().partial_fit(X, y)

    def fit_predict(self, X, y=None):
        """Fit on ``X`` and label its images.

        The held-out images (``validation_indices_``) are labelled from their
        honest ``train_scores_``; the images trained on can only be scored
        in-sample, which makes them look more normal than new images, so
        fewer than ``contamination * n`` of them may be flagged. With nothing
        held out (``validation_fraction=0``) every label is in-sample.

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
        held = self.validation_indices_
        if len(held):
            scores = self.score_samples(X)
            scores[held] = self.train_scores_
        else:
            scores = self.train_scores_
        return np.where(scores - self.offset_ >= 0, 1, -1)

    def _fit_images(self, images, *, previous, partial=False):
        super()._fit_images(images, previous=previous, partial=partial)
        # The base has set every attribute: expose the head's history.
        head = self.flow_
        self.n_iter_ = head.n_iter_
        self.loss_curve_ = list(head.loss_curve_)
        self.validation_scores_ = (
            None if head.validation_scores_ is None else list(head.validation_scores_)
        )
        self.best_validation_score_ = head.best_validation_score_
        self.validation_indices_ = head.validation_indices_.copy()
        return self

    def _fit_head(
        self, images, extractor, frame_shape, *, previous=None, partial=False
    ):
        one_epoch = partial
        if previous is None and self.warm_start and not one_epoch:
            previous = getattr(self, "flow_", None)
            warm = True
        else:
            warm = False
        rng = check_random_state(self.random_state)
        init_seed, split_seed, shuffle_seed = (
            int(s) for s in rng.randint(np.iinfo(np.int32).max, size=3)
        )
        held = _held_out_indices(len(images), self.validation_fraction, split_seed)
        trained = np.setdiff1d(np.arange(len(images)), held)
        budget = working_memory_bytes()
        share = len(trained) / len(images)
        device = extractor.device_
        train_cache = FeatureCache(budget=int(budget * share), device=device)
        held_cache = None
        try:
            features = iter_features(
                images.subset(trained), extractor, frame_shape, "taps"
            )
            for group in _regroup(features, _SHUFFLE_GROUP):
                train_cache.append(group)
            if len(held):
                held_cache = FeatureCache(
                    budget=budget - train_cache.budget, device=device
                )
                for _ in iter_features(
                    images.subset(held),
                    extractor,
                    frame_shape,
                    "taps",
                    cache=held_cache,
                ):
                    pass
            head = self._train(
                train_cache,
                held_cache,
                previous,
                warm=warm,
                one_epoch=one_epoch,
                seeds=(init_seed, shuffle_seed),
                device=device,
            )
            head.validation_indices_ = held
        except BaseException:
            train_cache.close()
            if held_cache is not None:
                held_cache.close()
            raise
        if held_cache is None:
            return head, train_cache  # the threshold from in-sample scores
        train_cache.close()
        return head, held_cache

    def _new_head(self, level_channels, previous, warm):
        if previous is not None and not warm:  # partial_fit: the fitted model's
            head = _FlowHead(
                previous.level_channels,
                previous.condition_dim,
                previous.n_coupling_blocks,
                previous.clamp,
            )
        else:
            head = _FlowHead(
                level_channels, self.condition_dim, self.n_coupling_blocks, self.clamp
            )
        if previous is None:
            return head
        ours = (head.level_channels, head.condition_dim, head.n_coupling_blocks)
        theirs = (
            previous.level_channels,
            previous.condition_dim,
            previous.n_coupling_blocks,
        )
        if ours != theirs or tuple(level_channels) != previous.level_channels:
            raise ValueError(
                "Cannot continue training: the previous flows have level channels "
                f"{list(previous.level_channels)}, condition_dim "
                f"{previous.condition_dim} and {previous.n_coupling_blocks} coupling "
                f"blocks, but these features and parameters give "
                f"{list(level_channels)}, {self.condition_dim} and "
                f"{self.n_coupling_blocks}. Set warm_start=False to start anew."
            )
        head.state_ = previous.state_
        return head.clone_history(previous)

    def _train(
        self, train_cache, held_cache, previous, *, warm, one_epoch, seeds, device
    ):
        """Run the epochs; return a new head (``previous`` is left alone)."""
        init_seed, shuffle_seed = seeds
        level_channels = [tap.shape[1] for tap in next(iter(train_cache))]
        head = self._new_head(level_channels, previous, warm)
        pyramid = head.new_pyramid(device, random_state=init_seed)
        pyramid.train()
        optimizers = [_adam(flow, self.learning_rate_init) for flow in pyramid.flows]
        early = self.early_stopping and not one_epoch and held_cache is not None
        if early:
            head.validation_scores_ = list(head.validation_scores_ or [])
        best_score, best_loss, best_state, stale = -np.inf, np.inf, None, 0
        for _ in range(1 if one_epoch else self.max_iter):
            generator = torch.Generator().manual_seed(shuffle_seed + head.n_iter_)
            loss = _train_epoch(
                pyramid, optimizers, train_cache, self.fiber_batch_size, generator
            )
            if not math.isfinite(loss):
                raise ValueError(
                    f"CFLOW training diverged (loss {loss} at epoch "
                    f"{head.n_iter_ + 1}); lower learning_rate_init."
                )
            head.n_iter_ += 1
            head.loss_curve_.append(loss)
            message = f"Epoch {head.n_iter_}, loss = {loss:.6f}"
            # MLP's rule: count epochs that improve by less than tol.
            if early:
                score = _mean_log_prob(pyramid, held_cache)
                head.validation_scores_.append(score)
                message += f", held-out log-likelihood = {score:.6f}"
                stale = stale + 1 if score < best_score + self.tol else 0
                if score > best_score:
                    best_score = score
                    best_state = copy.deepcopy(pyramid.state_dict())
            else:
                stale = stale + 1 if loss > best_loss - self.tol else 0
                best_loss = min(best_loss, loss)
            if self.verbose:
                print(message)
            if stale > self.n_iter_no_change:
                break
        if early:
            pyramid.load_state_dict(best_state)
            head.best_validation_score_ = best_score
        elif not one_epoch:
            head.validation_scores_ = head.best_validation_score_ = None
        pyramid.eval()
        _, _, maxima = _level_log_probs(pyramid, train_cache)
        head.log_prob_max_ = maxima
        head.set_weights(pyramid)
        return head

    def _training_scores(self, images, extractor, head, frame_shape, cache):
        """``score_samples`` of the cached images: the held-out ones, or (with
        nothing held out) every training image, in-sample."""
        sigma = float(self.sigma)
        scores = [
            score_features(head, features, frame_shape, sigma)[0].cpu().numpy()
            for features in cache
        ]
        return -np.concatenate(scores).astype(np.float64)
