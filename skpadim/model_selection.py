"""Cross-validation splitters for novelty detection.

A PaDiM detector learns what *normal* looks like, so it must be trained on
normal images only, while its evaluation needs anomalous images too. The
splitters here give every split a training set of normal images and a test
set of held-out normal images plus anomalous ones. They follow scikit-learn's
splitter API, so they plug into the ``cv`` parameter of
:class:`~sklearn.model_selection.GridSearchCV`,
:func:`~sklearn.model_selection.cross_val_score` and friends, with the labels
``y`` in scikit-learn's outlier convention: ``+1`` for a normal image, ``-1``
for an anomalous one. As
:meth:`PadimDetector.decision_function <skpadim.PadimDetector.decision_function>`
is higher for more normal images, ``scoring="roc_auc"`` is the image AUROC.

The refit caveat
----------------
A splitter only controls the cross-validation fits. With its default
``refit=True``, :class:`~sklearn.model_selection.GridSearchCV` refits the
best candidate on *all* of ``X``, anomalous images included, whose patches
then widen the per-position Gaussians: the refitted ``best_estimator_``
scores defects as more normal than it should. Search with ``refit=False``
and fit the best candidate on the normal images yourself::

    from sklearn.base import clone

    search = GridSearchCV(
        PadimDetector(), {"n_features": [50, 100]},
        scoring="roc_auc", cv=NoveltyKFold(5), refit=False,
    ).fit(X, y)
    best = clone(search.estimator).set_params(**search.best_params_)
    best.fit(X[y == 1])  # a list of paths: [x for x, t in zip(X, y) if t == 1]

The estimators that :func:`~sklearn.model_selection.cross_validate` returns
with ``return_estimator=True`` are the fold fits, trained on normal images
only, so they are safe to reuse.
"""

from __future__ import annotations

import math
import numbers
import warnings

import numpy as np
from sklearn.model_selection import BaseCrossValidator
from sklearn.utils import check_random_state

__all__ = ["NoveltyKFold", "NoveltyShuffleSplit"]

_NORMAL, _ANOMALOUS = 1, -1
# PadimDetector needs two images to estimate a covariance.
_MIN_TRAIN = 2


# --------------------------------------------------------------------------
# Validation shared by the splitters
# --------------------------------------------------------------------------


def _is_int(value):
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_real(value):
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _check_n_splits(n_splits, minimum):
    if not _is_int(n_splits) or n_splits < minimum:
        raise ValueError(f"n_splits must be an int >= {minimum}; got {n_splits!r}.")
    return int(n_splits)


def _check_random_state_use(shuffle, random_state):
    if not isinstance(shuffle, bool):
        raise TypeError(f"shuffle must be True or False; got {shuffle!r}.")
    # As in KFold: a seed without shuffling would silently do nothing.
    if not shuffle and random_state is not None:
        raise ValueError(
            "Setting a random_state has no effect since shuffle is False. "
            "Leave random_state=None or set shuffle=True."
        )


def _split_labels(splitter, X, y):
    """Indices of the normal and anomalous images, after checking ``y``.

    Parameters
    ----------
    splitter : object
        The calling splitter, named in the error messages.
    X : sequence
        The images; only ``len(X)`` is used, so paths need no reading.
    y : array-like of shape (n_samples,)
        ``+1`` normal, ``-1`` anomalous.

    Returns
    -------
    normal, anomalous : ndarray of int
        Sorted positions of the normal and of the anomalous images.
    """
    name = type(splitter).__name__
    if y is None:
        raise ValueError(
            f"{name} needs the labels y (+1 normal, -1 anomalous) to keep the "
            "anomalous images out of the training folds; got y=None."
        )
    y = np.asarray(y)
    if y.ndim != 1:
        raise ValueError(f"y must be 1-D; got shape {y.shape}.")
    if X is not None and len(X) != len(y):
        raise ValueError(
            f"X and y must have the same length; got {len(X)} images and "
            f"{len(y)} labels."
        )
    # Comparing element by element tolerates any dtype (strings, objects,
    # booleans) and rejects everything that is not +1 or -1.
    values = y.tolist()
    is_normal = np.array([_is_label(v, _NORMAL) for v in values], dtype=bool)
    is_anomalous = np.array([_is_label(v, _ANOMALOUS) for v in values], dtype=bool)
    if not (is_normal | is_anomalous).all():
        given = sorted({repr(v) for v in values})
        shown = ", ".join(given[:10]) + (", ..." if len(given) > 10 else "")
        raise ValueError(
            f"{name} needs y labels in {{+1 (normal), -1 (anomalous)}}; got the "
            f"values [{shown}]."
        )
    anomalous = np.flatnonzero(is_anomalous)
    if anomalous.size == 0:
        raise ValueError(
            f"{name} needs at least one anomalous image (label -1) to test on; "
            "y only holds normal images (+1)."
        )
    return np.flatnonzero(is_normal), anomalous


