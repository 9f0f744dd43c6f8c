"""
=========================================
Quickstart: finding defective solar cells
=========================================

This example shows the whole PaDiM workflow on real inspection images: the
ELPV dataset of electroluminescence (EL) images of solar cells, in which
cracks and inactive areas show up dark. Like a scikit-learn outlier
detector, :class:`~skpadim.PadimDetector` is fitted on **normal images
only** (no defect needs to be collected or labelled) and then scores new
images: the higher the anomaly score, the less the image looks like the
training cells. It also returns a pixel anomaly map that shows *where* an
image departs from normal.

Everything runs offline on a CPU: the default backbone, EfficientNet-Lite0,
ships with its ImageNet weights, and the images come with the
``elpv-dataset`` package (``pip install skpadim[elpv]``).

.. note::

   With ``SKPADIM_EXAMPLES_QUICK=1`` the example keeps a random third of the
   cells and resizes them to 160 pixels instead of 224. The documentation
   build of the continuous integration sets it, so the numbers on this page
   may come from that reduced run (the first printed line says which);
   ``make docs-full`` builds the pages from the full run.
"""

# %%
# Loading the cells
# -----------------
# :func:`~skpadim.datasets.load_elpv` returns file paths and labels, +1 for a
# normal cell and -1 for a defective one; the detector reads the pixels
# itself, one batch at a time. Monocrystalline and polycrystalline cells look
# very different even when defect-free, so we keep one type, the
# monocrystalline cells. Cells an expert was unsure about are left out by
# default.
import os
import time
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
from sklearn.metrics import (
    ConfusionMatrixDisplay,
    RocCurveDisplay,
    confusion_matrix,
    roc_auc_score,
)
from sklearn.model_selection import train_test_split

from skpadim import PadimDetector
from skpadim.datasets import load_elpv
from skpadim.metrics import threshold_from_normal
from skpadim.plotting import plot_anomaly_grid

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
IMAGE_SIZE = 160 if QUICK else 224
print(f"{'quick' if QUICK else 'full'} run: images resized to {IMAGE_SIZE} px")

