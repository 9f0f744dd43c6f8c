"""Image inputs: validation, lazy loading and preprocessing.

Everything a user may pass as ``X`` goes through :func:`check_images`, which
does only cheap checks (types, shapes, value ranges of arrays, file existence)
so that bad input fails before any network is built; it never decodes the
pixels of a file. Pixels are read lazily, one batch at a time, by
:meth:`ImageSet.batches`; :class:`Preprocessing` turns a batch into the
normalised float tensor the backbone expects and knows how to map a
model-frame anomaly map back onto the image the user passed in.

How pixels are read
-------------------
Every image becomes float32 RGB in [0, 1]; grayscale is replicated to three
channels (by the preprocessing, after resizing: one channel is resized, not
three).

* Arrays: uint8 is divided by 255, uint16 by 65535, and floats must already lie
  in [0, 1]. Other dtypes (bool, signed or wider integers, complex, object) are
  refused with a TypeError, since they have no standard full-scale value.
* A stacked array is a batch: (n, H, W) grayscale or (n, H, W, C) with C in
  {1, 3}. A 3-D array whose last axis has length 3 or 4 looks like one RGB(A)
  image without its batch axis and is refused as ambiguous: pass ``X[None]``
  for one image, ``X[..., None]`` for grayscale images of width 3. Each item of
  a list is one image, (H, W) or (H, W, C) with C in {1, 3}. Arrays with an
  alpha channel (C = 4) are refused: drop it with ``X[..., :3]``.
* Files and PIL images are read by one function, so a path and the PIL image
  opened from it give the same pixels. Only the first frame of a multi-frame
  file is read (the current frame of a PIL image). By Pillow mode: "1" gives
  0 or 1; "L", "P", "RGB", "RGBX", "CMYK", "YCbCr", "LAB" and "HSV" are
  converted to 8-bit RGB by Pillow and divided by 255 (embedded ICC profiles
  are ignored; CMYK uses Pillow's plain formula); "LA", "PA" and "RGBA" lose
  their alpha channel, keeping the colours as stored (not composited onto a
  background); "La" and "RGBa" are un-premultiplied first; "I;16", "I;16L",
  "I;16B" and "I;16N" are divided by 65535; "I" (32-bit integer) is read as
  16-bit data, divided by 65535, and refused when a value lies outside
  0-65535; "F" (32-bit float) must hold values in [0, 1]. Pillow itself
  reduces 16-bit colour PNGs to 8 bits per channel.
* The EXIF Orientation tag of a file or PIL image is applied, as
  :func:`PIL.ImageOps.exif_transpose` does, so the image is scored the way a
  viewer shows it, and its (height, width) is the upright one. Only the tag
  the header carries is used (for a PNG, an eXIf chunk before the pixel data,
  where Pillow and other writers put it), so shapes are known without
  decoding.
* A file whose content cannot be decoded raises a ValueError naming the file,
  whatever Pillow raised (unidentified format, truncated data, its
  decompression-bomb limit ``PIL.Image.MAX_IMAGE_PIXELS``, ...). A file the
  system cannot read at all (deleted, permission denied, disk error) raises the
  system's OSError, which names it.
"""

from __future__ import annotations

import math
import numbers
import os
from collections import deque
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import ExifTags, Image

from ._scratch import scratch

_PATH_TYPES = (str, os.PathLike)
# Threads decoding image files; decoding is I/O and C code, so a few suffice.
_LOADER_THREADS = min(4, os.cpu_count() or 1)
_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")
_DTYPES = "uint8 (0-255), uint16 (0-65535) or float (0-1)"
# How to bring each stored EXIF orientation upright, on a (H, W[, C]) array;
# the same transposes as PIL.ImageOps.exif_transpose.
_UPRIGHT = {
    2: lambda a: a[:, ::-1],
    3: lambda a: a[::-1, ::-1],
    4: lambda a: a[::-1],
    5: lambda a: a.swapaxes(0, 1),
    6: lambda a: np.rot90(a, -1),
    7: lambda a: a.swapaxes(0, 1)[::-1, ::-1],
    8: lambda a: np.rot90(a, 1),
}


