"""Scoring throughput of PadimDetector compared with its backbone alone.

What is measured
----------------
For each backbone (resnet18 with random weights and ``n_features=100``, and
the default efficientnet_lite0 with its pretrained weights), a detector is
fitted on random uint8 images (the fit is not what is measured) and then, on
one uint8 array of shape (n, 224, 224, 3):

* ``score_samples`` and ``anomaly_maps`` end to end, as a user calls them;
* the *backbone alone*: the truncated feature network
  (``det.feature_extractor_._get_runtime().network``) applied under
  ``torch.inference_mode`` to already-preprocessed float tensors of the same
  batch size. No scoring pipeline can beat this, so it is the floor;
* the stages around it, so that any overhead can be attributed: preprocessing
  alone (reading the uint8 images, conversion to float, normalisation), and
  the post-backbone work of each batch split into channel reduction,
  Mahalanobis distances, and map upsampling + smoothing + image maxima.

How
---
One warm-up round, then ``--repeats`` rounds; every round times every measure
in turn, so that a change in machine load during the run affects all of them
alike. The median wall-clock time is reported as images per second and as a
ratio to the backbone-alone time; the process CPU time (all threads) is shown
too, as it is less sensitive to other processes competing for the cores.
Images are 224x224 and the detector uses ``image_size=224, crop_size=None``,
so preprocessing resizes nothing.

Target
------
Full scoring (``score_samples``, and ``anomaly_maps``) within 1.15x of the
backbone-alone time.

Usage::

    python benchmarks/bench_predict.py [--n-images 64] [--batch-size 32]
        [--repeats 3] [--backbones resnet18,efficientnet_lite0]
        [--device cpu] [--threads N]
"""

from __future__ import annotations

import argparse
import os
import platform
import time

import numpy as np
import torch

from skpadim import PadimDetector
from skpadim._images import check_images
from skpadim._maps import distances_to_maps, image_scores

IMAGE_SIZE = 224
TARGET_RATIO = 1.15

# Detector settings per backbone: resnet18's ImageNet weights cannot be
# downloaded here, and timings do not depend on weight values.
BACKBONE_PARAMS = {
    "resnet18": {"weights": None, "n_features": 100},
    "efficientnet_lite0": {"weights": "DEFAULT", "n_features": None},
}


