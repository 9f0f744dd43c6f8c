"""Time of PaDiM's whitening factors: batched triangular solve vs alternatives.

What is measured
----------------
``skpadim._gaussian.whitening_factors`` turns per-position covariances into
inverse Cholesky factors, a chunk of ``--chunk`` positions at a time: one
batched ``torch.linalg.cholesky_ex`` and one batched
``torch.linalg.solve_triangular(L, I)``. On random ``--n-features``-square
covariances (the same for every variant) this script times, per chunk:

* ``cholesky_ex`` (the factorisation, for scale);
* ``solve_triangular`` as ``whitening_factors`` calls it, with the current
  torch threads and with one thread (``torch.set_num_threads(1)`` around it);
* a loop of LAPACK ``dtrtri`` calls (``scipy.linalg.lapack``), the direct
  triangular inverse, one matrix at a time.

All give the same factors (max difference printed). Variants alternate,
``--repeats`` rounds; medians and minima are printed, with the load average:
a batched op that splits tiny per-matrix work over threads pays a thread
synchronisation per matrix, which a loaded machine turns into long waits.

Usage::

    python benchmarks/bench_whitening.py [--chunk 256] [--n-features 100]
        [--repeats 5] [--threads N]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import numpy as np
import scipy.linalg
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _common import describe_machine, load_average, machine  # noqa: E402


def one_thread(fn):
    def run():
        old = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            return fn()
        finally:
            torch.set_num_threads(old)

    return run


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--chunk", type=int, default=256)
    parser.add_argument("--n-features", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    print(describe_machine(machine()))
    gen = torch.Generator().manual_seed(0)
    d = args.n_features
    a = torch.randn(args.chunk, d, 2 * d, dtype=torch.float64, generator=gen)
    cov = a @ a.mT / (2 * d) + 0.01 * torch.eye(d, dtype=torch.float64)
    factor, _ = torch.linalg.cholesky_ex(cov)
    eye = torch.eye(d, dtype=torch.float64)

    def solve():
        return torch.linalg.solve_triangular(factor, eye.expand_as(factor), upper=False)

    factor_np = factor.numpy()

    def trtri_loop():
        out = np.empty_like(factor_np)
        for i, matrix in enumerate(factor_np):
            out[i], _ = scipy.linalg.lapack.dtrtri(matrix, lower=1)
        return torch.from_numpy(out)

    variants = {
        "cholesky_ex": lambda: torch.linalg.cholesky_ex(cov)[0],
        f"solve_triangular ({torch.get_num_threads()} threads)": solve,
        "solve_triangular (1 thread)": one_thread(solve),
        "LAPACK dtrtri loop": trtri_loop,
    }
    reference = solve()
    times = {name: [] for name in variants}
    for _ in range(args.repeats):
        for name, fn in variants.items():
            start = time.perf_counter()
            out = fn()
            times[name].append(time.perf_counter() - start)
            if name != "cholesky_ex":
                diff = (out - reference).abs().max().item()
                assert diff < 1e-8, (name, diff)
    print(
        f"{args.chunk} positions x {d}x{d} float64, {args.repeats} interleaved "
        f"rounds; load average {load_average():.2f}"
    )
    for name, values in times.items():
        print(
            f"  {name:<32} median {1000 * statistics.median(values):9.1f} ms, "
            f"min {1000 * min(values):9.1f} ms"
        )


if __name__ == "__main__":
    main()
