"""
===========================================================
Fitting and scoring in parallel, on local processes or Dask
===========================================================

PaDiM's statistics are sums over images, so a fit is a map-reduce: with
``n_jobs``, :class:`~skpadim.PadimDetector` cuts the images into contiguous
chunks, each job runs the backbone on its chunk and returns the partial
per-position moments (count, mean, centred scatter), and the parent merges
them exactly (Chan's pairwise update). Scoring splits the same way and
returns the scores in input order.

The jobs go through :mod:`joblib`, so the same detector runs on local worker
processes (``n_jobs=2``) or, inside ``joblib.parallel_config(backend="dask")``,
on the workers of a Dask cluster, which may span many machines. This example
times one fit three ways on a few hundred images read from PNG files, checks
that the three fitted models are the same, then scores new images on the
cluster.

The Dask part needs the ``dask`` extra (``pip install "skpadim[dask]"``, or
``pip install "dask[distributed]"``); without it, it is skipped.

.. note::

   With ``SKPADIM_EXAMPLES_QUICK=1`` the example fits on 48 images instead
   of 192 and scores 16 instead of 32. The documentation build of the
   continuous integration sets it, so the timings on this page may come
   from that reduced run (the first printed line says which), where the
   start-up of the workers weighs more; ``make docs-full`` builds the pages
   from the full run.
"""

# %%
# Training images on disk
# -----------------------
#
# :func:`~skpadim.datasets.make_synthetic_defects` crops 128 x 128 views of a
# brick texture. The normal ones are written as PNG files, as a real data set
# would be stored: jobs then receive file paths, not pixels, and each reads
# only its own chunk (on a cluster the files must be on storage that every
# worker can read; here all processes share one disk).
import os
import subprocess
import sys
import tempfile
import warnings
from contextlib import contextmanager
from pathlib import Path
from time import perf_counter

import joblib
import matplotlib.pyplot as plt
import numpy as np
from PIL import Image
from sklearn.metrics import roc_auc_score

from skpadim import PadimDetector
from skpadim.datasets import make_synthetic_defects

# SKPADIM_EXAMPLES_QUICK=1 (set by the docs build in CI): a reduced run.
QUICK = os.environ.get("SKPADIM_EXAMPLES_QUICK", "0") not in ("", "0")
N_TRAIN, N_TEST = (48, 8) if QUICK else (192, 16)
print(f"{'quick' if QUICK else 'full'} run")
train = make_synthetic_defects(N_TRAIN, 0, image_size=128, random_state=0)
test = make_synthetic_defects(N_TEST, N_TEST, image_size=128, random_state=1)

folder = tempfile.TemporaryDirectory(prefix="skpadim_parallel_")
train_paths = []
for i, image in enumerate(train.images):
    path = os.path.join(folder.name, f"train_{i:04d}.png")
    Image.fromarray(image).save(path)
    train_paths.append(path)
X_test, y_test = test.images, test.labels
print(f"{len(train_paths)} training PNGs in {folder.name}; {len(X_test)} test images")

# %%
# One process, then two local processes
# -------------------------------------
#
# The default backbone, EfficientNet-Lite0, with its packaged ImageNet
# weights; the CPU, so that the timings below compare processes and not
# devices. ``n_jobs=1`` runs everything in this process, on all the threads
# PyTorch uses by default. With ``n_jobs=2`` joblib starts two worker
# processes and each runs the backbone on half of the images with half of
# the threads.
#
# A pool of worker processes is started once and reused: the first parallel
# call also pays for starting the workers and importing PyTorch in them. We
# pay it before timing, with a fit on a few images, so that the timings show
# the steady state.
params = dict(image_size=128, batch_size=16, random_state=0, device="cpu")


def timed_fit(detector, X):
    """Fit and return (detector, seconds)."""
    start = perf_counter()
    detector.fit(X)
    return detector, perf_counter() - start


def load_average():
    """The 1-minute load average (Unix), to judge the timings on a shared machine."""
    return f"{os.getloadavg()[0]:.1f}" if hasattr(os, "getloadavg") else "n/a"


print(f"{os.cpu_count()} CPU cores, load average {load_average()}")
serial, t_serial = timed_fit(PadimDetector(**params, n_jobs=1), train_paths)
print(f"n_jobs=1: fit on {N_TRAIN} images in {t_serial:.1f} s")

