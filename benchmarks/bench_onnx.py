"""ONNX Runtime (CPU) against the Python detectors: speed, file size, agreement.

What is measured
----------------
For PaDiM and PatchCore (default parameters otherwise), each on resnet18
with random weights and on efficientnet_lite0 with its pretrained weights,
at ``--image-size`` pixels: a detector is fitted on ``--n-train`` smooth
random images, exported with :func:`skpadim.export.to_onnx`, and then

* images per second of the Python detector's ``score_samples`` and of its
  ``anomaly_maps(..., resolution="model")`` (each runs the backbone), with
  ``batch_size`` = ``--batch-size``;
* images per second of one ONNX Runtime ``session.run`` giving both
  ``scores`` and ``maps``, on batches of ``--batch-size`` uint8 frames;
* the joblib file and the ONNX file sizes;
* the largest relative difference between the two, scores and maps.

How
---
Torch and ONNX Runtime get the same number of threads (``--threads``,
default: all cores). Each timing is warmed up once, then the three are timed
in turn ``--repeats`` rounds over ``--n-batches`` batches, so that all see the
same machine load; the median round is printed (and the best in brackets).
The test images are given at the frame size, so both sides read the same
pixels.

Usage::

    python benchmarks/bench_onnx.py [--image-size 224] [--n-train 20]
        [--batch-size 8] [--n-batches 2] [--repeats 3] [--threads N]
        [--only padim,patchcore] [--backbones resnet18,efficientnet_lite0]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

import joblib
import numpy as np
import torch

from skpadim import PadimDetector, PatchCoreDetector
from skpadim.export import to_onnx

MIB = 2**20
DETECTORS = {"padim": PadimDetector, "patchcore": PatchCoreDetector}
WEIGHTS = {"resnet18": None, "efficientnet_lite0": "DEFAULT"}


def smooth_images(rng, n, size):
    """Smooth random uint8 RGB images (a blocky low-pass texture plus noise)."""
    block = max(size // 16, 1)
    base = rng.normal(size=(n, -(-size // block), -(-size // block), 3))
    up = np.kron(base, np.ones((1, block, block, 1)))[:, :size, :size]
    noise = rng.normal(scale=0.3, size=up.shape)
    return np.clip(128 + 30 * (up + noise), 0, 255).astype(np.uint8)


def timed_rounds(functions, repeats):
    """Run each function once to warm up, then ``repeats`` interleaved rounds;
    return the list of seconds per round of each."""
    for function in functions.values():
        function()
    seconds = {name: [] for name in functions}
    for _ in range(repeats):
        for name, function in functions.items():
            start = time.perf_counter()
            function()
            seconds[name].append(time.perf_counter() - start)
    return seconds


def measure(name, backbone, args, train, test):
    import onnxruntime

    detector = DETECTORS[name](
        backbone=backbone,
        weights=WEIGHTS[backbone],
        image_size=args.image_size,
        batch_size=args.batch_size,
        device="cpu",
        random_state=0,
    )
    start = time.perf_counter()
    detector.fit(train)
    fit_seconds = time.perf_counter() - start
    with tempfile.TemporaryDirectory() as folder:
        joblib_path = os.path.join(folder, "model.joblib")
        joblib.dump(detector, joblib_path)
        start = time.perf_counter()
        onnx_path = to_onnx(detector, os.path.join(folder, "model.onnx"))
        export_seconds = time.perf_counter() - start
        sizes = os.path.getsize(joblib_path), os.path.getsize(onnx_path)
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = args.threads
        options.inter_op_num_threads = 1
        session = onnxruntime.InferenceSession(
            os.fspath(onnx_path), options, providers=["CPUExecutionProvider"]
        )
    batches = [
        test[i : i + args.batch_size] for i in range(0, len(test), args.batch_size)
    ]

    def python_scores():
        return [detector.score_samples(batch) for batch in batches]

    def python_maps():
        return [detector.anomaly_maps(batch, resolution="model") for batch in batches]

    def onnx_run():
        return [session.run(None, {"images": batch}) for batch in batches]

    seconds = timed_rounds(
        {
            "python score_samples": python_scores,
            "python anomaly_maps": python_maps,
            "onnxruntime scores+maps": onnx_run,
        },
        args.repeats,
    )
    outputs = onnx_run()
    scores = np.concatenate([o[0] for o in outputs])
    maps = np.concatenate([o[1] for o in outputs])
    expected_scores = -np.concatenate(python_scores())
    expected_maps = np.concatenate(python_maps())
    score_error = np.max(np.abs(scores - expected_scores) / np.abs(expected_scores))
    map_error = np.max(np.abs(maps - expected_maps)) / np.abs(expected_maps).max()

    print(f"\n{name} on {backbone} ({WEIGHTS[backbone] or 'random'} weights)")
    print(f"  fit {fit_seconds:.1f} s, export {export_seconds:.1f} s")
    print(
        f"  files: joblib {sizes[0] / MIB:.1f} MiB, onnx {sizes[1] / MIB:.1f} MiB "
        f"({sizes[1] / sizes[0]:.3f} x joblib)"
    )
    for what, rounds in seconds.items():
        median, best = statistics.median(rounds), min(rounds)
        print(
            f"  {what:<25} {len(test) / median:7.1f} images/s "
            f"(best {len(test) / best:.1f})"
        )
    print(
        f"  max relative difference: scores {score_error:.1e}, "
        f"maps {map_error:.1e} (of the largest map value)"
    )


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--n-train", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--n-batches", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--only", default=",".join(DETECTORS))
    parser.add_argument("--backbones", default=",".join(WEIGHTS))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(
        f"torch {torch.__version__}, {args.threads} threads, "
        f"{args.image_size} px, batches of {args.batch_size}, "
        f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores"
    )
    rng = np.random.default_rng(0)
    train = smooth_images(rng, args.n_train, args.image_size)
    test = smooth_images(rng, args.batch_size * args.n_batches, args.image_size)
    for backbone in args.backbones.split(","):
        for name in args.only.split(","):
            measure(name, backbone, args, train, test)


if __name__ == "__main__":
    main()