def cpu_model():
    """The CPU model name from /proc/cpuinfo, or the platform's guess."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Timer:
    """Wall-clock and process CPU seconds of one call, device work included."""

    def __init__(self, device):
        self.device = device

    def __call__(self, fn):
        synchronize(self.device)
        wall, cpu = time.perf_counter(), time.process_time()
        fn()
        synchronize(self.device)
        return time.perf_counter() - wall, time.process_time() - cpu


def random_images(n, seed):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, size=(n, IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)


def preprocessed_batches(detector, images):
    """All batches as the backbone receives them (list of device tensors)."""
    extractor = detector.feature_extractor_
    runtime = extractor._get_runtime()
    return list(extractor._batches(images, runtime, desc="preprocess"))


def staged_pass(detector, batches, timer):
    """One pass over preprocessed batches, timing each stage after the backbone.

    Returns an array of shape (3, 2): the (wall, cpu) seconds spent over all
    batches in channel reduction, Mahalanobis distances, and maps + scores.
    """
    runtime = detector.feature_extractor_._get_runtime()
    gaussian = detector.gaussian_
    totals = np.zeros((3, 2))
    out = {}  # the current batch's intermediate results
    stages = (
        lambda: out.update(embeddings=runtime.reduce(out["taps"])),
        lambda: out.update(distances=gaussian.distances(out["embeddings"])),
        lambda: image_scores(
            distances_to_maps(out["distances"], detector.frame_shape_, detector.sigma)
        ).cpu(),
    )
    for batch in batches:
        with torch.inference_mode():
            out["taps"] = runtime.network(batch)
            for i, stage in enumerate(stages):
                totals[i] += timer(stage)
        out.clear()
    return totals


def bench_backbone(name, args, device):
    """Fit a detector, time every measure in interleaved rounds, print a table."""
    params = BACKBONE_PARAMS.get(name, {"weights": "DEFAULT", "n_features": None})
    detector = PadimDetector(
        backbone=name,
        image_size=IMAGE_SIZE,
        crop_size=None,
        batch_size=args.batch_size,
        device=str(device),
        random_state=0,
        **params,
    )
    start = time.perf_counter()
    detector.fit(random_images(args.n_fit, seed=0))
    fit_seconds = time.perf_counter() - start

    X = random_images(args.n_images, seed=1)
    images = check_images(X)
    network = detector.feature_extractor_._get_runtime().network
    batches = preprocessed_batches(detector, images)

    def backbone_alone():
        with torch.inference_mode():
            for batch in batches:
                network(batch)

    measures = {
        "backbone alone": backbone_alone,
        "preprocessing": lambda: preprocessed_batches(detector, images),
        "score_samples": lambda: detector.score_samples(X),
        "anomaly_maps": lambda: detector.anomaly_maps(X),
    }
    timer = Timer(device)
    runs = {key: [] for key in [*measures, "stages"]}
    for _ in range(args.repeats + 1):  # the first round is the warm-up
        for key, fn in measures.items():
            runs[key].append(timer(fn))
        runs["stages"].append(staged_pass(detector, batches, timer))
    median = {key: np.median(np.array(v[1:]), axis=0) for key, v in runs.items()}
    stages = median.pop("stages")
    times = {
        "backbone alone": median["backbone alone"],
        "preprocessing": median["preprocessing"],
        "  reduce": stages[0],
        "  mahalanobis": stages[1],
        "  maps + scores": stages[2],
        "post-backbone": stages.sum(axis=0),
        "score_samples": median["score_samples"],
        "anomaly_maps": median["anomaly_maps"],
    }

    extractor = detector.feature_extractor_
    print(
        f"\n== {name}: weights={params['weights']!r}, "
        f"n_features={extractor.n_features_}, layers={extractor.layers_}, "
        f"embedding grid={detector.gaussian_.feature_shape_[1:]}, "
        f"fit on {args.n_fit} images took {fit_seconds:.1f} s"
    )
    floor_wall, floor_cpu = times["backbone alone"]
    print(
        f"{'stage':<18} {'wall s':>8} {'images/s':>9} {'x backbone':>11} "
        f"{'cpu s':>8} {'cpu x bb':>9}"
    )
    for stage, (wall, cpu) in times.items():
        rate = args.n_images / wall if wall > 0 else float("inf")
        print(
            f"{stage:<18} {wall:8.3f} {rate:9.1f} {wall / floor_wall:11.3f} "
            f"{cpu:8.3f} {cpu / floor_cpu:9.3f}"
        )
    accounted = sum(
        times[key][0] for key in ("preprocessing", "backbone alone", "post-backbone")
    )
    print(
        f"preprocessing + backbone + post-backbone = {accounted:.3f} s wall "
        f"({accounted / floor_wall:.3f}x backbone)"
    )
    ratios = {}
    for method in ("score_samples", "anomaly_maps"):
        ratios[method] = times[method][0] / floor_wall
        met = "MET" if ratios[method] <= TARGET_RATIO else "NOT MET"
        print(
            f"target {method} <= {TARGET_RATIO}x backbone: "
            f"{ratios[method]:.3f}x -> {met}"
        )
    return ratios


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n-images", type=int, default=64, help="images scored")
    parser.add_argument("--n-fit", type=int, default=64, help="images fitted on")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--backbones",
        default="resnet18,efficientnet_lite0",
        help="comma-separated backbone names",
    )
    parser.add_argument("--device", default="cpu", help="torch device (default cpu)")
    parser.add_argument(
        "--threads", type=int, default=None, help="torch intra-op threads"
    )
    args = parser.parse_args(argv)

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"CPU: {cpu_model()}")
    if device.type == "cuda":
        print(f"GPU: {torch.cuda.get_device_name(device)}")
    print(f"load average (1 min) at start: {os.getloadavg()[0]:.2f}")
    print(
        f"device={device}, {args.n_images} images {IMAGE_SIZE}x{IMAGE_SIZE} uint8, "
        f"batch_size={args.batch_size}, median of {args.repeats} interleaved "
        "rounds after 1 warm-up round"
    )

    summary = {}
    for name in args.backbones.split(","):
        summary[name.strip()] = bench_backbone(name.strip(), args, device)

    print(f"\n== summary (target: scoring time <= {TARGET_RATIO}x backbone alone)")
    print(f"{'backbone':<20} {'score_samples':>14} {'anomaly_maps':>13}  target")
    for name, ratios in summary.items():
        met = all(r <= TARGET_RATIO for r in ratios.values())
        print(
            f"{name:<20} {ratios['score_samples']:13.3f}x "
            f"{ratios['anomaly_maps']:12.3f}x  {'MET' if met else 'NOT MET'}"
        )
    print(f"load average (1 min) at end: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