PadimDetector(**params, n_jobs=2).fit(train_paths[:8])  # start the workers
local, t_local = timed_fit(PadimDetector(**params, n_jobs=2), train_paths)
print(f"n_jobs=2: fit on {N_TRAIN} images in {t_local:.1f} s (2 local processes)")

# %%
# A Dask cluster
# --------------
#
# To scale out, one starts a Dask scheduler and workers, connects a
# :class:`distributed.Client` to the scheduler, and fits inside
# ``joblib.parallel_config(backend="dask")``. The detector code does not
# change; ``n_jobs=-1`` gives one chunk per worker thread of the cluster.
#
# On real machines one runs ``dask scheduler`` on one host and ``dask worker
# <scheduler address>`` on each of the others. Here the scheduler and two
# single-threaded workers are started the same way, as local processes, by
# the helper below. (In a notebook, ``distributed.LocalCluster(n_workers=2,
# threads_per_worker=1)`` does the same in one line. A *script* that uses
# ``LocalCluster`` must put its code under ``if __name__ == "__main__":``,
# because the workers are started by re-running the main script, which this
# gallery page, made of top-level cells, cannot do.)
try:
    import distributed
except ImportError:
    distributed = None
    print(
        "Dask is not installed: skipping the Dask part. Install it with\n"
        '    pip install "skpadim[dask]"    (or: pip install "dask[distributed]")'
    )


