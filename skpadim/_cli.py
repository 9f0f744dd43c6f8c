"""The ``skpadim`` command line: fit, score, export and inspect detectors.

Only click and the standard library are imported at module level; numpy,
scikit-learn and the estimators are imported inside the commands that need
them, so that the command line adds no start-up time of its own.
"""

from __future__ import annotations

import ast
import csv
import sys
import time
import warnings
from pathlib import Path

import click

from . import __version__

# Suffixes of the files taken from a folder (compared case-insensitively).
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")

# Command-line name -> class name in the skpadim namespace, looked up when
# used, so that a build without one of the detectors still runs the others.
DETECTORS = {
    "padim": "PadimDetector",
    "patchcore": "PatchCoreDetector",
    "spade": "SpadeDetector",
    "gaussian-ad": "GaussianADDetector",
    "cflow": "CflowDetector",
}

# Opacity of the heat map in the --maps overlays.
MAP_ALPHA = 0.5
# Images per anomaly_maps call when writing overlays: bounds the memory.
MAP_CHUNK = 32

_MODEL_HELP = "Model files are pickles: only load files you trust."


# --------------------------------------------------------------- inputs
def find_images(root):
    """Image files under ``root``, recursively, in a deterministic order.

    Parameters
    ----------
    root : path-like
        A folder.

    Returns
    -------
    paths : list of pathlib.Path
        Files whose suffix is in ``IMAGE_SUFFIXES`` (any case), sorted by
        their path relative to ``root``. Hidden files and folders are skipped:
        they hold editor and OS debris such as macOS's ``._name.png``, which
        are not images.
    """
    root = Path(root)
    found = [
        path
        for path in root.rglob("*")
        if path.suffix.lower() in IMAGE_SUFFIXES
        and path.is_file()
        and not any(part.startswith(".") for part in path.relative_to(root).parts)
    ]
    return sorted(found, key=lambda path: path.relative_to(root).parts)


def expand_inputs(inputs):
    """Expand files and folders into ``(path, name)`` pairs, in order.

    ``name`` is the path relative to its folder argument, or the file name of
    a file argument: it names the file's overlay under ``--maps``.
    """
    items = []
    for arg in map(Path, inputs):
        if arg.is_dir():
            found = find_images(arg)
            if not found:
                raise click.ClickException(_no_images(arg))
            items += [(path, path.relative_to(arg)) for path in found]
        else:
            items.append((arg, Path(arg.name)))
    return items


def _no_images(folder):
    return (
        f"No images found in {folder} (looked recursively for "
        f"{' '.join(IMAGE_SUFFIXES)})."
    )


def parse_settings(ctx, param, values):
    """Click callback: ``("key=value", ...)`` -> dict of parameters.

    Values are Python literals where possible (``8``, ``0.5``, ``None``,
    ``(256, 256)``, ``True``), else plain strings (``resnet18``), so that
    users need not quote strings.
    """
    settings = {}
    for item in values:
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            raise click.BadParameter(f"expected key=value, got {item!r}.")
        try:
            value = ast.literal_eval(text.strip())
        except (ValueError, SyntaxError):
            value = text.strip()
        settings[key.strip()] = value
    return settings


# --------------------------------------------------------------- models
def detector_class(name):
    """The skpadim class behind a ``--detector`` name, or a clear error."""
    import skpadim

    class_name = DETECTORS[name]
    cls = getattr(skpadim, class_name, None)
    if cls is None:
        raise click.ClickException(
            f"The {name!r} detector (skpadim.{class_name}) is not available in "
            f"this build of skpadim {skpadim.__version__}; available: "
            f"{', '.join(n for n, c in DETECTORS.items() if hasattr(skpadim, c))}."
        )
    return cls


def make_detector(cls, settings):
    """An instance of ``cls`` with ``--set`` parameters, progress bars on."""
    valid = cls().get_params(deep=False)
    unknown = sorted(set(settings) - set(valid))
    if unknown:
        raise click.BadParameter(
            f"unknown parameter(s) {', '.join(unknown)} for {cls.__name__}; "
            f"valid ones: {', '.join(sorted(valid))}.",
            param_hint="'--set'",
        )
    params = dict(settings)
    # A fit on a large folder takes minutes: show progress unless told not to.
    if "verbose" in valid:
        params.setdefault("verbose", 1)
    return cls(**params)


