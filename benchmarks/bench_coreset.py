"""Time of the PatchCore coreset selection, ``k_center_greedy``, against a naive loop.

What is measured
----------------
Random float32 features of shape (n_rows, n_features), by default 47,000 x
384: about what ResNet-18 layer2+layer3 gives for 60 training images at
224 px, where anomalib's sampler takes about 89 s on 2 cores. For each
coreset ratio (10% and 1% by default) the selection of
``int(ratio * n_rows)`` rows is timed, projection included, for:

* ``k_center_greedy`` (one vector-matrix product per step on squared
  distances, preallocated buffers, no host syncs);
* a naive but reasonable loop written the way anomalib's ``KCenterGreedy``
  is (after its PR #2968): same Gaussian projection, then per step
  ``torch.linalg.norm(z - z[idx], dim=1)``, ``torch.minimum`` and an
  ``argmax(...).item()``.

Both start from the same row and project with the same matrix, so they make
the same choices up to float32 rounding; the overlap of the two selections is
printed as a check. Wall-clock and process CPU seconds (all threads) are
shown: on a machine shared with other work, the CPU time is the steadier
figure, and with more threads than free cores the wall-clock time of such
short memory-bound steps suffers badly (try ``--threads 1``).

Usage::

    python benchmarks/bench_coreset.py [--n-rows 47000] [--n-features 384]
        [--ratios 0.1,0.01] [--projection-dim 128] [--threads N]
        [--skip-naive]
"""

from __future__ import annotations

import argparse
import platform
import time

import torch

from skpadim._coreset import _generator, _projection_matrix, k_center_greedy


def naive_k_center_greedy(x, n_samples, projection_dim, random_state):
    """The anomalib-style loop, seeded like k_center_greedy for a fair check."""
    generator = _generator(random_state)
    index = int(torch.randint(x.shape[0], (1,), generator=generator))
    projection = _projection_matrix(x.shape[1], projection_dim, generator)
    z = x @ projection
    selected = [index]
    min_distances = None
    for _ in range(n_samples - 1):
        distances = torch.linalg.norm(z - z[index], dim=1)
        if min_distances is None:
            min_distances = distances
        else:
            min_distances = torch.minimum(min_distances, distances)
        min_distances[index] = 0
        index = int(torch.argmax(min_distances).item())
        selected.append(index)
    return torch.tensor(selected)


def timed(function, *args, **kwargs):
    """Wall-clock and process CPU seconds (all threads) of one call."""
    wall, cpu = time.perf_counter(), time.process_time()
    result = function(*args, **kwargs)
    return (time.perf_counter() - wall, time.process_time() - cpu), result


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n-rows", type=int, default=47_000)
    parser.add_argument("--n-features", type=int, default=384)
    parser.add_argument("--ratios", default="0.1,0.01")
    parser.add_argument("--projection-dim", type=int, default=128)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--skip-naive", action="store_true")
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    x = torch.randn(
        args.n_rows, args.n_features, generator=torch.Generator().manual_seed(0)
    )
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"{platform.processor() or platform.machine()}; x {tuple(x.shape)}, "
        f"projection_dim={args.projection_dim}"
    )
    print(
        f"{'ratio':>6} {'n_samples':>9} {'ours s (cpu)':>14} {'naive s (cpu)':>14} "
        f"{'naive/ours':>10} {'overlap':>8}"
    )
    for ratio in (float(r) for r in args.ratios.split(",")):
        n_samples = max(1, int(ratio * args.n_rows))
        ours_s, ours = timed(
            k_center_greedy,
            x,
            n_samples,
            projection_dim=args.projection_dim,
            random_state=0,
        )
        ours_col = f"{ours_s[0]:.2f} ({ours_s[1]:.2f})"
        if args.skip_naive:
            print(f"{ratio:>6} {n_samples:>9} {ours_col:>14}")
            continue
        naive_s, naive = timed(
            naive_k_center_greedy, x, n_samples, args.projection_dim, 0
        )
        overlap = len(set(ours.tolist()) & set(naive.tolist())) / n_samples
        naive_col = f"{naive_s[0]:.2f} ({naive_s[1]:.2f})"
        print(
            f"{ratio:>6} {n_samples:>9} {ours_col:>14} {naive_col:>14} "
            f"{naive_s[0] / ours_s[0]:>10.2f} {overlap:>8.1%}"
        )


if __name__ == "__main__":
    main()
