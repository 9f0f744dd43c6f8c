"""Tests of skpadim.metrics against slow, literal reference computations."""

import numpy as np
import pytest
from scipy import ndimage
from sklearn.metrics import f1_score, roc_auc_score

from skpadim.metrics import (
    anomaly_masks,
    aupro_score,
    f1_optimal_threshold,
    pixel_roc_auc_score,
    threshold_from_normal,
)

# --------------------------------------------------------------------------
# Slow references: one threshold at a time, straight from the definitions.
# --------------------------------------------------------------------------


def reference_aupro(masks, maps, max_fpr):
    """AUPRO by looping over every distinct score (no NaN support)."""
    regions = []  # (image index, boolean mask of one region)
    for i, mask in enumerate(masks):
        labels, n = ndimage.label(np.asarray(mask) != 0, structure=np.ones((3, 3)))
        regions += [(i, labels == k) for k in range(1, n + 1)]
    normal = [np.asarray(mask) == 0 for mask in masks]
    n_normal = sum(int(nm.sum()) for nm in normal)
    thresholds = np.unique(np.concatenate([np.ravel(m) for m in maps]))[::-1]

    fprs, pros = [0.0], [0.0]
    for t in thresholds:
        predicted = [np.asarray(m) >= t for m in maps]
        false_pos = sum(int((p & nm).sum()) for p, nm in zip(predicted, normal))
        fprs.append(false_pos / n_normal)
        pros.append(np.mean([predicted[i][region].mean() for i, region in regions]))

    area = 0.0
    for k in range(1, len(fprs)):
        x0, x1, y0, y1 = fprs[k - 1], fprs[k], pros[k - 1], pros[k]
        if x1 <= max_fpr:
            area += (x1 - x0) * (y0 + y1) / 2
            continue
        if x0 < max_fpr:
            y_cut = y0 + (y1 - y0) * (max_fpr - x0) / (x1 - x0)
            area += (max_fpr - x0) * (y0 + y_cut) / 2
        break
    return area / max_fpr


def tiny_masks():
    """Three 16x16 masks: several regions of different sizes, one empty mask."""
    masks = np.zeros((3, 16, 16), dtype=bool)
    masks[0, 1, 1] = True  # a single pixel
    masks[0, 4, 4] = masks[0, 5, 5] = True  # diagonal pair: one region
    masks[0, 8:12, 9:14] = True  # 4x5 rectangle
    masks[0, 14, 2:6] = True  # thin line
    # masks[1]: no defect at all
    masks[2, 3:10, 3:6] = True  # L-shape
    masks[2, 8:10, 6:12] = True
    return masks


def tiny_maps(masks, *, quantized, seed=0):
    """Noisy maps, brighter on defects; quantized scores create many ties."""
    rng = np.random.default_rng(seed)
    maps = rng.random(masks.shape) + 0.6 * masks
    if quantized:
        maps = np.round(maps * 6) / 6
    return maps


# --------------------------------------------------------------------------
# aupro_score
# --------------------------------------------------------------------------


@pytest.mark.parametrize("quantized", [True, False])
@pytest.mark.parametrize("max_fpr", [0.3, 0.05, 0.5, 1.0])
def test_aupro_matches_reference(quantized, max_fpr):
    masks = tiny_masks()
    maps = tiny_maps(masks, quantized=quantized)
    expected = reference_aupro(masks, maps, max_fpr)
    assert aupro_score(masks, maps, max_fpr=max_fpr) == pytest.approx(
        expected, abs=1e-9
    )


@pytest.mark.parametrize("seed", range(4))
def test_aupro_matches_reference_random_regions(seed):
    rng = np.random.default_rng(seed)
    # Smoothed noise, thresholded: blobs of assorted sizes and shapes.
    smooth = ndimage.uniform_filter(rng.random((3, 16, 16)), size=(1, 3, 3))
    masks = smooth > 0.6
    assert ndimage.label(masks[0], structure=np.ones((3, 3)))[1] > 1
    maps = np.round(rng.random(masks.shape) * 4 + 2 * masks) / 4
    assert aupro_score(masks, maps) == pytest.approx(
        reference_aupro(masks, maps, 0.3), abs=1e-9
    )


