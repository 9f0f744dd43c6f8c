"""
=======================================
Comparing the detectors of the family
=======================================

skpadim offers five anomaly detectors on one image pipeline:
:class:`~skpadim.PadimDetector` (one Gaussian per patch position),
:class:`~skpadim.PatchCoreDetector` (a coreset memory bank of patches),
:class:`~skpadim.SpadeDetector` (nearest training images, then nearest
pixels), :class:`~skpadim.GaussianADDetector` (one Gaussian per level of
globally pooled features, no maps) and :class:`~skpadim.CflowDetector`
(conditional normalizing flows). They share the scikit-learn API, so they
can be compared the way any scikit-learn estimators are: with
:func:`~sklearn.model_selection.cross_validate` and a splitter that never
trains on a defect, :class:`~skpadim.model_selection.NoveltyKFold`.

We compare them twice:

1. **Detection** on real inspection images, the monocrystalline solar cells
   of the ELPV dataset: image ROC AUC, fit time, scoring time and model
   size, cross-validated.
2. **Localisation** on synthetic defects painted on a brick texture, whose
   pixel masks are known: pixel ROC AUC and AUPRO, and the anomaly maps
   side by side.

:ref:`choosing` explains what each method assumes and costs.

.. note::

   This example honours ``SKPADIM_EXAMPLES_QUICK=1``: it then uses fewer
   images, smaller frames (128 pixels instead of 224 for ELPV), fewer
   CFLOW epochs and fewer SPADE neighbours, and runs in under a minute on an
   idle 2-core CPU. The
   documentation build of the continuous integration sets it, so the
   figures and numbers on this page may come from the quick run; the
   first printed line says which. Without it (``make docs-full``), it runs
   at full size (360 cells at 224 pixels, 4 CFLOW epochs), which takes about
   8 minutes on an idle 2-core CPU, mostly in PatchCore's coreset selection
   and CFLOW's training.
"""

# %%
# Quick or full run
# -----------------
import os
import pickle
import time
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
from sklearn.model_selection import cross_validate

from skpadim import (
    CflowDetector,
    GaussianADDetector,
    PadimDetector,
    PatchCoreDetector,
    SpadeDetector,
)
from skpadim.datasets import load_elpv, make_synthetic_defects
from skpadim.metrics import aupro_score, pixel_roc_auc_score, threshold_from_normal
from skpadim.model_selection import NoveltyKFold

# sphinx_gallery_thumbnail_number = 2

# Figures are also saved to examples/output/. sphinx-gallery defines no
# __file__ but runs each example from its own folder.
try:
    OUTPUT = Path(__file__).resolve().parent / "output"
except NameError:
    OUTPUT = Path.cwd() / "output"
OUTPUT.mkdir(exist_ok=True)

# SKPADIM_EXAMPLES_QUICK=1 (set by the docs build in CI): a reduced run.
QUICK = os.environ.get("SKPADIM_EXAMPLES_QUICK", "0") not in ("", "0")
if QUICK:
    N_NORMAL, N_DEFECTIVE, ELPV_SIZE = 60, 30, 128  # ELPV cells, 3 folds
    N_TRAIN, N_CALIB, N_TEST_NORMAL, N_TEST_DEFECTIVE = 30, 10, 10, 12  # bricks
    CFLOW_EPOCHS, SPADE_NEIGHBORS = 2, 5
else:
    N_NORMAL, N_DEFECTIVE, ELPV_SIZE = 240, 120, 224
    N_TRAIN, N_CALIB, N_TEST_NORMAL, N_TEST_DEFECTIVE = 100, 30, 30, 60
    CFLOW_EPOCHS, SPADE_NEIGHBORS = 4, 50
print(
    f"{'quick' if QUICK else 'full'} run: ELPV {N_NORMAL} normal + {N_DEFECTIVE} "
    f"defective cells at {ELPV_SIZE} px; bricks {N_TRAIN} training crops"
)

# %%
# The detectors
# -------------
# Every detector keeps its defaults (the EfficientNet-Lite0 backbone, whose
# weights ship with skpadim, so this runs offline) except for a fixed
# ``random_state``, which makes the runs reproducible, CFLOW's number of
# epochs (``max_iter``), which sets its training time, and, in the quick run,
# SPADE's number of nearest training images (5, the default of the most used
# SPADE reimplementation, instead of the paper's 50), which sets its scoring
# time. ``make_detectors`` returns fresh, unfitted detectors for a given frame
# size.


def make_detectors(image_size):
    """Unfitted detectors of the family, by display name."""
    common = dict(image_size=image_size, random_state=0)
    return {
        "PaDiM": PadimDetector(**common),
        "PatchCore": PatchCoreDetector(**common),
        "SPADE": SpadeDetector(n_neighbors=SPADE_NEIGHBORS, **common),
        "Gaussian AD": GaussianADDetector(**common),
        "CFLOW": CflowDetector(max_iter=CFLOW_EPOCHS, **common),
    }


