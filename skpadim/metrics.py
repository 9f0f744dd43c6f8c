"""Anomaly-detection metrics: pixel ROC AUC, AUPRO and decision thresholds.

Conventions shared by every function here:

* anomaly maps are float arrays of shape ``(n_images, height, width)``, or lists
  of 2-D arrays of different sizes (one map per image); higher means more
  anomalous;
* ground-truth masks have the same layout as the maps, one mask per map and of
  the same shape; a nonzero pixel is a defect;
* NaN pixels of a map are pixels the model did not analyse (for instance outside
  a centre crop): every pixel metric ignores them, together with the mask
  pixels under them;
* image labels follow scikit-learn's outlier convention: ``+1`` normal, ``-1``
  anomalous.
"""

from __future__ import annotations

import numbers

import numpy as np
from scipy import ndimage
from sklearn.metrics import precision_recall_curve

__all__ = [
    "anomaly_masks",
    "aupro_score",
    "f1_optimal_threshold",
    "pixel_roc_auc_score",
    "threshold_from_normal",
]

# The MVTec AD evaluation code labels regions with a 3x3 all-ones structure:
# diagonal neighbours belong to the same region (8-connectivity).
_EIGHT_CONNECTED = np.ones((3, 3), dtype=bool)

# Queries per np.searchsorted call in the rank-based ROC AUC: bounds the two
# temporary int64 index arrays whatever the number of pixels.
_SEARCH_CHUNK = 1 << 22


# --------------------------------------------------------------------------
# Input validation
# --------------------------------------------------------------------------


def _check_real(value, name, *, low=None, high=None, low_open=False):
    """Return ``value`` as a float after checking its type and range."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number; got {value!r}.")
    value = float(value)
    if np.isnan(value):
        raise ValueError(f"{name} must be a number; got NaN.")
    too_low = low is not None and (value <= low if low_open else value < low)
    too_high = high is not None and value > high
    if too_low or too_high:
        left = "(" if low_open else "["
        raise ValueError(f"{name} must be in {left}{low}, {high}]; got {value!r}.")
    return value


def _is_image_stack(x):
    """Whether ``x`` looks like maps/masks rather than one value per image."""
    if isinstance(x, (list, tuple)):
        return any(np.ndim(item) > 0 for item in x)
    return np.ndim(x) > 1


def _as_images(x, name):
    """Return ``x`` as a 3-D array or a list of 2-D arrays, one per image."""
    if isinstance(x, (list, tuple)):
        images = [np.asarray(item) for item in x]
        for i, image in enumerate(images):
            if image.ndim != 2:
                raise ValueError(
                    f"{name} must be a 3-D array (n_images, height, width) or a "
                    f"list of 2-D arrays; {name}[{i}] has shape {image.shape}."
                )
    else:
        images = np.asarray(x)
        if images.ndim != 3:
            raise ValueError(
                f"{name} must be a 3-D array (n_images, height, width) or a list "
                f"of 2-D arrays; got an array of shape {images.shape}. Wrap a "
                f"single image as {name}[None]."
            )
    if len(images) == 0:
        raise ValueError(f"{name} must hold at least one image; got none.")
    is_stack = isinstance(images, np.ndarray)
    for dtype in [images.dtype] if is_stack else [im.dtype for im in images]:
        if dtype.kind not in "biuf":
            raise TypeError(
                f"{name} must hold real numbers or booleans; got dtype {dtype}."
            )
    return images


def _as_float(image):
    """One map as floats (NaN-capable): integer and boolean maps become float64."""
    return image if image.dtype.kind == "f" else image.astype(np.float64)


def _check_masks_maps(masks, anomaly_maps):
    """Validate masks against maps; return both as per-image sequences."""
    masks = _as_images(masks, "masks")
    maps = _as_images(anomaly_maps, "anomaly_maps")
    if len(masks) != len(maps):
        raise ValueError(
            f"masks and anomaly_maps must hold as many images; got {len(masks)} "
            f"masks and {len(maps)} anomaly_maps."
        )
    for i, (mask, amap) in enumerate(zip(masks, maps)):
        if mask.shape != amap.shape:
            raise ValueError(
                f"each mask must have the shape of its anomaly map; masks[{i}] "
                f"has shape {mask.shape} but anomaly_maps[{i}] has {amap.shape}."
            )
        # A NaN mask pixel would silently count as a defect (NaN != 0).
        if mask.dtype.kind == "f" and np.isnan(mask).any():
            raise ValueError(f"masks must not contain NaN; masks[{i}] does.")
    return masks, maps


def _pixel_scores(masks, maps):
    """Scores of the normal and of the defect pixels, NaN pixels dropped.

    Returns two new 1-D arrays that the caller may sort in place.
    """
    normal, defect = [], []
    for mask, amap in zip(masks, maps):
        amap = _as_float(amap)
        valid = ~np.isnan(amap)
        is_defect = mask != 0
        normal.append(amap[valid & ~is_defect])
        defect.append(amap[valid & is_defect])
    return np.concatenate(normal), np.concatenate(defect)


# --------------------------------------------------------------------------
# Pixel ROC AUC
# --------------------------------------------------------------------------


def _count_below(sorted_ref, queries):
    """Twice the number of (ref, query) pairs with ref < query, plus the ties.

    Python ints keep the count exact however many pixels there are.
    """
    total = 0
    for start in range(0, queries.size, _SEARCH_CHUNK):
        chunk = queries[start : start + _SEARCH_CHUNK]
        total += int(np.searchsorted(sorted_ref, chunk, side="left").sum())
        total += int(np.searchsorted(sorted_ref, chunk, side="right").sum())
    return total


def _rank_auc(positive, negative):
    """ROC AUC as the Mann-Whitney statistic, ties counting one half.

    Sorts both arrays in place. Only the two score arrays are held in memory,
    unlike a ROC curve which needs an index array and cumulative sums over all
    pixels.
    """
    positive.sort()
    negative.sort()
    n_pairs = positive.size * negative.size
    # Queries into a sorted array are fastest when few and themselves sorted:
    # search the smaller group in the larger one.
    if positive.size <= negative.size:
        twice_wins = _count_below(negative, positive)
    else:
        twice_wins = 2 * n_pairs - _count_below(positive, negative)
    return twice_wins / (2 * n_pairs)


def pixel_roc_auc_score(masks, anomaly_maps):
    """Area under the ROC curve of the pixels, defect pixels being positive.

    Every pixel of every image is one sample; NaN pixels of the maps are
    ignored. The value is computed exactly from ranks (ties count one half), so
    it equals :func:`sklearn.metrics.roc_auc_score` on the flattened arrays up
    to rounding, while keeping memory close to one copy of the scores: tens of
    millions of pixels are fine, and float32 maps stay float32.

    Parameters
    ----------
    masks : array-like of shape (n_images, height, width) or list of 2-D arrays
        Ground-truth masks; a nonzero pixel is a defect.
    anomaly_maps : array-like of shape (n_images, height, width) or list of \
