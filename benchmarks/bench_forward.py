"""The fastest float32 forward pass of a backbone on this machine: the floor.

What is measured
----------------
For each backbone (random-init weights: timings do not depend on weight
values), images per second of its truncated feature network (default taps),
under ``torch.inference_mode``, on ``--n-batches`` random float32 batches of
``--batch-size`` images of ``--image-size`` pixels, for these variants:

* ``plain``: the network as ``build_feature_network`` returns it, NCHW input;
* ``channels_last``: weights and input in ``torch.channels_last``;
* ``fused``: BatchNorm folded into the convolutions
  (``skpadim.backbones._inference.fuse_conv_bn``), NCHW;
* ``fused+channels_last``: both, which is what
  ``optimize_for_inference(network, "cpu")`` returns on a CPU with oneDNN;
* ``jit.freeze``: ``torch.jit.trace`` + ``torch.jit.freeze`` +
  ``torch.jit.optimize_for_inference`` of the plain network (which folds
  BatchNorm and may convert to oneDNN layouts itself). Deprecated, and the
  trace bakes Lite0's input-size dependent padding in, so it is only a
  comparison;
* ``mkldnn``: ``torch.utils.mkldnn.to_mkldnn`` of the fused network with
  oneDNN tensors in and out (ResNets only: oneDNN tensors lack ``hardtanh``,
  i.e. Lite0's ReLU6);
* ``torch.compile`` with ``--compile`` (off by default: tens of seconds of
  warm-up and a C++ compiler needed).

How
---
Every variant is warmed up on one batch, then the variants are timed in
turn, ``--repeats`` rounds, each over all the batches, so that all see the
same load; the median and the best round are printed. Outputs of each
variant are checked against the plain network's (max |difference| relative
to the tap's max |value|). The fastest variant's best round is the floor
that other benchmarks compare with; import it with::

    sys.path.insert(0, "benchmarks")
    from bench_forward import fastest_forward_images_per_second

Usage::

    python benchmarks/bench_forward.py [--backbones resnet18,efficientnet_lite0]
        [--image-size 224] [--batch-size 16] [--n-batches 2] [--repeats 5]
        [--threads N] [--compile]
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import time
import warnings

import torch

from skpadim.backbones import build_feature_network
from skpadim.backbones._inference import fuse_conv_bn, optimize_for_inference

FLOOR_VARIANT = "fused+channels_last"


def _batches(image_size, batch_size, n_batches, seed=0):
    gen = torch.Generator().manual_seed(seed)
    shape = (batch_size, 3, image_size, image_size)
    return [torch.randn(shape, generator=gen) for _ in range(n_batches)]


def _seconds(forward, batches):
    start = time.perf_counter()
    with torch.inference_mode():
        for batch in batches:
            forward(batch)
    return time.perf_counter() - start


def _network(backbone, weights=None):
    # Seeded, so that every variant and run times the same weights.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return build_feature_network(backbone, None, weights)


def fastest_forward_images_per_second(
    backbone, image_size=224, batch_size=16, n_batches=2, *, repeats=3, weights=None
):
    """Images per second of the fastest float32 CPU forward of a backbone.

    The network is the one :func:`optimize_for_inference` makes (BatchNorm
    folded, the preferred memory format), which was the fastest variant
    measured by this script; the input batches are given in its memory
    format, as the runtime does.

    Parameters
    ----------
    backbone : str
        A registered backbone name; its default taps are used.
    image_size : int, default=224
        Height and width of the input images.
    batch_size : int, default=16
        Images per forward call.
    n_batches : int, default=2
        Forward calls per timing.
    repeats : int, default=3
        Timings; the best (least disturbed by other processes) is returned.
    weights : {"DEFAULT"} or None, default=None
        As in ``build_feature_network``; random weights time the same.

    Returns
    -------
    images_per_second : float
        ``batch_size * n_batches`` divided by the shortest timing, after one
        warm-up batch.
    """
    network, memory_format = optimize_for_inference(_network(backbone, weights), "cpu")
    batches = [
        b.contiguous(memory_format=memory_format)
        for b in _batches(image_size, batch_size, n_batches)
    ]
    _seconds(network, batches[:1])
    best = min(_seconds(network, batches) for _ in range(repeats))
    return batch_size * n_batches / best


def _variants(network, sample, use_compile):
    """name -> (forward, memory format of its input); skips what fails."""
    nchw, nhwc = torch.contiguous_format, torch.channels_last
    fused = fuse_conv_bn(network)
    variants = {
        "plain": (network, nchw),
        "channels_last": (copy.deepcopy(network).to(memory_format=nhwc), nhwc),
        "fused": (fused, nchw),
        FLOOR_VARIANT: optimize_for_inference(network, "cpu"),
    }
    with warnings.catch_warnings():
        # Deprecation and tracer warnings of the comparison-only variants.
        warnings.simplefilter("ignore")
        try:
            traced = torch.jit.trace(copy.deepcopy(network), sample, check_trace=False)
            variants["jit.freeze"] = (
                torch.jit.optimize_for_inference(torch.jit.freeze(traced)),
                nchw,
            )
        except Exception as exc:  # noqa: BLE001  (report and go on)
            print(f"  jit.freeze: not available ({type(exc).__name__})")
        try:
            from torch.utils import mkldnn

            onednn = mkldnn.to_mkldnn(copy.deepcopy(fused))

            def onednn_forward(x):
                return [tap.to_dense() for tap in onednn(x.to_mkldnn())]

            with torch.inference_mode():
                onednn_forward(sample)
            variants["mkldnn"] = (onednn_forward, nchw)
        except Exception as exc:  # noqa: BLE001
            print(f"  mkldnn: not available ({type(exc).__name__}: {exc})"[:100])
        if use_compile:
            optimized, memory_format = optimize_for_inference(network, "cpu")
            compiled = torch.compile(optimized)
            start = time.perf_counter()
            with torch.inference_mode():
                compiled(sample.contiguous(memory_format=memory_format))
            print(f"  torch.compile warm-up: {time.perf_counter() - start:.1f} s")
            variants["compile(fused+cl)"] = (compiled, memory_format)
    return variants


def _max_relative_error(outputs, references):
    return max(
        ((out - ref).abs().max() / ref.abs().max()).item()
        for out, ref in zip(outputs, references)
    )


def bench_backbone(backbone, args):
    """Time every variant of one backbone; return name -> list of images/s."""
    network = _network(backbone)
    batches = _batches(args.image_size, args.batch_size, args.n_batches)
    variants = _variants(network, batches[0][:2], args.compile)
    inputs = {
        fmt: [b.contiguous(memory_format=fmt) for b in batches]
        for fmt in {fmt for _, fmt in variants.values()}
    }
    with torch.inference_mode():
        reference = network(batches[0])
        errors = {
            name: _max_relative_error(forward(inputs[fmt][0]), reference)
            for name, (forward, fmt) in variants.items()
        }
    n_images = args.batch_size * args.n_batches
    rates = {name: [] for name in variants}
    for forward, fmt in variants.values():  # warm-up: kernel choice, caches
        _seconds(forward, inputs[fmt][:1])
    for _ in range(args.repeats):
        for name, (forward, fmt) in variants.items():
            rates[name].append(n_images / _seconds(forward, inputs[fmt]))
    return rates, errors


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--backbones", default="resnet18,efficientnet_lite0")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--n-batches", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--compile", action="store_true")
    args = parser.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)

    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}; "
        f"{args.image_size} px, batch {args.batch_size} x {args.n_batches}, "
        f"{args.repeats} interleaved rounds"
    )
    for backbone in args.backbones.split(","):
        print(f"\n{backbone}")
        rates, errors = bench_backbone(backbone, args)
        plain = statistics.median(rates["plain"])
        print(
            f"  {'variant':22s} {'median':>8s} {'best':>8s} {'vs plain':>9s}"
            f"  max rel. error"
        )
        for name, values in rates.items():
            median = statistics.median(values)
            print(
                f"  {name:22s} {median:8.1f} {max(values):8.1f} "
                f"{median / plain:8.2f}x  {errors[name]:.1e}"
            )
        fastest = max(rates, key=lambda name: statistics.median(rates[name]))
        print(
            f"  fastest (median): {fastest}; the floor, as "
            f"fastest_forward_images_per_second gives it, is {FLOOR_VARIANT}: "
            f"{max(rates[FLOOR_VARIANT]):.1f} images/s (best round)"
        )
    print(f"\nload average after: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
