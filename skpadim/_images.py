"""Image inputs: validation, lazy loading and preprocessing.

Everything a user may pass as ``X`` goes through :func:`check_images`, which
does only cheap checks (types, shapes, value ranges, file existence) so that
bad input fails before any network is built. Pixels are read lazily, one batch
at a time, by :meth:`ImageSet.batches`; :class:`Preprocessing` turns a batch
into the normalised float tensor the backbone expects and knows how to map a
model-frame anomaly map back onto the image the user passed in.
"""

from __future__ import annotations

import math
import numbers
import os
from collections import deque
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

_PATH_TYPES = (str, os.PathLike)
# Threads decoding image files; decoding is I/O and C code, so a few suffice.
_LOADER_THREADS = min(4, os.cpu_count() or 1)


class ImageSet:
    """A validated, lazily read collection of images.

    Do not build it directly: use :func:`check_images`.

    Attributes
    ----------
    kind : {"array", "arrays", "paths", "pil"}
        What the user passed.
    shapes : list of (int, int) or None
        The (height, width) of every image when known without reading pixels
        (arrays and PIL images); None for paths.
    """

    def __init__(self, items, kind, shapes):
        self._items = items
        self.kind = kind
        self.shapes = shapes

    def __len__(self):
        return len(self._items)

    def image_shapes(self, limit=None):
        """(height, width) of the first ``limit`` images (all when None).

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
        """Yield lists of (H, W, 3) float32 RGB arrays in [0, 1], in order.

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
            item = _read_image_file(item)
        elif self.kind == "pil":
            item = np.asarray(item.convert("RGB"))
        return _to_rgb_float(item)


def _read_image_file(path):
    try:
        with Image.open(path) as image:
            return np.asarray(image.convert("RGB"))
    except (OSError, ValueError) as exc:
        raise ValueError(
            f"Could not read image file {os.fspath(path)!r}: expected an image "
            f"that PIL can open ({exc})."
        ) from exc


def read_image_shape(path):
    """(height, width) of an image file, from its header only."""
    try:
        with Image.open(path) as image:
            return image.height, image.width
    except (OSError, ValueError) as exc:
        raise ValueError(
            f"Could not read image file {os.fspath(path)!r}: expected an image "
            f"that PIL can open ({exc})."
        ) from exc


def _to_rgb_float(image):
    """(H, W), (H, W, 1) or (H, W, 3), uint8 or float in [0, 1] -> float32 RGB."""
    image = np.asarray(image)
    if image.ndim == 2:
        image = image[:, :, None]
    if image.shape[2] == 1:
        # Grayscale: replicate so ImageNet backbones see what they were trained on.
        image = np.repeat(image, 3, axis=2)
    if image.dtype == np.uint8:
        return image.astype(np.float32) / 255.0
    return image.astype(np.float32, copy=False)


def _check_array_pixels(image, what):
    """Shape, dtype and range checks for one image or a stack of images."""
    if image.dtype == np.uint8:
        return
    if not np.issubdtype(image.dtype, np.floating):
        raise TypeError(
            f"{what} must have dtype uint8 (0-255) or float (0-1); got {image.dtype}."
        )
    if image.size == 0:
        raise ValueError(f"{what} is empty; got shape {image.shape}.")
    low, high = float(np.min(image)), float(np.max(image))
    if not (math.isfinite(low) and math.isfinite(high)):
        raise ValueError(f"{what} contains NaN or infinity; expected finite pixels.")
    if low < 0.0 or high > 1.0:
        raise ValueError(
            f"Float {what} must hold values in [0, 1]; got values in "
            f"[{low:.4g}, {high:.4g}]. Divide by 255 or pass uint8."
        )


def _check_channels(shape, what, expected_ndim):
    if len(shape) == expected_ndim - 1:
        return
    if len(shape) != expected_ndim or shape[-1] not in (1, 3):
        layout = "(n, H, W) or (n, H, W, C)" if expected_ndim == 4 else "(H, W[, C])"
        raise ValueError(
            f"{what} must have shape {layout} with C in {{1, 3}}; got shape {shape}."
        )


def _check_stack(X):
    if X.ndim not in (3, 4):
        raise ValueError(
            f"An image array must have shape (n, H, W) or (n, H, W, C); got "
            f"{X.ndim}-d array of shape {X.shape}."
        )
    _check_channels(X.shape, "An image array", 4)
    if min(X.shape[1:3]) < 1:
        raise ValueError(f"Images must be at least 1x1 pixels; got shape {X.shape}.")
    _check_array_pixels(X, "images")
    return ImageSet(X, "array", [X.shape[1:3]] * len(X))


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
        return ImageSet(list(X), "pil", [(im.height, im.width) for im in X])
    images = [np.asarray(im) for im in X]
    for i, image in enumerate(images):
        _check_channels(image.shape, f"Image {i} of the list", 3)
        _check_array_pixels(image, f"image {i} of the list")
    return ImageSet(images, "arrays", [im.shape[:2] for im in images])


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

    Parameters
    ----------
    X : ndarray of shape (n, H, W) or (n, H, W, C), or list
        Images as a uint8 (0-255) or float (0-1) array with C in {1, 3}, or a
        list of such arrays (sizes may differ), of image file paths or of PIL
        images.
    min_samples : int, default=1
        The fewest images accepted.

    Returns
    -------
    images : ImageSet
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

    def __call__(self, images, device):
        """Turn a list of float RGB arrays into one normalised (B, 3, h, w) tensor."""
        frames = [self._frame(image, device) for image in images]
        shapes = {tuple(frame.shape[-2:]) for frame in frames}
        if len(shapes) > 1:
            raise ValueError(
                "With image_size=None all images must have the same size; got "
                f"sizes {sorted(shapes)}. Set image_size to resize them."
            )
        batch = torch.cat(frames)
        mean = torch.tensor(self.mean, device=device).view(1, 3, 1, 1)
        std = torch.tensor(self.std, device=device).view(1, 3, 1, 1)
        return (batch - mean) / std

    def _frame(self, image, device):
        tensor = torch.from_numpy(np.ascontiguousarray(image)).to(device)
        tensor = tensor.permute(2, 0, 1).unsqueeze(0)
        if self.image_size is not None and tuple(tensor.shape[-2:]) != self.image_size:
            tensor = F.interpolate(
                tensor,
                size=self.image_size,
                mode="bilinear",
                antialias=True,
                align_corners=False,
            )
        top, left, height, width = self.crop_box(image.shape[:2])
        return tensor[:, :, top : top + height, left : left + width]

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