class ImageSet:
    """A validated, lazily read collection of images.

    Do not build it directly: use :func:`check_images`.

    Attributes
    ----------
    kind : {"array", "arrays", "paths", "pil"}
        What the user passed.
    shapes : list of (int, int) or None
        The upright (height, width) of every image when known without reading
        files (arrays and PIL images); None for paths.
    """

    def __init__(self, items, kind, shapes):
        self._items = items
        self.kind = kind
        self.shapes = shapes

    def __len__(self):
        return len(self._items)

    def image_shapes(self, limit=None):
        """Upright (height, width) of the first ``limit`` images (all when None).

        For files only the headers are read, not the pixels.
        """
        if self.shapes is not None:
            return self.shapes[:limit]
        return [read_image_shape(path) for path in self._items[:limit]]

    def subset(self, indices):
        """The images at ``indices``, as a new ImageSet."""
        if self.kind == "array":
            items = self._items[np.asarray(indices)]
        else:
            items = [self._items[i] for i in indices]
        shapes = None if self.shapes is None else [self.shapes[i] for i in indices]
        return ImageSet(items, self.kind, shapes)

    def batches(self, batch_size, *, prefetch=2):
        """Yield lists of (H, W, 3) RGB or (H, W, 1) grayscale arrays, in
        order: uint8 as read or given (which :class:`Preprocessing` scales
        while it normalises them), anything else float32 in [0, 1].

        Files are decoded by a small thread pool up to ``prefetch`` batches
        ahead, so reading and decoding overlap the network's work (PIL
        releases the GIL while decoding).
        """
        starts = range(0, len(self), batch_size)
        chunks = (self._items[start : start + batch_size] for start in starts)
        if self.kind != "paths" or prefetch == 0:
            for chunk in chunks:
                yield [self._load(item) for item in chunk]
            return
        with ThreadPoolExecutor(max_workers=_LOADER_THREADS) as pool:
            pending = deque()
            for chunk in chunks:
                pending.append([pool.submit(self._load, item) for item in chunk])
                if len(pending) > prefetch:
                    yield [future.result() for future in pending.popleft()]
            while pending:
                yield [future.result() for future in pending.popleft()]

    def _load(self, item):
        if self.kind == "paths":
            return _read_image_file(item)
        if self.kind == "pil":
            return _read_pil_image(item)
        return _batch_pixels(item)


# --- Files and PIL images -------------------------------------------------


class _PixelError(ValueError):
    """Decoded pixels that break a documented reading rule."""


@contextmanager
def _decoding_errors(source):
    """Turn whatever decoding ``source`` raises into a ValueError naming it.

    Pillow and its format plugins raise many unrelated types (OSError,
    SyntaxError, DecompressionBombError, struct.error, ...), so all are caught;
    the system's own I/O failures (they carry an errno) and MemoryError pass.
    """
    try:
        yield
    except _PixelError as exc:
        raise ValueError(f"Could not read {source}: {exc}") from exc
    except MemoryError:
        raise
    except Exception as exc:
        if isinstance(exc, OSError) and exc.errno is not None:
            raise
        raise ValueError(
            f"Could not read {source}: expected an image that Pillow can decode; "
            f"{_describe_failure(exc)}"
        ) from exc


def _describe_failure(exc):
    what = f"{type(exc).__name__}: {exc}"
    if isinstance(exc, Image.DecompressionBombError):
        what += (
            " (Pillow's decompression-bomb safety limit, PIL.Image.MAX_IMAGE_PIXELS"
            f" = {Image.MAX_IMAGE_PIXELS}; raise it if you trust the file)"
        )
    return what


def read_image(source):
    """Read one image file or PIL image exactly as the detectors see it.

    For code that shows an image next to its anomaly map (plots, overlays):
    the map has the shape of this array, EXIF orientation included.

    Parameters
    ----------
    source : str, path-like or PIL.Image.Image
        The image.

    Returns
    -------
    image : ndarray of shape (H, W, 3), float32
        Upright RGB in [0, 1], read by the rules of this module's docstring.
    """
    if isinstance(source, Image.Image):
        return _as_rgb(_to_float_pixels(_read_pil_image(source)))
    return _as_rgb(_to_float_pixels(_read_image_file(source)))


def _read_image_file(path):
    """Decode an image file to upright (H, W, 1) grayscale or (H, W, 3) RGB
    pixels, as :func:`_batch_pixels` gives them."""
    source = f"image file {os.fspath(path)!r}"
    with _decoding_errors(source), Image.open(path) as image:
        return _decode(image)


def _read_pil_image(image):
    """Decode a PIL image exactly as :func:`_read_image_file` decodes a file."""
    with _decoding_errors(f"PIL image {_describe_pil(image)}"):
        return _decode(image)


def _describe_pil(image):
    filename = getattr(image, "filename", "")
    if filename:
        return f"from file {os.fspath(filename)!r}"
    return f"of mode {image.mode!r} and size {image.width}x{image.height}"


