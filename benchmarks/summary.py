"""One table of every benchmark target: measured figure, limit, MET / NOT MET.

Reads the JSON files the benchmark scripts write to ``benchmarks/results/``
(machine-specific, ignored by git) and prints one table, then the figures
without a target ("info") and the machines and loads they were measured at.
Run the benchmarks first (each writes its own file)::

    python benchmarks/bench_predict.py
    python benchmarks/bench_fit_time.py
    python benchmarks/bench_fit_time.py --tree /tmp/skpadim-old --label before \\
        --configs wide_resnet50_2      # optional: an older checkout
    python benchmarks/bench_fit_memory.py
    PYTHONPATH=$PWD /tmp/anomalib-env/bin/python benchmarks/bench_anomalib.py
    python benchmarks/summary.py

``--markdown`` prints the table in Markdown instead of plain text.
"""

from __future__ import annotations

import argparse
import glob
import json
import os

RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
ORDER = [
    "predict",
    "fit_time",
    "fit_time_after",
    "fit_time_before",
    "fit_time_before_wrn",
    "fit_memory_padim",
    "fit_memory_patchcore",
    "anomalib",
    "anomalib_cflow",
]


def load_results(folder):
    records = []
    for path in glob.glob(os.path.join(folder, "*.json")):
        with open(path) as f:
            records.append(json.load(f))

    def rank(record):
        name = record["benchmark"]
        return (ORDER.index(name) if name in ORDER else len(ORDER), name)

    return sorted(records, key=rank)


def fmt(value, unit):
    if unit == "x":
        return f"{value:.2f}x"
    if unit == "%":
        return f"{value:+.1f} %"
    if unit == "":
        return f"{value:.4f}"
    return f"{value:.4g}{unit}"


def rows_of(records):
    targets, infos = [], []
    for record in records:
        for t in record["targets"]:
            limit = f"{t['op']} {fmt(t['limit'], t['unit']).lstrip('+')}"
            verdict = "MET" if t["met"] else "NOT MET"
            targets.append((t["name"], fmt(t["value"], t["unit"]), limit, verdict))
        for i in record.get("info", []):
            infos.append((i["name"], fmt(i["value"], i["unit"]), "", "info"))
    return targets, infos


def table(rows, markdown=False):
    header = ("target", "measured", "limit", "verdict")
    if markdown:
        lines = ["| " + " | ".join(header) + " |", "|---|---:|---:|---|"]
        lines += ["| " + " | ".join(row) + " |" for row in rows]
        return "\n".join(lines)
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(4)]
    line = f"{{:<{widths[0]}}}  {{:>{widths[1]}}}  {{:>{widths[2]}}}  {{}}"
    out = [line.format(*header), line.format(*("-" * w for w in widths))]
    out += [line.format(*row) for row in rows]
    return "\n".join(out)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--results", default=RESULTS_DIR)
    parser.add_argument("--markdown", action="store_true")
    parser.add_argument(
        "--benchmarks",
        default=None,
        help="comma-separated result names to show (default: every file)",
    )
    args = parser.parse_args(argv)
    records = load_results(args.results)
    if args.benchmarks:
        wanted = args.benchmarks.split(",")
        records = [r for r in records if r["benchmark"] in wanted]
    if not records:
        raise SystemExit(f"no results in {args.results}: run the benchmarks first")
    targets, infos = rows_of(records)
    print(table(targets + infos, args.markdown))
    met = sum(row[3] == "MET" for row in targets)
    print(f"\n{met} of {len(targets)} targets met.")
    print("\nMeasured on:")
    for record in records:
        m = record["machine"]
        print(
            f"  {record['benchmark']:<21} {record['date']}  {m['cpu']}, "
            f"{m['usable_cores']} cores, torch {m['torch']} ({m['torch_threads']} "
            f"threads), load average {m['load_average_1min']:.1f} at the end"
        )


if __name__ == "__main__":
    main()
