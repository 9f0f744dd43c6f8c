"""Scoring time of PadimDetector over the fastest forward of its backbone.

What is measured
----------------
For each backbone (resnet18 with random weights and ``n_features=100``: no
ImageNet ResNet weights can be downloaded here, and timings do not depend on
weight values; and the default efficientnet_lite0 with its packaged
pretrained weights, ``weights="DEFAULT"``) and each image set, a detector is
fitted (not timed) on ``--n-fit`` images of the set, then these are timed on
``--n-images`` other images, batch ``--batch-size``:

* ``floor``: the fastest float32 forward of the same backbone, with the
  detector's weights, on this machine: BatchNorm folded into the
  convolutions and channels-last weights and input, the variant
  ``bench_forward.FLOOR_VARIANT`` that ``bench_forward.py`` measured as the
  fastest on CPU (it beats plain, channels-last only, fused only,
  ``jit.freeze`` and ``mkldnn``). It runs under ``torch.inference_mode`` on
  the images already preprocessed into float batches in channels-last
  layout, so no scoring pipeline can beat it;
* ``preprocess``: reading the images into normalised float batches;
* ``embed``: preprocessing + backbone + channel selection and upsampling;
* ``score_samples`` and ``anomaly_maps`` end to end, as a user calls them.

Image sets (224 x 224 into the backbone):

* ``random``: uniform random uint8 RGB arrays of 224 x 224;
* ``elpv``: real ELPV solar-cell images (``skpadim.datasets.load_elpv``,
  300 x 300 grayscale PNGs), read and resized to 224 x 224 uint8 arrays
  beforehand, so that the timed work is the same as for ``random``;
* ``elpv-files`` (information only, no target): the same cells passed as file
  paths, so decoding the PNGs and resizing 300 -> 224 are part of the
  timing (decoding runs in a thread pool, overlapping the network).

How
---
One warm-up round, then ``--repeats`` rounds; every round times every measure
in turn, so that load changes affect all alike. The ratio is the median
``score_samples`` (or ``anomaly_maps``) time over the median floor time;
the best-round ratio is printed as well. With ``--threads 1`` the targets use
process CPU time rather than wall-clock time: with one thread it is the work
done, however long other processes hold the cores (the steadier figure on a
loaded machine); both are printed. ``torch.profiler`` then profiles one
``anomaly_maps`` call and one floor pass on the same images and prints the
ops that take the most self CPU time *beyond* the floor: what remains above
it. ``bench_forward.fastest_forward_images_per_second`` (best of 3, random
tensors) is printed as a cross-check of the floor.

Target
------
``score_samples`` and ``anomaly_maps`` within 1.15x of the floor, on
``random`` and ``elpv``. Results go to ``benchmarks/results/predict.json``.

Usage::

    python benchmarks/bench_predict.py [--n-images 64] [--n-fit 64]
        [--batch-size 32] [--repeats 5] [--backbones resnet18,efficientnet_lite0]
        [--sets random,elpv,elpv-files] [--threads N] [--no-profile]
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _common import (  # noqa: E402
    allocator_description,
    describe_machine,
    info_row,
    interleaved,
    load_average,
    machine,
    median_cpu,
    median_wall,
    print_targets,
    profile_table,
    reexec_with_steady_allocator,
    save_result,
    target,
)
from bench_forward import (  # noqa: E402
    FLOOR_VARIANT,
    fastest_forward_images_per_second,
)

from skpadim import PadimDetector  # noqa: E402
from skpadim._images import check_images  # noqa: E402
from skpadim.backbones import build_feature_network  # noqa: E402
from skpadim.backbones._inference import optimize_for_inference  # noqa: E402

IMAGE_SIZE = 224
TARGET_RATIO = 1.15
TARGET_SETS = ("random", "elpv")

BACKBONE_PARAMS = {
    "resnet18": {"weights": None, "n_features": 100},
    "efficientnet_lite0": {"weights": "DEFAULT", "n_features": None},
}


def random_images(n, seed):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, size=(n, IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)


def elpv_cells(n_fit, n_score):
    """Normal ELPV cells for the fit, then the next cells (any label) to score,
    as file paths."""
    from skpadim.datasets import load_elpv

    data = load_elpv()
    normal = [p for p, y in zip(data.paths, data.labels) if y == 1]
    rest = [p for p in data.paths if p not in set(normal[:n_fit])]
    return normal[:n_fit], rest[:n_score]


def read_resized(paths):
    from PIL import Image

    return np.stack(
        [
            np.asarray(
                Image.open(p)
                .convert("L")
                .resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.BILINEAR)
            )
            for p in paths
        ]
    )


def image_sets(names, n_fit, n_score):
    sets = {}
    if "random" in names:
        sets["random"] = (random_images(n_fit, 0), random_images(n_score, 1))
    if {"elpv", "elpv-files"} & set(names):
        fit_paths, score_paths = elpv_cells(n_fit, n_score)
        if "elpv" in names:
            sets["elpv"] = (read_resized(fit_paths), read_resized(score_paths))
        if "elpv-files" in names:
            sets["elpv-files"] = (fit_paths, score_paths)
    return {name: sets[name] for name in names if name in sets}


def floor_network(detector):
    """The floor variant of the detector's backbone with its weights."""
    extractor = detector.feature_extractor_
    state = {
        k: torch.from_numpy(np.array(v)) for k, v in extractor.backbone_state_.items()
    }
    network = build_feature_network(extractor.backbone, extractor.layers_, state)
    return optimize_for_inference(network, "cpu")