def read_image_shape(path):
    """Upright (height, width) of an image file, from its header only."""
    source = f"image file {os.fspath(path)!r}"
    with _decoding_errors(source), Image.open(path) as image:
        return _upright_shape(image)


def _upright_shape(image):
    height, width = image.height, image.width
    return (width, height) if _orientation(image) in (5, 6, 7, 8) else (height, width)


def _orientation(image):
    """The EXIF Orientation (1-8) the header declares; 1 when absent or invalid."""
    # The base-class method reads only what the header gave; PNG's override
    # would decode every pixel to look for an eXIf chunk after the data.
    value = Image.Image.getexif(image).get(ExifTags.Base.Orientation, 1)
    return value if isinstance(value, int) and value in _UPRIGHT else 1


def _decode(image):
    """Upright pixels from an open PIL image of any mode: (H, W, 1) grayscale
    or (H, W, 3) RGB, as :func:`_batch_pixels` gives them."""
    orientation = _orientation(image)  # before loading: see _orientation
    pixels = _mode_pixels(image)
    if pixels.size == 0:
        raise _PixelError(f"the image is empty (shape {pixels.shape}).")
    if orientation in _UPRIGHT:
        pixels = _UPRIGHT[orientation](pixels)
    return _batch_pixels(pixels)


def _mode_pixels(image):
    """(H, W) or (H, W, 3) uint8, uint16 or float32 pixels, at full fidelity."""
    mode = image.mode
    if mode in _SIXTEEN_BIT_MODES:
        return np.asarray(image).astype(np.uint16)  # also fixes big-endian
    if mode == "I":
        return _sixteen_bit(np.asarray(image))
    if mode == "F":
        pixels = np.asarray(image)
        problem = _unit_interval_problem(pixels, "mode 'F' (32-bit float) pixels")
        if problem:
            raise _PixelError(problem)
        return pixels
    if mode in ("1", "L"):
        return np.asarray(image.convert("L"))
    if mode in ("LA", "La"):
        return np.asarray(image.convert("LA"))[:, :, 0]
    if mode in ("P", "PA"):
        # Via RGBA: Pillow warns when a palette with transparency goes to RGB.
        return np.asarray(image.convert("RGBA"))[:, :, :3]
    return np.asarray(image.convert("RGB"))


def _sixteen_bit(pixels):
    """Mode "I" holds 16-bit data in practice (e.g. 16-bit PNGs, older Pillow)."""
    low, high = int(pixels.min(initial=0)), int(pixels.max(initial=0))
    if low < 0 or high > 65535:
        raise _PixelError(
            f"mode 'I' (32-bit integer) pixels are read as 16-bit data and must "
            f"lie in 0-65535; got values in [{low}, {high}]."
        )
    return pixels.astype(np.uint16)


# --- Arrays ---------------------------------------------------------------


def _to_float_pixels(image):
    """(H, W), (H, W, 1) or (H, W, 3) uint8, uint16 or float in [0, 1] ->
    float32 (H, W, 1) or (H, W, 3) in [0, 1], in one pass."""
    image = np.asarray(image)
    if image.ndim == 2:
        image = image[:, :, None]
    if not _is_scaled_integer(image.dtype):
        return image.astype(np.float32, copy=False)
    scale = np.float32(np.iinfo(image.dtype).max)
    return np.divide(image, scale, dtype=np.float32)


def _batch_pixels(image):
    """What a batch holds: uint8 pixels as they are, (H, W, C), scaled by the
    preprocessing in its normalising pass; anything else as float32 in [0, 1]."""
    pixels = np.asarray(image)
    if pixels.dtype == np.uint8:
        return pixels[:, :, None] if pixels.ndim == 2 else pixels
    return _to_float_pixels(pixels)


def _as_rgb(pixels):
    """Grayscale (H, W, 1) replicated to RGB, as ImageNet backbones expect."""
    return np.repeat(pixels, 3, axis=2) if pixels.shape[2] == 1 else pixels


def _is_scaled_integer(dtype):
    return dtype.kind == "u" and dtype.itemsize in (1, 2)


def _check_array_pixels(image, what):
    """Dtype and range checks for one image or a stack of images."""
    _check_dtype(image.dtype, what)
    if image.size and image.dtype.kind == "f":
        hint = " Divide by 255 or pass uint8."
        problem = _unit_interval_problem(image, f"float {what}", hint)
        if problem:
            raise ValueError(problem)


