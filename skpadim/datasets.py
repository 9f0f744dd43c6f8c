"""Datasets for visual anomaly detection.

Loaders for the MVTec AD folder layout, for a user's own folder of images
sorted by class, and for the ELPV solar-cell dataset, plus a generator of
synthetic defects on real textures.

The loaders return file paths, not decoded pixels: a dataset of thousands of
images costs nothing until the detector reads it, one batch at a time. The
synthetic generator is the exception, as its images only exist in memory.

Conventions shared by the whole package: labels follow scikit-learn's outlier
convention, ``+1`` for a normal image and ``-1`` for an anomalous one; masks
are boolean ``(H, W)`` arrays in which ``True`` marks a defective pixel.
"""

from __future__ import annotations

from numbers import Integral, Real
from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage
from sklearn.utils import Bunch, check_random_state

__all__ = [
    "IMAGE_EXTENSIONS",
    "MVTEC_AD_CATEGORIES",
    "SYNTHETIC_DEFECT_KINDS",
    "SYNTHETIC_TEXTURES",
    "add_synthetic_defect",
    "load_elpv",
    "load_image_folder",
    "load_mask",
    "load_mvtec_ad",
    "make_synthetic_defects",
]

#: The 15 categories of the official MVTec AD release.
MVTEC_AD_CATEGORIES = (
    "bottle",
    "cable",
    "capsule",
    "carpet",
    "grid",
    "hazelnut",
    "leather",
    "metal_nut",
    "pill",
    "screw",
    "tile",
    "toothbrush",
    "transistor",
    "wood",
    "zipper",
)

#: File suffixes read as images by default (compared case-insensitively).
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")

#: Texture names of :func:`make_synthetic_defects`, from ``skimage.data``.
SYNTHETIC_TEXTURES = ("brick", "grass", "gravel")

#: Defect kinds of :func:`add_synthetic_defect`.
SYNTHETIC_DEFECT_KINDS = ("patch", "scratch", "blob")

_NORMAL, _ANOMALOUS = 1, -1
_GOOD = "good"
# Synthetic defects need room to be placed and to stay thin relative to the
# image, so smaller images are refused.
_MIN_SYNTHETIC_SIDE = 32


# --------------------------------------------------------------------------
# File-system helpers
# --------------------------------------------------------------------------


def _existing_dir(path, what):
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(
            f"{what} {str(path)!r} does not exist or is not a directory."
        )
    return path


def _subdirs(path):
    """Visible sub-directories of ``path`` (none if it is missing), by name."""
    if not path.is_dir():
        return []
    # Hidden folders (.ipynb_checkpoints, .DS_Store's cousins) are never classes.
    return sorted(
        p for p in path.iterdir() if p.is_dir() and not p.name.startswith(".")
    )


def _image_files(folder, extensions):
    """Sorted string paths of the image files directly inside ``folder``."""
    if not folder.is_dir():
        return []
    return sorted(
        str(p)
        for p in folder.iterdir()
        if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in extensions
    )


def _check_extensions(extensions):
    if isinstance(extensions, str):
        extensions = (extensions,)
    try:
        extensions = tuple(extensions)
    except TypeError:
        extensions = None
    if not extensions or not all(isinstance(e, str) and e for e in extensions):
        raise ValueError(
            "extensions must be a non-empty sequence of file suffixes such as "
            f"('.png', '.jpg'); got {extensions!r}."
        )
    # Accept "png" as well as ".png", and match ".PNG" files too.
    return tuple(
        e.lower() if e.startswith(".") else "." + e.lower() for e in extensions
    )


# --------------------------------------------------------------------------
# MVTec AD
# --------------------------------------------------------------------------


def _mvtec_category_dir(root, category):
    if not isinstance(category, str) or not category:
        raise ValueError(f"category must be a non-empty str; got {category!r}.")
    category_dir = root / category
    if category_dir.is_dir():
        return category_dir
    # A category is recognised by its train/ folder; other folders in root
    # (a licence directory, archives unpacked beside) are not listed.
    found = [d.name for d in _subdirs(root) if (d / "train").is_dir()]
    hint = f"found categories: {found}" if found else "found no category folders"
    raise ValueError(
        f"category {category!r} not found in MVTec AD root {str(root)!r}; {hint}."
    )


def _mvtec_mask_path(category_dir, defect, image_path):
    """Ground-truth mask of a defective test image; raises if it is missing."""
    mask = category_dir / "ground_truth" / defect / f"{Path(image_path).stem}_mask.png"
    if not mask.is_file():
        raise FileNotFoundError(
            f"test image {image_path!r} (defect type {defect!r}) has no "
            f"ground-truth mask; expected {str(mask)!r}."
        )
    return str(mask)