def _is_label(value, label):
    # bool is an int in Python: True would pass for +1 without _is_real.
    return _is_real(value) and value == label


def _check_train_size(splitter, n_normal, n_train, how):
    if n_train < _MIN_TRAIN:
        raise ValueError(
            f"{type(splitter).__name__} leaves only {n_train} normal image(s) in "
            f"the smallest training fold ({n_normal} normal images, {how}); "
            f"each training fold needs at least {_MIN_TRAIN}."
        )


def _warn_groups(splitter, groups):
    if groups is not None:
        warnings.warn(
            f"The groups parameter is ignored by {type(splitter).__name__}.",
            UserWarning,
            stacklevel=3,
        )


# --------------------------------------------------------------------------
# K-fold
# --------------------------------------------------------------------------


class NoveltyKFold(BaseCrossValidator):
    """K-fold cross-validation trained on normal images only.

    The normal images are split into ``n_splits`` consecutive folds (shuffled
    first if ``shuffle=True``). Split ``k`` trains on the other
    ``n_splits - 1`` normal folds and tests on normal fold ``k`` plus the
    anomalous images: all of them in every split (``anomalies="all"``), or
    only the ``k``-th of ``n_splits`` anomaly folds (``anomalies="split"``).
    Every normal image is thus tested exactly once; anomalous images are
    never trained on.

    .. warning::

       ``GridSearchCV(..., refit=True)`` (the default) refits the best
       candidate on *all* of ``X``, anomalous images included, which widens
       the Gaussians of the final model. Search with ``refit=False`` and fit
       the best candidate on the normal images only::

           search = GridSearchCV(detector, grid, scoring="roc_auc",
                                 cv=NoveltyKFold(5), refit=False).fit(X, y)
           best = clone(search.estimator).set_params(**search.best_params_)
           best.fit(X[y == 1])

    Parameters
    ----------
    n_splits : int, default=5
        Number of folds of normal images, at least 2.
    shuffle : bool, default=False
        Shuffle the normal (and, with ``anomalies="split"``, the anomalous)
        images before folding them.
    random_state : int, RandomState instance or None, default=None
        Seeds the shuffling when ``shuffle=True``; must stay None otherwise.
    anomalies : {"all", "split"}, default="all"
        ``"all"``: every test set holds every anomalous image, so each
        fold's AUROC uses all defects (more stable, but the anomalous images
        are scored ``n_splits`` times). ``"split"``: the anomalous images
        are split into ``n_splits`` folds too, one per test set, so every
        image is tested exactly once (needs at least ``n_splits`` anomalous
        images).

    See Also
    --------
    NoveltyShuffleSplit : Random normal test sets, as many as wanted.
    sklearn.model_selection.KFold : The supervised counterpart.

    Examples
    --------
    >>> import numpy as np
    >>> from skpadim.model_selection import NoveltyKFold
    >>> y = np.array([1, 1, 1, 1, 1, 1, -1, -1])
    >>> X = np.zeros((8, 32, 32, 3), dtype=np.uint8)
    >>> for train, test in NoveltyKFold(n_splits=3).split(X, y):
    ...     print(train, test)
    [2 3 4 5] [0 1 6 7]
    [0 1 4 5] [2 3 6 7]
    [0 1 2 3] [4 5 6 7]
    >>> for train, test in NoveltyKFold(2, anomalies="split").split(X, y):
    ...     print(train, test)
    [3 4 5] [0 1 2 6]
    [0 1 2] [3 4 5 7]
    """

    def __init__(
        self, n_splits=5, *, shuffle=False, random_state=None, anomalies="all"
    ):
        self.n_splits = _check_n_splits(n_splits, 2)
        _check_random_state_use(shuffle, random_state)
        if anomalies not in ("all", "split"):
            raise ValueError(f"anomalies must be 'all' or 'split'; got {anomalies!r}.")
        self.shuffle = shuffle
        self.random_state = random_state
        self.anomalies = anomalies

    def split(self, X, y=None, groups=None):
        """Generate indices to split the images into training and test sets.

        Parameters
        ----------
        X : array-like or sequence of length n_samples
            The images (an array, or a list of paths or arrays); only its
            length is used.
        y : array-like of shape (n_samples,)
            ``+1`` for normal images, ``-1`` for anomalous ones. Required:
            the default None only exists for API compatibility and raises.
        groups : None
            Ignored (with a warning if given), exists for API compatibility.

        Yields
        ------
        train : ndarray of int
            Sorted indices of the training images, all normal.
        test : ndarray of int
            Sorted indices of the test images: held-out normal images and
            anomalous ones.

        Raises
        ------
        ValueError
            If ``y`` is missing, holds values other than +1 and -1, has no
            -1, or leaves fewer than two normal images in a training fold or
            (``anomalies="split"``) no anomalous image in a test fold.

        Examples
        --------
        >>> from skpadim.model_selection import NoveltyKFold
        >>> splits = NoveltyKFold(2).split(["a.png"] * 5, [1, 1, 1, 1, -1])
        >>> [test.tolist() for _, test in splits]
        [[0, 1, 4], [2, 3, 4]]
        """
        _warn_groups(self, groups)
        normal, anomalous = _split_labels(self, X, y)
        normal_folds, anomaly_folds = self._folds(normal, anomalous)
        for k, test_normal in enumerate(normal_folds):
            train = np.concatenate(normal_folds[:k] + normal_folds[k + 1 :])
            test = np.concatenate([test_normal, anomaly_folds[k]])
            yield np.sort(train), np.sort(test)

    def _folds(self, normal, anomalous):
        """The normal folds and, for each, the anomalies tested with it."""
        n_normal, k = normal.size, self.n_splits
        if k > n_normal:
            raise ValueError(
                f"NoveltyKFold cannot split {n_normal} normal images into "
                f"n_splits={k} folds; lower n_splits."
            )
        _check_train_size(
            self, n_normal, n_normal - math.ceil(n_normal / k), f"{k} folds"
        )
        if self.anomalies == "split" and anomalous.size < k:
            raise ValueError(
                f"anomalies='split' needs at least n_splits={k} anomalous images, "
                f"one per test fold; got {anomalous.size}. Use anomalies='all'."
            )
        if self.shuffle:
            rng = check_random_state(self.random_state)
            normal, anomalous = rng.permutation(normal), rng.permutation(anomalous)
        # array_split gives the first n % k folds one image more, as KFold does.
        normal_folds = np.array_split(normal, k)
        if self.anomalies == "split":
            return normal_folds, np.array_split(anomalous, k)
        return normal_folds, [anomalous] * k

    def get_n_splits(self, X=None, y=None, groups=None):
        """Return the number of splits, ``n_splits``.

        Parameters
        ----------
        X, y, groups : object
            Ignored, exist for API compatibility.

        Returns
        -------
        n_splits : int
            The number of train/test splits.

        Examples
        --------
        >>> from skpadim.model_selection import NoveltyKFold
        >>> NoveltyKFold(4).get_n_splits()
        4
        """
        return self.n_splits