def _check_dtype(dtype, what):
    if _is_scaled_integer(dtype) or np.issubdtype(dtype, np.floating):
        return
    hint = ""
    if dtype.kind in "iu":
        hint = (
            " Other integer dtypes have no standard full-scale value: convert, "
            "e.g. X.astype(np.uint8) if the values are 0-255."
        )
    raise TypeError(
        f"{what[:1].upper()}{what[1:]} must have dtype {_DTYPES}; got {dtype}.{hint}"
    )


def _unit_interval_problem(pixels, what, hint=""):
    """Why float ``pixels`` break the [0, 1] convention, or None."""
    low, high = float(np.min(pixels)), float(np.max(pixels))
    if not (math.isfinite(low) and math.isfinite(high)):
        return f"Found NaN or infinity in {what}; expected finite pixels."
    if low < 0.0 or high > 1.0:
        return (
            f"Values of {what} must lie in [0, 1]; got values in "
            f"[{low:.4g}, {high:.4g}].{hint}"
        )
    return None


def _channel_error(what, layout, shape):
    hint = " Drop an alpha channel with [..., :3]." if shape[-1] == 4 else ""
    return ValueError(
        f"{what} must have shape {layout} with C in {{1, 3}}; got shape {shape}.{hint}"
    )


def _check_stack(X):
    if X.ndim not in (3, 4):
        raise ValueError(
            f"An image array must have shape (n, H, W) or (n, H, W, C); got "
            f"{X.ndim}-d array of shape {X.shape}."
        )
    if X.ndim == 3 and X.shape[2] in (3, 4):
        raise _ambiguous_stack_error(X.shape)
    if X.ndim == 4 and X.shape[3] not in (1, 3):
        raise _channel_error("An image array", "(n, H, W) or (n, H, W, C)", X.shape)
    if min(X.shape[1:3]) < 1:
        raise ValueError(f"Images must be at least 1x1 pixels; got shape {X.shape}.")
    _check_array_pixels(X, "images")
    return ImageSet(X, "array", [X.shape[1:3]] * len(X))


def _ambiguous_stack_error(shape):
    """Like scikit-learn's "Reshape your data" error for 1-D input."""
    height, width, channels = shape
    colour = "RGB" if channels == 3 else "RGBA"
    fix = "X[None]" if channels == 3 else "X[None, ..., :3]"
    return ValueError(
        f"Expected a batch of images; got an array of shape {shape}, which looks "
        f"like a single {colour} image without its batch axis. Reshape your data: "
        f"for one {colour} image pass {fix} (shape (1, {height}, {width}, 3)); "
        f"for a batch of grayscale images of width {channels} pass X[..., None]."
    )


# --- Lists and the entry point ----------------------------------------------


def _check_list(X):
    kinds = {_item_kind(item) for item in X}
    if len(kinds) > 1 or None in kinds:
        given = sorted({type(item).__name__ for item in X})
        raise TypeError(
            "A list of images must hold only numpy arrays, only file paths or only "
            f"PIL images; got a list of {given}."
        )
    kind = kinds.pop()
    if kind == "paths":
        missing = [os.fspath(p) for p in X if not os.path.isfile(p)]
        if missing:
            raise ValueError(
                f"Expected paths of existing image files; {len(missing)} do not "
                f"exist, e.g. {missing[:3]}."
            )
        return ImageSet(list(X), "paths", None)
    if kind == "pil":
        return ImageSet(list(X), "pil", [_check_pil(im, i) for i, im in enumerate(X)])
    images = [np.asarray(im) for im in X]
    # Shapes first: they are cheap, pixel ranges need a pass over the data.
    for i, image in enumerate(images):
        _check_item_shape(image.shape, i)
    for i, image in enumerate(images):
        _check_array_pixels(image, f"image {i} of the list")
    return ImageSet(images, "arrays", [im.shape[:2] for im in images])


def _check_item_shape(shape, i):
    what = f"Image {i} of the list"
    if len(shape) not in (2, 3) or (len(shape) == 3 and shape[2] not in (1, 3)):
        raise _channel_error(what, "(H, W) or (H, W, C)", shape)
    if min(shape[:2]) < 1:
        raise ValueError(f"{what} is empty: shape {shape}; expected at least 1x1.")


def _check_pil(image, i):
    """Upright (height, width) of a PIL image, from its header only."""
    if image.width < 1 or image.height < 1:
        raise ValueError(
            f"PIL image {i} of the list is empty: size {image.width}x"
            f"{image.height}; expected at least 1x1."
        )
    with _decoding_errors(f"PIL image {i} of the list"):
        return _upright_shape(image)