2-D arrays
        Anomaly maps, each of the shape of its mask; higher is more anomalous.

    Returns
    -------
    score : float
        The pixel ROC AUC, in [0, 1]; 0.5 for uninformative maps.

    Raises
    ------
    ValueError
        If the shapes disagree, or if the analysed pixels are all defects or
        all normal.

    Examples
    --------
    >>> import numpy as np
    >>> from skpadim.metrics import pixel_roc_auc_score
    >>> masks = np.zeros((1, 2, 3), dtype=bool)
    >>> masks[0, 0, 2] = True
    >>> maps = np.array([[[0.1, 0.2, 0.9], [0.3, 0.95, 0.0]]])
    >>> pixel_roc_auc_score(masks, maps)
    0.8
    """
    masks, maps = _check_masks_maps(masks, anomaly_maps)
    normal, defect = _pixel_scores(masks, maps)
    if normal.size == 0 or defect.size == 0:
        raise ValueError(
            "pixel ROC AUC needs both defect and normal pixels among the "
            f"non-NaN pixels; got {defect.size} defect and {normal.size} "
            "normal pixels."
        )
    return float(_rank_auc(defect, normal))


# --------------------------------------------------------------------------
# AUPRO
# --------------------------------------------------------------------------


def _region_pixels(masks, maps):
    """Normal scores, defect scores and each defect pixel's region weight.

    A defect pixel's weight is ``1 / (n_regions * size of its region)``, so
    that the weights of the pixels at or above a threshold sum to the PRO at
    that threshold. Regions are the 8-connected components of the analysed
    (non-NaN) defect pixels of each image.
    """
    normal, defect, inverse_size = [], [], []
    n_regions = 0
    for mask, amap in zip(masks, maps):
        amap = _as_float(amap)
        valid = ~np.isnan(amap)
        is_defect = (mask != 0) & valid
        normal.append(amap[valid & ~is_defect])
        if not is_defect.any():
            continue
        # Labelling only analysed pixels makes a NaN border act like a crop:
        # a region joined only through unanalysed pixels counts as two.
        labels, n_image_regions = ndimage.label(is_defect, structure=_EIGHT_CONNECTED)
        region = labels[is_defect]
        inverse_size.append(1.0 / np.bincount(region)[region])
        defect.append(amap[is_defect])
        n_regions += n_image_regions
    if n_regions == 0:
        raise ValueError(
            "aupro_score needs at least one defect region among the non-NaN "
            "pixels of the masks; got none."
        )
    weight = np.concatenate(inverse_size) / n_regions
    return np.concatenate(normal), np.concatenate(defect), weight


def _pro_curve(normal, defect, weight):
    """The exact (FPR, PRO) curve, every distinct score being a threshold.

    Sorts ``normal`` in place. Between two consecutive distinct defect scores
    only normal pixels cross the threshold, so the curve runs horizontally
    there; it is therefore fully described by two points per distinct defect
    score ``s``: (normals > s, PRO just above s) and (normals >= s, PRO at s).
    This needs a sort of the normal scores but no arg-sort of all pixels.
    """
    normal.sort()
    order = np.argsort(defect)[::-1]
    scores, weight = defect[order], weight[order]
    # Equal scores cross the threshold together: one curve point per tie group.
    starts = np.flatnonzero(np.r_[True, scores[1:] != scores[:-1]])
    levels = scores[starts]
    pro = np.cumsum(np.add.reduceat(weight, starts))

    n_normal = normal.size
    fpr = np.empty(2 * levels.size + 2)
    fpr[0] = 0.0
    fpr[1:-1:2] = n_normal - np.searchsorted(normal, levels, side="right")
    fpr[2:-1:2] = n_normal - np.searchsorted(normal, levels, side="left")
    fpr[-1] = n_normal
    fpr /= n_normal
    overlap = np.empty_like(fpr)
    overlap[0] = 0.0
    overlap[1:-1:2] = np.r_[0.0, pro[:-1]]
    overlap[2:-1:2] = pro
    overlap[-1] = pro[-1]
    return fpr, overlap


def _normalized_partial_area(x, y, x_max):
    """Trapezoid area under ``y(x)`` on [0, x_max], divided by ``x_max``.

    ``x`` must be non-decreasing from 0 to at least ``x_max``; the curve is
    linearly interpolated at exactly ``x_max``.
    """
    end = int(np.searchsorted(x, x_max, side="left"))  # first x >= x_max
    x0, x1, y0, y1 = x[end - 1], x[end], y[end - 1], y[end]
    y_end = y0 + (y1 - y0) * (x_max - x0) / (x1 - x0)
    head = np.sum(np.diff(x[:end]) * (y[1:end] + y[: end - 1])) / 2
    return (head + (x_max - x0) * (y0 + y_end) / 2) / x_max


def aupro_score(masks, anomaly_maps, *, max_fpr=0.3):
    """Normalised area under the per-region-overlap curve (MVTec AD AUPRO).

    The defect regions are the 8-connected components of each mask. For a
    threshold ``t``, the per-region overlap PRO(t) is the mean, over all regions
    of all images, of the fraction of the region's pixels with a score
    ``>= t``; the false positive rate FPR(t) is the fraction of all normal
    pixels with a score ``>= t``. PRO is integrated over FPR from 0 to
    ``max_fpr`` with the trapezoid rule, the curve being interpolated linearly
    at exactly ``max_fpr``, and the area is divided by ``max_fpr``: a perfect
    detector scores 1, maps that rank normal pixels first score 0, and a
    constant map scores ``max_fpr / 2``.

    The curve is exact: every distinct score is a threshold, as in the MVTec
    AD evaluation code. Implementations that sample a fixed grid of
    thresholds (200 evenly spaced ones in several PaDiM re-implementations)
    can therefore give slightly different values.

    NaN pixels of the maps are ignored: their mask pixels are neither normal
    nor part of a region, and regions are computed on the analysed pixels only,
    so a NaN border gives the same score as cropping it away.

    Parameters
    ----------
    masks : array-like of shape (n_images, height, width) or list of 2-D arrays
        Ground-truth masks; a nonzero pixel is a defect. Images without any
        defect only contribute normal pixels.
    anomaly_maps : array-like of shape (n_images, height, width) or list of \