# --------------------------------------------------------------------------
# Shuffle split
# --------------------------------------------------------------------------


def _check_size(value, name, allow_one):
    """A fraction in (0, 1) (or (0, 1] when ``allow_one``) or a count >= 1."""
    if _is_int(value):
        if value < 1:
            raise ValueError(f"{name} must be >= 1 as an int; got {value!r}.")
        return int(value)
    high_ok = allow_one and value == 1.0
    if not _is_real(value) or not (0.0 < value < 1.0 or high_ok):
        interval = "(0, 1]" if allow_one else "(0, 1)"
        raise ValueError(
            f"{name} must be a float in {interval} or an int >= 1; got {value!r}."
        )
    return float(value)


def _resolve_count(size, n, name):
    """``size`` as a number of the ``n`` images; fractions round up."""
    count = size if isinstance(size, int) else math.ceil(size * n)
    if count > n:
        raise ValueError(f"{name}={size!r} asks for {count} images but only {n} exist.")
    return count


class NoveltyShuffleSplit(BaseCrossValidator):
    """Random train/test splits trained on normal images only.

    Each split draws ``test_size`` of the normal images at random as held-out
    test images and trains on the rest of the normal images. The test set
    also holds the anomalous images: all of them (``anomalies="all"``) or a
    random subset of the given size. Unlike :class:`NoveltyKFold`, a normal
    image may be tested several times or never.

    .. warning::

       ``GridSearchCV(..., refit=True)`` (the default) refits the best
       candidate on *all* of ``X``, anomalous images included, which widens
       the Gaussians of the final model. Search with ``refit=False`` and fit
       the best candidate on the normal images only::

           search = GridSearchCV(detector, grid, scoring="roc_auc",
                                 cv=NoveltyShuffleSplit(10), refit=False).fit(X, y)
           best = clone(search.estimator).set_params(**search.best_params_)
           best.fit(X[y == 1])

    Parameters
    ----------
    n_splits : int, default=10
        Number of re-shuffling and splitting iterations, at least 1.
    test_size : float or int, default=0.2
        A fraction in (0, 1) of the normal images, rounded up, or their
        number, held out for testing in each split.
    anomalies : "all", float or int, default="all"
        Anomalous images in each test set: all of them, a fraction in (0, 1]
        (rounded up), or a number, drawn at random for each split.
    random_state : int, RandomState instance or None, default=None
        Seeds the draws; an int gives the same splits on every call.

    See Also
    --------
    NoveltyKFold : Every normal image tested exactly once.
    sklearn.model_selection.ShuffleSplit : The supervised counterpart.

    Examples
    --------
    >>> import numpy as np
    >>> from skpadim.model_selection import NoveltyShuffleSplit
    >>> y = np.array([1, 1, 1, 1, 1, -1, -1])
    >>> cv = NoveltyShuffleSplit(n_splits=2, test_size=2, anomalies=1,
    ...                          random_state=0)
    >>> for train, test in cv.split(np.zeros((7, 32, 32)), y):
    ...     print(len(train), len(test), bool((y[train] == 1).all()))
    3 3 True
    3 3 True
    """

    def __init__(
        self, n_splits=10, *, test_size=0.2, anomalies="all", random_state=None
    ):
        self.n_splits = _check_n_splits(n_splits, 1)
        self.test_size = _check_size(test_size, "test_size", allow_one=False)
        if isinstance(anomalies, str) and anomalies != "all":
            raise ValueError(
                f"anomalies must be 'all', a float in (0, 1] or an int >= 1; "
                f"got {anomalies!r}."
            )
        if anomalies != "all":
            anomalies = _check_size(anomalies, "anomalies", allow_one=True)
        self.anomalies = anomalies
        self.random_state = random_state

    def split(self, X, y=None, groups=None):
        """Generate indices to split the images into training and test sets.

        Parameters
        ----------
        X : array-like or sequence of length n_samples
            The images (an array, or a list of paths or arrays); only its
            length is used.
        y : array-like of shape (n_samples,)
            ``+1`` for normal images, ``-1`` for anomalous ones. Required:
            the default None only exists for API compatibility and raises.
        groups : None
            Ignored (with a warning if given), exists for API compatibility.

        Yields
        ------
        train : ndarray of int
            Sorted indices of the training images, all normal.
        test : ndarray of int
            Sorted indices of the test images: held-out normal images and
            anomalous ones.

        Raises
        ------
        ValueError
            If ``y`` is missing, holds values other than +1 and -1, has no
            -1, or the sizes ask for more images than there are or leave
            fewer than two normal images for training.

        Examples
        --------
        >>> from skpadim.model_selection import NoveltyShuffleSplit
        >>> cv = NoveltyShuffleSplit(3, test_size=1, random_state=0)
        >>> [len(test) for _, test in cv.split(["a.png"] * 4, [1, 1, 1, -1])]
        [2, 2, 2]
        """
        _warn_groups(self, groups)
        normal, anomalous = _split_labels(self, X, y)
        n_test = _resolve_count(self.test_size, normal.size, "test_size")
        _check_train_size(self, normal.size, normal.size - n_test, f"{n_test} held out")
        n_anomalous = anomalous.size
        if self.anomalies != "all":
            n_anomalous = _resolve_count(self.anomalies, anomalous.size, "anomalies")
        rng = check_random_state(self.random_state)
        for _ in range(self.n_splits):
            order = rng.permutation(normal)
            drawn = rng.permutation(anomalous)[:n_anomalous]
            test = np.concatenate([order[:n_test], drawn])
            yield np.sort(order[n_test:]), np.sort(test)

    def get_n_splits(self, X=None, y=None, groups=None):
        """Return the number of splits, ``n_splits``.

        Parameters
        ----------
        X, y, groups : object
            Ignored, exist for API compatibility.

        Returns
        -------
        n_splits : int
            The number of train/test splits.

        Examples
        --------
        >>> from skpadim.model_selection import NoveltyShuffleSplit
        >>> NoveltyShuffleSplit(7).get_n_splits()
        7
        """
        return self.n_splits
