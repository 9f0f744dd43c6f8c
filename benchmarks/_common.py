"""Helpers shared by the benchmark scripts: machine description, timing,
targets, and the JSON result files that ``benchmarks/summary.py`` reads.

Each benchmark writes ``benchmarks/results/<name>.json`` (machine-specific,
ignored by git) holding the machine it ran on, its figures and its targets,
each target as ``{"name", "value", "limit", "op", "unit", "met", "note"}``.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import statistics
import time

RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
MIB = 2**20


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


def usable_cores():
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count()


def load_average():
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")


# glibc malloc hands blocks over 32 MiB (a batch's first activations) back to
# the kernel when they are freed, so every batch page-faults them in again:
# about 110k minor faults and 20 % of a resnet18 forward of 64 images at
# 224 px, whatever runs the network. With mmap off and trimming out of reach,
# freed memory is reused instead. Both the floor and skpadim run in the
# regime chosen; the environment must be set before the process starts.
STEADY_ALLOCATOR = {"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": str(2**40)}


def steady_allocator_active():
    return all(os.environ.get(k) == v for k, v in STEADY_ALLOCATOR.items())


def reexec_with_steady_allocator(argv, opt_out="--default-allocator"):
    """Restart this script with :data:`STEADY_ALLOCATOR` in its environment,
    unless it is there already or ``opt_out`` is in ``argv`` (Linux/glibc
    only; elsewhere the flag has no effect and the script runs as is)."""
    import sys

    if opt_out in argv or steady_allocator_active() or sys.platform != "linux":
        return
    os.environ.update(STEADY_ALLOCATOR)
    sys.stdout.flush()
    os.execv(sys.executable, [sys.executable, *sys.argv])


def allocator_description():
    if steady_allocator_active():
        return (
            "glibc malloc without mmap or trimming ("
            + " ".join(f"{k}={v}" for k, v in STEADY_ALLOCATOR.items())
            + ")"
        )
    return "default glibc malloc (freed large blocks go back to the kernel)"


def machine():
    """A dict describing this machine and the torch build."""
    import torch

    info = {
        "cpu": cpu_model(),
        "usable_cores": usable_cores(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "load_average_1min": round(load_average(), 2),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
    try:
        with open("/proc/meminfo") as f:
            total = int(f.readline().split()[1]) * 1024
        info["memory_gib"] = round(total / 2**30, 1)
    except (OSError, ValueError, IndexError):
        pass
    return info


def describe_machine(info=None):
    info = info or machine()
    return (
        f"CPU: {info['cpu']}, {info['usable_cores']} usable cores, "
        f"{info.get('memory_gib', '?')} GiB; torch {info['torch']} with "
        f"{info['torch_threads']} threads; Python {info['python']}; "
        f"load average (1 min) {info['load_average_1min']:.2f}"
    )


class Timer:
    """Wall-clock and process CPU seconds of one call (device work included)."""

    def __init__(self, device="cpu"):
        import torch

        self.device = torch.device(device)

    def _sync(self):
        if self.device.type == "cuda":
            import torch

            torch.cuda.synchronize(self.device)

    def __call__(self, fn):
        self._sync()
        wall, cpu = time.perf_counter(), time.process_time()
        fn()
        self._sync()
        return time.perf_counter() - wall, time.process_time() - cpu


def interleaved(measures, repeats, timer=None, warmup=1):
    """Time every callable of ``measures`` in turn, ``warmup + repeats`` rounds.

    Returns name -> list of (wall, cpu) seconds of the timed rounds, so that a
    change of load during the run affects every measure alike.
    """
    timer = timer or Timer()
    runs = {name: [] for name in measures}
    for round_ in range(warmup + repeats):
        for name, fn in measures.items():
            t = timer(fn)
            if round_ >= warmup:
                runs[name].append(t)
    return runs


def median_wall(runs):
    return statistics.median(w for w, _ in runs)


def median_cpu(runs):
    return statistics.median(c for _, c in runs)


def target(name, value, limit, op="<=", unit="x", note=""):
    """A target record; ``op`` is "<=", "<" or ">="."""
    met = {
        "<=": value <= limit,
        "<": value < limit,
        ">=": value >= limit,
    }[op]
    return {
        "name": name,
        "value": float(value),
        "limit": float(limit),
        "op": op,
        "unit": unit,
        "met": bool(met),
        "note": note,
    }


def info_row(name, value, unit="", note=""):
    """A measured figure without a target (shown as 'info' in the summary)."""
    return {"name": name, "value": float(value), "unit": unit, "note": note}


def print_targets(targets):
    for t in targets:
        verdict = "MET" if t["met"] else "NOT MET"
        print(
            f"target {t['name']}: {t['value']:.3g}{t['unit']} {t['op']} "
            f"{t['limit']:g}{t['unit']} -> {verdict}"
        )


def save_result(name, payload, *, targets=(), info=()):
    """Write ``benchmarks/results/<name>.json`` and return its path."""
    os.makedirs(RESULTS_DIR, exist_ok=True)
    record = {
        "benchmark": name,
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "machine": machine(),
        "targets": list(targets),
        "info": list(info),
        "figures": payload,
    }
    path = os.path.join(RESULTS_DIR, f"{name}.json")
    with open(path, "w") as f:
        json.dump(record, f, indent=1, default=_jsonable)
    print(f"results written to {os.path.relpath(path)}")
    return path


def _jsonable(value):
    try:
        import numpy as np

        if isinstance(value, np.generic):
            return value.item()
        if isinstance(value, np.ndarray):
            return value.tolist()
    except ImportError:  # pragma: no cover
        pass
    return str(value)


def profile_table(fn, row_limit=12, baseline=None, runs=3):
    """Top ops by self CPU time of one call of ``fn`` (torch.profiler).

    Each callable is profiled ``runs`` times and every op's *smallest* self
    time is kept: on a shared machine a descheduled thread inflates whichever
    op was running, and the minimum is the least disturbed estimate. With
    ``baseline`` (another callable, e.g. the backbone alone on the same
    images), each op's self time in the baseline is subtracted, so the rows
    are what ``fn`` spends *above* the baseline. Returns (rows, total_ms,
    baseline_total_ms), rows as dicts {"op", "ms", "calls"}.
    """
    from torch.profiler import ProfilerActivity, profile

    def self_times(call):
        best = {}
        for _ in range(runs):
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                call()
            times = {}
            for event in prof.key_averages():
                entry = times.setdefault(event.key, [0.0, 0])
                entry[0] += event.self_cpu_time_total / 1000.0
                entry[1] += event.count
            for op, (ms, calls) in times.items():
                if op not in best or ms < best[op][0]:
                    best[op] = [ms, calls]
        return best

    fn()  # warm
    ours = self_times(fn)
    base = self_times(baseline) if baseline is not None else {}
    rows = []
    for op, (ms, calls) in ours.items():
        extra = ms - base.get(op, [0.0, 0])[0]
        rows.append({"op": op, "ms": round(extra, 2), "calls": calls})
    rows.sort(key=lambda r: -r["ms"])
    total = sum(v[0] for v in ours.values())
    base_total = sum(v[0] for v in base.values())
    return rows[:row_limit], total, base_total
