"""Fit and scoring throughput of PadimDetector against its backbone alone.

What is measured
----------------
For every backbone, batch size and device, on ``n`` random uint8 images of
224 x 224 pixels (``image_size=224``, so nothing is resized):

* **fit**: ``PadimDetector.fit`` on the ``n`` images, timed once, as a user
  calls it: it builds the network, runs the backbone over the images twice
  (once for the statistics, once to score them for ``offset_``) and
  factorises one covariance matrix per patch position;
* **score**: ``score_samples`` on the same images (preprocessing, backbone,
  Mahalanobis distances, map upsampling and smoothing, maxima);
* **backbone alone**: the truncated feature network
  (``det.feature_extractor_._get_runtime().network``) applied to the same
  images, already preprocessed into batches of the same size, under
  ``torch.inference_mode`` (and the same autocast and memory format as the
  detector uses). No pipeline can beat it; the ratios are to this time.

A fit passes over the images twice, so its ratio cannot go below 2 (with
one fit against the best of several backbone runs, a noisy machine can
still show less); a score's floor is 1. Above the floor, a fit also pays
for the float64 statistics (a rank-B update of ``h * w`` scatter matrices of
``d x d`` per batch, and one Cholesky factorisation per position at the
end) and the network's construction, which dominate for ``d = 550`` and few
images. Throughputs are images per second. The backbones:
resnet18 (``n_features=100``), wide_resnet50_2 (``n_features=550``, the
paper's setting) with random weights, as timings do not depend on weight
values, and the default efficientnet_lite0 (``n_features=100``) with its
packaged ImageNet weights.

How
---
Each (backbone, batch size, device) runs in a fresh Python subprocess (this
file with ``--child``), so that its peak resident memory,
``resource.getrusage(RUSAGE_SELF).ru_maxrss``, is its own; on CUDA the
child also reports ``torch.cuda.max_memory_allocated``. Scoring and the
backbone alone are warmed up on one batch, then timed ``--repeats`` times
each over all the images, alternately, so that both see the same load; the
best (shortest) time of each is reported, as the one least disturbed by
other processes. The fit runs once. Batch sizes larger than the
number of images are skipped. The machine (CPU model, cores, torch version
and threads, GPU) and the 1-minute load average before and after every row
are printed with the results: on a shared machine the timings are only
comparable at a similar load. The results end with a Markdown table ready
for the docs.

Usage::

    python benchmarks/bench_throughput.py [--backbones resnet18,...]
        [--batch-sizes 1,8,32] [--n-images 32 | name=N,...] [--device cpu,cuda]
        [--repeats 3] [--precision float32] [--threads N]

On a CPU, wide_resnet50_2 gets 8 images (it embeds a few images per second
and its ``n_features=550`` statistics take 11 GB), the others 32. The
default run took 17 minutes on a 2-core CPU shared with other work (load
average 3 to 6), and 7 minutes with ``--threads 1``: on a loaded machine,
PyTorch's threads wait for each other whenever one is descheduled, so
single-threaded runs are both faster and steadier there.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _common import cpu_model, usable_cores  # noqa: E402

IMAGE_SIZE = 224
MIB = 2**20

# Detector settings per backbone. The ResNets' ImageNet weights would need a
# download; timings do not depend on the weight values.
BACKBONES = {
    "resnet18": {"weights": None, "n_features": 100},
    "wide_resnet50_2": {"weights": None, "n_features": 550},
    "efficientnet_lite0": {"weights": "DEFAULT", "n_features": 100},
}
# Images per backbone and device type when --n-images is not given.
DEFAULT_N_IMAGES = {
    "cpu": {"resnet18": 32, "wide_resnet50_2": 8, "efficientnet_lite0": 32},
    "cuda": {"resnet18": 256, "wide_resnet50_2": 128, "efficientnet_lite0": 256},
}


# ---------------------------------------------------------------- child side
def peak_rss_bytes():
    """Peak resident memory of this process (ru_maxrss: KiB on Linux, B on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def load_average():
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")


def run_child(args):
    """Benchmark one (backbone, batch size, device) and print one JSON line."""
    import contextlib

    import numpy as np
    import torch

    from skpadim import PadimDetector
    from skpadim._images import check_images

    device = torch.device(args.device)
    if args.threads is not None:
        torch.set_num_threads(args.threads)

    def synchronize():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    def seconds(fn):
        synchronize()
        start = time.perf_counter()
        fn()
        synchronize()
        return time.perf_counter() - start

    load_before = load_average()
    rng = np.random.default_rng(0)
    shape = (args.n_images, IMAGE_SIZE, IMAGE_SIZE, 3)
    X = rng.integers(0, 256, size=shape, dtype=np.uint8)
    params = BACKBONES.get(args.backbone, {"weights": "DEFAULT", "n_features": None})
    detector = PadimDetector(
        backbone=args.backbone,
        image_size=IMAGE_SIZE,
        batch_size=args.batch_size,
        device=str(device),
        precision=args.precision,
        random_state=0,
        **params,
    )
    result = {"load_before": load_before}
    try:
        result["fit_seconds"] = seconds(lambda: detector.fit(X))
    except ValueError as exc:  # the memory guard refused the fit
        result["error"] = str(exc)
        print(json.dumps(result))
        return

    extractor = detector.feature_extractor_
    runtime = extractor._get_runtime()
    network = runtime.network
    batches = list(extractor._batches(check_images(X), runtime, desc="preprocess"))
    if device.type == "cuda":  # as runtime.forward feeds the network
        batches = [b.contiguous(memory_format=torch.channels_last) for b in batches]
    autocast = (
        contextlib.nullcontext()
        if args.precision == "float32"
        else torch.autocast(device.type, dtype=getattr(torch, args.precision))
    )

    def backbone_alone():
        with torch.inference_mode(), autocast:
            for batch in batches:
                network(batch)

    def first_batch_alone():
        with torch.inference_mode(), autocast:
            network(batches[0])

    def score():
        detector.score_samples(X)

    # Warm up on one batch (lazy initialisations, kernel selection, caches),
    # then alternate the two measurements so that both see the same load.
    first_batch_alone()
    detector.score_samples(X[: args.batch_size])
    backbone_times, score_times = [], []
    for _ in range(args.repeats):
        backbone_times.append(seconds(backbone_alone))
        score_times.append(seconds(score))
    result["backbone_seconds"] = min(backbone_times)
    result["score_seconds"] = min(score_times)
    result["n_features"] = extractor.n_features_
    result["grid"] = list(detector.gaussian_.feature_shape_[1:])
    result["peak_rss"] = peak_rss_bytes()
    if device.type == "cuda":
        result["peak_cuda"] = torch.cuda.max_memory_allocated(device)
    result["load_after"] = load_average()
    print(json.dumps(result))


# --------------------------------------------------------------- parent side
def parse_n_images(text, backbones, device_type):
    """Images per backbone: defaults, one number for all, or "name=N,..." overrides."""
    counts = {name: DEFAULT_N_IMAGES[device_type].get(name, 64) for name in backbones}
    if text is None:
        return counts
    if "=" not in text:
        return dict.fromkeys(backbones, int(text))
    for item in text.split(","):
        name, _, value = item.partition("=")
        counts[name.strip()] = int(value)
    return counts


def run_in_subprocess(backbone, batch_size, n_images, device, args):
    command = [
        sys.executable,
        os.path.abspath(__file__),
        "--child",
        "--backbone",
        backbone,
        "--batch-size",
        str(batch_size),
        "--n-images",
        str(n_images),
        "--device",
        device,
        "--repeats",
        str(args.repeats),
        "--precision",
        args.precision,
    ]
    if args.threads is not None:
        command += ["--threads", str(args.threads)]
    done = subprocess.run(command, capture_output=True, text=True)
    lines = done.stdout.strip().splitlines()
    if done.returncode != 0 or not lines:
        sys.stderr.write(done.stderr[-3000:])
        return {"error": f"child process failed (exit status {done.returncode})"}
    return json.loads(lines[-1])


def markdown_rows(rows):
    header = (
        "| backbone | d | device | batch | images | fit img/s | fit / backbone "
        "| score img/s | score / backbone | backbone img/s | peak RSS (MiB) "
        "| peak CUDA (MiB) | load |"
    )
    n_columns = header.count("|") - 1
    lines = [header, "|" + "|".join(["---"] * n_columns) + "|"]
    for row in rows:
        r = row["result"]
        prefix = (
            f"| {row['backbone']} | {row['n_features']} | {row['device']} "
            f"| {row['batch_size']} | {row['n_images']} "
        )
        if "error" in r:
            reason = r["error"].split(". ")[0]
            lines.append(prefix + f"| {reason} |" + " |" * (n_columns - 6))
            continue
        n = row["n_images"]
        cuda = f"{r['peak_cuda'] / MIB:.0f}" if "peak_cuda" in r else "-"
        load = f"{r['load_before']:.1f}-{r['load_after']:.1f}"
        lines.append(
            prefix
            + f"| {n / r['fit_seconds']:.3g} "
            + f"| {r['fit_seconds'] / r['backbone_seconds']:.2f} "
            + f"| {n / r['score_seconds']:.3g} "
            + f"| {r['score_seconds'] / r['backbone_seconds']:.2f} "
            + f"| {n / r['backbone_seconds']:.3g} "
            + f"| {r['peak_rss'] / MIB:.0f} | {cuda} | {load} |"
        )
    return lines


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--backbones",
        default="resnet18,wide_resnet50_2,efficientnet_lite0",
        help="comma-separated backbone names",
    )
    parser.add_argument("--batch-sizes", default="1,8,32")
    parser.add_argument(
        "--n-images",
        default=None,
        help="images per run: one number for every backbone, or name=N,... "
        "(default: 32, and 8 for wide_resnet50_2, on a CPU)",
    )
    parser.add_argument(
        "--device",
        default=None,
        help="comma-separated torch devices (default: cpu, plus cuda if available)",
    )
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--threads", type=int, default=None, help="torch intra-op threads per run"
    )
    parser.add_argument(
        "--precision", default="float32", choices=["float32", "float16", "bfloat16"]
    )
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--backbone", help=argparse.SUPPRESS)
    parser.add_argument("--batch-size", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        args.n_images = int(args.n_images)
        run_child(args)
        return

    import torch

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    devices = args.device or ("cpu,cuda" if torch.cuda.is_available() else "cpu")
    devices = [d.strip() for d in devices.split(",")]
    backbones = [b.strip() for b in args.backbones.split(",")]
    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]

    machine = [
        f"CPU: {cpu_model()}, {usable_cores()} usable cores "
        f"({os.cpu_count()} logical in the machine)",
        f"torch {torch.__version__}, {torch.get_num_threads()} intra-op threads, "
        f"Python {platform.python_version()}, {platform.system()}",
    ]
    if torch.cuda.is_available():
        machine.append(f"GPU: {torch.cuda.get_device_name(0)}")
    machine.append(
        f"devices {devices}, precision {args.precision}, {IMAGE_SIZE}x{IMAGE_SIZE} "
        f"uint8 images, best of {args.repeats} runs after a one-batch warm-up "
        "(fit: one run)"
    )
    machine.append(f"load average at start: {load_average():.2f}")
    for line in machine:
        print(line)

    rows = []
    start = time.perf_counter()
    for device in devices:
        n_images = parse_n_images(args.n_images, backbones, device.split(":")[0])
        for backbone in backbones:
            n_features = BACKBONES.get(backbone, {}).get("n_features")
            for batch_size in batch_sizes:
                n = n_images[backbone]
                if batch_size > n:
                    print(
                        f"skip {backbone} batch {batch_size} on {device}: only "
                        f"{n} images"
                    )
                    continue
                result = run_in_subprocess(backbone, batch_size, n, device, args)
                row = dict(
                    backbone=backbone,
                    n_features=result.get("n_features", n_features),
                    device=device,
                    batch_size=batch_size,
                    n_images=n,
                    result=result,
                )
                rows.append(row)
                print(markdown_rows([row])[-1], flush=True)

    print(
        f"\ntotal {time.perf_counter() - start:.0f} s, load average at end: "
        f"{load_average():.2f}\n"
    )
    print("\n".join(f"{line}  " for line in machine))
    print()
    print("\n".join(markdown_rows(rows)))
    print(
        "\nfit / backbone and score / backbone: wall time over the time of the "
        "backbone alone on the same preprocessed batches (floors: 2 for fit, "
        "which passes over the images twice, and 1 for score). load: 1-minute "
        "load average before and after the row."
    )


if __name__ == "__main__":
    main()
