"""Peak memory of a detector's fit on few vs many images read from files.

What is measured
----------------
PaDiM's statistics are a sum over images, so ``fit`` streams: it should hold
one batch of images and embeddings plus the per-position statistics
(``h * w * d * d`` float64 scatter matrices), whatever the number of images.
On top of that, the fit runs the backbone once per image and keeps the
training embeddings for scoring the training images (``offset_``) in a
bounded cache (``skpadim._cache.FeatureCache``): in RAM up to scikit-learn's
``working_memory`` (default 1024 MiB; ``sklearn.set_config`` or
``sklearn.config_context(working_memory=MiB)``), spilled beyond it to files in
a temporary directory. Spilled files are written through the page cache and
are not part of the process's RSS (nor are they counted here), so with a small
budget the peak no longer grows with the number of images.

PatchCore buffers raw patches up to the same budget, reduces each full buffer
to a coreset, and caches the embeddings the same way; its report shows the raw
bank, ``n_patches x d x 4`` bytes, that peers hold in RAM (anomalib stacks it
once more with ``vstack``).

This script fits each detector on 64 and on 640 images (``--sizes``) given as
PNG file paths, and compares the peak resident set size (RSS).

How
---
Random smooth-noise 224x224 RGB PNGs are written once to a temporary folder.
Each fit runs in a fresh Python subprocess (this file with ``--child``), so
that one fit's allocations cannot lower or raise another's peak. The child
imports everything, builds the backbone once and runs one warm-up forward pass
(so the libraries' lazy start-up memory is counted before the fit), records
its RSS (``VmRSS`` from /proc/self/status), then fits and reports
``resource.getrusage(RUSAGE_SELF).ru_maxrss`` (KiB on Linux), the peak over
its whole life. Detectors (``--detectors``): ``padim`` (PadimDetector,
resnet18 with random weights, ``n_features=100``) and ``patchcore``
(PatchCoreDetector, resnet18 layer2+3 with random weights, 384 features,
``coreset_size=--coreset``, default 0.1); memory does not depend on weight
values; batch_size=32. ``--working-memory MiB`` (repeatable, "default" for
scikit-learn's setting) runs each fit under ``sklearn.config_context``.

Target
------
PaDiM's peak RSS grows by less than 10 % from 64 to 640 images at the
default budget: ``(peak_640 - peak_64) / peak_64 < 0.10``. PatchCore has no
target; its peaks are printed next to the raw bank size. Results go to
``benchmarks/results/fit_memory_<detectors>.json``.

``--env NAME=VALUE`` (repeatable) sets environment variables in the children
only, e.g. ``--env MALLOC_MMAP_THRESHOLD_=131072`` to see how much of the peak
is glibc malloc keeping freed memory rather than memory in use.

Usage::

    python benchmarks/bench_fit_memory.py [--sizes 64,640]
        [--detectors padim,patchcore] [--coreset 0.1]
        [--working-memory default --working-memory 64] [--batch-size 32]
        [--env NAME=VALUE ...]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

IMAGE_SIZE = 224
TARGET_GROWTH = 0.10
MIB = 1024 * 1024
BACKBONE = "resnet18"


def current_rss_bytes():
    """The process's resident set size now (VmRSS), in bytes."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("VmRSS not found in /proc/self/status")