2-D arrays
        Anomaly maps, each of the shape of its mask; higher is more anomalous.
    max_fpr : float, default=0.3
        Upper integration limit on the false positive rate, in (0, 1]. 0.3 is
        the value of the MVTec AD benchmark.

    Returns
    -------
    score : float
        The normalised AUPRO, in [0, 1].

    Raises
    ------
    ValueError
        If the shapes disagree, ``max_fpr`` is outside (0, 1], or the analysed
        pixels hold no defect region or no normal pixel.

    Examples
    --------
    >>> import numpy as np
    >>> from skpadim.metrics import aupro_score
    >>> masks = np.zeros((1, 4, 4), dtype=bool)
    >>> masks[0, :2, :2] = True
    >>> maps = masks.astype(float)
    >>> aupro_score(masks, maps)
    1.0
    >>> aupro_score(masks, np.ones((1, 4, 4)), max_fpr=0.3)
    0.15
    """
    max_fpr = _check_real(max_fpr, "max_fpr", low=0.0, high=1.0, low_open=True)
    masks, maps = _check_masks_maps(masks, anomaly_maps)
    normal, defect, weight = _region_pixels(masks, maps)
    if normal.size == 0:
        raise ValueError(
            "aupro_score needs normal pixels among the non-NaN pixels to "
            "measure a false positive rate; every analysed pixel is a defect."
        )
    fpr, pro = _pro_curve(normal, defect, weight)
    return float(_normalized_partial_area(fpr, pro, max_fpr))


# --------------------------------------------------------------------------
# Thresholds
# --------------------------------------------------------------------------


def _finite_values(scores, name):
    """Flatten image scores or maps into one 1-D array without NaN."""
    if _is_image_stack(scores):
        values = np.concatenate(
            [_as_float(m).ravel() for m in _as_images(scores, name)]
        )
    else:
        values = np.asarray(scores)
        if values.ndim != 1:
            raise ValueError(
                f"{name} must be a 1-D array of image scores, a 3-D array of "
                f"maps or a list of 2-D maps; got shape {values.shape}."
            )
        if values.dtype.kind not in "biuf":
            raise TypeError(f"{name} must hold real numbers; got dtype {values.dtype}.")
        values = _as_float(values)
    return values[~np.isnan(values)]


def threshold_from_normal(scores, *, quantile=0.99):
    """Anomaly-score threshold under which a fraction of normal scores lies.

    Returns the smallest observed score ``t`` such that at least ``quantile``
    of the given scores of held-out normal data are ``<= t``, that is
    ``np.quantile(scores, quantile, method="inverted_cdf")``; no interpolation
    between scores. At most ``1 - quantile`` of those normal scores lie strictly
    above ``t``; note that :func:`anomaly_masks` and
    :func:`f1_optimal_threshold` flag ``score >= t``, which also flags the
    normal scores equal to ``t``.

    Parameters
    ----------
    scores : array-like of shape (n_images,), (n_images, height, width) or \
