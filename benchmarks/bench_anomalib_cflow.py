"""skpadim's CflowDetector against anomalib's Cflow: same images, same weights.

anomalib is not a dependency of skpadim and must never become one: run this
script with the Python of a separate virtual environment that has anomalib
(see ``bench_anomalib.py`` for how it is made), with skpadim on
``PYTHONPATH``, on one thread::

    OMP_NUM_THREADS=1 PYTHONPATH=$PWD /tmp/anomalib-env/bin/python \\
        benchmarks/bench_anomalib_cflow.py

Both libraries run in one process, on the same torch and the same single
thread; ratios are taken on process CPU time (``time.process_time``), which a
busy neighbour on a shared machine disturbs less than wall-clock time (also
printed).

What is compared
----------------
* **Weights**: a seeded random-init torchvision resnet18 state dict, saved to
  a file (no ImageNet weights can be downloaded here). skpadim loads it with
  ``weights=<file>``; anomalib's ``TimmFeatureExtractor`` loads the same
  tensors with ``load_state_dict(strict=True)``. The tap outputs of both
  networks are compared on a batch (max relative difference printed).
* **Images**: ``skpadim.datasets.make_synthetic_defects`` on the skimage
  "brick" texture: ``--n-train`` normal training images and a test set of
  normal images and images with a pasted defect (patch, scratch, blob) and
  their exact masks.
* **Configuration**: both as skpadim's defaults for resnet18: taps layer2,
  layer3, layer4 (strides 8, 16, 32; 128, 256, 512 channels), one flow per
  tap of 8 coupling blocks, a 128-channel positional condition, clamp 1.9,
  Adam at a constant 1e-3, 256 fibers per Adam step, ``--epochs`` epochs
  over the same training images. skpadim holds out ``validation_fraction``
  (10 %) of its training images for its threshold; anomalib is trained on
  exactly the images skpadim trained on (``--n-train 36`` leaves 32, one
  shuffle group of 32 for skpadim and one image batch of 32 for anomalib).
* **Training**: skpadim's ``fit`` on uint8 images (it extracts the features
  once into a cache, then runs the epochs). anomalib's ``CflowModel`` is
  driven directly, not through the Lightning ``Engine``, by a loop written
  here that does what its Lightning ``training_step`` does on each image
  batch: encoder forward, then per tap: all fibers of the batch shuffled,
  cut into ``E // fiber_batch_size`` chunks (the last one takes the
  remainder), one step each of a single Adam over all decoders, with the
  loss ``-logsigmoid(log p / C)``. So anomalib runs its encoder in every
  epoch (that is how it trains); the flow-only share of its epoch is
  printed too. Per-epoch time: anomalib's epochs are timed directly;
  skpadim's come from the timestamps of its ``verbose`` "Epoch n" lines, so
  epochs 2.. are pure training (epoch 1 also extracts the features and is
  left out of the median; it is in the fit total).
* **Scoring**: skpadim ``anomaly_maps`` (and ``score_samples``) on uint8
  arrays against anomalib's torch model forward in ``eval()`` under
  ``torch.inference_mode`` on already preprocessed float tensors (which
  favours anomalib: its preprocessing is not timed), same image batch size;
  anomalib decodes in chunks of ``fiber_batch_size`` fibers at inference
  too. Rounds are interleaved, ``--repeats`` after a warm-up; medians.
* **Matmul backend**: skpadim's flows run their float32 matmuls on oneDNN
  when torch has it (printed), which is about twice as fast as torch's
  default MKL on AMD processors (MKL runs AVX2 code there) and about the same
  on Intel ones; anomalib's flows use torch's default. The rest of skpadim's
  lead is the flows' implementation (hand-written backward, channels-major
  activations, per-position condition products at scoring, fused Adam).
* **Quality**: pixel AUROC, image AUROC (skpadim ``-score_samples``,
  anomalib ``pred_score``, the max of its map) and AUPRO (``skpadim.metrics.
  aupro_score``, FPR <= 0.3) on the test maps at 224 px. skpadim smooths its
  map (``sigma=4``, its default); anomalib's Cflow does not. skpadim with
  ``sigma=0`` is reported as well.

Batch dependence
----------------
anomalib's ``AnomalyMapGenerator`` computes, per tap, ``exp(log p - max log
p)`` with the maximum taken over every fiber of the *batch*, sums the taps
and returns ``max(score map) - score map``, the maximum again over the whole
batch. An image's map and score therefore depend on the images it is scored
with (cflow-ad#24). skpadim removes this: its per-tap constants are the
largest log-likelihood of a training fiber, stored at fit time, and its map
is ``n_levels - sum_l exp(log p_l - c_l)``. The script scores one test image
alone and inside its test batch with both and prints the max absolute
difference of its map (relative to the map's range).

Targets
-------
skpadim at least 1.5x faster than anomalib in training time per epoch and in
scoring images/s (CPU time), and a pixel AUROC at least equal to anomalib's.
Results go to ``benchmarks/results/anomalib_cflow.json``.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import math
import os
import statistics
import sys
import tempfile
import time
import warnings

# One thread: the machine's other cores belong to other people's benchmarks.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")
os.environ.setdefault("TQDM_DISABLE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _common import (  # noqa: E402
    Timer,
    describe_machine,
    info_row,
    interleaved,
    load_average,
    machine,
    median_cpu,
    median_wall,
    print_targets,
    save_result,
    target,
)

LAYERS = ("layer2", "layer3", "layer4")
MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)


# ------------------------------------------------------------------ helpers
def save_weights(path, seed=0):
    """A seeded random-init torchvision resnet18 state dict, saved to ``path``."""
    import torchvision

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        state = torchvision.models.resnet18(weights=None).state_dict()
    torch.save(state, path)
    return state


def preprocess(images):
    """uint8 (n, H, W, 3) -> ImageNet-normalised float (n, 3, H, W)."""
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float().div_(255)
    return ((x - MEAN) / STD).contiguous()


def split(x, batch_size):
    return [x[i : i + batch_size].contiguous() for i in range(0, len(x), batch_size)]


def load_trunk(extractor, state):
    """Load torchvision-named weights into a timm extractor, strictly."""
    net = extractor.feature_extractor
    own = net.state_dict()
    missing = [k for k in own if k not in state]
    if missing:
        raise RuntimeError(f"timm keys not in the torchvision state dict: {missing}")
    net.load_state_dict({k: state[k] for k in own}, strict=True)
    return len(own)


class EpochClock:
    """A stdout stand-in that stamps (wall, CPU) when a line starts with 'Epoch'.

    skpadim's ``verbose`` fit prints one such line at the end of each epoch.
    """

    def __init__(self):
        self.stamps = []
        self.lines = []
        self._buffer = io.StringIO()

    def write(self, text):
        now = (time.perf_counter(), time.process_time())
        for line in text.splitlines():
            if line.startswith("Epoch"):
                self.stamps.append(now)
                self.lines.append(line)
        return len(text)

    def flush(self):
        pass


# ----------------------------------------------------------------- skpadim
def fit_skpadim(train, weights, args):
    from skpadim import CflowDetector

    detector = CflowDetector(
        backbone="resnet18",
        weights=weights,
        layers=LAYERS,
        image_size=args.image_size,
        batch_size=args.batch_size,
        max_iter=args.epochs,
        learning_rate_init=args.lr,
        fiber_batch_size=args.fiber_batch_size,
        n_coupling_blocks=args.coupling_blocks,
        condition_dim=args.condition_dim,
        clamp=args.clamp,
        device="cpu",
        random_state=0,
        verbose=1,
    )
    clock = EpochClock()
    start = (time.perf_counter(), time.process_time())
    with contextlib.redirect_stdout(clock):
        detector.fit(train)
    end = (time.perf_counter(), time.process_time())
    detector.set_params(verbose=0)
    stamps = [start] + clock.stamps
    epochs = [
        (b[0] - a[0], b[1] - a[1]) for a, b in zip(stamps[:-1], stamps[1:])
    ]  # epoch 1 includes the feature extraction
    return detector, {
        "fit": (end[0] - start[0], end[1] - start[1]),
        "epochs": epochs,
        "after_last_epoch": (end[0] - stamps[-1][0], end[1] - stamps[-1][1]),
        "losses": list(detector.loss_curve_),
    }


def skpadim_adam_steps(n_images, grids, n_fibers_step):
    return [math.ceil(n_images * h * w / n_fibers_step) for h, w in grids]


# ---------------------------------------------------------------- anomalib
def build_anomalib(state, args):
    from anomalib.models.image.cflow.torch_model import CflowModel

    torch.manual_seed(0)  # FrEIA draws its weights and permutations globally
    model = CflowModel(
        backbone="resnet18",
        layers=list(LAYERS),
        pre_trained=False,
        fiber_batch_size=args.fiber_batch_size,
        condition_vector=args.condition_dim,
        coupling_blocks=args.coupling_blocks,
        clamp_alpha=args.clamp,
        permute_soft=False,
    )
    load_trunk(model.encoder, state)
    return model


def anomalib_epoch(model, optimizer, images, batch_size, generator):
    """One epoch of anomalib's Cflow training step over shuffled image batches.

    Returns (mean loss per fiber, encoder seconds (wall, CPU), Adam steps).
    """
    from anomalib.models.image.cflow.utils import get_logp, positional_encoding_2d

    n_fibers_step = model.fiber_batch_size
    order = torch.randperm(len(images), generator=generator)
    total, count, steps = 0.0, 0, 0
    encoder = [0.0, 0.0]
    for first in range(0, len(images), batch_size):
        batch = images[order[first : first + batch_size]]
        t0 = (time.perf_counter(), time.process_time())
        taps = model.encoder(batch)
        encoder[0] += time.perf_counter() - t0[0]
        encoder[1] += time.process_time() - t0[1]
        for level, name in enumerate(model.pool_layers):
            tap = taps[name].detach()
            n, channels, height, width = tap.shape
            cond = positional_encoding_2d(model.condition_vector, height, width)
            cond = cond.flatten(1).T.repeat(n, 1)  # (n h w, P), rows b-major
            fibers = tap.permute(0, 2, 3, 1).reshape(-1, channels)
            n_fibers = len(fibers)
            n_chunks = n_fibers // n_fibers_step
            if n_chunks <= 0:
                raise ValueError("fewer fibers than fiber_batch_size in a batch")
            perm = torch.randperm(n_fibers, generator=generator)
            decoder = model.decoders[level]
            for chunk in range(n_chunks):
                stop = (
                    n_fibers if chunk == n_chunks - 1 else (chunk + 1) * n_fibers_step
                )
                rows = perm[chunk * n_fibers_step : stop]
                optimizer.zero_grad()
                z, log_det = decoder(fibers[rows], [cond[rows]])
                log_prob = get_logp(channels, z, log_det) / channels
                loss = -F.logsigmoid(log_prob)
                loss.mean().backward()
                optimizer.step()
                total += float(loss.detach().sum())
                count += len(rows)
                steps += 1
    return total / count, tuple(encoder), steps


def train_anomalib(model, images, args):
    model.train()
    params = [p for decoder in model.decoders for p in decoder.parameters()]
    optimizer = torch.optim.Adam(params, lr=args.lr)
    generator = torch.Generator().manual_seed(0)
    epochs, encoder, losses, steps = [], [], [], 0
    for _ in range(args.epochs):
        t0 = (time.perf_counter(), time.process_time())
        loss, enc, steps = anomalib_epoch(
            model, optimizer, images, args.batch_size, generator
        )
        epochs.append((time.perf_counter() - t0[0], time.process_time() - t0[1]))
        encoder.append(enc)
        losses.append(loss)
        if not math.isfinite(loss):
            print(f"anomalib training diverged: loss {loss}")
            break
    return model.eval(), {
        "epochs": epochs,
        "encoder": encoder,
        "losses": losses,
        "adam_steps_per_epoch": steps,
    }


def anomalib_outputs(model, batches):
    scores, maps = [], []
    with torch.inference_mode():
        for batch in batches:
            out = model(batch)
            scores.append(out.pred_score.reshape(-1))
            maps.append(out.anomaly_map.reshape(len(batch), *batch.shape[-2:]))
    return torch.cat(scores).numpy(), torch.cat(maps).numpy()


def backbone_only(detector, batches):
    """skpadim's network on preprocessed tensors: the backbone share of scoring."""
    runtime = detector.feature_extractor_._get_runtime()
    for batch in batches:
        runtime.forward(batch)