def peak_rss_bytes():
    """The process's peak RSS so far; ru_maxrss is in KiB on Linux."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def write_images(folder, n, seed=0):
    """Write ``n`` smooth random RGB PNGs of 224x224 and return their paths."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        coarse = rng.integers(0, 256, size=(7, 7, 3), dtype=np.uint8)
        smooth = Image.fromarray(coarse).resize(
            (IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.BICUBIC
        )
        noise = rng.integers(-12, 13, size=(IMAGE_SIZE, IMAGE_SIZE, 3))
        pixels = np.clip(np.asarray(smooth, dtype=np.int16) + noise, 0, 255)
        path = os.path.join(folder, f"image_{i:05d}.png")
        # Fast, light compression: the files only need to be valid PNGs.
        Image.fromarray(pixels.astype(np.uint8)).save(path, compress_level=1)
        paths.append(path)
    return paths


# ---------------------------------------------------------------- child side
def make_detector(kind, batch_size, coreset):
    from skpadim import PadimDetector, PatchCoreDetector

    common = dict(
        backbone=BACKBONE,
        weights=None,
        batch_size=batch_size,
        image_size=IMAGE_SIZE,
        device="cpu",
        random_state=0,
    )
    if kind == "padim":
        return PadimDetector(n_features=100, **common)
    return PatchCoreDetector(coreset_size=coreset, **common)


def run_child(args):
    """Fit once and print a JSON line with the memory figures."""
    import sklearn
    import torch

    from skpadim._cache import cache_budget
    from skpadim.backbones import build_feature_network

    paths = sorted(
        os.path.join(args.image_dir, name) for name in os.listdir(args.image_dir)
    )[: args.n_images]
    if len(paths) < args.n_images:
        raise SystemExit(f"only {len(paths)} images in {args.image_dir}")

    # Model construction and one forward pass, so that the baseline includes
    # the weights loading and the lazily initialised kernels and thread pools.
    network = build_feature_network(BACKBONE, None, None)
    with torch.inference_mode():
        network(torch.zeros(1, 3, IMAGE_SIZE, IMAGE_SIZE))
    del network
    detector = make_detector(args.detector, args.batch_size, args.coreset)
    config = {}
    if args.working_memory != "default":
        config["working_memory"] = int(args.working_memory)
    rss_before = current_rss_bytes()
    peak_before = peak_rss_bytes()

    start = time.perf_counter()
    with sklearn.config_context(**config):
        budget = cache_budget()
        detector.fit(paths)
    seconds = time.perf_counter() - start

    extractor = detector.feature_extractor_
    d = extractor.n_features_
    if args.detector == "padim":
        _, height, width = detector.gaussian_.feature_shape_
        head = {
            "scatter_bytes": detector.gaussian_.moments_.scatter.nbytes,
            "whitening_bytes": detector.gaussian_.whitening_.nbytes,
        }
    else:
        height = width = -(-IMAGE_SIZE // 8)  # stride-8 grid of layer2
        head = {"bank_bytes": detector.memory_bank_.bank_.nbytes}
    embeddings = args.n_images * d * height * width * 4
    report = {
        "detector": args.detector,
        "n_images": args.n_images,
        "working_memory": args.working_memory,
        "cache_budget": budget,
        "embedding_bytes": embeddings,
        "cache_in_ram": min(embeddings, budget),
        "cache_spilled": max(0, embeddings - budget),
        "rss_before_fit": rss_before,
        "peak_before_fit": peak_before,
        "peak": peak_rss_bytes(),
        "rss_after_fit": current_rss_bytes(),
        "fit_seconds": seconds,
        "grid": [height, width],
        "n_features": d,
        **head,
    }
    print(json.dumps(report))


# --------------------------------------------------------------- parent side
def fit_in_subprocess(detector, n_images, image_dir, args, working_memory, env):
    command = [
        sys.executable,
        os.path.abspath(__file__),
        "--child",
        "--detector",
        detector,
        "--n-images",
        str(n_images),
        "--image-dir",
        image_dir,
        "--batch-size",
        str(args.batch_size),
        "--coreset",
        str(args.coreset),
        "--working-memory",
        working_memory,
    ]
    done = subprocess.run(
        command, capture_output=True, text=True, env={**os.environ, **(env or {})}
    )
    if done.returncode != 0:
        sys.stderr.write(done.stderr[-3000:])
        raise RuntimeError(f"child fit failed for {detector}, n={n_images}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def mib(n_bytes):
    return n_bytes / MIB


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="64,640", help="numbers of images")
    parser.add_argument("--detectors", default="padim,patchcore")
    parser.add_argument("--coreset", type=float, default=0.1)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument(
        "--working-memory",
        action="append",
        default=None,
        help='MiB, or "default" (repeatable; default: "default")',
    )
    parser.add_argument(
        "--env",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="environment variable for the fitting subprocesses (repeatable)",
    )
    parser.add_argument("--no-save", dest="save", action="store_false")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--detector", help=argparse.SUPPRESS)
    parser.add_argument("--n-images", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--image-dir", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    budgets = args.working_memory or ["default"]
    if args.child:
        args.working_memory = budgets[0]
        run_child(args)
        return

    import sklearn
    from _common import (
        describe_machine,
        info_row,
        machine,
        print_targets,
        save_result,
        target,
    )

    sizes = sorted(int(s) for s in args.sizes.split(","))
    child_env = dict(item.split("=", 1) for item in args.env)
    detectors = [d.strip() for d in args.detectors.split(",")]
    print(describe_machine(machine()))
    print(
        f"fit on {sizes} PNG paths {IMAGE_SIZE}x{IMAGE_SIZE}, {BACKBONE}, "
        f"batch_size={args.batch_size}, one fresh subprocess per fit; "
        f"scikit-learn working_memory default "
        f"{sklearn.get_config()['working_memory']} MiB"
    )
    if child_env:
        print(f"environment of the subprocesses: {child_env}")

    folder = tempfile.mkdtemp(prefix="skpadim_fit_memory_")
    rows = []
    try:
        start = time.perf_counter()
        write_images(folder, max(sizes))
        print(f"wrote {max(sizes)} PNGs in {time.perf_counter() - start:.1f} s")
        for detector in detectors:
            for budget in budgets:
                for n in sizes:
                    row = fit_in_subprocess(
                        detector, n, folder, args, budget, child_env
                    )
                    rows.append(row)
                    print_row(row, flush=True)
    finally:
        shutil.rmtree(folder, ignore_errors=True)

    print("\nRSS in MiB (before fit: after imports, model build and one forward)")
    for row in rows:
        print_row(row)
    targets, infos = [], []
    small, large = sizes[0], sizes[-1]
    print(f"\nGrowth of the peak from {small} to {large} images")
    for detector in detectors:
        for budget in budgets:
            pick = [r for r in rows if r["detector"] == detector]
            pick = [r for r in pick if r["working_memory"] == budget]
            low = next(r for r in pick if r["n_images"] == small)
            high = next(r for r in pick if r["n_images"] == large)
            growth = (high["peak"] - low["peak"]) / low["peak"]
            label = (
                f"fit memory {detector} peak RSS growth {small}->{large} images "
                f"(working_memory {budget})"
            )
            print(
                f"{detector:<10} working_memory {budget:>7}: "
                f"{mib(low['peak']):7.0f} -> {mib(high['peak']):7.0f} MiB, "
                f"{growth:+.1%}"
            )
            if detector == "padim" and budget == "default":
                targets.append(
                    target(label, 100 * growth, 100 * TARGET_GROWTH, "<", "%")
                )
            else:
                infos.append(info_row(label, 100 * growth, "%"))
            if detector == "patchcore":
                d = high["n_features"]
                h, w = high["grid"]
                raw = large * h * w * d * 4
                print(
                    f"{'':<10} raw bank of {large} images: {large} x {h * w} "
                    f"patches x {d} x 4 B = {mib(raw):.0f} MiB (anomalib: x2 at "
                    f"its vstack); skpadim's fitted bank "
                    f"{mib(high['bank_bytes']):.0f} MiB; peak growth "
                    f"{mib(high['peak'] - low['peak']):.0f} MiB"
                )
                infos.append(
                    info_row(
                        f"fit memory patchcore raw bank of {large} images "
                        f"(peers hold it)",
                        mib(raw),
                        " MiB",
                    )
                )
    print_targets(targets)
    if args.save:
        # One file per detector set, so that separate runs do not overwrite
        # each other: fit_memory_padim.json, fit_memory_patchcore.json, ...
        name = "fit_memory_" + "_".join(detectors)
        save_result(name, {"rows": rows}, targets=targets, info=infos)


def print_row(row, flush=False):
    print(
        f"{row['detector']:<10} wm {row['working_memory']:>7} "
        f"{row['n_images']:5d} images: before {mib(row['rss_before_fit']):6.0f}, "
        f"peak {mib(row['peak']):6.0f}, growth during fit "
        f"{mib(row['peak'] - row['rss_before_fit']):6.0f} MiB; cache "
        f"{mib(row['cache_in_ram']):5.0f} MiB in RAM + "
        f"{mib(row['cache_spilled']):5.0f} MiB on disk (budget "
        f"{mib(row['cache_budget']):.0f}); fit {row['fit_seconds']:.1f} s",
        flush=flush,
    )


if __name__ == "__main__":
    main()
