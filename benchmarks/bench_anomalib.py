"""skpadim against anomalib, side by side: same images, same weights, 224 px.

anomalib is not a dependency of skpadim and must never become one: run this
script with the Python of a separate virtual environment that has anomalib,
with skpadim on ``PYTHONPATH``::

    python -m venv /tmp/anomalib-env
    /tmp/anomalib-env/bin/pip install torch==2.14.1 torchvision==0.29.1 anomalib
    PYTHONPATH=$PWD /tmp/anomalib-env/bin/python benchmarks/bench_anomalib.py

(anomalib 2.7.0 installs with torch 2.14.1; it brings lightning, timm,
FrEIA, opencv and others into that environment only.) Both libraries then
run in one process, on the same torch, with the same threads, and their
measures are interleaved round by round.

What is compared
----------------
* **Weights**: a seeded random-init torchvision resnet18 state dict is saved
  to a file (no ImageNet weights can be downloaded here; timings do not
  depend on weight values). skpadim loads it with ``weights=<file>``;
  anomalib's ``TimmFeatureExtractor`` (timm ``resnet18``, ``features_only``)
  loads the same tensors with ``load_state_dict(strict=True)``: timm's trunk
  parameter names are torchvision's (checked: every one of its 90 keys is in
  the torchvision state dict; only ``layer4`` and ``fc`` are left out). The
  tap outputs of both networks are compared on a batch (max relative
  difference printed; skpadim folds BatchNorm, hence float32 rounding).
* **Images**: ``skpadim.datasets.make_synthetic_defects`` on the skimage
  "brick" texture at 224 px: ``--n-train`` normal training images, and a
  test set of normal images and images with a pasted defect (patch, scratch,
  blob) with their exact masks.
* **PaDiM** (resnet18, layer1-3, d=100): fit time (skpadim ``fit`` on the
  uint8 images, which builds the network, streams the moments, factorises,
  and scores the training images for the threshold; anomalib: model
  construction + weights, ``model.train()`` forward of every batch, then
  ``model.fit()``, as its Lightning module does), and scoring images/s:
  skpadim ``anomaly_maps`` (and ``score_samples``) on uint8 arrays against
  anomalib's torch model forward in ``eval()`` under ``torch.inference_mode``
  on already preprocessed float tensors (which favours anomalib: its
  preprocessing is not timed), same batch size.
* **PatchCore** (resnet18, layer2+3, 3x3 average, coreset 10 %,
  9 re-weighting neighbours): fit time, split for anomalib into feature
  extraction and ``subsample_embedding`` (KCenterGreedy), scoring images/s
  as above, and the pixel AUROC (and image AUROC) of both on the test set.

Fits are timed ``--fit-repeats`` times (interleaved), scoring ``--repeats``
rounds after a warm-up; medians are reported.

Targets
-------
skpadim's PaDiM scoring >= 2x anomalib's images/s; skpadim's PatchCore fit
and scoring >= 1.5x faster; skpadim's PatchCore pixel AUROC >= anomalib's.
Results go to ``benchmarks/results/anomalib.json``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
import warnings

# anomalib's coreset sampler draws a tqdm bar per step: keep the output short.
os.environ.setdefault("TQDM_DISABLE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _common import (  # noqa: E402
    describe_machine,
    info_row,
    interleaved,
    load_average,
    machine,
    median_wall,
    print_targets,
    save_result,
    target,
)

IMAGE_SIZE = 224
MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)


def save_weights(path, seed=0):
    import torchvision

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        state = torchvision.models.resnet18(weights=None).state_dict()
    torch.save(state, path)
    return state


def to_batches(images, batch_size):
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float().div_(255)
    x = (x - MEAN) / STD
    return [x[i : i + batch_size].contiguous() for i in range(0, len(x), batch_size)]


def load_trunk(model, state):
    """Load torchvision-named weights into anomalib's timm extractor, strictly."""
    net = model.feature_extractor.feature_extractor
    own = net.state_dict()
    missing = [k for k in own if k not in state]
    if missing:
        raise RuntimeError(f"timm keys not in the torchvision state dict: {missing}")
    net.load_state_dict({k: state[k] for k in own}, strict=True)
    return len(own), sorted({k.split(".")[0] for k in state if k not in own})


def anomalib_padim(state, batches):
    from anomalib.models.image.padim.torch_model import PadimModel

    model = PadimModel(
        backbone="resnet18",
        layers=["layer1", "layer2", "layer3"],
        pre_trained=False,
        n_features=100,
    )
    load_trunk(model, state)
    model.train()
    for batch in batches:
        model(batch)
    model.fit()
    return model.eval()