def encoder_only(model, batches):
    with torch.inference_mode():
        for batch in batches:
            model.encoder(batch)


# ----------------------------------------------------------------- figures
def check_same_features(detector, model, batch):
    runtime = detector.feature_extractor_._get_runtime()
    with torch.inference_mode():
        ours = runtime.forward(batch)
        theirs = model.encoder(batch)
        theirs = [theirs[name] for name in LAYERS]
    return max(
        ((a - b).abs().max() / b.abs().max()).item() for a, b in zip(ours, theirs)
    )


def quality(masks, labels, maps, scores, with_aupro):
    from sklearn.metrics import roc_auc_score

    from skpadim.metrics import aupro_score

    maps = np.asarray(maps, dtype=np.float64)
    out = {
        "pixel_auroc": float(roc_auc_score(masks.ravel(), maps.ravel())),
        "image_auroc": float(roc_auc_score(labels == -1, scores)),
    }
    if with_aupro:
        out["aupro_0.3"] = aupro_score(masks, maps, max_fpr=0.3)
    return out


def skpadim_tree():
    """The commit of the skpadim checkout and its uncommitted files, if any."""
    import subprocess

    import skpadim

    root = os.path.dirname(os.path.dirname(os.path.abspath(skpadim.__file__)))

    def git(*cmd):
        try:
            return subprocess.run(
                ["git", "-C", root, *cmd], capture_output=True, text=True, check=True
            ).stdout.rstrip()
        except (OSError, subprocess.CalledProcessError):
            return ""

    changed = git("status", "--porcelain", "--", "skpadim")
    return {
        "path": root,
        "commit": git("rev-parse", "--short", "HEAD"),
        "uncommitted": [line[3:] for line in changed.splitlines()],
    }