def _mvtec_test_split(category_dir, extensions):
    rows = []
    for defect_dir in _subdirs(category_dir / "test"):
        defect = defect_dir.name
        for path in _image_files(defect_dir, extensions):
            is_good = defect == _GOOD
            mask = None if is_good else _mvtec_mask_path(category_dir, defect, path)
            rows.append((path, _NORMAL if is_good else _ANOMALOUS, defect, mask))
    if not rows:
        raise ValueError(
            f"no test images found in {str(category_dir / 'test')!r}; expected "
            "test/<defect type>/*.png with test/good/ for normal images."
        )
    # Sorting whole paths (rather than folder, then file) makes the order one
    # simple invariant: test_paths == sorted(test_paths).
    rows.sort(key=lambda row: row[0])
    paths, labels, defects, masks = zip(*rows)
    return list(paths), np.asarray(labels, dtype=np.int64), list(defects), list(masks)


def load_mvtec_ad(root, category, *, extensions=IMAGE_EXTENSIONS):
    """Load one category of MVTec AD (or any dataset in its folder layout).

    The expected layout is ``<root>/<category>/train/good/*.png`` for the
    normal training images, ``<root>/<category>/test/<defect>/*.png`` for the
    test images, where the defect type ``good`` holds the normal ones, and
    ``<root>/<category>/ground_truth/<defect>/<stem>_mask.png`` for the
    pixel mask of each defective test image. Nothing is decoded: the images
    are read later, by the detector, from the returned paths.

    Parameters
    ----------
    root : str or path-like
        Folder holding one sub-folder per category, e.g. the unpacked
        ``mvtec_anomaly_detection`` archive.
    category : str
        Name of the category folder, e.g. ``"bottle"``; one of
        :data:`MVTEC_AD_CATEGORIES` for the official release, but any folder
        in the same layout is accepted.
    extensions : sequence of str, default=IMAGE_EXTENSIONS
        File suffixes of the train and test images (masks are always
        ``.png``). MVTec AD itself only has ``.png`` files.

    Returns
    -------
    data : sklearn.utils.Bunch
        With the keys:

        train_paths : list of str
            Sorted paths of the normal training images.
        test_paths : list of str
            Sorted paths of the test images.
        test_labels : ndarray of shape (n_test,), dtype int64
            ``+1`` for a normal test image, ``-1`` for a defective one.
        test_defect_types : list of str
            Defect type (test folder name) of each test image, ``"good"``
            for the normal ones.
        test_mask_paths : list of str or None
            Path of each test image's mask, ``None`` for normal images; read
            them with :func:`load_mask`.
        category : str
            The category loaded.
        root : str
            The dataset root.

    Raises
    ------
    FileNotFoundError
        If ``root`` is missing, or a defective test image has no mask.
    ValueError
        If ``category`` is not a folder of ``root`` (the message lists the
        categories found), or there are no training or no test images.

    See Also
    --------
    load_mask : Read a mask path into a boolean array.

    Examples
    --------
    >>> from skpadim.datasets import load_mvtec_ad
    >>> data = load_mvtec_ad("~/data/mvtec_anomaly_detection", "bottle")
    ... # doctest: +SKIP
    >>> len(data.train_paths), len(data.test_paths)  # doctest: +SKIP
    (209, 83)
    """
    root = _existing_dir(Path(root).expanduser(), "MVTec AD root")
    extensions = _check_extensions(extensions)
    category_dir = _mvtec_category_dir(root, category)
    train_dir = category_dir / "train" / _GOOD
    train_paths = _image_files(train_dir, extensions)
    if not train_paths:
        raise ValueError(
            f"no training images found in {str(train_dir)!r}; expected files "
            f"with one of the suffixes {list(extensions)}."
        )
    paths, labels, defects, masks = _mvtec_test_split(category_dir, extensions)
    return Bunch(
        train_paths=train_paths,
        test_paths=paths,
        test_labels=labels,
        test_defect_types=defects,
        test_mask_paths=masks,
        category=category,
        root=str(root),
    )