def load_model(path):
    """Unpickle a fitted skpadim detector; report load warnings on stderr.

    Returns
    -------
    detector : estimator
    warned : list of warnings.WarningMessage
        Warnings raised while loading (e.g. SkpadimVersionWarning).
    """
    import joblib
    from sklearn.base import BaseEstimator
    from sklearn.exceptions import NotFittedError
    from sklearn.utils.validation import check_is_fitted

    with warnings.catch_warnings(record=True) as warned:
        warnings.simplefilter("always")
        try:
            detector = joblib.load(path)
        # Unpickling can fail in many ways (truncated file, foreign pickle,
        # missing module, incompatible state format); all mean "not loadable".
        except Exception as exc:
            raise click.ClickException(
                f"Could not load a model from {path}: {type(exc).__name__}: {exc}"
            ) from exc
    # UserWarnings (skpadim's and sklearn's version warnings) concern the
    # user; deprecation chatter from unpickling library internals does not.
    warned = [w for w in warned if issubclass(w.category, UserWarning)]
    for message in dict.fromkeys(str(w.message) for w in warned):
        click.echo(f"Warning: {message}", err=True)
    if not (
        isinstance(detector, BaseEstimator)
        and type(detector).__module__.partition(".")[0] == "skpadim"
        and hasattr(detector, "score_samples")
    ):
        raise click.ClickException(
            f"{path} holds a {type(detector).__name__}, not a skpadim detector "
            "(save one with `skpadim fit`)."
        )
    try:
        check_is_fitted(detector)
    except NotFittedError as exc:
        raise click.ClickException(f"The model in {path} is not fitted.") from exc
    return detector, warned


# --------------------------------------------------------------- overlays
def colour_range(detector):
    """Default (low, high) of the heat-map colours, or None for per image.

    One scale for all images, so that colours compare across images: from
    the lowest training-image score to the threshold (``-offset_``). Map
    values at or above the threshold get the hottest colour. This reads the
    maps on the image-score scale, true of detectors whose image score is the
    maximum of the map (PaDiM, PatchCore).
    """
    import numpy as np

    train = getattr(detector, "train_scores_", None)
    offset = getattr(detector, "offset_", None)
    if train is None or offset is None:
        return None
    low, high = float(np.min(-np.asarray(train))), float(-offset)
    return (low, high) if high > low else None


def overlay(image, amap, low=None, high=None):
    """The RGB image with its anomaly map as a semi-transparent heat map.

    Parameters
    ----------
    image : PIL.Image.Image
        The image as read from disk.
    amap : ndarray of shape (H, W)
        Its anomaly map at the image's size; NaN (outside an analysed centre
        crop) is left uncoloured.
    low, high : float or None
        Map values shown with the coldest and hottest colours; None uses the
        map's own range.

    Returns
    -------
    PIL.Image.Image
    """
    import numpy as np
    from PIL import Image

    rgb = np.asarray(image.convert("RGB"), dtype=np.float32)
    if low is None or high is None:
        low, high = np.nanmin(amap), np.nanmax(amap)
    level = np.clip((amap - low) / max(high - low, 1e-12), 0.0, 1.0)
    colour, alpha = _heat(np.nan_to_num(level))
    alpha = np.where(np.isnan(amap), 0.0, alpha)[..., None]
    blended = rgb * (1.0 - alpha) + colour * alpha
    return Image.fromarray(blended.round().astype(np.uint8))


def _heat(level):
    """(colour (H, W, 3) in 0-255, alpha (H, W)) of levels in [0, 1]."""
    import numpy as np

    try:
        from matplotlib import colormaps  # the optional ``plot`` extra
    except ImportError:
        # Plain red whose opacity grows with the level: readable without
        # a colour scale, and needs only PIL.
        colour = np.zeros((*level.shape, 3), np.float32)
        colour[..., 0] = 255.0
        return colour, MAP_ALPHA * level
    colour = colormaps["jet"](level)[..., :3] * 255.0
    return colour, np.full(level.shape, MAP_ALPHA)


def unique_names(names):
    """``.png`` overlay names, with ``-1``, ``-2``... added to repeats."""
    taken, out = set(), []
    for name in names:
        candidate, k = name.with_suffix(".png"), 0
        while candidate in taken:
            k += 1
            candidate = name.with_name(f"{name.stem}-{k}.png")
        taken.add(candidate)
        out.append(candidate)
    return out