def bench_one(name, set_name, fit_X, X, args):
    params = BACKBONE_PARAMS.get(name, {"weights": "DEFAULT", "n_features": None})
    detector = PadimDetector(
        backbone=name,
        image_size=IMAGE_SIZE,
        crop_size=None,
        batch_size=args.batch_size,
        device="cpu",
        random_state=0,
        **params,
    )
    start = time.perf_counter()
    detector.fit(fit_X)
    fit_seconds = time.perf_counter() - start
    extractor = detector.feature_extractor_
    runtime = extractor._get_runtime()
    images = check_images(X)
    network, memory_format = floor_network(detector)
    batches = [
        b.contiguous(memory_format=memory_format)
        for b in extractor._batches(images, runtime, desc="preprocess")
    ]

    def floor():
        with torch.inference_mode():
            for batch in batches:
                network(batch)

    def preprocess():
        for _ in extractor._batches(images, runtime, desc="preprocess"):
            pass

    def embed():
        for _ in extractor.embed_batches(images):
            pass

    measures = {
        "floor": floor,
        "preprocess": preprocess,
        "embed": embed,
        "score_samples": lambda: detector.score_samples(X),
        "anomaly_maps": lambda: detector.anomaly_maps(X),
    }
    runs = interleaved(measures, args.repeats)
    floor_wall = median_wall(runs["floor"])
    floor_best = min(w for w, _ in runs["floor"])
    n = len(X)
    print(
        f"\n== {name} on {set_name}: weights={params['weights']!r}, "
        f"d={extractor.n_features_}, layers={list(extractor.layers_)}, "
        f"grid={detector.gaussian_.feature_shape_[1:]}, fit on {len(fit_X)} "
        f"images: {fit_seconds:.1f} s; load {load_average():.2f}"
    )
    print(
        f"{'measure':<15} {'median s':>9} {'images/s':>9} {'x floor':>8} "
        f"{'best x floor':>13} {'cpu s':>7} {'cpu x floor':>12}"
    )
    figures = {"fit_seconds": fit_seconds, "n_images": n, "measures": {}}
    floor_cpu = median_cpu(runs["floor"])
    for key, values in runs.items():
        wall, cpu = median_wall(values), median_cpu(values)
        best = min(w for w, _ in values)
        ratio, best_ratio = wall / floor_wall, best / floor_best
        print(
            f"{key:<15} {wall:9.3f} {n / wall:9.1f} {ratio:8.3f} {best_ratio:13.3f} "
            f"{cpu:7.2f} {cpu / median_cpu(runs['floor']):12.3f}"
        )
        figures["measures"][key] = {
            "median_s": wall,
            "best_s": best,
            "images_per_s": n / wall,
            "ratio": ratio,
            "best_ratio": best_ratio,
            "cpu_s": cpu,
            "cpu_ratio": cpu / floor_cpu,
        }
    head = median_wall(runs["score_samples"]) - median_wall(runs["embed"])
    embed_extra = median_wall(runs["embed"]) - median_wall(runs["preprocess"])
    print(
        f"breakdown (share of floor): preprocess "
        f"{median_wall(runs['preprocess']) / floor_wall:.3f}, embed - preprocess - "
        f"floor {embed_extra / floor_wall - 1:+.3f}, head + maps (score_samples - "
        f"embed) {head / floor_wall:.3f}"
    )
    if args.profile:
        rows, total, base = profile_table(
            lambda: detector.anomaly_maps(X), baseline=floor, row_limit=args.top
        )
        print(
            f"torch.profiler, anomaly_maps vs floor: ops self CPU {total:.0f} ms vs "
            f"{base:.0f} ms; top ops beyond the floor:"
        )
        for row in rows:
            print(f"  {row['op']:<42} {row['ms']:8.1f} ms  ({row['calls']} calls)")
        figures["profile_beyond_floor"] = rows
        figures["profile_total_ms"] = {"anomaly_maps": total, "floor": base}
    return figures


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n-images", type=int, default=64, help="images scored")
    parser.add_argument("--n-fit", type=int, default=64, help="images fitted on")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--backbones", default="resnet18,efficientnet_lite0")
    parser.add_argument("--sets", default="random,elpv,elpv-files")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--top", type=int, default=8, help="profile rows")
    parser.add_argument("--no-profile", dest="profile", action="store_false")
    parser.add_argument("--no-save", dest="save", action="store_false")
    parser.add_argument(
        "--default-allocator",
        action="store_true",
        help="keep glibc's default malloc (page faults on every batch)",
    )
    args = parser.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    info = machine()
    print(describe_machine(info))
    print(
        f"{args.n_images} images scored, batch {args.batch_size}, {IMAGE_SIZE} px; "
        f"median of {args.repeats} interleaved rounds after 1 warm-up; floor = "
        f"{FLOOR_VARIANT} (bench_forward.py); {allocator_description()}"
    )
    sets = image_sets(args.sets.split(","), args.n_fit, args.n_images)
    results, targets, infos = {}, [], []
    for name in args.backbones.split(","):
        params = BACKBONE_PARAMS.get(name, {"weights": "DEFAULT"})
        check = fastest_forward_images_per_second(
            name, IMAGE_SIZE, args.batch_size, 2, weights=params["weights"]
        )
        print(f"\n{name}: fastest_forward_images_per_second = {check:.1f} images/s")
        results[name] = {
            "fastest_forward_images_per_second": check,
            "allocator": allocator_description(),
        }
        for set_name, (fit_X, X) in sets.items():
            fig = bench_one(name, set_name, fit_X, X, args)
            results[name][set_name] = fig
            # With one thread, process CPU time is the work done whatever the
            # other processes on the machine: the steadier figure when loaded.
            by_cpu = torch.get_num_threads() == 1
            for method in ("score_samples", "anomaly_maps"):
                ratio = fig["measures"][method]["cpu_ratio" if by_cpu else "ratio"]
                label = f"predict {name} {set_name} {method} / floor"
                label += " (CPU time, 1 thread)" if by_cpu else ""
                if set_name in TARGET_SETS:
                    targets.append(target(label, ratio, TARGET_RATIO))
                else:
                    infos.append(info_row(label, ratio, "x"))
    print(f"\n== summary (load average now {load_average():.2f})")
    print_targets(targets)
    for row in infos:
        print(f"info {row['name']}: {row['value']:.3f}x")
    if args.save:
        save_result("predict", results, targets=targets, info=infos)


if __name__ == "__main__":
    reexec_with_steady_allocator(sys.argv)
    main()