def load_mask(path, shape=None):
    """Read a ground-truth mask image into a boolean array.

    Parameters
    ----------
    path : str, path-like or None
        Mask image, white (non-zero) on the defect. ``None``, as
        :func:`load_mvtec_ad` gives for normal images, yields an all-False
        mask of ``shape``.
    shape : tuple of int, default=None
        Expected ``(H, W)``. Extra trailing entries are ignored, so an
        image's ``.shape`` can be passed directly. Required when ``path`` is
        None; otherwise the mask read is checked against it.

    Returns
    -------
    mask : ndarray of shape (H, W), dtype bool
        True on defective pixels.

    Raises
    ------
    ValueError
        If ``path`` is None and ``shape`` is not given, or the mask read does
        not have the expected shape.

    Examples
    --------
    >>> from skpadim.datasets import load_mask
    >>> load_mask(None, (2, 3))
    array([[False, False, False],
           [False, False, False]])
    """
    if shape is not None:
        shape = tuple(int(s) for s in shape)[:2]
    if path is None:
        if shape is None or len(shape) != 2:
            raise ValueError(
                "load_mask(None, shape) needs shape=(H, W) to build an empty "
                f"mask; got shape={shape!r}."
            )
        return np.zeros(shape, dtype=bool)
    with Image.open(path) as img:
        values = np.asarray(img.convert("L"))
    # MVTec masks are 0/255, but masks saved by other tools are often 0/1;
    # resized masks have grey edges, which the half-way threshold splits.
    mask = values > 0 if values.max(initial=0) <= 1 else values >= 128
    if shape is not None and mask.shape != shape:
        raise ValueError(
            f"mask {str(path)!r} has shape {mask.shape}; expected {shape}."
        )
    return mask


# --------------------------------------------------------------------------
# A user's own image folder
# --------------------------------------------------------------------------


def _folder_classes(root, extensions):
    """Image paths of every non-empty class sub-folder, by folder name."""
    classes = {d.name: _image_files(d, extensions) for d in _subdirs(root)}
    return {name: paths for name, paths in classes.items() if paths}


def _check_normal_folder(root, normal, classes):
    if normal is None or normal in classes or (root / normal).is_dir():
        return
    raise ValueError(
        f"no normal folder {normal!r} in {str(root)!r}; found sub-folders "
        f"{sorted(classes)}. Pass normal=<folder of good images>, or "
        "normal=None if every sub-folder holds defects."
    )


def load_image_folder(root, *, normal=_GOOD, extensions=IMAGE_EXTENSIONS):
    """Load a folder of images sorted into one sub-folder per class.

    The sub-folder named ``normal`` holds good parts; every other sub-folder
    holds defective parts, its name being the defect type::

        root/good/001.png       -> +1, "good"
        root/scratch/017.jpg    -> -1, "scratch"

    A folder with only the ``normal`` sub-folder, or with the images directly
    inside ``root`` and no sub-folder, gives all-normal data, e.g. for
    training. Only files directly inside each folder are read, not deeper
    ones; hidden files and folders are skipped.

    Parameters
    ----------
    root : str or path-like
        The folder to read.
    normal : str or None, default="good"
        Name of the sub-folder of normal images. ``None`` means there is no
        normal class: every sub-folder holds defects.
    extensions : sequence of str, default=IMAGE_EXTENSIONS
        File suffixes read as images, compared case-insensitively.

    Returns
    -------
    data : sklearn.utils.Bunch
        With the keys:

        paths : list of str
            Image paths, sorted.
        labels : ndarray of shape (n_images,), dtype int64
            ``+1`` for normal images, ``-1`` for defective ones.
        defect_types : list of str
            Class folder of each image; ``normal`` for the normal ones.
        root : str
            The folder read.

    Raises
    ------
    FileNotFoundError
        If ``root`` does not exist.
    ValueError
        If no image is found, if images lie both directly in ``root`` and in
        sub-folders, or if the ``normal`` sub-folder is missing while others
        exist (the message lists them).

    Examples
    --------
    >>> from skpadim.datasets import load_image_folder
    >>> data = load_image_folder("parts/test")  # doctest: +SKIP
    >>> sorted(set(data.defect_types))  # doctest: +SKIP
    ['dent', 'good', 'scratch']
    """
    root = _existing_dir(Path(root).expanduser(), "image folder")
    extensions = _check_extensions(extensions)
    if normal is not None and (not isinstance(normal, str) or not normal):
        raise ValueError(f"normal must be a folder name or None; got {normal!r}.")
    classes = _folder_classes(root, extensions)
    loose = _image_files(root, extensions)
    if loose and classes:
        raise ValueError(
            f"{str(root)!r} holds images both directly and in the sub-folders "
            f"{sorted(classes)}; put every image in a class sub-folder."
        )
    if loose:
        if normal is None:
            raise ValueError(
                f"{str(root)!r} has no class sub-folders, so its images are "
                "taken as normal, which needs normal=<name>; got normal=None."
            )
        classes = {normal: loose}
    if not classes:
        raise ValueError(
            f"no images found in {str(root)!r} or its sub-folders; expected "
            f"files with one of the suffixes {list(extensions)}."
        )
    _check_normal_folder(root, normal, classes)
    rows = sorted((p, name) for name, paths in classes.items() for p in paths)
    return Bunch(
        paths=[p for p, _ in rows],
        labels=np.array(
            [_NORMAL if name == normal else _ANOMALOUS for _, name in rows],
            dtype=np.int64,
        ),
        defect_types=[name for _, name in rows],
        root=str(root),
    )