def write_maps(detector, paths, out_names, out_dir, low, high):
    """Write one overlay per image, ``MAP_CHUNK`` images at a time."""
    from PIL import Image

    # Our own bar replaces the detector's, which would restart every chunk.
    if "verbose" in detector.get_params(deep=False):
        detector.set_params(verbose=0)
    with click.progressbar(
        length=len(paths), label="Writing maps", file=sys.stderr
    ) as bar:
        for start in range(0, len(paths), MAP_CHUNK):
            chunk = paths[start : start + MAP_CHUNK]
            maps = detector.anomaly_maps([str(p) for p in chunk])
            for path, name, amap in zip(chunk, out_names[start:], maps):
                target = out_dir / name
                target.parent.mkdir(parents=True, exist_ok=True)
                with Image.open(path) as image:
                    overlay(image, amap, low, high).save(target)
            bar.update(len(chunk))


# --------------------------------------------------------------- commands
@click.group(context_settings={"help_option_names": ["-h", "--help"]})
# The package's own version: installed metadata goes stale in editable installs.
@click.version_option(version=__version__, prog_name="skpadim")
def main():
    """Visual anomaly detection from the command line.

    Fit a detector on a folder of normal images, then score new images:

    \b
        skpadim fit good_parts/ -o model.joblib
        skpadim score model.joblib new_parts/ --csv scores.csv --maps maps/
    """


@main.command()
@click.argument(
    "train_dir", type=click.Path(exists=True, file_okay=False, path_type=Path)
)
@click.option(
    "-o",
    "--output",
    required=True,
    type=click.Path(dir_okay=False, path_type=Path),
    help="Where to save the fitted model (a joblib file).",
)
@click.option(
    "--detector",
    type=click.Choice(list(DETECTORS)),
    default="padim",
    show_default=True,
    help="The detection method.",
)
@click.option(
    "--set",
    "settings",
    multiple=True,
    metavar="KEY=VALUE",
    callback=parse_settings,
    help="A detector parameter, e.g. --set image_size=256 --set backbone="
    "resnet18; repeat for several. Values are read as Python literals "
    "(8, 0.5, None, (256, 256)), else as text.",
)
def fit(train_dir, output, detector, settings):
    """Fit a detector on the normal images in TRAIN_DIR and save it.

    TRAIN_DIR is searched recursively for .png, .jpg, .jpeg, .bmp, .tif,
    .tiff and .webp files (any case). All of them should show normal,
    defect-free items.
    """
    import joblib

    paths = find_images(train_dir)
    if not paths:
        raise click.ClickException(_no_images(train_dir))
    # Fail before a long fit, not after it.
    if not output.parent.is_dir():
        raise click.ClickException(f"Output folder {output.parent} does not exist.")
    cls = detector_class(detector)
    try:
        est = make_detector(cls, settings)
        start = time.perf_counter()
        est.fit([str(p) for p in paths])
    # The estimator's own message says what is wrong with a value or image.
    except (ValueError, TypeError) as exc:
        raise click.ClickException(str(exc)) from exc
    seconds = time.perf_counter() - start
    joblib.dump(est, output)
    offset = getattr(est, "offset_", float("nan"))
    click.echo(
        f"{cls.__name__}: fitted on {_images(len(paths))} in {seconds:.1f} s, "
        f"offset_={offset:.6g}, saved to {output}"
    )