# %%
# Detection on ELPV solar cells
# -----------------------------
# :func:`~skpadim.datasets.load_elpv` returns the paths and labels (+1
# normal, -1 defective) of the cells; we keep the monocrystalline ones and
# draw a seeded subset of them. The detectors read the files themselves,
# batch by batch.
elpv = load_elpv(cell_type="mono")
paths, labels = np.array(elpv.paths), elpv.labels
rng = np.random.default_rng(0)
chosen = np.r_[
    rng.choice(np.flatnonzero(labels == 1), N_NORMAL, replace=False),
    rng.choice(np.flatnonzero(labels == -1), N_DEFECTIVE, replace=False),
]
X_cells, y_cells = list(paths[chosen]), labels[chosen]

# %%
# :class:`~skpadim.model_selection.NoveltyKFold` splits the *normal* cells
# into three folds; each split trains on two of them and tests on the third
# plus every defective cell, so no detector ever trains on a defect. With
# ``scoring="roc_auc"``, :func:`~sklearn.model_selection.cross_validate`
# reports the image ROC AUC (``decision_function`` is higher for normal
# images and +1 is the normal label), along with the fit and scoring times.
# ``return_estimator=True`` keeps the fold models, to measure their size.
cv = NoveltyKFold(n_splits=3, shuffle=True, random_state=0)
n_test = len(next(cv.split(X_cells, y_cells))[1])
rows = {}
for name, detector in make_detectors(ELPV_SIZE).items():
    result = cross_validate(
        detector,
        X_cells,
        y_cells,
        cv=cv,
        scoring="roc_auc",
        return_estimator=True,
        error_score="raise",
    )
    size = np.mean([len(pickle.dumps(est)) for est in result["estimator"]])
    rows[name] = {
        "auroc": result["test_score"],
        "fit": result["fit_time"].mean(),
        "score": result["score_time"].mean() / n_test,
        "size": size / 2**20,
    }
    del result  # the fold models: SPADE's hold every training pyramid

print(f"ELPV mono cells, 3-fold NoveltyKFold, {n_test} test cells per fold")
print(
    f"{'detector':<12} {'image AUROC':>14} {'fit (s)':>8} "
    f"{'scoring (ms/image)':>19} {'model (MiB)':>12}"
)
for name, row in rows.items():
    print(
        f"{name:<12} {row['auroc'].mean():>7.3f} +- {row['auroc'].std():.3f} "
        f"{row['fit']:>8.1f} {1000 * row['score']:>19.0f} {row['size']:>12.1f}"
    )

# %%
# The same numbers as a figure: the AUROC of each fold as dots on the mean,
# and the costs.
names = list(rows)
colors = [f"C{i}" for i in range(len(names))]
fig, (ax_auc, ax_fit, ax_score) = plt.subplots(
    1, 3, figsize=(11, 3.6), layout="constrained", sharey=True
)
means = [rows[n]["auroc"].mean() for n in names]
ax_auc.barh(names, means, color=colors, alpha=0.6)
for i, name in enumerate(names):
    ax_auc.plot(rows[name]["auroc"], [i] * 3, "k.", markersize=5)
ax_auc.set(xlim=(0.5, 1), xlabel="image ROC AUC (folds as dots)")
ax_auc.invert_yaxis()
fit_times = [rows[n]["fit"] for n in names]
bars = ax_fit.barh(names, fit_times, color=colors)
ax_fit.bar_label(bars, labels=[f"{t:.1f}" for t in fit_times], padding=2)
ax_fit.set(xlabel="fit time per fold (s)", xlim=(0, 1.2 * max(fit_times)))
score_times = [1000 * rows[n]["score"] for n in names]
bars = ax_score.barh(names, score_times, color=colors)
ax_score.bar_label(bars, labels=[f"{t:.0f}" for t in score_times], padding=2)
ax_score.set(xlabel="scoring time (ms per image)", xlim=(0, 1.2 * max(score_times)))
fig.suptitle(
    f"ELPV mono cells at {ELPV_SIZE} px: {N_NORMAL} normal, {N_DEFECTIVE} "
    "defective, 3-fold NoveltyKFold"
)
fig.savefig(OUTPUT / "compare_detectors_elpv.png", dpi=100)

# %%
# Read the AUROCs with their spread across folds (the dots): a difference
# between two detectors smaller than that spread says little, and a small
# training set (40 cells per fold in the quick run) leaves every method
# short of what it reaches with more. The costs are more stable. Gaussian AD
# summarises a whole cell by its pooled features: its statistics are tiny,
# but it cannot say where a defect is. PaDiM's model grows with the square of
# ``n_features`` and with the frame, not with the number of images, and
# CFLOW's is fixed by its flows. PatchCore's bank is small at
# ``coreset_size=0.1``, but selecting it takes time that grows with the
# square of the number of training patches. SPADE's model holds every
# training image's feature pyramid, so its size grows with the training set,
# as does the cost of its maps (its image score needs only its first stage).
# CFLOW's fit time is set by its epochs.
#
# Times were measured on the machine that built this page and vary with its
# load; their ratios are more telling than their values.

