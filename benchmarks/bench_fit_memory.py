"""Peak memory of PadimDetector.fit on few vs many images read from files.

What is measured
----------------
PaDiM's statistics are a sum over images, so ``fit`` streams: it should hold
one batch of images and embeddings plus the per-position statistics
(``h * w * d * d`` float64 scatter matrices), whatever the number of images.
This script fits the same detector on 64 and on 1024 images (``--sizes``)
given as PNG file paths, and compares the peak resident set size (RSS).

How
---
Random smooth-noise 224x224 RGB PNGs are written once to a temporary folder.
Each fit runs in a fresh Python subprocess (this file with ``--child``), so
that one fit's allocations cannot lower or raise another's peak. The child
imports everything, builds the backbone once and runs one warm-up forward pass
(so the libraries' lazy start-up memory is counted before the fit), records
its RSS (``VmRSS`` from /proc/self/status), then fits and reports
``resource.getrusage(RUSAGE_SELF).ru_maxrss`` (KiB on Linux), the peak over
its whole life. Detectors: resnet18 with random weights (its ImageNet weights
cannot be downloaded here; memory does not depend on weight values) and
``n_features=100``, and the default efficientnet_lite0; batch_size=32.

Target
------
Peak RSS grows by less than 10 % from 64 to 1024 images:
``(peak_1024 - peak_64) / peak_64 < 0.10``.

``--env NAME=VALUE`` (repeatable) sets environment variables in the children
only, e.g. ``--env MALLOC_MMAP_THRESHOLD_=131072`` to see how much of the peak
is glibc malloc keeping freed memory rather than memory in use.

Usage::

    python benchmarks/bench_fit_memory.py [--sizes 64,1024]
        [--backbones resnet18,efficientnet_lite0] [--batch-size 32]
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

IMAGE_SIZE = 224
TARGET_GROWTH = 0.10
MIB = 1024 * 1024

BACKBONE_PARAMS = {
    "resnet18": {"weights": None, "n_features": 100},
    "efficientnet_lite0": {"weights": "DEFAULT", "n_features": None},
}


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
def run_child(args):
    """Fit once and print a JSON line with the memory figures."""
    import torch

    from skpadim import PadimDetector
    from skpadim.backbones import build_feature_network

    params = BACKBONE_PARAMS.get(args.backbone, {"weights": "DEFAULT"})
    paths = sorted(
        os.path.join(args.image_dir, name) for name in os.listdir(args.image_dir)
    )[: args.n_images]
    if len(paths) < args.n_images:
        raise SystemExit(f"only {len(paths)} images in {args.image_dir}")

    # Model construction and one forward pass, so that the baseline includes
    # the weights loading and the lazily initialised kernels and thread pools.
    network = build_feature_network(args.backbone, None, params["weights"])
    with torch.inference_mode():
        network(torch.zeros(1, 3, IMAGE_SIZE, IMAGE_SIZE))
    del network
    detector = PadimDetector(
        backbone=args.backbone,
        batch_size=args.batch_size,
        device="cpu",
        random_state=0,
        **params,
    )
    rss_before = current_rss_bytes()
    peak_before = peak_rss_bytes()

    start = time.perf_counter()
    detector.fit(paths)
    seconds = time.perf_counter() - start

    n_features, height, width = detector.gaussian_.feature_shape_
    moments = detector.gaussian_.moments_
    report = {
        "backbone": args.backbone,
        "n_images": args.n_images,
        "rss_before_fit": rss_before,
        "peak_before_fit": peak_before,
        "peak": peak_rss_bytes(),
        "rss_after_fit": current_rss_bytes(),
        "fit_seconds": seconds,
        "grid": [height, width],
        "n_features": n_features,
        "scatter_bytes": moments.scatter.numel() * moments.scatter.element_size(),
        "whitening_bytes": detector.gaussian_.whitening_.nbytes,
    }
    print(json.dumps(report))


# --------------------------------------------------------------- parent side
def fit_in_subprocess(backbone, n_images, image_dir, batch_size, env=None):
    command = [
        sys.executable,
        os.path.abspath(__file__),
        "--child",
        "--backbone",
        backbone,
        "--n-images",
        str(n_images),
        "--image-dir",
        image_dir,
        "--batch-size",
        str(batch_size),
    ]
    done = subprocess.run(
        command, capture_output=True, text=True, env={**os.environ, **(env or {})}
    )
    if done.returncode != 0:
        sys.stderr.write(done.stderr)
        raise RuntimeError(f"child fit failed for {backbone}, n={n_images}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def mib(n_bytes):
    return n_bytes / MIB


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="64,1024", help="numbers of images")
    parser.add_argument("--backbones", default="resnet18,efficientnet_lite0")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument(
        "--env",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="environment variable for the fitting subprocesses (repeatable)",
    )
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--backbone", help=argparse.SUPPRESS)
    parser.add_argument("--n-images", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--image-dir", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        run_child(args)
        return

    import torch

    sizes = sorted(int(s) for s in args.sizes.split(","))
    child_env = dict(item.split("=", 1) for item in args.env)
    backbones = [b.strip() for b in args.backbones.split(",")]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, ", end="")
    print(f"load average {os.getloadavg()[0]:.2f}")
    print(
        f"fit on {sizes} PNG paths {IMAGE_SIZE}x{IMAGE_SIZE}, "
        f"batch_size={args.batch_size}, one fresh subprocess per fit"
    )
    if child_env:
        print(f"environment of the subprocesses: {child_env}")

    folder = tempfile.mkdtemp(prefix="skpadim_fit_memory_")
    try:
        start = time.perf_counter()
        write_images(folder, max(sizes))
        print(
            f"wrote {max(sizes)} PNGs in {time.perf_counter() - start:.1f} s "
            f"to {folder}"
        )
        results = {
            backbone: [
                fit_in_subprocess(backbone, n, folder, args.batch_size, child_env)
                for n in sizes
            ]
            for backbone in backbones
        }
    finally:
        shutil.rmtree(folder, ignore_errors=True)

    header = (
        f"{'backbone':<20} {'images':>6} {'before fit':>11} {'peak':>9} "
        f"{'fit growth':>11} {'after fit':>10} {'fit time':>9}"
    )
    print("\nRSS in MiB (before fit: after imports, model build and one forward)")
    print(header)
    for backbone, rows in results.items():
        for row in rows:
            print(
                f"{backbone:<20} {row['n_images']:6d} "
                f"{mib(row['rss_before_fit']):11.1f} {mib(row['peak']):9.1f} "
                f"{mib(row['peak'] - row['rss_before_fit']):11.1f} "
                f"{mib(row['rss_after_fit']):10.1f} {row['fit_seconds']:8.1f}s"
            )

    print("\nStatistics held by a fitted detector (for context)")
    for backbone, rows in results.items():
        row = rows[0]
        (height, width), d = row["grid"], row["n_features"]
        theory = height * width * d * d * 8
        print(
            f"{backbone:<20} grid {height}x{width}, d={d}: float64 scatter "
            f"h*w*d*d*8 = {mib(theory):.1f} MiB (measured tensor "
            f"{mib(row['scatter_bytes']):.1f} MiB), float32 whitening "
            f"{mib(row['whitening_bytes']):.1f} MiB"
        )

    small, large = sizes[0], sizes[-1]
    print(
        f"\nTarget: (peak_{large} - peak_{small}) / peak_{small} < {TARGET_GROWTH:.0%}"
    )
    for backbone, rows in results.items():
        low, high = rows[0]["peak"], rows[-1]["peak"]
        growth = (high - low) / low
        verdict = "MET" if growth < TARGET_GROWTH else "NOT MET"
        print(
            f"{backbone:<20} {mib(low):9.1f} -> {mib(high):9.1f} MiB: "
            f"{growth:+.1%} -> {verdict}"
        )


if __name__ == "__main__":
    main()