# --------------------------------------------------------------------------
# ELPV solar cells
# --------------------------------------------------------------------------

_ELPV_UNCERTAIN = ("drop", "normal", "anomalous")
_ELPV_CELL_TYPES = ("mono", "poly")

_ELPV_DESCR = """\
ELPV: electroluminescence images of solar cells
-----------------------------------------------

2,624 images of single solar cells cut out of electroluminescence (EL)
images of 44 photovoltaic modules: 1,074 monocrystalline ("mono") and 1,550
polycrystalline ("poly") cells. Every image is a 300 x 300 pixel, 8-bit
grayscale PNG (PIL mode "L"), corrected for lens distortion and normalised
in size and perspective. Defects (cracks, inactive regions, finger
interruptions...) show as dark areas. Mono and poly cells look very
different when defect-free (mono cells have dark corners, poly cells a
grain texture), so fitting one detector per cell type is advisable.

An expert graded each cell with a defect probability of 0, 1/3, 2/3 or 1;
the middle grades are cells the expert was unsure about. There are no
pixel masks: only image-level scores can be evaluated.

Source: the ``elpv-dataset`` package (https://github.com/zae-bayern/elpv-dataset),
licensed CC BY-NC-SA 4.0 (non-commercial use).

References: Buerhop-Lutz, C. et al. "A Benchmark for Visual Identification of
Defective Solar Cells in Electroluminescence Imagery", EU PVSEC 2018;
Deitsch, S. et al. "Automatic classification of defective photovoltaic module
cells in electroluminescence images", Solar Energy 185, 455-468, 2019.
"""


def _elpv_data_dir():
    try:
        import elpv_dataset
    except ImportError as exc:
        raise ImportError(
            "load_elpv needs the optional package 'elpv-dataset', which ships "
            "the images: pip install elpv-dataset (or pip install skpadim[elpv])."
        ) from exc
    return Path(elpv_dataset.__file__).resolve().parent / "data"