def _item_kind(item):
    if isinstance(item, np.ndarray):
        return "arrays"
    if isinstance(item, _PATH_TYPES):
        return "paths"
    if isinstance(item, Image.Image):
        return "pil"
    return None


def check_images(X, *, min_samples=1):
    """Validate ``X`` cheaply and wrap it in an :class:`ImageSet`.

    Only types, shapes, array values and file existence are checked here; the
    pixels of files are read later, batch by batch.

    Parameters
    ----------
    X : ndarray of shape (n, H, W) or (n, H, W, C), or list
        A batch of images as an array of dtype uint8 (0-255), uint16 (0-65535)
        or float (0-1) with C in {1, 3}; or a list of single images, all numpy
        arrays of shape (H, W) or (H, W, C) (sizes may differ), all image file
        paths or all PIL images. A 3-D array whose last axis has length 3 or 4
        is refused as ambiguous: pass ``X[None]`` for one RGB image, or
        ``X[..., None]`` for a batch of grayscale images of width 3. Arrays
        with an alpha channel are refused; files and PIL images with one lose
        it. Files and PIL images are turned upright by their EXIF Orientation
        tag. See the module docstring for how each Pillow mode is read.
    min_samples : int, default=1
        The fewest images accepted.

    Returns
    -------
    images : ImageSet

    Raises
    ------
    TypeError
        For an unsupported container or array dtype.
    ValueError
        For bad shapes, empty images, out-of-range values or missing files.
        A file that cannot be decoded raises ValueError when it is read.
    """
    if isinstance(X, ImageSet):
        images = X
    elif isinstance(X, np.ndarray):
        images = _check_stack(X)
    elif isinstance(X, (str, bytes, os.PathLike, Image.Image)):
        raise TypeError(
            "X must be a collection of images (an array (n, H, W[, C]) or a list); "
            f"got a single {type(X).__name__}. Wrap it in a list."
        )
    elif isinstance(X, Sequence):
        if len(X) == 0:
            raise ValueError("X is an empty list; expected at least one image.")
        images = _check_list(X)
    else:
        raise TypeError(
            "X must be an array of shape (n, H, W[, C]) or a list of arrays, file "
            f"paths or PIL images; got {type(X).__name__}."
        )
    if len(images) < min_samples:
        raise ValueError(f"Expected at least {min_samples} images; got {len(images)}.")
    return images


def check_size(size, name):
    """Normalise an ``image_size``/``crop_size`` parameter to (h, w) or None."""
    if size is None:
        return None
    if isinstance(size, numbers.Integral) and not isinstance(size, bool):
        size = (size, size)
    if (
        isinstance(size, Sequence)
        and len(size) == 2
        and all(
            isinstance(s, numbers.Integral) and not isinstance(s, bool) for s in size
        )
        and min(size) >= 1
    ):
        return int(size[0]), int(size[1])
    raise ValueError(
        f"{name} must be None, a positive int or a (height, width) pair of "
        f"positive ints; got {size!r}."
    )