def anomalib_patchcore(state, batches, ratio, timings=None):
    from anomalib.models.image.patchcore.torch_model import PatchcoreModel

    start = time.perf_counter()
    model = PatchcoreModel(
        backbone="resnet18",
        layers=["layer2", "layer3"],
        pre_trained=False,
        num_neighbors=9,
    )
    load_trunk(model, state)
    model.train()
    for batch in batches:
        model(batch)
    middle = time.perf_counter()
    model.subsample_embedding(ratio)
    if timings is not None:
        timings.append((middle - start, time.perf_counter() - middle))
    return model.eval()


def anomalib_outputs(model, batches):
    scores, maps = [], []
    with torch.inference_mode():
        for batch in batches:
            out = model(batch)
            scores.append(out.pred_score.reshape(-1))
            maps.append(out.anomaly_map.reshape(len(batch), *batch.shape[-2:]))
    return torch.cat(scores).numpy(), torch.cat(maps).numpy()


def check_same_features(detector, model, batch):
    """Max relative difference of the tap outputs of both networks."""
    runtime = detector.feature_extractor_._get_runtime()
    with torch.inference_mode():
        ours = runtime.forward(batch)
        theirs = list(model.feature_extractor(batch).values())
    return max(
        ((a - b).abs().max() / b.abs().max()).item() for a, b in zip(ours, theirs)
    )


def aurocs(masks, labels, maps, scores):
    from sklearn.metrics import roc_auc_score

    pixel = roc_auc_score(masks.ravel(), np.asarray(maps).ravel())
    image = roc_auc_score(labels == -1, scores)
    return pixel, image


def med(values):
    return statistics.median(values)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n-train", type=int, default=60)
    parser.add_argument("--n-test-normal", type=int, default=24)
    parser.add_argument("--n-test-anomalous", type=int, default=40)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--coreset", type=float, default=0.1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--fit-repeats", type=int, default=1)
    parser.add_argument("--texture", default="brick")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--no-save", dest="save", action="store_false")
    args = parser.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", category=FutureWarning)

    import anomalib
    import timm

    from skpadim import PadimDetector, PatchCoreDetector
    from skpadim.datasets import make_synthetic_defects

    info = machine()
    print(describe_machine(info))
    print(
        f"anomalib {anomalib.__version__}, timm {timm.__version__}; "
        f"{IMAGE_SIZE} px, batch {args.batch_size}"
    )
    n_test = args.n_test_normal + args.n_test_anomalous
    data = make_synthetic_defects(
        args.n_train + args.n_test_normal,
        args.n_test_anomalous,
        texture=args.texture,
        image_size=IMAGE_SIZE,
        random_state=0,
    )
    train = data.images[: args.n_train]
    test = data.images[args.n_train :]
    masks, labels = data.masks[args.n_train :], data.labels[args.n_train :]
    print(
        f"images: {args.texture} texture, {args.n_train} normal training images; "
        f"test {n_test} = {args.n_test_normal} normal + {args.n_test_anomalous} "
        f"with a pasted defect ({masks.mean():.2%} of test pixels defective)"
    )
    train_batches = to_batches(train, args.batch_size)
    test_batches = to_batches(test, args.batch_size)
    tmp = tempfile.mkdtemp(prefix="skpadim_vs_anomalib_")
    weights = os.path.join(tmp, "resnet18_random.pt")
    state = save_weights(weights)
    common = dict(
        backbone="resnet18",
        weights=weights,
        image_size=IMAGE_SIZE,
        batch_size=args.batch_size,
        device="cpu",
        random_state=0,
    )
    figures, targets, infos = {}, [], []

    # ------------------------------------------------------------- PaDiM
    print(f"\n== PaDiM resnet18 d=100, fit on {args.n_train} images")
    ours_fit, theirs_fit = [], []
    for _ in range(args.fit_repeats):
        start = time.perf_counter()
        padim = PadimDetector(n_features=100, **common).fit(train)
        ours_fit.append(time.perf_counter() - start)
        start = time.perf_counter()
        a_padim = anomalib_padim(state, train_batches)
        theirs_fit.append(time.perf_counter() - start)
    n_keys, left_out = load_trunk(a_padim, state)
    diff = check_same_features(padim, a_padim, test_batches[0])
    print(
        f"weights: {n_keys} timm trunk tensors loaded strictly from the torchvision "
        f"state dict (not used by the trunk: {left_out}); tap outputs differ by "
        f"{diff:.1e} (max relative)"
    )
    evaluation = (test, test_batches, masks, labels, args.repeats)
    padim_fig = compare(padim, a_padim, ours_fit, theirs_fit, *evaluation)
    padim_fig["feature_max_rel_diff"] = diff
    print_fit_and_auroc(padim_fig)
    figures["padim"] = padim_fig
    speed = padim_fig["speedup"]["skpadim anomaly_maps"]
    targets.append(
        target("anomalib PaDiM scoring: ours / anomalib images/s", speed, 2, ">=")
    )
    infos.append(
        info_row(
            "anomalib PaDiM fit: anomalib time / ours",
            med(theirs_fit) / med(ours_fit),
            "x",
        )
    )

    # ---------------------------------------------------------- PatchCore
    print(
        f"\n== PatchCore resnet18 layer2+3, coreset {args.coreset:.0%}, fit on "
        f"{args.n_train} images"
    )
    ours_fit, theirs_fit, split = [], [], []
    for _ in range(args.fit_repeats):
        start = time.perf_counter()
        core = PatchCoreDetector(coreset_size=args.coreset, **common).fit(train)
        ours_fit.append(time.perf_counter() - start)
        start = time.perf_counter()
        a_core = anomalib_patchcore(state, train_batches, args.coreset, split)
        theirs_fit.append(time.perf_counter() - start)
    print(
        f"banks: skpadim {tuple(core.memory_bank_.bank_.shape)}, anomalib "
        f"{tuple(a_core.memory_bank.shape)}; anomalib fit = "
        f"{med([s[0] for s in split]):.1f} s features + "
        f"{med([s[1] for s in split]):.1f} s coreset"
    )
    core_fig = compare(core, a_core, ours_fit, theirs_fit, *evaluation)
    core_fig["anomalib_fit_split_s"] = {
        "features": med([s[0] for s in split]),
        "coreset": med([s[1] for s in split]),
    }
    print_fit_and_auroc(core_fig)
    figures["patchcore"] = core_fig
    fit_speed = med(theirs_fit) / med(ours_fit)
    targets += [
        target("anomalib PatchCore fit: anomalib time / ours", fit_speed, 1.5, ">="),
        target(
            "anomalib PatchCore scoring: ours / anomalib images/s",
            core_fig["speedup"]["skpadim anomaly_maps"],
            1.5,
            ">=",
        ),
        target(
            "anomalib PatchCore pixel AUROC: ours vs anomalib's",
            core_fig["pixel_image_auroc"]["skpadim"][0],
            core_fig["pixel_image_auroc"]["anomalib"][0],
            ">=",
            unit="",
        ),
    ]
    print(f"\n== summary (load average now {load_average():.2f})")
    print_targets(targets)
    if args.save:
        save_result("anomalib", figures, targets=targets, info=infos)