@main.command()
@click.argument("model", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.argument(
    "images",
    nargs=-1,
    required=True,
    type=click.Path(exists=True, path_type=Path),
)
@click.option(
    "--csv",
    "csv_path",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Write the scores to this CSV file instead of standard output.",
)
@click.option(
    "--maps",
    "maps_dir",
    type=click.Path(file_okay=False, path_type=Path),
    help="Write an anomaly heat-map overlay PNG per image into this folder.",
)
@click.option(
    "--vmin",
    type=float,
    help="Map value of the coldest overlay colour [default: lowest training score].",
)
@click.option(
    "--vmax",
    type=float,
    help="Map value of the hottest overlay colour [default: the threshold].",
)
def score(model, images, csv_path, maps_dir, vmin, vmax):
    """Score IMAGES (files or folders) with the detector saved in MODEL.

    One CSV row per image: path, anomaly_score (higher is more anomalous),
    decision (negative means anomalous) and label (normal or anomalous).
    With --maps, also a column map naming the image's overlay file.
    Folders are searched recursively as in `skpadim fit`.
    """
    import numpy as np

    detector, _ = load_model(model)
    if maps_dir is not None and not hasattr(detector, "anomaly_maps"):
        raise click.ClickException(
            f"{type(detector).__name__} scores whole images and has no anomaly "
            "maps; drop --maps."
        )
    if csv_path is not None and not csv_path.parent.is_dir():
        raise click.ClickException(f"Output folder {csv_path.parent} does not exist.")
    items = expand_inputs(images)
    paths = [path for path, _ in items]
    try:
        # One pass over the files: the detector reads them lazily in batches.
        # decision and label follow from the scores exactly as in the
        # detector's decision_function and predict (OutlierMixin contract).
        scores = detector.score_samples([str(p) for p in paths])
        decision = scores - detector.offset_
        rows = [
            [str(path), repr(float(-s)), repr(float(d)), _label(d)]
            for path, s, d in zip(paths, scores, decision)
        ]
        if maps_dir is not None:
            names = unique_names([name for _, name in items])
            rows = [row + [str(maps_dir / n)] for row, n in zip(rows, names)]
        _write_csv(rows, csv_path, with_maps=maps_dir is not None)
        if maps_dir is not None:
            low, high = colour_range(detector) or (None, None)
            low = low if vmin is None else vmin
            high = high if vmax is None else vmax
            write_maps(detector, paths, names, maps_dir, low, high)
    except (ValueError, TypeError) as exc:
        raise click.ClickException(str(exc)) from exc
    n_anomalous = int(np.sum(decision < 0))
    click.echo(f"{_images(len(paths))} scored, {n_anomalous} anomalous.", err=True)


def _images(n):
    return f"{n} image" if n == 1 else f"{n} images"


def _label(decision):
    return "normal" if decision >= 0 else "anomalous"


def _write_csv(rows, csv_path, with_maps):
    header = ["path", "anomaly_score", "decision", "label"]
    header += ["map"] if with_maps else []
    if csv_path is None:
        writer = csv.writer(click.get_text_stream("stdout"), lineterminator="\n")
        writer.writerows([header, *rows])
        return
    with open(csv_path, "w", newline="", encoding="utf-8") as f:
        csv.writer(f).writerows([header, *rows])


@main.command()
@click.argument("model", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.argument("output", type=click.Path(dir_okay=False, path_type=Path))
def export(model, output):
    """Export the detector saved in MODEL to an ONNX file OUTPUT."""
    detector, _ = load_model(model)
    hint = "ONNX export needs skpadim[onnx]: pip install 'skpadim[onnx]'"
    try:
        from skpadim.export import to_onnx
    except ImportError as exc:
        raise click.ClickException(f"{hint} ({exc}).") from exc
    try:
        to_onnx(detector, output)
    except ImportError as exc:  # the exporter imports onnx lazily
        raise click.ClickException(f"{hint} ({exc}).") from exc
    except (ValueError, TypeError, NotImplementedError) as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(f"Exported {type(detector).__name__} to {output}")


@main.command()
@click.argument("model", type=click.Path(exists=True, dir_okay=False, path_type=Path))
def info(model):
    """Describe the detector saved in MODEL: class, parameters, threshold."""
    import sklearn
    import torch

    import skpadim
    from skpadim._persistence import SkpadimVersionWarning, VersionedStateMixin

    detector, warned = load_model(model)
    cls = type(detector)
    lines = [f"detector: {cls.__name__} ({cls.__module__})"]
    lines.append(f"training images: {_n_trained(detector)}")
    if hasattr(detector, "offset_"):
        lines.append(f"threshold offset_: {detector.offset_!r}")
    if hasattr(detector, "frame_shape_"):
        height, width = detector.frame_shape_
        lines.append(f"frame size: {height} x {width} (height x width)")
    if not isinstance(detector, VersionedStateMixin):
        lines.append("saved by: not recorded by this detector")
    elif any(issubclass(w.category, SkpadimVersionWarning) for w in warned):
        lines.append("saved by: another skpadim version (see the warning above)")
    else:
        # Loading checks the stamp and warns on any difference.
        lines.append(f"saved by: skpadim {skpadim.__version__}")
    lines.append(
        f"loaded with: skpadim {skpadim.__version__}, scikit-learn "
        f"{sklearn.__version__}, torch {torch.__version__}"
    )
    lines.append("parameters:")
    params = detector.get_params(deep=False)
    lines += [f"  {key} = {params[key]!r}" for key in sorted(params)]
    click.echo("\n".join(lines))


def _n_trained(detector):
    if hasattr(detector, "n_samples_seen_"):
        return int(detector.n_samples_seen_)
    if hasattr(detector, "train_scores_"):
        return len(detector.train_scores_)
    return "unknown"