@dataclass(frozen=True)
class Preprocessing:
    """Resize, centre-crop and normalise images for a backbone.

    Parameters
    ----------
    image_size : (int, int) or None
        Every image is resized (bilinear, antialiased) to this (height, width);
        None keeps the input size.
    crop_size : (int, int) or None
        Centre crop taken after resizing; None keeps the whole image.
    mean, std : tuple of float
        Per-channel normalisation of RGB values in [0, 1].
    """

    image_size: tuple[int, int] | None
    crop_size: tuple[int, int] | None
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    def resized_shape(self, shape):
        return tuple(shape) if self.image_size is None else self.image_size

    def crop_box(self, shape):
        """(top, left, height, width) of the analysed region in the resized image."""
        height, width = self.resized_shape(shape)
        if self.crop_size is None:
            return 0, 0, height, width
        crop_h, crop_w = self.crop_size
        if crop_h > height or crop_w > width:
            raise ValueError(
                f"crop_size {self.crop_size} is larger than the resized image "
                f"{(height, width)}; expected crop_size <= image_size."
            )
        return (height - crop_h) // 2, (width - crop_w) // 2, crop_h, crop_w

    def frame_shape(self, shape):
        """The (height, width) of the tensor the backbone sees for an input shape."""
        return self.crop_box(shape)[2:]

    def __call__(self, images, device, memory_format=torch.contiguous_format):
        """Turn a list of (H, W, 3) RGB or (H, W, 1) grayscale arrays, float
        in [0, 1] or uint8, into one normalised (B, 3, h, w) tensor.

        The batch is written once, in ``memory_format`` (the network's), each
        frame normalised on its way in: no concatenated copy, no layout change.
        A uint8 frame that needs no resizing is scaled and normalised in that
        same pass.
        """
        frames = [self._frame(image, device, raw=True) for image in images]
        shapes = {tuple(frame.shape[-2:]) for frame in frames}
        if len(shapes) > 1:
            raise ValueError(
                "With image_size=None all images must have the same size; got "
                f"sizes {sorted(shapes)}. Set image_size to resize them."
            )
        (height, width), n_images = shapes.pop(), len(frames)
        # A scratch buffer: while scoring, the next batch reuses its memory.
        if memory_format == torch.channels_last:
            shape = (n_images, height, width, 3)
            batch = scratch("input", shape, device=device).permute(0, 3, 1, 2)
        else:
            batch = scratch("input", (n_images, 3, height, width), device=device)
        mean = torch.tensor(self.mean, device=device).view(1, 3, 1, 1)
        std = torch.tensor(self.std, device=device).view(1, 3, 1, 1)
        scale, shift = 1 / (255 * std), -mean / std
        for i, frame in enumerate(frames):
            if frame.dtype == torch.uint8:
                torch.addcmul(shift, frame, scale, out=batch[i : i + 1])
            else:
                # One image at a time, so that it is still in cache for the division.
                torch.sub(frame, mean, out=batch[i : i + 1]).div_(std)
        return batch

    def _frame(self, image, device, *, raw=False):
        """(1, 3, h, w) frame of one image: resized, cropped, RGB; float in
        [0, 1], or with ``raw`` uint8 as given when it needs no resizing."""
        pixels = np.ascontiguousarray(image)
        if not pixels.flags.writeable:  # torch warns on read-only arrays (PIL's)
            pixels = pixels.copy()
        tensor = torch.from_numpy(pixels).to(device)
        tensor = tensor.permute(2, 0, 1).unsqueeze(0)
        resize = (
            self.image_size is not None and tuple(tensor.shape[-2:]) != self.image_size
        )
        if tensor.dtype == torch.uint8 and (resize or not raw):
            tensor = tensor.to(torch.float32) / 255  # as _to_float_pixels does
        if resize:
            tensor = F.interpolate(
                tensor,
                size=self.image_size,
                mode="bilinear",
                antialias=True,
                align_corners=False,
            )
        top, left, height, width = self.crop_box(image.shape[:2])
        frame = tensor[:, :, top : top + height, left : left + width]
        # Grayscale to RGB last: the resize above ran on one channel.
        return frame.expand(-1, 3, -1, -1)

    def to_input_frame(self, maps, shape):
        """Resample model-frame maps onto the pixel grid of the input image.

        Parameters
        ----------
        maps : tensor of shape (B, h, w)
            Maps in the frame the backbone saw (after resize and crop).
        shape : (int, int)
            (H, W) of the images as the user passed them.

        Returns
        -------
        tensor of shape (B, H, W)
            Bilinear resampling; input pixels outside the analysed crop are NaN.
        """
        in_h, in_w = shape
        res_h, res_w = self.resized_shape(shape)
        top, left, crop_h, crop_w = self.crop_box(shape)
        if (top, left, crop_h, crop_w) == (0, 0, in_h, in_w):
            return maps
        # Centre of each input pixel in resized-image pixel units, then in the
        # crop's normalised [-1, 1] coordinates (align_corners=False convention).
        ys = (torch.arange(in_h, device=maps.device) + 0.5) * (res_h / in_h) - top
        xs = (torch.arange(in_w, device=maps.device) + 0.5) * (res_w / in_w) - left
        gy = (2 * ys / crop_h - 1).view(-1, 1).expand(in_h, in_w)
        gx = (2 * xs / crop_w - 1).view(1, -1).expand(in_h, in_w)
        grid = torch.stack([gx, gy], dim=-1).to(maps.dtype)
        grid = grid.unsqueeze(0).expand(maps.shape[0], -1, -1, -1)
        out = F.grid_sample(
            maps.unsqueeze(1),
            grid,
            mode="bilinear",
            padding_mode="border",
            align_corners=False,
        ).squeeze(1)
        outside = (gy.abs() > 1) | (gx.abs() > 1)
        return out.masked_fill(outside, float("nan"))
