"""Every detector of the family on the real data we have, as one table.

Datasets
--------
* ``elpv``: ELPV monocrystalline solar cells (``skpadim.datasets.load_elpv``,
  needs ``elpv-dataset``): normal cells for training, held-out normal cells
  and defective cells (defect probability >= 2/3, the 1/3 grade dropped) for
  the test. Image ROC AUC only: ELPV has no pixel masks.
* ``brick``: the localization task of ``examples/plot_localization.py``:
  128 px crops of scikit-image's brick texture, synthetic defects (patch,
  scratch, blob) with exact masks. Image and pixel ROC AUC, AUPRO (FPR <= 0.3).
* ``mvtec:<category>``: with ``--mvtec PATH``, each category folder of an
  MVTec-AD-layout root (``--categories`` to choose), all metrics.

Measured per detector and dataset
---------------------------------
Each fit + scoring runs in a fresh subprocess (this file with ``--child``),
so that the peak RSS (``resource.getrusage(RUSAGE_SELF).ru_maxrss``) belongs
to that detector alone (it includes the torch import and the data arrays).
Fit time is the wall time of ``fit``; scoring images/s is the test images
over the wall time of ``score_samples`` (the maps, for the pixel metrics,
are computed in a separate call, not timed). The model size is the size of
``joblib.dump(detector)`` in a temporary file. CFLOW trains ``--cflow-epochs``
epochs (``max_iter``).

Defaults: backbone efficientnet_lite0 with its ImageNet weights
(``weights="DEFAULT"``, offline), ``image_size=224``, CPU,
``torch.set_num_threads(--threads)`` (default 1: on the shared 2-core
machine, load ~15, scoring 16 images took 0.21-0.24 s with 1 thread against
0.49-0.60 s with 2), ``random_state=0``; other hyper-parameters are each
detector's defaults. ``--quick``: 40 training and 40 test images (20 normal,
20 defective) per dataset, 3 CFLOW epochs; otherwise 200 and 100, 20 epochs.

Usage::

    python benchmarks/bench_methods.py [--quick] [--n-train N] [--n-test N]
        [--image-size 224] [--threads 1] [--cflow-epochs 20]
        [--datasets elpv,brick] [--detectors padim,patchcore,...]
        [--mvtec PATH [--categories bottle,...]] [--rst FILE]

Results go to ``benchmarks/results/methods.json``; ``--rst FILE`` also
writes the table as reStructuredText.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

DETECTORS = {
    "padim": "PadimDetector",
    "patchcore": "PatchCoreDetector",
    "spade": "SpadeDetector",
    "gaussian_ad": "GaussianADDetector",
    "cflow": "CflowDetector",
}
ELPV_SIZE = 300


# ---------------------------------------------------------------- datasets
def _read_gray_rgb(path):
    from PIL import Image

    gray = np.asarray(Image.open(path).convert("L"))
    return np.repeat(gray[:, :, None], 3, axis=2)


def elpv_data(n_train, n_test_normal, n_test_defective, seed=0):
    """Mono cells: (X_train, X_test, y_test, None) as uint8 RGB arrays."""
    from skpadim.datasets import load_elpv

    data = load_elpv(cell_type="mono")
    paths = np.asarray(data.paths)
    rng = np.random.default_rng(seed)
    normal = rng.permutation(np.flatnonzero(data.labels == 1))
    defective = rng.permutation(np.flatnonzero(data.labels == -1))
    if len(normal) < n_train + n_test_normal or len(defective) < n_test_defective:
        raise ValueError("not enough ELPV mono cells for the requested sizes")
    train = paths[normal[:n_train]]
    test = np.concatenate(
        [
            paths[normal[n_train : n_train + n_test_normal]],
            paths[defective[:n_test_defective]],
        ]
    )
    y_test = np.r_[np.ones(n_test_normal), -np.ones(n_test_defective)].astype(int)
    X_train = np.stack([_read_gray_rgb(p) for p in train])
    X_test = np.stack([_read_gray_rgb(p) for p in test])
    return X_train, X_test, y_test, None


def brick_data(n_train, n_test_normal, n_test_defective, seed=0):
    """The brick localization task: (X_train, X_test, y_test, masks_test)."""
    from skpadim.datasets import make_synthetic_defects

    data = make_synthetic_defects(
        n_train + n_test_normal,
        n_test_defective,
        texture="brick",
        image_size=128,
        random_state=seed,
    )
    test = slice(n_train, None)
    return (
        data.images[:n_train],
        data.images[test],
        data.labels[test],
        data.masks[test],
    )


def mvtec_data(root, category, n_train, image_size):
    """One MVTec-AD-layout category, read and resized to ``image_size``."""
    from PIL import Image

    from skpadim.datasets import load_mvtec_ad

    data = load_mvtec_ad(root, category)

    def read(path, mode="RGB", resample=Image.Resampling.BILINEAR):
        image = Image.open(path).convert(mode)
        return np.asarray(image.resize((image_size, image_size), resample))

    train = list(data.train_paths)[:n_train]
    X_train = np.stack([read(p) for p in train])
    X_test = np.stack([read(p) for p in data.test_paths])
    masks = []
    for mask_path in data.test_mask_paths:
        if mask_path is None:
            masks.append(np.zeros((image_size, image_size), dtype=bool))
        else:
            m = read(mask_path, "L", Image.Resampling.NEAREST)
            masks.append(m > 127)
    return X_train, X_test, np.asarray(data.test_labels), np.stack(masks)


# ---------------------------------------------------------------- child side
def run_child(args):
    import joblib
    import torch
    from sklearn.metrics import roc_auc_score

    import skpadim
    from skpadim.metrics import aupro_score, pixel_roc_auc_score

    torch.set_num_threads(args.threads)
    arrays = np.load(args.data_file, allow_pickle=False)
    X_train, X_test, y_test = arrays["X_train"], arrays["X_test"], arrays["y_test"]
    masks = arrays["masks"] if "masks" in arrays.files else None

    params = dict(
        backbone=args.backbone,
        weights="DEFAULT",
        image_size=args.image_size,
        device="cpu",
        random_state=0,
    )
    if args.detector == "cflow":
        params["max_iter"] = args.cflow_epochs
    detector = getattr(skpadim, DETECTORS[args.detector])(**params)

    start = time.perf_counter()
    detector.fit(X_train)
    fit_s = time.perf_counter() - start

    start = time.perf_counter()
    scores = detector.score_samples(X_test)
    score_s = time.perf_counter() - start
    report = {
        "fit_s": fit_s,
        "images_per_s": len(X_test) / score_s,
        "image_auroc": float(roc_auc_score(y_test, scores)),
        "pixel_auroc": None,
        "aupro": None,
        "epochs": getattr(detector, "n_iter_", None),
    }
    if masks is not None and hasattr(detector, "anomaly_maps"):
        maps = detector.anomaly_maps(X_test)
        report["pixel_auroc"] = float(pixel_roc_auc_score(masks, maps))
        report["aupro"] = float(aupro_score(masks, maps))
    report["peak_rss"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "model.joblib")
        joblib.dump(detector, path)
        report["model_bytes"] = os.path.getsize(path)
    print("RESULT " + json.dumps(report))


# ---------------------------------------------------------------- parent side
def run_one(args, detector, data_file):
    command = [
        sys.executable,
        os.path.abspath(__file__),
        "--child",
        "--detector",
        detector,
        "--data-file",
        data_file,
        "--threads",
        str(args.threads),
        "--image-size",
        str(args.image_size),
        "--backbone",
        args.backbone,
        "--cflow-epochs",
        str(args.cflow_epochs),
    ]
    try:
        proc = subprocess.run(
            command, capture_output=True, text=True, timeout=args.timeout
        )
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {args.timeout:.0f} s"}
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT ") :])
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
    return {"error": " | ".join(tail)}


def _fmt(value, spec=".3f"):
    return "n/a" if value is None else format(value, spec)


def table_rows(results):
    header = [
        "detector",
        "dataset",
        "image AUROC",
        "pixel AUROC",
        "AUPRO",
        "fit s",
        "score img/s",
        "peak RSS MiB",
        "model MiB",
    ]
    rows = []
    for r in results:
        if "error" in r:
            rows.append([r["detector"], r["dataset"], "error: " + r["error"][:60]])
            continue
        name = r["detector"]
        if r["detector"] == "cflow" and r.get("epochs") is not None:
            name = f"cflow ({r['epochs']} epochs)"
        rows.append(
            [
                name,
                r["dataset"],
                _fmt(r["image_auroc"]),
                _fmt(r["pixel_auroc"]),
                _fmt(r["aupro"]),
                _fmt(r["fit_s"], ".1f"),
                _fmt(r["images_per_s"], ".1f"),
                _fmt(r["peak_rss"] / 2**20, ".0f"),
                _fmt(r["model_bytes"] / 2**20, ".2f"),
            ]
        )
    return header, rows


def rst_table(header, rows):
    rows = [row + [""] * (len(header) - len(row)) for row in rows]
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    rule = "  ".join("=" * w for w in widths)

    def line(cells):
        return "  ".join(str(c).ljust(w) for c, w in zip(cells, widths)).rstrip()

    return "\n".join([rule, line(header), rule, *map(line, rows), rule])


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--detector", help=argparse.SUPPRESS)
    parser.add_argument("--data-file", help=argparse.SUPPRESS)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--n-train", type=int, default=None)
    parser.add_argument(
        "--n-test", type=int, default=None, help="normal + defective test images"
    )
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--backbone", default="efficientnet_lite0")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--cflow-epochs", type=int, default=None)
    parser.add_argument("--datasets", default="elpv,brick")
    parser.add_argument("--detectors", default=",".join(DETECTORS))
    parser.add_argument("--mvtec", default=None, help="MVTec-AD-layout root")
    parser.add_argument("--categories", default=None)
    parser.add_argument("--rst", default=None, help="also write the table here")
    parser.add_argument(
        "--timeout", type=float, default=None, help="seconds per detector run"
    )
    parser.add_argument("--label", default=None, help="results file suffix")
    args = parser.parse_args(argv)
    if args.cflow_epochs is None:
        args.cflow_epochs = 3 if args.quick else 20
    if args.child:
        run_child(args)
        return

    from _common import describe_machine, load_average, machine, save_result

    n_train = args.n_train or (40 if args.quick else 200)
    n_test = args.n_test or (40 if args.quick else 100)
    n_normal, n_defective = n_test // 2, n_test - n_test // 2
    datasets = {}
    for name in args.datasets.split(","):
        if name == "elpv":
            datasets["elpv (mono)"] = lambda: elpv_data(n_train, n_normal, n_defective)
        elif name == "brick":
            datasets["brick (synthetic)"] = lambda: brick_data(
                n_train, n_normal, n_defective
            )
    if args.mvtec:
        from skpadim.datasets import MVTEC_AD_CATEGORIES

        categories = (
            args.categories.split(",")
            if args.categories
            else [
                c
                for c in MVTEC_AD_CATEGORIES
                if os.path.isdir(os.path.join(args.mvtec, c))
            ]
        )
        for category in categories:
            datasets[f"mvtec:{category}"] = lambda c=category: mvtec_data(
                args.mvtec, c, n_train, args.image_size
            )

    start_info = machine()
    print(describe_machine(start_info))
    print(
        f"settings: backbone {args.backbone} (ImageNet weights), image_size "
        f"{args.image_size}, {args.threads} torch threads, n_train {n_train}, "
        f"n_test {n_test}, cflow epochs {args.cflow_epochs}"
    )
    results, loads = [], [load_average()]
    with tempfile.TemporaryDirectory() as tmp:
        for dataset, make in datasets.items():
            try:
                X_train, X_test, y_test, masks = make()
            except (ImportError, ValueError, OSError) as exc:
                print(f"{dataset}: skipped ({exc})")
                continue
            data_file = os.path.join(tmp, "data.npz")
            arrays = dict(X_train=X_train, X_test=X_test, y_test=y_test)
            if masks is not None:
                arrays["masks"] = masks
            np.savez(data_file, **arrays)
            print(
                f"{dataset}: {len(X_train)} train, {int((y_test == 1).sum())} "
                f"normal + {int((y_test == -1).sum())} defective test images "
                f"of {X_train.shape[1:]}"
            )
            for detector in args.detectors.split(","):
                t0 = time.perf_counter()
                report = run_one(args, detector, data_file)
                loads.append(load_average())
                print(
                    f"  {detector}: {time.perf_counter() - t0:.0f} s wall, "
                    f"load {loads[-1]:.1f}: {json.dumps(report)}",
                    flush=True,
                )
                report.update(detector=detector, dataset=dataset)
                results.append(report)
    header, rows = table_rows(results)
    table = rst_table(header, rows)
    print(table)
    print(f"load average (1 min) during the run: {min(loads):.1f}-{max(loads):.1f}")
    save_result(
        f"methods_{args.label}" if args.label else "methods",
        {
            "settings": {
                "backbone": args.backbone,
                "image_size": args.image_size,
                "threads": args.threads,
                "n_train": n_train,
                "n_test": n_test,
                "cflow_epochs": args.cflow_epochs,
                "quick": args.quick,
            },
            "load_average_range": [min(loads), max(loads)],
            "results": results,
        },
    )
    if args.rst:
        now = datetime.datetime.now(datetime.timezone.utc)
        with open(args.rst, "w") as f:
            f.write(
                f"Run {now:%Y-%m-%d %H:%M} UTC. "
                f"{describe_machine(start_info)}; load average during the run "
                f"{min(loads):.1f}-{max(loads):.1f}.\n\n{table}\n"
            )


if __name__ == "__main__":
    main()