def compare(ours, theirs, ours_fit, theirs_fit, test, batches, masks, labels, repeats):
    """Scoring speed (interleaved rounds), fit times and AUROCs of a fitted
    skpadim detector and its fitted anomalib peer on the same test images."""
    runs = interleaved(
        {
            "skpadim anomaly_maps": lambda: ours.anomaly_maps(test),
            "skpadim score_samples": lambda: ours.score_samples(test),
            "anomalib forward": lambda: anomalib_outputs(theirs, batches),
        },
        repeats,
    )
    fig = report_scoring(runs, len(test))
    o_maps, o_scores = ours.anomaly_maps(test), -ours.score_samples(test)
    a_scores, a_maps = anomalib_outputs(theirs, batches)
    fig["fit_s"] = {"skpadim": med(ours_fit), "anomalib": med(theirs_fit)}
    fig["pixel_image_auroc"] = {
        "skpadim": aurocs(masks, labels, o_maps, o_scores),
        "anomalib": aurocs(masks, labels, a_maps, a_scores),
    }
    return fig


def report_scoring(runs, n):
    base = median_wall(runs["anomalib forward"])
    fig = {"images_per_s": {}, "speedup": {}}
    print(
        f"{'scoring ' + str(n) + ' images':<24} {'median s':>9} {'images/s':>9} "
        f"{'vs anomalib':>12}"
    )
    for key, values in runs.items():
        wall = median_wall(values)
        fig["images_per_s"][key] = n / wall
        fig["speedup"][key] = base / wall
        print(f"{key:<24} {wall:9.3f} {n / wall:9.1f} {base / wall:11.2f}x")
    return fig


def print_fit_and_auroc(fig):
    fit = fig["fit_s"]
    print(
        f"fit: skpadim {fit['skpadim']:.1f} s, anomalib {fit['anomalib']:.1f} s "
        f"(anomalib / skpadim = {fit['anomalib'] / fit['skpadim']:.2f}x)"
    )
    for who, (pixel, image) in fig["pixel_image_auroc"].items():
        print(f"{who:<9} pixel AUROC {pixel:.4f}, image AUROC {image:.4f}")


if __name__ == "__main__":
    main()