def test_aupro_max_fpr_on_a_curve_point():
    # max_fpr equal to the FPR at one of the thresholds: the curve needs no
    # interpolation at the limit, and the segment after it must not count.
    masks = tiny_masks()
    maps = tiny_maps(masks, quantized=True, seed=3)
    max_fpr = float(np.mean(maps[~masks] >= 5 / 6))
    assert 0.05 < max_fpr < 0.5
    assert aupro_score(masks, maps, max_fpr=max_fpr) == pytest.approx(
        reference_aupro(masks, maps, max_fpr), abs=1e-9
    )


def test_aupro_list_of_different_sizes_matches_reference():
    rng = np.random.default_rng(1)
    masks = [np.zeros((16, 16), bool), np.zeros((12, 20), bool)]
    masks[0][2:6, 2:4] = True
    masks[1][5, 5:15] = True
    masks[1][9:11, 1:3] = True
    maps = [np.round(rng.random(m.shape) * 5 + 3 * m) / 5 for m in masks]
    assert aupro_score(masks, maps) == pytest.approx(
        reference_aupro(masks, maps, 0.3), abs=1e-9
    )


def test_aupro_perfect_constant_and_inverted_maps():
    masks = tiny_masks()
    perfect = masks.astype(float)
    assert aupro_score(masks, perfect) == pytest.approx(1.0)
    assert aupro_score(masks, 1.0 - perfect) == pytest.approx(0.0)
    for max_fpr in (0.3, 0.1, 1.0):
        # A constant map flags everything at once: PRO = FPR on [0, 1].
        constant = np.full(masks.shape, 0.7)
        assert aupro_score(masks, constant, max_fpr=max_fpr) == pytest.approx(
            max_fpr / 2
        )


def test_aupro_uses_eight_connectivity():
    # a touches b diagonally, b and c share an edge: one region with
    # 8-connectivity (PRO 1/3 once a is flagged), two with 4-connectivity
    # (PRO 1/2).
    mask = np.zeros((1, 4, 4), bool)
    mask[0, 0, 0] = mask[0, 1, 1] = mask[0, 2, 1] = True
    amap = np.full((1, 4, 4), 0.5)
    amap[0, 0, 0], amap[0, 1, 1], amap[0, 2, 1] = 1.0, 0.0, 0.0
    assert aupro_score(mask, amap, max_fpr=1.0) == pytest.approx(1 / 3)


def test_aupro_accepts_int_masks_and_int_maps():
    masks = tiny_masks()
    maps = tiny_maps(masks, quantized=True)
    expected = aupro_score(masks, maps)
    assert aupro_score(masks.astype(np.uint8), maps) == pytest.approx(expected)
    assert aupro_score(masks, (maps * 6).astype(int)) == pytest.approx(expected)
    assert aupro_score(masks, maps.astype(np.float32)) == pytest.approx(expected)


def test_aupro_ignores_nan_pixels_like_a_crop():
    masks = tiny_masks()
    # A U-shaped region whose base lies in the border: inside the crop it is
    # two regions, and must count as two.
    masks[1, 1:6, 4] = masks[1, 1:6, 8] = True
    masks[1, 1, 4:9] = True
    maps = tiny_maps(masks, quantized=True)
    crop = (slice(None), slice(2, -2), slice(2, -2))
    assert ndimage.label(masks[1][crop[1:]], structure=np.ones((3, 3)))[1] == 2

    with_nan = maps.copy()
    border = np.ones(maps.shape, bool)
    border[crop] = False
    with_nan[border] = np.nan
    expected = aupro_score(masks[crop], maps[crop])
    assert aupro_score(masks, with_nan) == pytest.approx(expected, abs=1e-12)
    assert expected == pytest.approx(
        reference_aupro(masks[crop], maps[crop], 0.3), abs=1e-9
    )


@pytest.mark.parametrize("max_fpr", [0, -0.1, 1.5, np.nan])
def test_aupro_rejects_max_fpr_out_of_range(max_fpr):
    masks = tiny_masks()
    with pytest.raises(ValueError, match="max_fpr must be"):
        aupro_score(masks, masks.astype(float), max_fpr=max_fpr)


@pytest.mark.parametrize("max_fpr", ["0.3", None, True])
def test_aupro_rejects_non_numeric_max_fpr(max_fpr):
    masks = tiny_masks()
    with pytest.raises(TypeError, match="max_fpr must be a real number"):
        aupro_score(masks, masks.astype(float), max_fpr=max_fpr)


