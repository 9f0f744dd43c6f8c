"""A small mutation runner: do the tests fail when the code is wrong?

Each mutant is one plausible bug in a core module: (file, exact original
snippet, replacement, test modules that should catch it). For each mutant the
runner copies the pristine file, applies the replacement, runs the mapped test
modules (with a timeout) and records whether they failed (killed) or passed
(survived), then restores the file. It never touches the checkout it is run
from: the package and its tests are copied into scratch directories (one per
worker) and the mutants are applied there.

Tests that already fail on the pristine code are found first (a baseline run
of each test module) and deselected, so that a mutant is only ever "killed"
by a test that passes on the real code.

Usage::

    python tools/mutation.py                 # every mutant, 2 workers
    python tools/mutation.py -j 1 --only maps_blur_radius knn_rerank_own
    python tools/mutation.py --markdown tools/MUTATION.md
    python tools/mutation.py --list

Exit status: 0 when the kill rate reaches ``--target`` (default 0.95).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


@dataclasses.dataclass(frozen=True)
class Mutant:
    name: str
    file: str  # relative to the package, skpadim/
    original: str
    replacement: str
    tests: tuple  # test modules, relative to tests/
    what: str


def m(name, file, original, replacement, tests, what):
    return Mutant(name, file, original, replacement, tuple(tests), what)


MUTANTS = [
    # ------------------------------------------------------------ _base.py
    m(
        "base_predict_strict",
        "_base.py",
        "return np.where(self.decision_function(X) >= 0, 1, -1)",
        "return np.where(self.decision_function(X) > 0, 1, -1)",
        ["test_family.py"],
        "predict: a decision of exactly 0 becomes an outlier (>= -> >)",
    ),
    m(
        "base_fit_predict_strict",
        "_base.py",
        "return np.where(self.train_scores_ - self.offset_ >= 0, 1, -1)",
        "return np.where(self.train_scores_ - self.offset_ > 0, 1, -1)",
        ["test_detector.py", "test_mutation_kills_base.py"],
        "fit_predict: >= -> >",
    ),
    m(
        "base_offset_upper_quantile",
        "_base.py",
        "np.percentile(train_scores, 100.0 * self.contamination)",
        "np.percentile(train_scores, 100.0 * (1 - self.contamination))",
        ["test_detector.py"],
        "offset_ from the wrong tail of the training scores",
    ),
    m(
        "base_offset_margin_sign",
        "_base.py",
        "self.offset_ = quantile - 1e-4 * (1.0 + abs(quantile))",
        "self.offset_ = quantile + 1e-4 * (1.0 + abs(quantile))",
        ["test_family.py", "test_hardening.py", "test_mutation_kills_base.py"],
        "offset_ margin raised instead of lowered",
    ),
    m(
        "base_training_scores_in_sample",
        "_base.py",
        "head, features, frame_shape, sigma, sample_ids=batch_ids",
        "head, features, frame_shape, sigma, sample_ids=None",
        ["test_detector.py"],
        "training images scored in-sample (dishonest train_scores_)",
    ),
    m(
        "base_chunk_ids_restart",
        "_base.py",
        "    position = start\n",
        "    position = 0\n",
        ["test_mutation_kills_base.py", "test_parallel.py"],
        "training ids restart at 0 in each parallel chunk",
    ),
    m(
        "base_partial_fit_forgets_scores",
        "_base.py",
        "earlier = np.empty(0) if previous is None else self.train_scores_",
        "earlier = np.empty(0)",
        ["test_detector.py", "test_mutation_kills_base.py"],
        "partial_fit drops the earlier train_scores_",
    ),
    m(
        "base_set_params_no_rollback",
        "_base.py",
        "super().set_params(**previous)  # never keep an invalid value",
        "pass",
        ["test_hardening.py", "test_bad_input.py"],
        "set_params keeps an invalid value on a fitted detector",
    ),
    m(
        "base_scores_use_live_sigma",
        "_base.py",
        "            self.frame_shape_,\n            self.sigma_,\n",
        "            self.frame_shape_,\n            float(self.sigma),\n",
        ["test_hardening.py", "test_inference.py"],
        "scoring uses the unfitted sigma parameter instead of sigma_",
    ),
    # -------------------------------------------------------- _gaussian.py
    m(
        "gaussian_loo_c_not_squared",
        "_gaussian.py",
        "loo = c**2 * (n - 2) * h / (1 - c * h).clamp_min(1e-12)",
        "loo = c * (n - 2) * h / (1 - c * h).clamp_min(1e-12)",
        ["test_gaussian.py"],
        "leave-one-out formula: c instead of c^2",
    ),
    m(
        "gaussian_loo_h_over_n",
        "_gaussian.py",
        "h = distances.double() ** 2 / (n - 1)",
        "h = distances.double() ** 2 / n",
        ["test_gaussian.py"],
        "leave-one-out formula: h = d^2 / n",
    ),
    m(
        "gaussian_whitening_transposed",
        "_gaussian.py",
        "return torch.bmm(centred, whitening.transpose(1, 2)).norm(dim=2)",
        "return torch.bmm(centred, whitening).norm(dim=2)",
        ["test_gaussian.py"],
        "Mahalanobis with W^T instead of W",
    ),
    m(
        "gaussian_upper_solve",
        "_gaussian.py",
        "factor, eye.expand_as(factor), upper=False",
        "factor.transpose(1, 2), eye.expand_as(factor), upper=True",
        ["test_gaussian.py"],
        "whitening factor L^-T instead of L^-1",
    ),
    # --------------------------------------------------------- _moments.py
    m(
        "moments_biased_covariance",
        "_moments.py",
        "covariance = self.scatter[positions] / (self.count - 1)",
        "covariance = self.scatter[positions] / self.count",
        ["test_gaussian.py"],
        "biased covariance (n instead of n - 1)",
    ),
    m(
        "moments_chan_update_weight",
        "_moments.py",
        "delta.unsqueeze(2), delta.unsqueeze(1), alpha=self.count * n_new / total",
        "delta.unsqueeze(2), delta.unsqueeze(1), alpha=n_new / total",
        ["test_gaussian.py"],
        "Chan update: wrong weight of the between-batch term",
    ),
    m(
        "moments_chan_merge_weight",
        "_moments.py",
        "alpha=self.count * other.count / total,",
        "alpha=self.count * other.count / total / 2,",
        ["test_gaussian.py"],
        "Chan merge: between-set term halved",
    ),
    m(
        "moments_mean_update",
        "_moments.py",
        "self.mean.add_(delta, alpha=n_new / total)",
        "self.mean.add_(delta, alpha=n_new / max(total - 1, 1))",
        ["test_gaussian.py"],
        "running mean updated with the wrong weight",
    ),
    # ------------------------------------------------------------ _maps.py
    m(
        "maps_blur_radius",
        "_maps.py",
        "radius = int(truncate * sigma + 0.5)",
        "radius = int(truncate * sigma)",
        ["test_maps.py", "test_mutation_kills_maps.py"],
        "blur radius truncated instead of rounded (differs from scipy)",
    ),
    m(
        "maps_whole_sample_reflect",
        "_maps.py",
        "return torch.where(period < size, period, 2 * size - 1 - period)",
        "return torch.where(period < size, period, (2 * size - 2 - period).abs())",
        ["test_maps.py"],
        "whole-sample reflection instead of scipy's half-sample",
    ),
    m(
        "maps_upsampling_align_corners",
        "_maps.py",
        'F.interpolate(eye, size=size_out, mode="linear", align_corners=False)',
        'F.interpolate(eye, size=size_out, mode="linear", align_corners=True)',
        ["test_maps.py", "test_detector.py"],
        "map upsampling with align_corners=True",
    ),
    m(
        "maps_image_score_mean",
        "_maps.py",
        "return maps.flatten(1).amax(dim=1)",
        "return maps.flatten(1).mean(dim=1)",
        ["test_maps.py"],
        "image score: mean of the map instead of its maximum",
    ),
    m(
        "maps_blur_before_upsampling",
        "_maps.py",
        "blur_matrix(size_out, sigma) @ upsampling_matrix(size_in, size_out)",
        "upsampling_matrix(size_in, size_out) @ blur_matrix(size_in, sigma)",
        ["test_maps.py"],
        "maps blurred on the patch grid, then upsampled",
    ),
    # -------------------------------------------------------- _features.py
    m(
        "features_channel_boundary",
        "_features.py",
        "local = indices[(indices >= start) & (indices < stop)] - start",
        "local = indices[(indices > start) & (indices < stop)] - start",
        ["test_features.py", "test_detector.py", "test_mutation_kills_features.py"],
        "channel selection drops the first channel of each tap",
    ),
    m(
        "features_pca_smallest",
        "_features.py",
        "components = eigvecs[:, ::-1][:, :n_features].T",
        "components = eigvecs[:, :n_features].T",
        ["test_features.py"],
        "PCA keeps the trailing (smallest) directions",
    ),
    m(
        "features_pca_no_centring",
        "_features.py",
        "return sum(parts) - self.pca_shift",
        "return sum(parts)",
        ["test_features.py", "test_detector.py"],
        "PCA projection without subtracting the mean",
    ),
    m(
        "images_normalise_multiply_std",
        "_images.py",
        "return (batch - mean) / std",
        "return (batch - mean) * std",
        ["test_features.py"],
        "input normalisation multiplies by std",
    ),
    m(
        "features_nearest_is_bilinear",
        "_features.py",
        'return F.interpolate(tap, size=size, mode="nearest")',
        'return F.interpolate(tap, size=size, mode="bilinear", align_corners=False)',
        ["test_detector.py", "test_mutation_kills_features.py"],
        "nearest upsampling of coarse taps replaced by bilinear",
    ),
    m(
        "features_bilinear_align_corners",
        "_features.py",
        'return F.interpolate(tap, size=size, mode="bilinear", align_corners=False)',
        'return F.interpolate(tap, size=size, mode="bilinear", align_corners=True)',
        ["test_patchcore.py", "test_mutation_kills_features.py"],
        "bilinear tap upsampling with align_corners=True",
    ),
    m(
        "features_patch_avg_excludes_pad",
        "_features.py",
        "tap, self.patch_size, stride=1, padding=self.patch_size // 2",
        "tap,\n"
        "                        self.patch_size,\n"
        "                        stride=1,\n"
        "                        padding=self.patch_size // 2,\n"
        "                        count_include_pad=False,",
        ["test_patchcore.py", "test_mutation_kills_features.py"],
        "patch averaging ignores the zero padding",
    ),
    # ---------------------------------------------------------- _images.py
    m(
        "images_uint16_by_255",
        "_images.py",
        "image = image.astype(np.float32) / np.float32(np.iinfo(image.dtype).max)",
        "image = image.astype(np.float32) / np.float32(255)",
        ["test_images.py"],
        "uint16 images divided by 255",
    ),
    m(
        "images_rgba_not_ambiguous",
        "_images.py",
        "if X.ndim == 3 and X.shape[2] in (3, 4):",
        "if X.ndim == 3 and X.shape[2] == 3:",
        ["test_images.py"],
        "an (H, W, 4) array is taken as a batch of grayscale images",
    ),
    # ------------------------------------------------------------- _knn.py
    m(
        "knn_rerank_own",
        "_knn.py",
        '        exact.masked_fill_(own, float("inf"))',
        "        pass",
        ["test_knn.py"],
        "exact re-ranking forgets the own-group exclusion",
    ),
    m(
        "knn_propose_alpha",
        "_knn.py",
        "squared = torch.addmm(block.square().sum(dim=1), queries, block.T, alpha=-2)",
        "squared = torch.addmm(block.square().sum(dim=1), queries, block.T, alpha=-1)",
        ["test_knn.py"],
        "candidate distances |b|^2 - q.b (wrong expansion)",
    ),
    m(
        "knn_ties_unstable",
        "_knn.py",
        "    indices, order = torch.sort(indices, dim=1)\n",
        "    indices, order = torch.sort(indices, dim=1, descending=True)\n",
        ["test_knn.py"],
        "ties broken towards the highest index",
    ),
    # --------------------------------------------------------- _coreset.py
    m(
        "coreset_no_centre_norm",
        "_coreset.py",
        "centre[dims + 1 :] = column[dims, :]",
        "centre[dims + 1 :] = 0.0",
        ["test_coreset.py"],
        "greedy distances miss the |c|^2 term",
    ),
    m(
        "coreset_running_max",
        "_coreset.py",
        "torch.minimum(min_sq, sq, out=min_sq)",
        "min_sq.copy_(sq)",
        ["test_coreset.py"],
        "distance to the newest centre only, not the running minimum",
    ),
    # ---------------------------------------------------- _memory_bank.py
    m(
        "bank_reweight_no_complement",
        "_memory_bank.py",
        "weight[part] = 1 - torch.softmax(distances, dim=1)[:, 0]",
        "weight[part] = torch.softmax(distances, dim=1)[:, 0]",
        ["test_patchcore.py"],
        "PatchCore reweighting: softmax weight instead of 1 - weight",
    ),
    m(
        "bank_own_image_groups",
        "_memory_bank.py",
        "groups = sample_ids.to(device).repeat_interleave(h * w)",
        "groups = sample_ids.to(device).repeat(h * w)",
        ["test_patchcore.py"],
        "own-image exclusion: patches assigned to the wrong images",
    ),
    m(
        "bank_eligible_ignores_own",
        "_memory_bank.py",
        "        return n_bank - own\n",
        "        return torch.full_like(own, n_bank)\n",
        ["test_patchcore.py"],
        "reweighting support not capped by the image's own entries",
    ),
    m(
        "bank_coreset_target_floor",
        "_memory_bank.py",
        "return max(1, min(math.ceil(coreset_size * n_patches), n_patches))",
        "return max(1, min(int(coreset_size * n_patches), n_patches))",
        ["test_patchcore.py", "test_coreset.py", "test_mutation_kills_bank.py"],
        "coreset size rounded down instead of up",
    ),
    # ----------------------------------------------------------- _spade.py
    m(
        "spade_image_score_nearest_only",
        "_spade.py",
        "image_scores = distances.mean(dim=1)",
        "image_scores = distances[:, 0]",
        ["test_spade.py"],
        "SPADE image score: first neighbour instead of mean of k",
    ),
    m(
        "spade_exclusion_shifted",
        "_spade.py",
        "bank_groups = torch.arange(n_train, device=device)",
        "bank_groups = torch.arange(n_train, device=device).roll(1)",
        ["test_spade.py"],
        "SPADE excludes the wrong training image",
    ),
    m(
        "spade_pixel_score_first",
        "_spade.py",
        "level_map = distances.mean(dim=1).view(1, 1, h, w)",
        "level_map = distances[:, :1].view(1, 1, h, w)",
        ["test_spade.py"],
        "SPADE pixel score: first neighbour instead of mean",
    ),
    # ----------------------------------------------------- _gaussian_ad.py
    m(
        "gad_no_shrinkage",
        "_gaussian_ad.py",
        "shrunk = (1.0 - shrinkage) * covariance",
        "shrunk = (1.0 - shrinkage / 2) * covariance",
        ["test_gaussian_ad.py"],
        "Ledoit-Wolf shrinkage applied by half",
    ),
    m(
        "gad_unbiased_covariance",
        "_gaussian_ad.py",
        "covariance = centred.T @ centred / len(x)",
        "covariance = centred.T @ centred / (len(x) - 1)",
        ["test_gaussian_ad.py"],
        "Ledoit-Wolf on the unbiased covariance (sklearn uses the biased one)",
    ),
    m(
        "gad_no_cross_fitting",
        "_gaussian_ad.py",
        "fold_head = LevelGaussians.fit([x[train] for x in levels])",
        "fold_head = head",
        ["test_gaussian_ad.py"],
        "training scores in-sample instead of cross-fitted",
    ),
    m(
        "gad_squared_distance",
        "_gaussian_ad.py",
        "total = total + squared.clamp_min(0).sqrt()",
        "total = total + squared.clamp_min(0)",
        ["test_gaussian_ad.py"],
        "scores sum squared distances over levels",
    ),
    # ------------------------------------------------- _flow.py / _cflow.py
    m(
        "flow_log_det_sign",
        "_flow.py",
        "log_det = s.sum(dim=1) + torch.log(scale).sum()",
        "log_det = -s.sum(dim=1) + torch.log(scale).sum()",
        ["test_flow.py"],
        "coupling log-determinant with the wrong sign of s",
    ),
    m(
        "flow_global_scale_log_det",
        "_flow.py",
        "log_det = s.sum(dim=1) + torch.log(scale).sum()",
        "log_det = s.sum(dim=1) + torch.log(scale).mean()",
        ["test_flow.py"],
        "log-determinant of the global scale averaged, not summed",
    ),
    m(
        "flow_normal_constant",
        "_flow.py",
        "return log_density / n_features - _HALF_LOG_2PI",
        "return log_density / n_features + _HALF_LOG_2PI",
        ["test_flow.py"],
        "log-density with the wrong sign of ln(2 pi) / 2",
    ),
    m(
        "cflow_batch_max",
        "_cflow.py",
        "likelihood = torch.exp(log_prob - float(self.log_prob_max_[level]))",
        "likelihood = torch.exp(log_prob - log_prob.max())",
        ["test_cflow.py"],
        "normalising constant from the scored batch, not from training",
    ),
    # ----------------------------------------------------------- _padim.py
    m(
        "padim_partial_fit_forgets",
        "_padim.py",
        "moments = previous.moments_.merge(moments)  # a new object",
        "moments = moments  # a new object",
        ["test_detector.py"],
        "partial_fit forgets the earlier images",
    ),
    m(
        "padim_default_epsilon",
        "_padim.py",
        "head = PatchGaussian(epsilon=self.epsilon)",
        "head = PatchGaussian()",
        ["test_detector.py", "test_mutation_kills_padim.py"],
        "the epsilon parameter is ignored",
    ),
]


# --------------------------------------------------------------------- run
def make_copy(root, dest):
    """Copy what the tests need (package, tests, project metadata)."""
    dest.mkdir(parents=True, exist_ok=True)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", ".pytest_cache")
    for name in ("skpadim", "tests"):
        shutil.copytree(root / name, dest / name, ignore=ignore, dirs_exist_ok=True)
    for name in ("pyproject.toml", "README.md"):
        if (root / name).exists():
            shutil.copy2(root / name, dest / name)
    return dest


def pytest_command(modules, deselect=()):
    cmd = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider"]
    cmd += ["-p", "no:randomly", "-W", "ignore::DeprecationWarning"]
    cmd += [f"tests/{module}" for module in modules]
    for node in deselect:
        cmd += ["--deselect", node]
    return cmd


def run_tests(copy, modules, timeout, deselect=()):
    """(status, seconds, tail): status is 'passed', 'failed' or 'timeout'."""
    env = {**os.environ, "PYTHONPATH": str(copy), "OMP_NUM_THREADS": "1"}
    env.setdefault("MKL_NUM_THREADS", "1")
    modules = [mod for mod in modules if (copy / "tests" / mod).exists()]
    if not modules:
        return "passed", 0.0, "(no test module found)"
    start = time.monotonic()
    try:
        proc = subprocess.run(
            pytest_command(modules, deselect),
            cwd=copy,
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
    except subprocess.TimeoutExpired:
        return "timeout", time.monotonic() - start, ""
    elapsed = time.monotonic() - start
    tail = (proc.stdout + proc.stderr).strip().splitlines()
    if proc.returncode == 0:
        return "passed", elapsed, "\n".join(tail[-3:])
    if proc.returncode == 5:  # nothing collected (all deselected)
        return "passed", elapsed, "\n".join(tail[-3:])
    return "failed", elapsed, "\n".join(tail[-40:])


def baseline_failures(copy, module, timeout):
    """Node ids of the tests of ``module`` that fail on the pristine code."""
    env = {**os.environ, "PYTHONPATH": str(copy), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "pytest", "-q", "-rf", "-p", "no:cacheprovider"]
    cmd += ["-W", "ignore::DeprecationWarning", f"tests/{module}"]
    try:
        proc = subprocess.run(
            cmd, cwd=copy, env=env, capture_output=True, text=True, timeout=timeout
        )
    except subprocess.TimeoutExpired:
        return None
    found = re.findall(r"^(?:FAILED|ERROR) (\S+)", proc.stdout, flags=re.M)
    return [node for node in found if "::" in node]


def apply(copy, mutant):
    path = copy / "skpadim" / mutant.file
    text = path.read_text()
    count = text.count(mutant.original)
    if count != 1:
        raise RuntimeError(
            f"{mutant.name}: the original snippet occurs {count} times in "
            f"{mutant.file} (expected once); update the mutant."
        )
    path.write_text(text.replace(mutant.original, mutant.replacement))
    return path, text


def run_mutant(copy, mutant, timeout, deselect):
    path, pristine = apply(copy, mutant)
    try:
        status, seconds, tail = run_tests(copy, mutant.tests, timeout, deselect)
    finally:
        path.write_text(pristine)
    killed = status in ("failed", "timeout")
    return {
        "mutant": mutant,
        "killed": killed,
        "status": status,
        "seconds": seconds,
        "tail": tail,
        "killer": _killer(tail) if status == "failed" else status,
    }


def _killer(tail):
    found = re.findall(r"^(?:FAILED|ERROR) (\S+)", tail, flags=re.M)
    return found[0] if found else "(collection/other error)"


def table(results):
    lines = [
        "| # | mutant | file | change | tests | result | killed by |",
        "|---|---|---|---|---|---|---|",
    ]
    for i, r in enumerate(results, 1):
        mut = r["mutant"]
        result = "killed" if r["killed"] else "**SURVIVED**"
        killer = r["killer"] if r["killed"] else ""
        lines.append(
            f"| {i} | `{mut.name}` | {mut.file} | {mut.what} | "
            f"{', '.join(mut.tests)} | {result} | {killer} |"
        )
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=ROOT)
    parser.add_argument("-j", "--jobs", type=int, default=2)
    parser.add_argument("--timeout", type=float, default=600.0)
    parser.add_argument("--only", nargs="*", help="mutant names to run")
    parser.add_argument("--list", action="store_true", help="list mutants and exit")
    parser.add_argument("--markdown", type=Path, help="also write the table here")
    parser.add_argument("--target", type=float, default=0.95)
    parser.add_argument("--no-baseline", action="store_true")
    parser.add_argument(
        "--deselect", nargs="*", default=[], help="test node ids to leave out"
    )
    parser.add_argument(
        "--reverse", action="store_true", help="run the mutants last to first"
    )
    parser.add_argument(
        "--tests",
        nargs="*",
        help="run these test modules instead of each mutant's own (e.g. to "
        "check that a new test kills a survivor)",
    )
    args = parser.parse_args(argv)

    mutants = MUTANTS
    if args.only:
        unknown = set(args.only) - {mut.name for mut in MUTANTS}
        if unknown:
            parser.error(f"unknown mutants: {sorted(unknown)}")
        mutants = [mut for mut in MUTANTS if mut.name in args.only]
    if args.reverse:
        mutants = mutants[::-1]
    if args.tests:
        mutants = [dataclasses.replace(mut, tests=tuple(args.tests)) for mut in mutants]
    if args.list:
        for mut in mutants:
            print(f"{mut.name:34s} {mut.file:16s} {mut.what}")
        return 0

    scratch = Path(tempfile.mkdtemp(prefix="skpadim-mutation-"))
    try:
        copies = [make_copy(args.root, scratch / f"w{i}") for i in range(args.jobs)]
        # Every snippet must match the pristine code exactly once.
        for mut in mutants:
            path = copies[0] / "skpadim" / mut.file
            count = path.read_text().count(mut.original)
            if count != 1:
                raise SystemExit(f"{mut.name}: snippet found {count}x in {mut.file}")

        deselect = {}
        if not args.no_baseline:
            modules = sorted(
                {t for mut in mutants for t in mut.tests}
                & {p.name for p in (copies[0] / "tests").glob("test_*.py")}
            )
            print(f"baseline: {len(modules)} test modules on the pristine code ...")
            with concurrent.futures.ThreadPoolExecutor(args.jobs) as pool:
                futures = {
                    mod: pool.submit(
                        baseline_failures, copies[i % args.jobs], mod, args.timeout
                    )
                    for i, mod in enumerate(modules)
                }
                for mod, fut in futures.items():
                    failing = fut.result()
                    if failing is None:
                        print(f"  {mod}: baseline timed out")
                        failing = []
                    if failing:
                        print(f"  {mod}: deselecting {len(failing)} failing: {failing}")
                    deselect[mod] = failing
        free = list(copies)
        results = {}

        def work(mut):
            copy = free.pop()
            try:
                nodes = [n for t in mut.tests for n in deselect.get(t, [])]
                nodes += [n for n in args.deselect if n.split("::")[0][6:] in mut.tests]
                return run_mutant(copy, mut, args.timeout, nodes)
            finally:
                free.append(copy)

        with concurrent.futures.ThreadPoolExecutor(args.jobs) as pool:
            futures = {pool.submit(work, mut): mut for mut in mutants}
            for fut in concurrent.futures.as_completed(futures):
                r = fut.result()
                results[r["mutant"].name] = r
                print(
                    f"{'killed  ' if r['killed'] else 'SURVIVED'} "
                    f"{r['mutant'].name:34s} {r['seconds']:6.1f}s  {r['killer']}",
                    flush=True,
                )
    finally:
        shutil.rmtree(scratch, ignore_errors=True)

    ordered = [results[mut.name] for mut in mutants]
    killed = sum(r["killed"] for r in ordered)
    score = killed / len(ordered) if ordered else 1.0
    text = table(ordered)
    summary = f"Mutation score: {killed}/{len(ordered)} killed ({100 * score:.1f}%)"
    print()
    print(text)
    print()
    print(summary)
    survivors = [r["mutant"].name for r in ordered if not r["killed"]]
    if survivors:
        print("Survivors:", ", ".join(survivors))
    if args.markdown:
        args.markdown.write_text(f"{summary}\n\n{text}\n")
    return 0 if score >= args.target else 1


if __name__ == "__main__":
    sys.exit(main())