@contextmanager
def dask_cluster(n_workers, folder):
    """Start a scheduler and ``n_workers`` one-thread workers; yield a Client.

    They run as separate ``dask`` command-line processes, which find the
    scheduler through a scheduler file, exactly as on a real cluster; all of
    them are stopped on exit, even after an error.
    """
    scheduler_file = os.path.join(folder, "scheduler.json")
    common = ["--scheduler-file", scheduler_file, "--no-dashboard"]
    quiet = dict(stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    processes = [
        subprocess.Popen(
            [sys.executable, "-m", "distributed.cli.dask_scheduler", *common]
            + ["--host", "127.0.0.1", "--port", "0"],
            **quiet,
        ),
        subprocess.Popen(
            [sys.executable, "-m", "distributed.cli.dask_worker", *common]
            + ["--nworkers", str(n_workers), "--nthreads", "1"],
            **quiet,
        ),
    ]
    try:
        with distributed.Client(scheduler_file=scheduler_file, timeout=120) as client:
            client.wait_for_workers(n_workers, timeout=300)
            yield client
    finally:
        for process in reversed(processes):
            process.terminate()
            process.wait(timeout=60)


if distributed is not None:
    # Each task carries the fitted backbone's weights (about 20 MB here), more
    # than Dask expects of a task's arguments; the transfer is cheap locally.
    warnings.filterwarnings("ignore", "Sending large graph", UserWarning)
    with dask_cluster(2, folder.name) as client:
        print(f"Dask workers: {sorted(client.scheduler_info()['workers'])}")
        with joblib.parallel_config(backend="dask"):
            PadimDetector(**params, n_jobs=-1).fit(train_paths[:8])  # warm up
            on_dask, t_dask = timed_fit(PadimDetector(**params, n_jobs=-1), train_paths)
            start = perf_counter()
            dask_scores = on_dask.score_samples(X_test)
            t_dask_score = perf_counter() - start
    print(f"Dask:     fit on {N_TRAIN} images in {t_dask:.1f} s (2 workers)")

# %%
# The same model, whoever fitted it
# ---------------------------------
#
# The partial moments are merged exactly, so the three detectors hold the
# same statistics, up to floating-point rounding (the chunks are summed in
# another order, and PyTorch may pick other kernels for other thread
# counts). The threshold ``offset_`` agrees less closely: it is a quantile of
# the training images' leave-one-out scores, which magnify rounding
# differences, most of all when there are fewer training images than
# embedding dimensions (48 images for 100 dimensions in the quick run); with
# one job the fit scores the training embeddings it kept, with several jobs
# it embeds the images again.


def relative_difference(a, b):
    """Largest absolute difference, relative to the largest entry of ``b``."""
    a, b = np.asarray(a), np.asarray(b)
    return float(np.abs(a - b).max() / np.abs(b).max())


fitted = {"n_jobs=2": local}
if distributed is not None:
    fitted["Dask"] = on_dask
reference = serial.gaussian_.moments_
for name, detector in fitted.items():
    moments = detector.gaussian_.moments_
    differences = {
        "count": moments.count - reference.count,
        "mean": relative_difference(moments.mean, reference.mean),
        "scatter": relative_difference(moments.scatter, reference.scatter),
        "offset_": relative_difference(detector.offset_, serial.offset_),
    }
    print(
        f"{name} vs n_jobs=1: "
        + ", ".join(f"{k} {v:.1e}" for k, v in differences.items())
    )
    assert differences["count"] == 0
    assert max(differences["mean"], differences["scatter"]) < 1e-6
    assert differences["offset_"] < 1e-3

# %%
# Scoring in parallel
# -------------------
#
# Scoring splits the test images across jobs in the same way; the scores come
# back in the order of the input. The anomalous images (label -1) should
# score lower than the normal ones: the image AUROC measures it.
start = perf_counter()
serial_scores = serial.score_samples(X_test)
t_serial_score = perf_counter() - start
start = perf_counter()
local_scores = local.score_samples(X_test)
t_local_score = perf_counter() - start
print(f"image AUROC: {roc_auc_score(y_test, serial_scores):.3f}")
print(f"n_jobs=1 scored {len(X_test)} images in {t_serial_score:.2f} s")
print(f"n_jobs=2 scored them in {t_local_score:.2f} s; ", end="")
print(f"largest difference {relative_difference(local_scores, serial_scores):.1e}")
if distributed is not None:
    print(f"Dask scored them in {t_dask_score:.2f} s; ", end="")
    print(f"largest difference {relative_difference(dask_scores, serial_scores):.1e}")
print(f"load average after the timings: {load_average()}")
folder.cleanup()

# %%
# What it buys here, and where it pays
# ------------------------------------
#
# On a small machine, such as the 2-core CPU this example was written on,
# two processes should gain little over one: a single process already runs
# the backbone's convolutions on every core with PyTorch's threads, and each
# job adds the cost of shipping the backbone weights to its worker and the
# partial statistics back. Expect the opposite only on a machine busy with
# other work: PyTorch's threads wait for each other whenever one of them is
# descheduled, while single-threaded jobs do not, so there one-thread
# processes can be several times faster. The load average printed above
# tells which case a run was in; timings on a shared machine vary widely.
#
# Process parallelism pays when it adds hardware: more machines (a Dask
# cluster, each worker with its own cores or GPU), or many cores on which
# one process's threads stop scaling. The merge is exact in every case, so
# the choice never changes the model.
names = ["n_jobs=1", "n_jobs=2\n(local processes)"]
fit_times = [t_serial, t_local]
score_times = [t_serial_score, t_local_score]
if distributed is not None:
    names.append("Dask\n(2 workers)")
    fit_times.append(t_dask)
    score_times.append(t_dask_score)

fig, axes = plt.subplots(1, 2, figsize=(8, 3.4))
for ax, times, what in zip(
    axes,
    [fit_times, score_times],
    [f"fit, {N_TRAIN} images", f"score, {len(X_test)} images"],
):
    bars = ax.bar(
        names, times, color=["tab:grey", "tab:blue", "tab:orange"][: len(times)]
    )
    ax.bar_label(bars, labels=[f"{t:.1f} s" for t in times], padding=2, fontsize=8)
    ax.set_ylabel("wall time (s)")
    ax.set_title(what, fontsize=10)
    ax.set_ylim(0, 1.2 * max(times))
    ax.tick_params(axis="x", labelsize=8)
cores = os.cpu_count()
fig.suptitle(
    f"PadimDetector on EfficientNet-Lite0, CPU with {cores} cores "
    f"(load average {load_average()})",
    fontsize=10,
)
fig.tight_layout()

# sphinx-gallery runs examples from their folder and defines no __file__.
try:
    here = Path(__file__).resolve().parent
except NameError:
    here = Path.cwd()
output = here / "output"
output.mkdir(exist_ok=True)
fig.savefig(output / "parallel_dask.png", dpi=120)