def _read_elpv_labels(csv_path):
    """Parse labels.csv: whitespace-separated ``path probability type`` rows."""
    rows = []
    with open(csv_path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            fields = line.split()
            if not fields:
                continue
            if len(fields) != 3:
                raise ValueError(
                    f"{str(csv_path)!r} line {lineno}: expected 3 fields "
                    f"(path, defect probability, cell type); got {fields!r}."
                )
            rows.append((fields[0], float(fields[1]), fields[2]))
    paths, proba, types = zip(*rows)
    return np.array(paths), np.array(proba, dtype=np.float64), np.array(types)


def _check_elpv_options(min_defect_probability, uncertain, cell_type):
    p = min_defect_probability
    if isinstance(p, bool) or not isinstance(p, Real) or not 0 < p <= 1:
        raise ValueError(
            f"min_defect_probability must be a number in (0, 1]; got {p!r}."
        )
    if uncertain not in _ELPV_UNCERTAIN:
        raise ValueError(
            f"uncertain must be one of {_ELPV_UNCERTAIN}; got {uncertain!r}."
        )
    if cell_type is not None and cell_type not in _ELPV_CELL_TYPES:
        raise ValueError(
            f"cell_type must be None, 'mono' or 'poly'; got {cell_type!r}."
        )


def _elpv_labels(proba, min_defect_probability, uncertain):
    """+1 / -1 per cell, 0 for the uncertain cells to drop."""
    labels = np.zeros(proba.shape, dtype=np.int64)
    labels[proba == 0] = _NORMAL
    labels[proba >= min_defect_probability] = _ANOMALOUS
    between = labels == 0
    if uncertain == "normal":
        labels[between] = _NORMAL
    elif uncertain == "anomalous":
        labels[between] = _ANOMALOUS
    return labels


def load_elpv(*, min_defect_probability=0.5, uncertain="drop", cell_type=None):
    """Load the ELPV dataset of solar-cell electroluminescence images.

    The images come from the optional ``elpv-dataset`` package; only their
    paths are returned, the pixels are read later by the detector. Each cell
    carries an expert's defect probability of 0, 1/3, 2/3 or 1. Cells graded
    0 are normal (``+1``) and cells graded at least
    ``min_defect_probability`` are anomalous (``-1``). The cells in between
    are ones the expert hesitated over; by default they are dropped, so that
    neither class is polluted by doubtful cells, which ``uncertain`` changes.

    Parameters
    ----------
    min_defect_probability : float, default=0.5
        Lowest defect probability labelled anomalous, in (0, 1]. The default
        makes 2/3 and 1 anomalous and leaves 1/3 uncertain; ``1.0`` keeps
        only certain defects (2/3 then becomes uncertain too). The grades are
        stored as ``2/3 == 0.666...``, so pass ``2/3`` rather than a rounded
        ``0.67`` to make that grade anomalous.
    uncertain : {"drop", "normal", "anomalous"}, default="drop"
        What to do with cells graded above 0 but below
        ``min_defect_probability``: leave them out, label them ``+1``, or
        label them ``-1``. ``"normal"`` with the default threshold gives the
        binary split of the ELPV papers (functional if below 0.5).
    cell_type : {"mono", "poly"} or None, default=None
        Keep only mono- or polycrystalline cells; None keeps both.

    Returns
    -------
    data : sklearn.utils.Bunch
        With the keys:

        paths : list of str
            Absolute paths of the 300 x 300 grayscale PNG images.
        labels : ndarray of shape (n_images,), dtype int64
            ``+1`` for normal cells, ``-1`` for defective ones.
        defect_probability : ndarray of shape (n_images,), dtype float64
            The expert grade, one of 0, 1/3, 2/3, 1.
        cell_type : ndarray of shape (n_images,), dtype str
            ``"mono"`` or ``"poly"``.
        DESCR : str
            Description of the dataset and of the selection made.

    Raises
    ------
    ImportError
        If the ``elpv-dataset`` package is not installed.
    ValueError
        If an option has an invalid value.

    Examples
    --------
    >>> from skpadim.datasets import load_elpv
    >>> data = load_elpv(cell_type="mono")  # doctest: +SKIP
    >>> len(data.paths), int((data.labels == -1).sum())  # doctest: +SKIP
    (957, 369)
    """
    _check_elpv_options(min_defect_probability, uncertain, cell_type)
    data_dir = _elpv_data_dir()
    rel_paths, proba, types = _read_elpv_labels(data_dir / "labels.csv")
    labels = _elpv_labels(proba, min_defect_probability, uncertain)
    keep = labels != 0
    if cell_type is not None:
        keep &= types == cell_type
    paths = [str(data_dir / p) for p in rel_paths[keep]]
    missing = [p for p in paths if not Path(p).is_file()]
    if missing:
        raise FileNotFoundError(
            f"{len(missing)} ELPV images listed in labels.csv are missing, e.g. "
            f"{missing[0]!r}; reinstall elpv-dataset."
        )
    labels = labels[keep]
    selection = (
        f"This selection (min_defect_probability={min_defect_probability!r}, "
        f"uncertain={uncertain!r}, cell_type={cell_type!r}): {len(paths)} "
        f"images, {int((labels == _NORMAL).sum())} normal (+1) and "
        f"{int((labels == _ANOMALOUS).sum())} anomalous (-1).\n"
    )
    return Bunch(
        paths=paths,
        labels=labels,
        defect_probability=proba[keep],
        cell_type=types[keep],
        DESCR=_ELPV_DESCR + "\n" + selection,
    )


# --------------------------------------------------------------------------
# Synthetic defects on real textures
# --------------------------------------------------------------------------


def _check_uint8_image(image, name="image"):
    image = np.asarray(image)
    if image.dtype != np.uint8 or image.ndim not in (2, 3):
        raise ValueError(
            f"{name} must be a uint8 array of shape (H, W) or (H, W, C); got "
            f"dtype {image.dtype} and shape {image.shape}."
        )
    if min(image.shape[:2]) < _MIN_SYNTHETIC_SIDE:
        raise ValueError(
            f"{name} must be at least {_MIN_SYNTHETIC_SIDE} pixels on each "
            f"side; got shape {image.shape}."
        )
    return image


def _soft_alpha(mask, floor=0.6):
    """Blend weight rising from ``floor`` at the mask edge to 1 inside.

    It softens a defect's outline the way real stains fade, while staying
    zero outside the mask, so the mask remains the exact set of changed
    pixels.
    """
    depth = ndimage.distance_transform_edt(mask)
    return np.where(mask, np.minimum(1.0, floor + (1 - floor) * (depth - 1) / 2), 0.0)


def _blend_toward(pixels, bright, strength):
    """Move ``pixels`` a fraction ``strength`` of the way to white or black."""
    target = 255.0 if bright else 0.0
    return pixels + strength * (target - pixels)


def _patch_defect(pixels, rng):
    """A rectangle of the same texture, turned 90 degrees and re-contrasted."""
    height, width = pixels.shape[:2]
    side = min(height, width)
    area = rng.uniform(0.03, 0.08) * height * width
    aspect = np.exp(rng.uniform(np.log(0.5), np.log(2.0)))
    h = int(np.clip(round(np.sqrt(area * aspect)), 4, side // 2))
    w = int(np.clip(round(area / h), 4, side // 2))
    top, left = rng.randint(0, height - h + 1), rng.randint(0, width - w + 1)
    # The source is read as w x h then rotated to h x w: a turned copy of the
    # texture breaks its orientation (brick courses, grass blades), and the
    # contrast change keeps it from blending in on isotropic textures.
    s_top, s_left = rng.randint(0, height - w + 1), rng.randint(0, width - h + 1)
    source = np.rot90(pixels[s_top : s_top + w, s_left : s_left + h], k=1)
    mean = source.mean(axis=(0, 1), keepdims=True)
    gain = rng.uniform(0.3, 0.6) if rng.rand() < 0.5 else rng.uniform(1.6, 2.2)
    shift = rng.choice([-1.0, 1.0]) * rng.uniform(25, 50)
    mask = np.zeros((height, width), dtype=bool)
    mask[top : top + h, left : left + w] = True
    changed = pixels.copy()
    changed[top : top + h, left : left + w] = (source - mean) * gain + mean + shift
    return mask, changed


def _segment_mask(shape, start, end, radius):
    """Pixels whose centre lies within ``radius`` of the segment start-end."""
    yy, xx = np.mgrid[: shape[0], : shape[1]].astype(np.float64)
    (y0, x0), (y1, x1) = start, end
    dy, dx = y1 - y0, x1 - x0
    t = np.clip(((yy - y0) * dy + (xx - x0) * dx) / (dy * dy + dx * dx), 0, 1)
    return np.hypot(yy - (y0 + t * dy), xx - (x0 + t * dx)) <= radius


def _scratch_defect(pixels, rng):
    """A thin straight bright or dark line at a random angle."""
    height, width = pixels.shape[:2]
    side = min(height, width)
    thickness = max(2.0, side * rng.uniform(0.02, 0.035))
    length = side * rng.uniform(0.5, 0.9)
    angle = rng.uniform(0, np.pi)
    half_dy, half_dx = np.sin(angle) * length / 2, np.cos(angle) * length / 2
    # Centre chosen so that the whole line fits: a clipped scratch would
    # fall below the advertised minimum area.
    cy = rng.uniform(abs(half_dy) + thickness, height - abs(half_dy) - thickness)
    cx = rng.uniform(abs(half_dx) + thickness, width - abs(half_dx) - thickness)
    start, end = (cy - half_dy, cx - half_dx), (cy + half_dy, cx + half_dx)
    # A hard distance threshold, no anti-aliasing: every changed pixel is in
    # the mask and every mask pixel is changed by the same rule.
    mask = _segment_mask((height, width), start, end, thickness / 2)
    changed = _blend_toward(pixels, rng.rand() < 0.5, rng.uniform(0.55, 0.85))
    return mask, changed


def _largest_component(mask):
    labelled, n = ndimage.label(mask)
    if n <= 1:
        return mask
    sizes = np.bincount(labelled.ravel())[1:]
    return labelled == 1 + int(np.argmax(sizes))


def _blob_defect(pixels, rng):
    """An irregular stain: smoothed noise thresholded inside a disc."""
    height, width = pixels.shape[:2]
    target = rng.uniform(0.02, 0.06) * height * width
    # The disc is larger than the blob so that the noise can carve its outline.
    radius = 1.4 * np.sqrt(target / np.pi)
    cy = rng.uniform(radius, height - radius)
    cx = rng.uniform(radius, width - radius)
    noise = ndimage.gaussian_filter(
        rng.standard_normal((height, width)), sigma=max(1.0, radius / 3)
    )
    yy, xx = np.mgrid[:height, :width]
    dist2 = ((yy - cy) ** 2 + (xx - cx) ** 2) / radius**2
    # Radial falloff plus noise: compact but ragged; thresholding at the
    # score of the k-th best pixel hits the target area exactly.
    score = np.where(dist2 <= 1, 1 - dist2 + 0.8 * noise / noise.std(), -np.inf)
    k = int(round(target))
    threshold = np.partition(score.ravel(), -k)[-k]
    mask = ndimage.binary_fill_holes(_largest_component(score >= threshold))
    stained = _blend_toward(pixels, rng.rand() < 0.5, rng.uniform(0.4, 0.65))
    alpha = _soft_alpha(mask)
    if pixels.ndim == 3:
        alpha = alpha[..., None]
    return mask, pixels + alpha * (stained - pixels)


_DEFECT_MAKERS = {
    "patch": _patch_defect,
    "scratch": _scratch_defect,
    "blob": _blob_defect,
}


def add_synthetic_defect(image, *, kind, random_state=None):
    """Paint one synthetic defect on an image and return its exact mask.

    Only the pixels under the returned mask are changed; all others keep
    their value. The defect covers roughly 1-8% of the image:

    - ``"patch"``: a rectangle (3-8% of the area) filled with a piece of the
      same image turned by 90 degrees, with its contrast scaled and its
      brightness shifted.
    - ``"scratch"``: a straight line 2-3.5% of the image side thick (at
      least 2 pixels) and 50-90% of it long, at a random angle, pulled
      towards white or black. Drawn without anti-aliasing.
    - ``"blob"``: an irregular stain (about 1.5-6% of the area) made by
      thresholding smoothed noise inside a disc, darkening or brightening
      the texture beneath it, with a softened edge that stays inside the
      mask.

    Parameters
    ----------
    image : ndarray of shape (H, W) or (H, W, C), dtype uint8
        The defect-free image, at least 32 pixels on each side. It is not
        modified.
    kind : {"patch", "scratch", "blob"}
        The kind of defect.
    random_state : int, RandomState instance or None, default=None
        Seed or generator for the defect's position, shape and intensity.

    Returns
    -------
    defective : ndarray, same shape as ``image``, dtype uint8
        A copy of ``image`` with the defect.
    mask : ndarray of shape (H, W), dtype bool
        True exactly on the defect.

    Raises
    ------
    ValueError
        If ``kind`` is unknown or ``image`` is not a large enough uint8 image.

    Examples
    --------
    >>> import numpy as np
    >>> from skpadim.datasets import add_synthetic_defect
    >>> image = np.full((64, 64), 128, dtype=np.uint8)
    >>> defective, mask = add_synthetic_defect(image, kind="scratch", random_state=0)
    >>> bool((defective[~mask] == image[~mask]).all()), mask.dtype
    (True, dtype('bool'))
    """
    if kind not in _DEFECT_MAKERS:
        raise ValueError(f"kind must be one of {SYNTHETIC_DEFECT_KINDS}; got {kind!r}.")
    image = _check_uint8_image(image)
    rng = check_random_state(random_state)
    mask, changed = _DEFECT_MAKERS[kind](image.astype(np.float64), rng)
    defective = image.copy()
    # Copying back only the masked pixels is what makes the mask exact.
    defective[mask] = np.clip(np.rint(changed[mask]), 0, 255).astype(np.uint8)
    return defective, mask


def _load_texture(texture):
    """The texture as an (H, W, C) uint8 array; names come from skimage.data."""
    if isinstance(texture, str):
        if texture not in SYNTHETIC_TEXTURES:
            raise ValueError(
                f"texture must be one of {SYNTHETIC_TEXTURES} or a uint8 array; "
                f"got {texture!r}."
            )
        try:
            import skimage.data
        except ImportError as exc:
            raise ImportError(
                f"texture={texture!r} needs scikit-image: pip install scikit-image, "
                "or pass the texture as a uint8 array."
            ) from exc
        texture = getattr(skimage.data, texture)()
    texture = np.asarray(texture)
    if texture.dtype != np.uint8 or not (
        texture.ndim == 2 or (texture.ndim == 3 and texture.shape[2] in (1, 3))
    ):
        raise ValueError(
            "texture must be a uint8 array of shape (H, W), (H, W, 1) or "
            f"(H, W, 3); got dtype {texture.dtype} and shape {texture.shape}."
        )
    if texture.ndim == 2:
        texture = texture[..., None]
    # Grey textures are replicated to RGB, the input the detector expects.
    return np.repeat(texture, 3, axis=2) if texture.shape[2] == 1 else texture


def _check_count(value, name):
    if isinstance(value, bool) or not isinstance(value, Integral) or value < 0:
        raise ValueError(f"{name} must be a non-negative int; got {value!r}.")
    return int(value)


def _check_synthetic_options(image_size, texture_shape, defect_types):
    side = min(texture_shape[:2])
    if (
        isinstance(image_size, bool)
        or not isinstance(image_size, Integral)
        or not _MIN_SYNTHETIC_SIDE <= image_size <= side
    ):
        raise ValueError(
            f"image_size must be an int between {_MIN_SYNTHETIC_SIDE} and the "
            f"texture's smaller side ({side}); got {image_size!r}."
        )
    if isinstance(defect_types, str):
        defect_types = (defect_types,)
    defect_types = tuple(defect_types)
    unknown = [t for t in defect_types if t not in _DEFECT_MAKERS]
    if not defect_types or unknown:
        raise ValueError(
            f"defect_types must be a non-empty subset of {SYNTHETIC_DEFECT_KINDS}; "
            f"got {defect_types!r}."
        )
    return int(image_size), defect_types


def _random_crop(texture, size, rng):
    """A size x size crop at a random position, randomly mirrored."""
    top = rng.randint(0, texture.shape[0] - size + 1)
    left = rng.randint(0, texture.shape[1] - size + 1)
    crop = texture[top : top + size, left : left + size]
    # Mirroring multiplies the variety of normal images without creating
    # orientations the texture never shows (a 90-degree turn would, and
    # is kept for the "patch" defect).
    if rng.rand() < 0.5:
        crop = crop[:, ::-1]
    if rng.rand() < 0.5:
        crop = crop[::-1]
    return np.ascontiguousarray(crop)


def make_synthetic_defects(
    n_normal,
    n_anomalous,
    *,
    texture="brick",
    image_size=128,
    defect_types=SYNTHETIC_DEFECT_KINDS,
    random_state=None,
):
    """Make images of a real texture, some with a synthetic defect and mask.

    Every image is a random crop of ``texture``, randomly mirrored. The
    anomalous ones then receive one defect from :func:`add_synthetic_defect`,
    the kinds taken in turn from ``defect_types``, so that each kind is
    equally represented. The normal images come first, then the anomalous
    ones.

    Parameters
    ----------
    n_normal : int
        Number of defect-free images.
    n_anomalous : int
        Number of images with a defect.
    texture : {"brick", "grass", "gravel"} or ndarray, default="brick"
        A 512 x 512 grayscale texture of ``skimage.data`` (needs
        scikit-image), or a uint8 array of shape (H, W), (H, W, 1) or
        (H, W, 3). Grayscale textures are replicated to RGB.
    image_size : int, default=128
        Side of the square images, between 32 and the texture's smaller side.
    defect_types : sequence of {"patch", "scratch", "blob"}, \
            default=("patch", "scratch", "blob")
        Defect kinds to use.
    random_state : int, RandomState instance or None, default=None
        Seed or generator; an int gives the same images on every call.

    Returns
    -------
    data : sklearn.utils.Bunch
        With the keys:

        images : ndarray of shape (n, image_size, image_size, 3), dtype uint8
            The images, ``n = n_normal + n_anomalous``.
        masks : ndarray of shape (n, image_size, image_size), dtype bool
            True on defective pixels; all False for the normal images.
        labels : ndarray of shape (n,), dtype int64
            ``+1`` for the normal images, ``-1`` for the anomalous ones.
        defect_types : list of str
            ``"good"`` for the normal images, else the defect kind.

    Raises
    ------
    ValueError
        If a count, the texture, ``image_size`` or ``defect_types`` is
        invalid.

    Examples
    --------
    >>> from skpadim.datasets import make_synthetic_defects
    >>> data = make_synthetic_defects(4, 3, image_size=64, random_state=0)
    >>> data.images.shape, data.labels.tolist()
    ((7, 64, 64, 3), [1, 1, 1, 1, -1, -1, -1])
    >>> data.defect_types[4:]
    ['patch', 'scratch', 'blob']
    """
    n_normal = _check_count(n_normal, "n_normal")
    n_anomalous = _check_count(n_anomalous, "n_anomalous")
    if n_normal + n_anomalous == 0:
        raise ValueError("n_normal + n_anomalous must be at least 1; got 0.")
    source = _load_texture(texture)
    size, kinds = _check_synthetic_options(image_size, source.shape, defect_types)
    rng = check_random_state(random_state)
    types = [_GOOD] * n_normal + [kinds[i % len(kinds)] for i in range(n_anomalous)]
    images = np.empty((len(types), size, size, 3), dtype=np.uint8)
    masks = np.zeros((len(types), size, size), dtype=bool)
    for i, kind in enumerate(types):
        images[i] = _random_crop(source, size, rng)
        if kind != _GOOD:
            images[i], masks[i] = add_synthetic_defect(
                images[i], kind=kind, random_state=rng
            )
    labels = np.where(np.array(types) == _GOOD, _NORMAL, _ANOMALOUS)
    return Bunch(
        images=images,
        masks=masks,
        labels=labels.astype(np.int64),
        defect_types=types,
    )
