"""PadimDetector.fit time over one backbone pass over the same images.

What is measured
----------------
A fit must run the backbone over every training image at least once, so the
floor of a fit is one pass of the fastest float32 forward of the backbone
over the training images (BatchNorm folded + channels-last, the variant
``bench_forward.FLOOR_VARIANT``, on the images already preprocessed into
channels-last float batches, under ``torch.inference_mode``). Everything
else a fit does is overhead over that floor: reading and normalising the
images, channel selection, the float64 moment updates (one rank-B update of
``h * w`` matrices of ``d x d`` per batch), one Cholesky factorisation per
position, and scoring the training images for ``offset_`` (from the cached
embeddings now; by a second backbone pass in releases before the cache).

Configurations (``--configs``):

* ``resnet18``: resnet18, ``n_features=100``, 160 images (target <= 1.5x);
* ``wide_resnet50_2``: wide_resnet50_2, ``n_features=550`` (the paper's
  setting), 32 images, no target: the issue reported 30-48x before the
  one-pass fit, against the detector's own (then unfused) network.

Both with random weights (no ImageNet ResNet weights can be downloaded here;
timings do not depend on weight values), 224 px, batch 32. The images are
real ELPV solar cells (``skpadim.datasets.load_elpv``, normal cells, resized
to 224 x 224 uint8 arrays beforehand), or random uint8 images with
``--images random`` or when ``elpv-dataset`` is not installed.

How
---
The floor is timed in this process with the current skpadim. Each fit runs in
a fresh subprocess (this file with ``--child``) whose ``PYTHONPATH`` starts
with ``--tree`` (default: this checkout), so that an older checkout can be
measured against the same floor, e.g.::

    git worktree add --detach /tmp/skpadim-old 2796308
    python benchmarks/bench_fit_time.py --tree /tmp/skpadim-old --label before

The child fits twice: the first fit of a fresh process (building the
network, oneDNN's first-call set-up) is printed for information; the target
is judged on the second, identical fit, as the floor is timed warm. The child
also times the detector's own network (``_get_runtime().network``)
on the same batches, best of 2, to give the ratio as the issue measured it.
Floor and fit alternate, ``--repeats`` rounds; medians are reported. With
``--profile`` the child runs one more fit under ``torch.profiler`` and prints
the top ops by self CPU time. Results go to
``benchmarks/results/fit_time[_<label>].json``.

Usage::

    python benchmarks/bench_fit_time.py [--configs resnet18,wide_resnet50_2]
        [--repeats 3] [--tree PATH] [--label NAME] [--images elpv|random]
        [--profile] [--threads N]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

IMAGE_SIZE = 224
BATCH_SIZE = 32
TARGET_RATIO = 1.5
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CONFIGS = {
    "resnet18": {"n_features": 100, "n_images": 160, "target": TARGET_RATIO},
    "wide_resnet50_2": {"n_features": 550, "n_images": 32, "target": None},
}


def make_images(kind, n):
    if kind == "elpv":
        try:
            from PIL import Image

            from skpadim.datasets import load_elpv

            data = load_elpv()
            paths = [p for p, y in zip(data.paths, data.labels) if y == 1][:n]
            return np.stack(
                [
                    np.asarray(
                        Image.open(p)
                        .convert("L")
                        .resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.BILINEAR)
                    )
                    for p in paths
                ]
            ), "elpv"
        except ImportError:
            pass
    rng = np.random.default_rng(0)
    shape = (n, IMAGE_SIZE, IMAGE_SIZE, 3)
    return rng.integers(0, 256, size=shape, dtype=np.uint8), "random"


# ---------------------------------------------------------------- child side
def run_child(args):
    import torch

    from skpadim import PadimDetector
    from skpadim._images import check_images

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    X = np.load(args.images_file)
    detector = PadimDetector(
        backbone=args.backbone,
        weights=None,
        n_features=args.n_features,
        image_size=IMAGE_SIZE,
        batch_size=BATCH_SIZE,
        device="cpu",
        random_state=0,
    )
    wall, cpu = time.perf_counter(), time.process_time()
    detector.fit(X)
    report = {
        "fit_s": time.perf_counter() - wall,
        "fit_cpu_s": time.process_time() - cpu,
        "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
    }
    extractor = detector.feature_extractor_
    runtime = extractor._get_runtime()
    batches = list(extractor._batches(check_images(X), runtime, desc="pre"))
    memory_format = getattr(runtime, "memory_format", torch.contiguous_format)
    batches = [b.contiguous(memory_format=memory_format) for b in batches]

    def own():
        start = time.perf_counter()
        with torch.inference_mode():
            for b in batches:
                runtime.network(b)
        return time.perf_counter() - start

    report["own_backbone_s"] = min(own() for _ in range(2))
    # A second, identical fit in the same process: what every fit after the
    # first one costs (the floor is timed warm too). The first model goes
    # first: at wide_resnet50_2's d=550 it holds 10 GiB, which the second
    # fit's memory guard would otherwise find taken.
    params = detector.get_params()
    del detector
    gc.collect()
    wall, cpu = time.perf_counter(), time.process_time()
    PadimDetector(**params).fit(X)
    report["fit_warm_s"] = time.perf_counter() - wall
    report["fit_warm_cpu_s"] = time.process_time() - cpu
    if args.profile:
        from _common import profile_table

        rows, total, _ = profile_table(
            lambda: PadimDetector(**params).fit(X), row_limit=12
        )
        report["profile"] = rows
        report["profile_total_ms"] = total
    print(json.dumps(report))


# --------------------------------------------------------------- parent side
def floor_seconds_fn(backbone, X):
    """A callable timing one pass of the fastest forward over X's batches,
    with the weights the timed fits use (a detector with ``weights=None`` and
    ``random_state=0``, fitted on two images): random weights of another
    initialisation scheme run at another speed on the CPU."""
    import torch
    from bench_predict import floor_network

    from skpadim import PadimDetector
    from skpadim._images import check_images

    # The weights do not depend on n_features: a small head keeps this
    # process's memory free for the fits (wide_resnet50_2 at d=550 is 11 GiB).
    detector = PadimDetector(
        backbone=backbone,
        weights=None,
        n_features=8,
        image_size=IMAGE_SIZE,
        batch_size=BATCH_SIZE,
        device="cpu",
        random_state=0,
    ).fit(X[:2])
    network, memory_format = floor_network(detector)
    extractor = detector.feature_extractor_
    runtime = extractor._get_runtime()
    batches = [
        b.contiguous(memory_format=memory_format)
        for b in extractor._batches(check_images(X), runtime, desc="pre")
    ]

    def run():
        start, cpu = time.perf_counter(), time.process_time()
        with torch.inference_mode():
            for b in batches:
                network(b)
        return time.perf_counter() - start, time.process_time() - cpu

    run()  # warm-up
    return run


def fit_in_child(backbone, n_features, images_file, tree, profile, threads):
    command = [
        sys.executable,
        os.path.abspath(__file__),
        "--child",
        "--backbone",
        backbone,
        "--n-features",
        str(n_features),
        "--images-file",
        images_file,
    ]
    if profile:
        command.append("--profile")
    if threads is not None:
        command += ["--threads", str(threads)]
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        [tree, os.path.dirname(os.path.abspath(__file__)), env.get("PYTHONPATH", "")]
    )
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    lines = done.stdout.strip().splitlines()
    if done.returncode != 0 or not lines:
        sys.stderr.write(done.stderr[-3000:])
        raise RuntimeError(f"fit child failed for {backbone} ({tree})")
    return json.loads(lines[-1])


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--configs", default="resnet18,wide_resnet50_2")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--wide-repeats", type=int, default=1)
    parser.add_argument(
        "--n-images",
        action="append",
        default=[],
        metavar="NAME=N",
        help="images for a configuration, e.g. wide_resnet50_2=8 (repeatable)",
    )
    parser.add_argument("--tree", default=REPO, help="skpadim checkout to fit with")
    parser.add_argument("--label", default="", help="suffix of the result file")
    parser.add_argument("--images", default="elpv", choices=["elpv", "random"])
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--threads", type=int, default=None, help="torch threads")
    parser.add_argument("--no-save", dest="save", action="store_false")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--backbone", help=argparse.SUPPRESS)
    parser.add_argument("--n-features", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--images-file", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        run_child(args)
        return

    import torch
    from _common import (
        describe_machine,
        load_average,
        machine,
        print_targets,
        save_result,
        target,
    )

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    tree = os.path.abspath(args.tree)
    commit = subprocess.run(
        ["git", "-C", tree, "rev-parse", "--short", "HEAD"],
        capture_output=True,
        text=True,
    ).stdout.strip()
    print(describe_machine(machine()))
    print(
        f"fit with skpadim from {tree} (commit {commit or '?'}); floor = fastest "
        f"forward (fused + channels-last) from {REPO}; {IMAGE_SIZE} px, batch "
        f"{BATCH_SIZE}"
    )
    figures, targets = {"tree": tree, "commit": commit}, []
    folder = tempfile.mkdtemp(prefix="skpadim_fit_time_")
    counts = dict(item.split("=", 1) for item in args.n_images)
    for name in args.configs.split(","):
        config = dict(CONFIGS[name])
        config["n_images"] = int(counts.get(name, config["n_images"]))
        X, kind = make_images(args.images, config["n_images"])
        images_file = os.path.join(folder, f"{name}.npy")
        np.save(images_file, X)
        floor = floor_seconds_fn(name, X)
        repeats = args.wide_repeats if name == "wide_resnet50_2" else args.repeats
        floors, fits = [], []
        for r in range(repeats):
            floors.append(floor())
            fits.append(
                fit_in_child(
                    name,
                    config["n_features"],
                    images_file,
                    tree,
                    args.profile and r == repeats - 1,
                    args.threads,
                )
            )
            floors.append(floor())
        floor_s = statistics.median(w for w, _ in floors)
        floor_cpu = statistics.median(c for _, c in floors)
        fit_s = statistics.median(f["fit_s"] for f in fits)
        own_s = statistics.median(f["own_backbone_s"] for f in fits)
        fit_cpu = statistics.median(f["fit_cpu_s"] for f in fits)
        cold_wall_ratio, cold_cpu_ratio = fit_s / floor_s, fit_cpu / floor_cpu
        warm_s = statistics.median(f.get("fit_warm_s", f["fit_s"]) for f in fits)
        warm_cpu = statistics.median(
            f.get("fit_warm_cpu_s", f["fit_cpu_s"]) for f in fits
        )
        wall_ratio, cpu_ratio = warm_s / floor_s, warm_cpu / floor_cpu
        # With one thread, process CPU time is the work done whatever the
        # other processes on the machine: the steadier figure when loaded.
        by_cpu = torch.get_num_threads() == 1
        ratio = cpu_ratio if by_cpu else wall_ratio
        print(
            f"\n== {name} d={config['n_features']}, {len(X)} {kind} images "
            f"(load {load_average():.2f})\n"
            f"fit {warm_s:.2f} s (cpu {warm_cpu:.1f} s; first fit of a fresh "
            f"process {fit_s:.2f} s, cpu {fit_cpu:.1f} s, peak RSS "
            f"{max(f['peak_rss'] for f in fits) / 2**20:.0f} MiB); one "
            f"fastest backbone pass {floor_s:.2f} s (cpu {floor_cpu:.1f} s) -> fit / "
            f"floor = {wall_ratio:.2f}x wall, {cpu_ratio:.2f}x CPU time (first fit "
            f"{cold_cpu_ratio:.2f}x CPU time); the detector's own network "
            f"{own_s:.2f} s -> fit / own = {warm_s / own_s:.2f}x"
        )
        if fits[-1].get("profile"):
            print("top ops of one fit by self CPU time (torch.profiler):")
            for row in fits[-1]["profile"]:
                print(f"  {row['op']:<40} {row['ms']:9.1f} ms ({row['calls']} calls)")
        figures[name] = {
            "n_images": len(X),
            "images": kind,
            "n_features": config["n_features"],
            "fit_s": fit_s,
            "floor_s": floor_s,
            "own_backbone_s": own_s,
            "floor_cpu_s": floor_cpu,
            "fit_cpu_s": fit_cpu,
            "fit_over_floor": ratio,
            "fit_over_floor_wall": wall_ratio,
            "fit_over_floor_cpu": cpu_ratio,
            "fit_warm_s": warm_s,
            "fit_warm_cpu_s": warm_cpu,
            "first_fit_over_floor_cpu": cold_cpu_ratio,
            "first_fit_over_floor_wall": cold_wall_ratio,
            "ratio_basis": "cpu time (1 thread)" if by_cpu else "wall",
            "fit_over_own_backbone": warm_s / own_s,
            "runs": fits,
            "floors": floors,
        }
        label = (
            f"fit {name} d={config['n_features']} n={len(X)} / one backbone pass"
            + (" (CPU time, 1 thread)" if by_cpu else "")
        )
        if args.label:
            label += f" [{args.label}]"
        if config["target"] is not None and not args.label:
            targets.append(target(label, ratio, config["target"]))
        else:
            figures[name]["info_label"] = label
    print(f"\nload average now {load_average():.2f}")
    print_targets(targets)
    if args.save:
        from _common import info_row

        infos = [
            info_row(figures[n]["info_label"], figures[n]["fit_over_floor"], "x")
            for n in args.configs.split(",")
            if "info_label" in figures[n]
        ]
        name = "fit_time" + (f"_{args.label}" if args.label else "")
        save_result(name, figures, targets=targets, info=infos)


if __name__ == "__main__":
    main()