# %%
# Localisation on synthetic defects
# ---------------------------------
# :func:`~skpadim.datasets.make_synthetic_defects` crops 128 x 128 views of a
# brick texture and paints a defect (a rotated patch, a scratch or a stain)
# on some of them, with its pixel mask. The normal crops come first: some to
# train, some to calibrate a pixel threshold, some for the test.
bricks = make_synthetic_defects(
    N_TRAIN + N_CALIB + N_TEST_NORMAL, N_TEST_DEFECTIVE, image_size=128, random_state=0
)
X_train = bricks.images[:N_TRAIN]
X_calib = bricks.images[N_TRAIN : N_TRAIN + N_CALIB]
test = slice(N_TRAIN + N_CALIB, None)
X_test, y_test, masks = bricks.images[test], bricks.labels[test], bricks.masks[test]
kinds = np.array(bricks.defect_types[test])

# %%
# Every detector is fitted on the same normal crops, at their own size
# (``image_size=None``). The maps of the calibration crops, which are
# normal and unseen, give each detector's pixel scale: its median normal
# pixel and the 99.9th percentile of its normal pixels
# (:func:`~skpadim.metrics.threshold_from_normal`). The methods' scores have
# unrelated units, so the maps are drawn on that scale: 0 is a typical
# normal pixel, 1 the calibrated pixel threshold. Gaussian AD has no maps
# and sits this part out.
localisation, shown_maps = {}, {}
for name, detector in make_detectors(None).items():
    if not hasattr(detector, "anomaly_maps"):
        continue
    start = time.perf_counter()
    detector.fit(X_train)
    maps = detector.anomaly_maps(X_test)
    calib = detector.anomaly_maps(X_calib)
    seconds = time.perf_counter() - start
    low, high = np.median(calib), threshold_from_normal(calib, quantile=0.999)
    shown_maps[name] = (maps - low) / (high - low)
    localisation[name] = (
        pixel_roc_auc_score(masks, maps),
        aupro_score(masks, maps),
        seconds,
    )

n_def = int((y_test == -1).sum())
print(f"bricks, 128 px: {len(X_test)} test crops ({n_def} with a defect)")
print(f"{'detector':<12} {'pixel AUROC':>11} {'AUPRO':>6} {'fit + maps (s)':>15}")
for name, (pixel, pro, seconds) in localisation.items():
    print(f"{name:<12} {pixel:>11.3f} {pro:>6.3f} {seconds:>15.1f}")

# %%
# The maps side by side
# ---------------------
# One test crop of each defect kind and a normal one (columns), the true
# defect outlined in green; one row per detector, all on the calibrated
# scale described above, so that a colour means the same thing in every
# panel: bright yellow is at or beyond the detector's pixel threshold.
columns = [
    *(np.flatnonzero(kinds == kind)[0] for kind in ("patch", "scratch", "blob")),
    np.flatnonzero(kinds == "good")[0],
]
fig, axes = plt.subplots(
    len(shown_maps) + 1,
    len(columns),
    figsize=(2.2 * len(columns) + 0.8, 2.2 * (len(shown_maps) + 1)),
    layout="constrained",
)
for ax, i in zip(axes[0], columns):
    ax.imshow(X_test[i])
    if masks[i].any():
        ax.contour(masks[i], levels=[0.5], colors="lime", linewidths=1)
    ax.set_title(kinds[i])
for row, (name, maps) in zip(axes[1:], shown_maps.items()):
    for ax, i in zip(row, columns):
        ax.imshow(X_test[i])
        image = ax.imshow(maps[i], cmap="inferno", vmin=0, vmax=1, alpha=0.6)
        if masks[i].any():
            ax.contour(masks[i], levels=[0.5], colors="lime", linewidths=1)
    row[0].set_ylabel(name, fontsize=11)
for ax in axes.ravel():
    ax.set_xticks([])
    ax.set_yticks([])
fig.colorbar(
    image,
    ax=axes[1:],
    shrink=0.6,
    label="anomaly, from median normal pixel (0) to pixel threshold (1)",
)
fig.suptitle("Synthetic defects on brick: the maps of each detector")
fig.savefig(OUTPUT / "compare_detectors_maps.png", dpi=100)
plt.show()

# %%
# What to take away
# -----------------
# On this regular texture the map-producing methods all light up the
# defects; they differ in how tightly the bright region follows the defect
# and in what they cost. PatchCore's and SPADE's nearest-neighbour maps need
# no alignment; PaDiM's per-position Gaussians are quick to score but assume
# the same structure at the same place in every image (here, a texture, which
# looks the same everywhere); CFLOW's maps depend on how long its flows were
# trained, a few epochs here. The ranking on your own images is what counts:
# run the same ``cross_validate`` call on them, and keep the test images
# apart from the ones you tune on. :ref:`choosing` sums up what each method
# assumes and costs.