def med(values):
    return statistics.median(values)


def fmt_pair(t):
    return f"{t[1]:7.2f} CPU s ({t[0]:6.2f} wall)"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n-train", type=int, default=36)
    parser.add_argument("--n-test-normal", type=int, default=16)
    parser.add_argument("--n-test-anomalous", type=int, default=24)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--fiber-batch-size", type=int, default=256)
    parser.add_argument("--coupling-blocks", type=int, default=8)
    parser.add_argument("--condition-dim", type=int, default=128)
    parser.add_argument("--clamp", type=float, default=1.9)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--texture", default="brick")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--no-aupro", dest="aupro", action="store_false")
    parser.add_argument("--no-save", dest="save", action="store_false")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning)

    import anomalib
    import FrEIA
    import timm

    from skpadim.datasets import make_synthetic_defects

    script_start = (time.perf_counter(), time.process_time())
    info = machine()
    print(describe_machine(info))
    print(
        f"anomalib {anomalib.__version__}, timm {timm.__version__}, FrEIA "
        f"{getattr(FrEIA, '__version__', '?')}; {args.image_size} px, image batch "
        f"{args.batch_size}"
    )
    n_test = args.n_test_normal + args.n_test_anomalous
    data = make_synthetic_defects(
        args.n_train + args.n_test_normal,
        args.n_test_anomalous,
        texture=args.texture,
        image_size=args.image_size,
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
    print(
        f"CFLOW: resnet18 {'+'.join(LAYERS)}, {args.coupling_blocks} coupling "
        f"blocks, condition {args.condition_dim}, clamp {args.clamp}, Adam lr "
        f"{args.lr:g} (constant), {args.fiber_batch_size} fibers per step, "
        f"{args.epochs} epochs"
    )
    tmp = tempfile.mkdtemp(prefix="skpadim_vs_anomalib_cflow_")
    weights = os.path.join(tmp, "resnet18_random.pt")
    state = save_weights(weights)
    tree = skpadim_tree()
    print(
        f"skpadim from {tree['path']} at {tree['commit'] or '?'}"
        + (
            f", uncommitted changes in: {', '.join(tree['uncommitted'])}"
            if tree["uncommitted"]
            else ""
        )
    )
    from skpadim import _flow

    # skpadim's flows run their float32 matmuls on oneDNN when torch has it
    # (about 2x MKL's speed on AMD CPUs, where MKL runs AVX2 code); anomalib's
    # go through torch's default (MKL).
    flow_matmul = "oneDNN" if _flow._LINEAR is not None else "torch.mm (MKL)"
    print(f"skpadim flow matmuls: {flow_matmul}; anomalib: torch default")
    figures, targets, infos = {"config": vars(args).copy()}, [], []
    figures["skpadim_tree"] = tree
    figures["skpadim_flow_matmul"] = flow_matmul

    # ------------------------------------------------------------ training
    print("\n== training")
    detector, ours = fit_skpadim(train, weights, args)
    held = np.asarray(detector.validation_indices_)
    trained = np.setdiff1d(np.arange(args.n_train), held)
    print(
        f"skpadim: held out {len(held)} of {args.n_train} images for the "
        f"threshold, trained on {len(trained)}; anomalib trains on the same "
        f"{len(trained)}"
    )
    train_x = preprocess(train[trained])
    test_x = preprocess(test)
    test_batches = split(test_x, args.batch_size)

    t0 = (time.perf_counter(), time.process_time())
    model = build_anomalib(state, args)
    build = (time.perf_counter() - t0[0], time.process_time() - t0[1])
    model, theirs = train_anomalib(model, train_x, args)

    diff = check_same_features(detector, model, test_batches[0])
    print(
        f"weights: timm trunk loaded strictly from the torchvision state dict; "
        f"tap outputs differ by {diff:.1e} (max relative)"
    )
    with torch.inference_mode():
        grids = [tuple(t.shape[-2:]) for t in model.encoder(train_x[:1]).values()]
    ours_steps = sum(skpadim_adam_steps(len(trained), grids, args.fiber_batch_size))
    print(
        f"grids {grids}; Adam steps per epoch: skpadim {ours_steps}, anomalib "
        f"{theirs['adam_steps_per_epoch']} (anomalib folds the remainder into "
        f"its last chunk, skpadim cuts ceil(E/N) near-equal chunks)"
    )
    print(f"{'epoch':<7} {'skpadim':>30} {'anomalib':>30} {'of which encoder':>18}")
    for i in range(max(len(ours["epochs"]), len(theirs["epochs"]))):
        o = fmt_pair(ours["epochs"][i]) if i < len(ours["epochs"]) else ""
        a = fmt_pair(theirs["epochs"][i]) if i < len(theirs["epochs"]) else ""
        e = f"{theirs['encoder'][i][1]:.2f} CPU s" if i < len(theirs["encoder"]) else ""
        note = "  (skpadim: + feature extraction)" if i == 0 else ""
        print(f"{i + 1:<7} {o:>30} {a:>30} {e:>18}{note}")
    print(
        "loss per epoch: skpadim "
        + ", ".join(f"{v:.4f}" for v in ours["losses"])
        + "; anomalib "
        + ", ".join(f"{v:.4f}" for v in theirs["losses"])
    )
    steady = ours["epochs"][1:] or ours["epochs"]
    ours_epoch = (med([t[0] for t in steady]), med([t[1] for t in steady]))
    theirs_epoch = (
        med([t[0] for t in theirs["epochs"]]),
        med([t[1] for t in theirs["epochs"]]),
    )
    theirs_flow = med(
        [t[1] - e[1] for t, e in zip(theirs["epochs"], theirs["encoder"])]
    )
    ours_fit = ours["fit"]
    theirs_fit = (
        build[0] + sum(t[0] for t in theirs["epochs"]),
        build[1] + sum(t[1] for t in theirs["epochs"]),
    )
    print(
        f"median epoch: skpadim {fmt_pair(ours_epoch)}"
        f"{'' if len(ours['epochs']) > 1 else ' (1 epoch: includes extraction)'}"
        f"; anomalib {fmt_pair(theirs_epoch)}, of which flows {theirs_flow:.2f} CPU s"
    )
    print(
        f"whole fit: skpadim {fmt_pair(ours_fit)} (extraction, {len(ours['epochs'])} "
        f"epochs, training maxima, held-out scores; {ours['after_last_epoch'][1]:.2f} "
        f"CPU s after the last epoch); anomalib {fmt_pair(theirs_fit)} "
        f"(model build + {len(theirs['epochs'])} epochs)"
    )
    epoch_speed = theirs_epoch[1] / ours_epoch[1]
    figures["training"] = {
        "skpadim_epochs_wall_cpu_s": ours["epochs"],
        "anomalib_epochs_wall_cpu_s": theirs["epochs"],
        "anomalib_encoder_wall_cpu_s": theirs["encoder"],
        "skpadim_median_epoch_wall_cpu_s": ours_epoch,
        "anomalib_median_epoch_wall_cpu_s": theirs_epoch,
        "anomalib_median_epoch_flows_cpu_s": theirs_flow,
        "skpadim_fit_wall_cpu_s": ours_fit,
        "anomalib_fit_wall_cpu_s": theirs_fit,
        "adam_steps_per_epoch": {
            "skpadim": ours_steps,
            "anomalib": theirs["adam_steps_per_epoch"],
        },
        "loss_curve": {"skpadim": ours["losses"], "anomalib": theirs["losses"]},
        "n_trained_images": int(len(trained)),
        "n_held_out_images": int(len(held)),
        "feature_max_rel_diff": diff,
    }
    targets.append(
        target(
            "anomalib Cflow train epoch: anomalib CPU time / ours",
            epoch_speed,
            1.5,
            ">=",
            note="skpadim epochs 2.. (features cached); anomalib epochs include "
            "its encoder pass",
        )
    )
    infos += [
        info_row(
            "anomalib Cflow train epoch, flows only: anomalib CPU / ours",
            theirs_flow / ours_epoch[1],
            "x",
        ),
        info_row(
            "anomalib Cflow whole fit: anomalib CPU / ours",
            theirs_fit[1] / ours_fit[1],
            "x",
        ),
    ]

    # ------------------------------------------------------------- scoring
    print(f"\n== scoring {n_test} images, batch {args.batch_size}")
    runs = interleaved(
        {
            "skpadim anomaly_maps": lambda: detector.anomaly_maps(test),
            "skpadim score_samples": lambda: detector.score_samples(test),
            "anomalib forward": lambda: anomalib_outputs(model, test_batches),
            "skpadim backbone only": lambda: backbone_only(detector, test_batches),
            "anomalib encoder only": lambda: encoder_only(model, test_batches),
        },
        args.repeats,
        timer=Timer(),
    )
    base_cpu = median_cpu(runs["anomalib forward"])
    base_wall = median_wall(runs["anomalib forward"])
    scoring = {"images_per_cpu_s": {}, "images_per_wall_s": {}, "speedup_cpu": {}}
    print(
        f"{'':<24} {'CPU s':>7} {'wall s':>7} {'img/CPU s':>10} {'img/wall s':>10} "
        f"{'vs anomalib (CPU)':>18} {'(wall)':>7}"
    )
    for key, values in runs.items():
        cpu, wall = median_cpu(values), median_wall(values)
        scoring["images_per_cpu_s"][key] = n_test / cpu
        scoring["images_per_wall_s"][key] = n_test / wall
        scoring["speedup_cpu"][key] = base_cpu / cpu
        print(
            f"{key:<24} {cpu:7.2f} {wall:7.2f} {n_test / cpu:10.2f} "
            f"{n_test / wall:10.2f} {base_cpu / cpu:17.2f}x {base_wall / wall:6.2f}x"
        )
    flows = {
        who: median_cpu(
            runs[f"{who} forward" if who == "anomalib" else f"{who} anomaly_maps"]
        )
        - median_cpu(runs[net])
        for who, net in (
            ("skpadim", "skpadim backbone only"),
            ("anomalib", "anomalib encoder only"),
        )
    }
    scoring["flows_and_maps_cpu_s"] = flows
    print(
        f"scoring minus the network (flows + maps): skpadim {flows['skpadim']:.2f} "
        f"CPU s, anomalib {flows['anomalib']:.2f} CPU s "
        f"(anomalib / skpadim = {flows['anomalib'] / flows['skpadim']:.2f}x)"
    )
    figures["scoring"] = scoring
    infos.append(
        info_row(
            "anomalib Cflow scoring minus the network: anomalib CPU / ours",
            flows["anomalib"] / flows["skpadim"],
            "x",
        )
    )
    targets.append(
        target(
            "anomalib Cflow scoring: ours / anomalib images/s (CPU)",
            scoring["speedup_cpu"]["skpadim anomaly_maps"],
            1.5,
            ">=",
            note="skpadim anomaly_maps on uint8 vs anomalib forward on "
            "preprocessed tensors",
        )
    )

    # ------------------------------------------------------------- quality
    print("\n== quality on the test set")
    o_maps, o_scores = detector.anomaly_maps(test), -detector.score_samples(test)
    a_scores, a_maps = anomalib_outputs(model, test_batches)
    # The smoothing is fixed at fit (sigma_); set_params(sigma=...) after fit
    # does not change it, so the fitted attribute is switched for this pass.
    fitted_sigma = detector.sigma_
    detector.sigma_ = 0.0
    o_maps0, o_scores0 = detector.anomaly_maps(test), -detector.score_samples(test)
    detector.sigma_ = fitted_sigma
    qual = {
        "skpadim (sigma=4)": quality(masks, labels, o_maps, o_scores, args.aupro),
        "skpadim (sigma=0)": quality(masks, labels, o_maps0, o_scores0, args.aupro),
        "anomalib": quality(masks, labels, a_maps, a_scores, args.aupro),
    }
    for who, q in qual.items():
        print(
            f"{who:<18} "
            + ", ".join(f"{k.replace('_', ' ')} {v:.4f}" for k, v in q.items())
        )
    figures["quality"] = qual
    targets.append(
        target(
            "anomalib Cflow pixel AUROC: ours vs anomalib's",
            qual["skpadim (sigma=4)"]["pixel_auroc"],
            qual["anomalib"]["pixel_auroc"],
            ">=",
            unit="",
        )
    )
    infos += [
        info_row(
            "anomalib Cflow pixel AUROC, ours with sigma=0",
            qual["skpadim (sigma=0)"]["pixel_auroc"],
        ),
        info_row(
            "anomalib Cflow image AUROC: ours (anomalib's "
            f"{qual['anomalib']['image_auroc']:.3f})",
            qual["skpadim (sigma=4)"]["image_auroc"],
        ),
    ]
    if args.aupro:
        infos.append(
            info_row(
                "anomalib Cflow AUPRO 0.3: ours (anomalib's "
                f"{qual['anomalib']['aupro_0.3']:.3f})",
                qual["skpadim (sigma=4)"]["aupro_0.3"],
            )
        )

    # ---------------------------------------------------- batch dependence
    with_k = test_x[: args.batch_size]
    o_batch = detector.anomaly_maps(test[: args.batch_size])
    _, a_batch = anomalib_outputs(model, [with_k])
    picks = {"normal": 0}
    if args.n_test_anomalous and args.n_test_normal < len(with_k):
        picks["defective"] = args.n_test_normal  # the first defective image
    print(
        f"\n== batch dependence: a test image alone vs in a batch of "
        f"{len(with_k)} test images"
    )
    dep = {}
    for kind, k in picks.items():
        _, a_alone = anomalib_outputs(model, [test_x[k : k + 1]])
        o_alone = detector.anomaly_maps(test[k : k + 1])
        for who, alone, batch in (
            ("anomalib", a_alone[0], a_batch[k]),
            ("skpadim", o_alone[0], o_batch[k]),
        ):
            span = float(batch.max() - batch.min())
            d = float(np.abs(alone.astype(np.float64) - batch).max())
            rel = d / span if span else float("nan")
            dep[f"{who} {kind} image {k}"] = {
                "max_abs_diff": d,
                "map_range_in_batch": span,
                "relative": rel,
                "image_score_alone": float(alone.max()),
                "image_score_in_batch": float(batch.max()),
            }
            print(
                f"{who:<9} {kind} image {k:<3} max |map alone - map in batch| = "
                f"{d:.3g} (map range in batch {span:.3g}: {rel:.1%}); image score "
                f"alone {alone.max():.4g}, in batch {batch.max():.4g}"
            )
    figures["batch_dependence"] = dep
    for who in ("anomalib", "skpadim"):
        worst = max(v["relative"] for key, v in dep.items() if key.startswith(who))
        infos.append(
            info_row(
                f"anomalib Cflow batch dependence, max map diff / map range: {who}",
                worst,
            )
        )

    total = (
        time.perf_counter() - script_start[0],
        time.process_time() - script_start[1],
    )
    print(
        f"\n== summary (load average now {load_average():.2f}; "
        f"script {fmt_pair(total)})"
    )
    print_targets(targets)
    for row in infos:
        print(f"info {row['name']}: {row['value']:.4g}{row['unit']}")
    if args.save:
        save_result("anomalib_cflow", figures, targets=targets, info=infos)


if __name__ == "__main__":
    main()