data = load_elpv(cell_type="mono")
paths, labels = np.array(data.paths), data.labels
if QUICK:  # a seeded third of the cells, in their original order
    keep = np.sort(np.random.default_rng(0).permutation(len(paths))[: len(paths) // 3])
    paths, labels = paths[keep], labels[keep]
print(
    f"{len(paths)} monocrystalline cells: {int((labels == 1).sum())} normal, "
    f"{int((labels == -1).sum())} defective"
)

# %%
# Training on normal cells only
# -----------------------------
# 60% of the normal cells train the detector and 10% are kept aside to
# choose a decision threshold later. The test set holds the remaining 30% of
# the normal cells and **all** the defective ones, which the detector never
# sees before scoring.
train_paths, other_paths = train_test_split(
    paths[labels == 1], train_size=0.6, random_state=0
)
calib_paths, test_normal_paths = train_test_split(
    other_paths, train_size=0.25, random_state=0
)
X_train, X_calib = list(train_paths), list(calib_paths)
X_test = list(test_normal_paths) + list(paths[labels == -1])
y_test = np.r_[np.ones(len(test_normal_paths)), -np.ones((labels == -1).sum())]
print(f"train: {len(X_train)} normal cells, calibration: {len(X_calib)} normal cells")
n_normal, n_defective = int((y_test == 1).sum()), int((y_test == -1).sum())
print(f"test: {n_normal} normal + {n_defective} defective cells")

# %%
# The detector keeps scikit-learn's conventions: ``fit`` takes images (an
# array, or a list of arrays, PIL images or file paths) and ignores ``y``.
# ``random_state`` fixes the random choice of embedding dimensions, so the
# results below are reproducible. ``image_size`` is the default, 224 x 224
# pixels, except in the quick run; the other parameters keep their defaults,
# such as 100 embedding dimensions.
detector = PadimDetector(image_size=IMAGE_SIZE, random_state=0)
start = time.perf_counter()
detector.fit(X_train)
fit_time = time.perf_counter() - start
print(
    f"fit: {fit_time:.1f} s for {len(X_train)} images "
    f"({len(X_train) / fit_time:.1f} images/s)"
)

# %%
# Scoring held-out cells
# ----------------------
# ``decision_function`` is negative for images the detector considers
# anomalous, like :class:`sklearn.ensemble.IsolationForest`: with the labels
# +1 / -1, it plugs straight into :func:`sklearn.metrics.roc_auc_score`.
start = time.perf_counter()
decision = detector.decision_function(X_test)
score_time = time.perf_counter() - start
auroc = roc_auc_score(y_test, decision)
print(
    f"scoring: {score_time:.1f} s for {len(X_test)} images "
    f"({len(X_test) / score_time:.1f} images/s)"
)
print(f"image ROC AUC: {auroc:.3f}")

# %%
# Choosing a threshold
# --------------------
# ``predict`` returns +1 (normal) or -1 (anomalous) using the threshold set
# by ``fit``: ``contamination=0.01`` places it so that 1% of the training
# images would be flagged *had each been left out of the fit* (their
# leave-one-out scores, computed in closed form). That stands in for new
# normal images. ``predict`` is ``decision_function >= 0``, so we
# derive its labels from the scores already computed, rather than reading
# the test images again, and check on a few images that they match.
y_pred = np.where(decision >= 0, 1, -1)
assert (detector.predict(X_test[:4]) == y_pred[:4]).all()


def report(name, y_pred):
    """Print the confusion counts, anomalous cells being the positive class."""
    (tn, fp), (fn, tp) = confusion_matrix(y_test == -1, y_pred == -1)
    print(
        f"{name}: {tp} of {tp + fn} defective cells flagged, "
        f"{fp} of {fp + tn} normal cells flagged"
    )
    return fp / (fp + tn), tp / (tp + fn)


fitted_point = report("fitted threshold", y_pred)

# %%
# A threshold can also be chosen for a target false-alarm rate on normal
# cells that took no part in the fit: the calibration cells, normal and
# unseen like the cells the detector will meet in production.
# :func:`~skpadim.metrics.threshold_from_normal` returns the anomaly score
# that 95% of them do not exceed, accepting about 5% of false alarms in
# exchange for more defects caught. Anomaly scores are ``-score_samples``:
# higher is more anomalous. Neither threshold looks at the test set.
calib_scores = -detector.score_samples(X_calib)
threshold = threshold_from_normal(calib_scores, quantile=0.95)
anomaly_score = -(decision + detector.offset_)  # = -score_samples(X_test)
y_calibrated = np.where(anomaly_score > threshold, -1, 1)
print(f"fitted threshold: {-detector.offset_:.1f}, calibrated: {threshold:.1f}")
calibrated_point = report("calibrated threshold", y_calibrated)

# %%
# The ROC curve shows every trade-off between missed defects and false
# alarms, with the two thresholds marked; the confusion matrix counts the
# test cells at the calibrated one.
fig, (ax_roc, ax_cm) = plt.subplots(1, 2, figsize=(10, 4.4), layout="constrained")
RocCurveDisplay.from_predictions(
    y_test == -1,
    anomaly_score,
    name="PaDiM",
    plot_chance_level=True,
    ax=ax_roc,
)
ax_roc.plot(*fitted_point, "o", color="C3", label="fitted threshold")
ax_roc.plot(*calibrated_point, "s", color="C2", label="calibrated threshold")
ax_roc.set(
    xlabel="False alarm rate (normal cells flagged)",
    ylabel="Recall (defective cells flagged)",
    title="ROC curve, held-out monocrystalline cells",
)
ax_roc.legend(loc="lower right")
ConfusionMatrixDisplay.from_predictions(
    y_test,
    y_calibrated,
    labels=[1, -1],
    display_labels=["normal", "defective"],
    colorbar=False,
    cmap="Blues",
    ax=ax_cm,
)
ax_cm.set(
    xlabel="Predicted",
    ylabel="True",
    title=f"Test cells at the calibrated threshold ({threshold:.1f})",
)
fig.savefig(OUTPUT / "quickstart_elpv_roc.png", dpi=100)

# %%
# Where are the defects?
# ----------------------
# ``anomaly_maps`` gives one map per image, on the image's own pixel grid
# (here 300 x 300), so it overlays directly; an image's anomaly score is the
# maximum of its map. Below, the four test cells with the highest scores (top
# row), the four with the lowest (middle row), and the four defective cells
# the detector found the least suspicious (bottom row). All panels share one
# colour scale, and a dashed line surrounds the pixels whose score reaches
# the calibrated threshold: a cell is flagged when any of its pixels does.
ranking = np.argsort(anomaly_score)
defective = np.flatnonzero(y_test == -1)
hardest = defective[np.argsort(anomaly_score[defective])[:4]]
shown = np.r_[ranking[::-1][:4], ranking[:4], hardest]
maps = detector.anomaly_maps([X_test[i] for i in shown])

truth = np.where(y_test[shown] == 1, "normal", "defective")
fig = plot_anomaly_grid(
    [X_test[i] for i in shown],
    maps,
    scores=anomaly_score[shown],
    titles=[f"{t} cell" for t in truth],
    threshold=threshold,
    ncols=4,
    panel_size=2.7,
    suptitle=f"Held-out cells (calibrated threshold: score {threshold:.1f})",
)
fig.savefig(OUTPUT / "quickstart_elpv_maps.png", dpi=100)

# %%
# In the highest-scoring cells, the regions above the threshold follow the
# cracks and the dark, electrically inactive areas. The lowest-scoring cells
# are clean. The defective cells with the lowest scores show no defect that
# is visible at this scale: whatever the expert graded (a fine crack, an
# interrupted contact finger) changes few pixels, and PaDiM, which compares
# each small patch of a cell with the normal patches at the same position,
# does not tell them from normal cells. The dark corners and contact lines
# raise no alarm: every training cell has them at the same place.

# %%
# Summary
# -------
false_alarms, recall = calibrated_point
print(
    f"ELPV mono: image ROC AUC {auroc:.3f} on {len(X_test)} held-out cells; "
    f"calibrated threshold: recall {recall:.2f} at {false_alarms:.0%} false "
    f"alarms; fit {fit_time:.0f} s ({len(X_train)} images), scoring "
    f"{len(X_test) / score_time:.1f} images/s on {detector.feature_extractor_.device_}"
)
plt.show()