list of 2-D arrays
        Anomaly scores (higher is more anomalous) of normal images, or their
        anomaly maps for a pixel threshold. NaN values are ignored.
    quantile : float, default=0.99
        Fraction of normal scores to keep at or below the threshold, in [0, 1].

    Returns
    -------
    threshold : float
        The threshold, one of the given scores.

    Raises
    ------
    ValueError
        If ``quantile`` is outside [0, 1] or there is no non-NaN score.

    Examples
    --------
    >>> import numpy as np
    >>> from skpadim.metrics import threshold_from_normal
    >>> threshold_from_normal(np.arange(10.0), quantile=0.8)
    7.0
    """
    quantile = _check_real(quantile, "quantile", low=0.0, high=1.0)
    values = _finite_values(scores, "scores")
    if values.size == 0:
        raise ValueError("scores must hold at least one non-NaN value; got none.")
    return float(np.quantile(values, quantile, method="inverted_cdf"))


def _check_labels(y_true, scores):
    """Validate 1-D outlier labels and scores; return (is_anomalous, scores)."""
    y_true = np.asarray(y_true)
    scores = np.asarray(scores)
    if y_true.ndim != 1 or scores.shape != y_true.shape:
        raise ValueError(
            "y_true and scores must be 1-D arrays of the same length (or masks "
            f"and maps); got shapes {y_true.shape} and {scores.shape}."
        )
    if scores.dtype.kind not in "biuf":
        raise TypeError(f"scores must hold real numbers; got dtype {scores.dtype}.")
    if np.isnan(_as_float(scores)).any():
        raise ValueError("scores must not contain NaN for 1-D image scores.")
    unexpected = np.setdiff1d(y_true, [-1, 1])
    if unexpected.size:
        # 0/1 here most likely means flattened masks, whose 1 means the
        # opposite (defect) of the outlier label +1 (normal).
        raise ValueError(
            "1-D y_true must hold outlier labels, +1 (normal) or -1 "
            f"(anomalous); got values {unexpected[:5].tolist()}. Pass "
            "ground-truth masks unflattened, as a 3-D array or a list of 2-D "
            "arrays."
        )
    return y_true == -1, scores


def f1_optimal_threshold(y_true, scores):
    """The anomaly-score threshold that maximises F1, anomalies being positive.

    Predicting "anomalous" for ``score >= threshold``, every distinct score is
    tried as a threshold (through :func:`sklearn.metrics.precision_recall_curve`)
    and the one with the highest F1 score of the anomalous class is returned;
    ties go to the lowest threshold.

    Works on image scores and on pixel maps: pass 1-D outlier labels with 1-D
    image scores, or ground-truth masks with anomaly maps, in which case every
    non-NaN pixel is a sample and defect pixels are positive.

    Parameters
    ----------
    y_true : array-like of shape (n_images,), (n_images, height, width) or \