def test_aupro_needs_a_region_and_normal_pixels():
    masks = np.zeros((2, 8, 8), bool)
    maps = np.random.default_rng(0).random(masks.shape)
    with pytest.raises(ValueError, match="at least one defect region"):
        aupro_score(masks, maps)
    masks[0, 2:4, 2:4] = True
    maps[0, 2:4, 2:4] = np.nan  # the only region is not analysed
    with pytest.raises(ValueError, match="at least one defect region"):
        aupro_score(masks, maps)
    with pytest.raises(ValueError, match="normal pixels"):
        aupro_score(np.ones((1, 4, 4)), np.zeros((1, 4, 4)))


@pytest.mark.parametrize("metric", [aupro_score, pixel_roc_auc_score])
def test_shape_errors(metric):
    masks = tiny_masks()
    maps = tiny_maps(masks, quantized=False)
    with pytest.raises(ValueError, match="as many images"):
        metric(masks[:2], maps)
    with pytest.raises(ValueError, match=r"masks\[0\] has shape \(16, 15\)"):
        metric(masks[:, :, :15], maps)
    with pytest.raises(ValueError, match=r"masks\[1\] has shape \(16, 16\)"):
        metric(list(masks), [maps[0], maps[1, :8], maps[2]])
    with pytest.raises(ValueError, match="3-D array"):
        metric(masks[0], maps[0])
    with pytest.raises(ValueError, match=r"anomaly_maps\[1\] has shape \(16,\)"):
        metric(list(masks), [maps[0], maps[1, 0], maps[2]])
    with pytest.raises(ValueError, match="at least one image"):
        metric([], [])


@pytest.mark.parametrize("metric", [aupro_score, pixel_roc_auc_score])
def test_type_and_nan_mask_errors(metric):
    masks = tiny_masks()
    with pytest.raises(TypeError, match="anomaly_maps must hold real numbers"):
        metric(masks, masks.astype(str))
    nan_masks = masks.astype(float)
    nan_masks[0, 0, 0] = np.nan
    with pytest.raises(ValueError, match="masks must not contain NaN"):
        metric(nan_masks, masks.astype(float))


# --------------------------------------------------------------------------
# pixel_roc_auc_score
# --------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("defect_fraction", [0.1, 0.9])
def test_pixel_roc_auc_matches_sklearn(dtype, defect_fraction):
    # defect_fraction 0.9 exercises the branch with more positives than
    # negatives; quantized scores create ties across the two classes.
    rng = np.random.default_rng(0)
    masks = rng.random((4, 20, 24)) < defect_fraction
    maps = (np.round(rng.random(masks.shape) * 10 + 3 * masks) / 10).astype(dtype)
    expected = roc_auc_score(masks.ravel(), maps.ravel())
    assert pixel_roc_auc_score(masks, maps) == pytest.approx(expected, abs=1e-12)


def test_pixel_roc_auc_ignores_nan_and_takes_lists():
    rng = np.random.default_rng(2)
    masks = [rng.random((10, 12)) < 0.2, rng.random((7, 5)) < 0.2]
    maps = [rng.random(m.shape) + m for m in masks]
    maps[0][:2] = np.nan
    flat_masks = np.concatenate([m.ravel() for m in masks])
    flat_maps = np.concatenate([m.ravel() for m in maps])
    keep = ~np.isnan(flat_maps)
    expected = roc_auc_score(flat_masks[keep], flat_maps[keep])
    assert pixel_roc_auc_score(masks, maps) == pytest.approx(expected, abs=1e-12)


def test_pixel_roc_auc_needs_both_classes():
    with pytest.raises(ValueError, match="both defect and normal"):
        pixel_roc_auc_score(np.zeros((1, 3, 3)), np.ones((1, 3, 3)))


# --------------------------------------------------------------------------
# Thresholds
# --------------------------------------------------------------------------


def brute_force_f1(is_anomalous, scores):
    """Best F1 over every distinct score, ties going to the lowest threshold."""
    best = (-1.0, None)
    for t in np.unique(scores):
        f1 = f1_score(is_anomalous, scores >= t, zero_division=0.0)
        if f1 > best[0]:
            best = (f1, t)
    return best[1], best[0]


@pytest.mark.parametrize("seed", range(3))
def test_f1_optimal_threshold_matches_brute_force(seed):
    rng = np.random.default_rng(seed)
    y = np.where(rng.random(60) < 0.3, -1, 1)
    scores = np.round(rng.random(60) + 0.5 * (y == -1), 1)
    threshold, f1 = f1_optimal_threshold(y, scores)
    expected_threshold, expected_f1 = brute_force_f1(y == -1, scores)
    assert f1 == pytest.approx(expected_f1, abs=1e-12)
    assert threshold == expected_threshold


def test_f1_optimal_threshold_on_maps_ignores_nan():
    masks = tiny_masks()
    maps = tiny_maps(masks, quantized=True)
    maps[:, 0] = np.nan
    threshold, f1 = f1_optimal_threshold(masks, maps)
    keep = ~np.isnan(maps)
    expected_threshold, expected_f1 = brute_force_f1(masks[keep], maps[keep])
    assert f1 == pytest.approx(expected_f1, abs=1e-12)
    assert threshold == expected_threshold
    assert f1_optimal_threshold(list(masks), list(maps)) == (threshold, f1)


def test_f1_optimal_threshold_errors():
    with pytest.raises(ValueError, match=r"outlier labels.*\[0\]"):
        f1_optimal_threshold([0, 1, 1], [0.1, 0.2, 0.3])
    with pytest.raises(ValueError, match="at least one anomalous"):
        f1_optimal_threshold([1, 1, 1], [0.1, 0.2, 0.3])
    with pytest.raises(ValueError, match="same length"):
        f1_optimal_threshold([1, -1], [0.1, 0.2, 0.3])
    with pytest.raises(ValueError, match="must not contain NaN"):
        f1_optimal_threshold([1, -1], [0.1, np.nan])
    with pytest.raises(ValueError, match="at least one anomalous"):
        f1_optimal_threshold(np.zeros((1, 3, 3)), np.ones((1, 3, 3)))


@pytest.mark.parametrize("quantile", [0.0, 0.5, 0.9, 0.99, 1.0])
def test_threshold_from_normal_is_the_empirical_quantile(quantile):
    scores = np.random.default_rng(0).random(101)
    threshold = threshold_from_normal(scores, quantile=quantile)
    assert threshold == np.quantile(scores, quantile, method="inverted_cdf")
    # The smallest score with at least `quantile` of the scores at or below.
    assert np.mean(scores <= threshold) >= quantile
    assert np.mean(scores < threshold) < quantile or quantile == 0


def test_threshold_from_normal_on_maps_ignores_nan():
    maps = [np.arange(12.0).reshape(3, 4), np.full((2, 2), np.nan)]
    assert threshold_from_normal(maps, quantile=0.5) == 5.0
    assert threshold_from_normal(np.stack([maps[0]]), quantile=0.5) == 5.0


def test_threshold_from_normal_errors():
    with pytest.raises(ValueError, match="quantile must be in"):
        threshold_from_normal([1.0, 2.0], quantile=1.5)
    with pytest.raises(ValueError, match="at least one non-NaN"):
        threshold_from_normal([np.nan])
    with pytest.raises(ValueError, match="3-D array"):
        threshold_from_normal(np.zeros((3, 3)))
    with pytest.raises(ValueError, match="1-D array of image scores"):
        threshold_from_normal(np.float64(0.5))


# --------------------------------------------------------------------------
# anomaly_masks
# --------------------------------------------------------------------------


def test_anomaly_masks():
    maps = np.array([[[0.2, 0.7], [np.nan, 0.5]], [[0.9, 0.1], [0.5, np.nan]]])
    expected = np.array([[[0, 1], [0, 1]], [[1, 0], [1, 0]]], dtype=bool)
    np.testing.assert_array_equal(anomaly_masks(maps, 0.5), expected)
    as_list = anomaly_masks([maps[0], maps[1, :1]], 0.5)
    np.testing.assert_array_equal(as_list[0], expected[0])
    np.testing.assert_array_equal(as_list[1], expected[1, :1])
    with pytest.raises(ValueError, match="threshold must be a number; got NaN"):
        anomaly_masks(maps, np.nan)
    with pytest.raises(TypeError, match="threshold must be a real number"):
        anomaly_masks(maps, "0.5")