list of 2-D arrays
        Either image labels, ``+1`` normal and ``-1`` anomalous (1-D), or
        ground-truth masks, a nonzero pixel being a defect.
    scores : array-like of the layout of ``y_true``
        Image anomaly scores or anomaly maps; higher is more anomalous. NaN is
        an error for image scores and ignored in maps.

    Returns
    -------
    threshold : float
        The F1-optimal threshold, one of the given scores.
    f1 : float
        The F1 score reached with it.

    Raises
    ------
    ValueError
        If the shapes disagree, 1-D labels are not all +1 or -1, or there is no
        anomalous sample.

    Examples
    --------
    >>> import numpy as np
    >>> from skpadim.metrics import f1_optimal_threshold
    >>> y = np.array([1, 1, 1, -1, -1])
    >>> scores = np.array([0.1, 0.6, 0.2, 0.8, 0.5])
    >>> threshold, f1 = f1_optimal_threshold(y, scores)
    >>> threshold, round(f1, 3)
    (0.5, 0.8)
    """
    if _is_image_stack(y_true):
        normal, defect = _pixel_scores(*_check_masks_maps(y_true, scores))
        is_anomalous = np.r_[np.zeros(normal.size, bool), np.ones(defect.size, bool)]
        scores = np.concatenate([normal, defect])
    else:
        is_anomalous, scores = _check_labels(y_true, scores)
    if not is_anomalous.any():
        raise ValueError(
            "f1_optimal_threshold needs at least one anomalous sample (label -1 "
            "or non-NaN defect pixel); got none."
        )
    precision, recall, thresholds = precision_recall_curve(is_anomalous, scores)
    # The last (precision, recall) pair has no threshold: it is the
    # predict-nothing point that scikit-learn appends.
    precision, recall = precision[:-1], recall[:-1]
    denominator = precision + recall
    f1 = np.divide(
        2 * precision * recall,
        denominator,
        out=np.zeros_like(denominator),
        where=denominator > 0,
    )
    best = int(np.argmax(f1))
    return float(thresholds[best]), float(f1[best])


def anomaly_masks(anomaly_maps, threshold):
    """Binary defect masks: the pixels whose anomaly score is ``>= threshold``.

    Parameters
    ----------
    anomaly_maps : array-like of shape (n_images, height, width) or list of \
2-D arrays
        Anomaly maps; higher is more anomalous.
    threshold : float
        Pixel threshold, for instance from :func:`f1_optimal_threshold` or
        :func:`threshold_from_normal`.

    Returns
    -------
    masks : ndarray of bool of shape (n_images, height, width) or list of \
2-D arrays
        True where a map is ``>= threshold``; NaN pixels are False. A list of
        maps gives a list of masks.

    Examples
    --------
    >>> import numpy as np
    >>> from skpadim.metrics import anomaly_masks
    >>> maps = np.array([[[0.2, 0.7], [np.nan, 0.5]]])
    >>> anomaly_masks(maps, 0.5)
    array([[[False,  True],
            [False,  True]]])
    """
    threshold = _check_real(threshold, "threshold")
    maps = _as_images(anomaly_maps, "anomaly_maps")
    # NaN >= threshold is False, so unanalysed pixels are never flagged.
    if isinstance(maps, np.ndarray):
        return maps >= threshold
    return [amap >= threshold for amap in maps]
