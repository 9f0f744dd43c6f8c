"""Visualisation of anomaly maps: overlays on images, with mask contours.

:class:`AnomalyMapDisplay` follows the scikit-learn ``Display`` pattern
(:class:`sklearn.metrics.RocCurveDisplay`,
:class:`~sklearn.metrics.ConfusionMatrixDisplay`): the constructor only
stores the data, :meth:`~AnomalyMapDisplay.plot` draws it and keeps the
matplotlib artists as attributes, and the classmethods
:meth:`~AnomalyMapDisplay.from_estimator` and
:meth:`~AnomalyMapDisplay.from_predictions` build and plot in one call.
:func:`plot_anomaly_grid` draws many examples on one figure with a shared
colour scale.

matplotlib is an optional dependency (``pip install skpadim[plot]``); it is
imported only when something is drawn, so ``import skpadim.plotting`` works
without it.
"""

from __future__ import annotations

import math
import os

import numpy as np

__all__ = ["AnomalyMapDisplay", "plot_anomaly_grid"]

# Colours chosen to stand out on both default colour maps ("inferno" runs
# black-purple-orange-yellow, "jet" blue-cyan-yellow-red): a green solid line
# for the ground truth, a white dashed one for the prediction.
_MASK_COLOR = "lime"
_THRESHOLD_COLOR = "white"
_THRESHOLD_STYLE = "--"


def _import_pyplot(what):
    """Import matplotlib.pyplot, or say how to install it."""
    try:
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise ImportError(
            f"{what} needs matplotlib, an optional dependency of skpadim: "
            "pip install matplotlib (or pip install skpadim[plot])."
        ) from exc
    return plt


# --------------------------------------------------------------------------
# Input handling
# --------------------------------------------------------------------------


def _read_display_image(path):
    from PIL import Image

    with Image.open(path) as image:
        # Grey images stay grey (drawn with a grey colour map), anything else
        # (palette, RGBA, CMYK...) is shown as the detector sees it: RGB.
        return _pil_to_array(image)


def _pil_to_array(image):
    if image.mode in ("L", "1"):
        return np.asarray(image.convert("L"))
    return np.asarray(image.convert("RGB"))


def _check_image(image, name="image"):
    """One image as an (H, W) or (H, W, 3) array; reads paths and PIL images."""
    if isinstance(image, (str, os.PathLike)):
        image = _read_display_image(image)
    elif hasattr(image, "convert") and hasattr(image, "mode"):  # a PIL image
        image = _pil_to_array(image)
    image = np.asarray(image)
    if image.ndim == 3 and image.shape[2] == 1:
        image = image[:, :, 0]
    if image.ndim not in (2, 3) or (image.ndim == 3 and image.shape[2] != 3):
        raise ValueError(
            f"{name} must be one image of shape (H, W), (H, W, 1) or (H, W, 3), "
            f"a file path or a PIL image; got an array of shape {image.shape}. "
            "Pass images one at a time."
        )
    if image.dtype.kind not in "buif":
        raise TypeError(f"{name} must hold numbers; got dtype {image.dtype}.")
    return image


def _check_map(anomaly_map, shape, name="anomaly_map"):
    anomaly_map = np.asarray(anomaly_map)
    if anomaly_map.ndim != 2 or anomaly_map.shape != tuple(shape):
        raise ValueError(
            f"{name} must be a 2-D array of the image's shape {tuple(shape)}; got "
            f"shape {anomaly_map.shape}. With PadimDetector, compute maps with "
            "anomaly_maps(X, resolution='input') to get them on the image's grid."
        )
    if anomaly_map.dtype.kind not in "buif":
        raise TypeError(f"{name} must hold numbers; got dtype {anomaly_map.dtype}.")
    return anomaly_map.astype(np.float64, copy=False)


def _check_mask(mask, shape, name="mask"):
    """A boolean (H, W) mask; None stays None, paths are read with load_mask."""
    if mask is None:
        return None
    if isinstance(mask, (str, os.PathLike)):
        from .datasets import load_mask

        return load_mask(mask, shape)
    mask = np.asarray(mask)
    if mask.shape != tuple(shape):
        raise ValueError(
            f"{name} must have the image's shape {tuple(shape)}; got {mask.shape}."
        )
    return mask != 0


def _finite_range(maps):
    """(min, max) of the non-NaN values of several maps, or (None, None)."""
    finite = [m[np.isfinite(m)] for m in maps]
    finite = [f for f in finite if f.size]
    if not finite:
        return None, None
    return (
        float(min(f.min() for f in finite)),
        float(max(f.max() for f in finite)),
    )


def _image_value_range(image):
    """Display range of the image's pixels: fixed for uint8 and [0, 1] floats.

    A fixed range shows images as they are; letting matplotlib stretch each
    grey image to its own min/max would make a dark cell look as bright as a
    good one, which hides exactly what an inspector looks for.
    """
    if image.dtype == np.uint8:
        return 0, 255
    if image.dtype.kind == "f" and np.nanmin(image) >= 0 and np.nanmax(image) <= 1:
        return 0.0, 1.0
    return None, None


# --------------------------------------------------------------------------
# The display
# --------------------------------------------------------------------------


class AnomalyMapDisplay:
    """Anomaly map overlaid on its image, with ground-truth and predicted regions.

    It is recommended to create a display with :meth:`from_estimator` or
    :meth:`from_predictions`; the constructor only stores the data, and
    :meth:`plot` draws it.

    Parameters
    ----------
    image : ndarray of shape (H, W), (H, W, 1) or (H, W, 3), path or PIL image
        The image, uint8 or float in [0, 1]; grey images are drawn in grey.
    anomaly_map : ndarray of shape (H, W)
        Pixel anomaly scores on the image's grid (higher is more anomalous),
        e.g. from ``PadimDetector.anomaly_maps(X, resolution="input")``. NaN
        pixels (outside an analysed centre crop) are left transparent.
    mask : ndarray of shape (H, W), path or None, default=None
        Ground-truth defect mask, nonzero on defects; its outline is drawn.
        A path is read with :func:`skpadim.datasets.load_mask`.
    threshold : float or None, default=None
        Pixel threshold: the outline of the region where
        ``anomaly_map >= threshold`` is drawn as the predicted defect.
    title : str or None, default=None
        Axes title.

    Attributes
    ----------
    ax_ : matplotlib Axes
        Axes with the display.
    figure_ : matplotlib Figure
        Figure containing the display.
    image_ : matplotlib AxesImage
        The drawn image.
    overlay_ : matplotlib AxesImage
        The semi-transparent anomaly map.
    colorbar_ : matplotlib Colorbar or None
        Colour bar of the anomaly scores, None if ``colorbar=False``.
    mask_contour_ : matplotlib ContourSet or None
        Outline of the ground-truth mask, None without a mask (or an empty
        one).
    threshold_contour_ : matplotlib ContourSet or None
        Outline of the predicted region, None without a threshold.

    See Also
    --------
    plot_anomaly_grid : Many images and maps on one figure.

    Examples
    --------
    >>> import numpy as np
    >>> from skpadim.plotting import AnomalyMapDisplay
    >>> image = np.full((32, 32), 128, dtype=np.uint8)
    >>> amap = np.zeros((32, 32))
    >>> amap[8:16, 8:16] = 1.0
    >>> disp = AnomalyMapDisplay.from_predictions(
    ...     image, amap, mask=amap > 0.5, threshold=0.5)  # doctest: +SKIP
    """

    def __init__(self, image, anomaly_map, *, mask=None, threshold=None, title=None):
        self.image = image
        self.anomaly_map = anomaly_map
        self.mask = mask
        self.threshold = threshold
        self.title = title

    def plot(
        self,
        *,
        ax=None,
        alpha=0.5,
        cmap="inferno",
        vmin=None,
        vmax=None,
        colorbar=True,
        mask_color=_MASK_COLOR,
        threshold_color=_THRESHOLD_COLOR,
        linewidth=1.5,
        legend=True,
    ):
        """Draw the image, the anomaly map and the region outlines.

        Parameters
        ----------
        ax : matplotlib Axes, default=None
            Axes to draw on; None creates a new figure and axes.
        alpha : float, default=0.5
            Opacity of the anomaly map over the image.
        cmap : str or matplotlib Colormap, default="inferno"
            Colour map of the anomaly scores ("jet" is the colour map of the
            PaDiM paper's figures).
        vmin, vmax : float or None, default=None
            Anomaly scores mapped to the ends of the colour map; None uses the
            map's own finite minimum and maximum. Set them to compare several
            displays on one scale.
        colorbar : bool, default=True
            Add a colour bar of the anomaly scores.
        mask_color : color, default="lime"
            Colour of the ground-truth outline (solid).
        threshold_color : color, default="white"
            Colour of the predicted-region outline (dashed).
        linewidth : float, default=1.5
            Width of the outlines.
        legend : bool, default=True
            Name the outlines in a legend (when any is drawn).

        Returns
        -------
        display : AnomalyMapDisplay
            The display, with the artists stored as attributes.
        """
        plt = _import_pyplot("AnomalyMapDisplay.plot")
        image = _check_image(self.image)
        shape = image.shape[:2]
        anomaly_map = _check_map(self.anomaly_map, shape)
        mask = _check_mask(self.mask, shape)

        if ax is None:
            _, ax = plt.subplots()
        low, high = _image_value_range(image)
        self.image_ = ax.imshow(
            image,
            cmap="gray" if image.ndim == 2 else None,
            vmin=low,
            vmax=high,
            interpolation="nearest",
        )
        map_low, map_high = _finite_range([anomaly_map])
        # Matplotlib draws NaN with the colour map's "bad" colour, transparent
        # by default: the image shows through outside the analysed crop.
        self.overlay_ = ax.imshow(
            anomaly_map,
            cmap=cmap,
            alpha=alpha,
            vmin=map_low if vmin is None else vmin,
            vmax=map_high if vmax is None else vmax,
            interpolation="nearest",
        )

        handles = []
        self.mask_contour_ = None
        if mask is not None and mask.any():
            # A level half-way between False (0) and True (1) traces the mask's
            # outline through the pixel centres, aligned with imshow's grid.
            self.mask_contour_ = ax.contour(
                mask.astype(np.float64),
                levels=[0.5],
                colors=[mask_color],
                linewidths=linewidth,
            )
            handles.append(_legend_line(mask_color, "-", linewidth, "ground truth"))
        self.threshold_contour_ = None
        if self.threshold is not None:
            threshold = float(self.threshold)
            # contour() skips NaN cells, so no outline is drawn along the
            # edge of an unanalysed border.
            self.threshold_contour_ = _threshold_contour(
                ax, anomaly_map, threshold, threshold_color, linewidth
            )
            handles.append(
                _legend_line(
                    threshold_color,
                    _THRESHOLD_STYLE,
                    linewidth,
                    f"score \u2265 {threshold:.3g}",
                )
            )
        if legend and handles:
            legend_ = ax.legend(
                handles=handles, loc="lower right", fontsize="small", framealpha=0.6
            )
            # The threshold outline is white: a grey legend box keeps it
            # visible.
            legend_.get_frame().set_facecolor("0.35")
            for text in legend_.get_texts():
                text.set_color("white")

        self.colorbar_ = None
        if colorbar:
            self.colorbar_ = ax.figure.colorbar(self.overlay_, ax=ax)
            self.colorbar_.set_label("anomaly score")
            # The colour bar shows the colours at full opacity; the overlay
            # itself is blended with the image.
            self.colorbar_.solids.set_alpha(1.0)
        if self.title is not None:
            ax.set_title(self.title)
        ax.set_axis_off()

        self.ax_ = ax
        self.figure_ = ax.figure
        return self

    @classmethod
    def from_estimator(
        cls,
        estimator,
        image,
        *,
        mask=None,
        threshold=None,
        title=None,
        ax=None,
        **kwargs,
    ):
        """Compute an image's anomaly map with a fitted detector and plot it.

        Parameters
        ----------
        estimator : fitted PadimDetector
            Or any fitted estimator with ``anomaly_maps(X)`` returning maps on
            the input images' grid and ``score_samples(X)``.
        image : ndarray of shape (H, W), (H, W, 1) or (H, W, 3), path or PIL image
            One image.
        mask : ndarray of shape (H, W), path or None, default=None
            Ground-truth defect mask at the image's resolution.
        threshold : float or None, default=None
            Pixel threshold of the predicted-region outline, e.g. from
            :func:`skpadim.metrics.threshold_from_normal`.
        title : str or None, default=None
            Axes title; None shows the image's anomaly score (and, when the
            detector has an ``offset_``, its predicted label), which costs one
            more ``score_samples`` call. Pass ``""`` for no title.
        ax : matplotlib Axes, default=None
            Axes to draw on; None creates a new figure.
        **kwargs
            Passed to :meth:`plot` (``alpha``, ``cmap``, ``vmin``, ``vmax``,
            ``colorbar``, ...).

        Returns
        -------
        display : AnomalyMapDisplay
        """
        from sklearn.utils.validation import check_is_fitted

        _import_pyplot("AnomalyMapDisplay.from_estimator")
        check_is_fitted(estimator)
        if not hasattr(estimator, "anomaly_maps"):
            raise TypeError(
                "estimator must have an anomaly_maps method, like a fitted "
                f"PadimDetector; got {type(estimator).__name__}."
            )
        # Validate (and read) the image first, so a bad input fails before
        # the network runs; the estimator gets the image as passed in.
        shown = _check_image(image)
        anomaly_map = estimator.anomaly_maps([image])[0]
        if title is None:
            title = _score_title(estimator, image)
        return cls.from_predictions(
            shown,
            anomaly_map,
            mask=mask,
            threshold=threshold,
            title=title,
            ax=ax,
            **kwargs,
        )

    @classmethod
    def from_predictions(
        cls,
        image,
        anomaly_map,
        *,
        mask=None,
        threshold=None,
        title=None,
        ax=None,
        **kwargs,
    ):
        """Plot a precomputed anomaly map over its image.

        Parameters
        ----------
        image : ndarray of shape (H, W), (H, W, 1) or (H, W, 3), path or PIL image
            The image.
        anomaly_map : ndarray of shape (H, W)
            Its anomaly map on the same grid (``resolution="input"``).
        mask : ndarray of shape (H, W), path or None, default=None
            Ground-truth defect mask.
        threshold : float or None, default=None
            Pixel threshold of the predicted-region outline.
        title : str or None, default=None
            Axes title.
        ax : matplotlib Axes, default=None
            Axes to draw on; None creates a new figure.
        **kwargs
            Passed to :meth:`plot`.

        Returns
        -------
        display : AnomalyMapDisplay
        """
        _import_pyplot("AnomalyMapDisplay.from_predictions")
        display = cls(image, anomaly_map, mask=mask, threshold=threshold, title=title)
        return display.plot(ax=ax, **kwargs)


def _legend_line(color, style, width, label):
    from matplotlib.lines import Line2D

    return Line2D([], [], color=color, linestyle=style, linewidth=width, label=label)


def _threshold_contour(ax, anomaly_map, threshold, color, linewidth):
    """Outline of ``anomaly_map >= threshold``, or None when nothing reaches it.

    A region that touches the image border would be left open there, and a
    map entirely above the threshold would have no outline at all: padding
    the map with a value below the threshold closes them along the border.
    """
    finite = anomaly_map[np.isfinite(anomaly_map)]
    if finite.size == 0 or finite.max() < threshold:
        return None
    below = min(float(finite.min()), threshold) - 1.0
    padded = np.pad(anomaly_map, 1, constant_values=below)
    height, width = anomaly_map.shape
    # The pad sits half a pixel outside the image edge, so a region touching
    # the border is outlined along the border instead of left open.
    ys = np.r_[-0.5, np.arange(height), height - 0.5]
    xs = np.r_[-0.5, np.arange(width), width - 0.5]
    return ax.contour(
        xs,
        ys,
        padded,
        levels=[threshold],
        colors=[color],
        linewidths=linewidth,
        linestyles=_THRESHOLD_STYLE,
    )


def _score_title(estimator, image):
    """'anomaly score 12.3', plus the predicted label when one is defined."""
    score = -float(estimator.score_samples([image])[0])
    title = f"anomaly score {score:.3g}"
    offset = getattr(estimator, "offset_", None)
    if offset is not None:
        # predict() calls an image normal when score_samples - offset_ >= 0,
        # that is when the anomaly score is <= -offset_.
        label = "normal" if -score - offset >= 0 else "anomalous"
        title += f" ({label})"
    return title


# --------------------------------------------------------------------------
# Grids of examples
# --------------------------------------------------------------------------


def _as_list(items, n, name):
    if items is None:
        return [None] * n
    items = list(items)
    if len(items) != n:
        raise ValueError(
            f"{name} must have one entry per image ({n}); got {len(items)}."
        )
    return items


def plot_anomaly_grid(
    images,
    anomaly_maps,
    *,
    scores=None,
    masks=None,
    threshold=None,
    titles=None,
    ncols=4,
    alpha=0.5,
    cmap="inferno",
    vmin=None,
    vmax=None,
    colorbar=True,
    mask_color=_MASK_COLOR,
    threshold_color=_THRESHOLD_COLOR,
    linewidth=1.2,
    panel_size=2.6,
    suptitle=None,
):
    """Draw images with their anomaly maps on a grid, on one colour scale.

    Every map uses the same ``vmin``/``vmax`` (by default the finite minimum
    and maximum over all maps), so colours compare across panels; one colour
    bar serves the whole figure.

    Parameters
    ----------
    images : sequence of images or ndarray of shape (n, H, W[, C])
        Arrays (uint8 or float in [0, 1]), file paths or PIL images.
    anomaly_maps : sequence of ndarray of shape (H, W) or ndarray (n, H, W)
        One map per image, on the image's grid; NaN is transparent.
    scores : array-like of shape (n,) or None, default=None
        Image anomaly scores shown as panel titles ("score 12.3").
    masks : sequence of (ndarray, path or None) or None, default=None
        Ground-truth masks whose outlines are drawn; None entries (e.g. the
        normal images of :func:`skpadim.datasets.load_mvtec_ad`) draw nothing.
    threshold : float or None, default=None
        Pixel threshold; the outline of ``map >= threshold`` is drawn.
    titles : sequence of str or None, default=None
        Panel titles; they replace the score titles, or are prefixed to them
        on their own line when ``scores`` is also given.
    ncols : int, default=4
        Panels per row (fewer if there are fewer images).
    alpha : float, default=0.5
        Opacity of the maps over the images.
    cmap : str or matplotlib Colormap, default="inferno"
        Colour map of the anomaly scores.
    vmin, vmax : float or None, default=None
        Shared ends of the colour scale; None takes them from all the maps.
    colorbar : bool, default=True
        Add one colour bar for all panels.
    mask_color, threshold_color : color, default="lime", "white"
        Colours of the ground-truth (solid) and predicted (dashed) outlines.
    linewidth : float, default=1.2
        Width of the outlines.
    panel_size : float, default=2.6
        Size of one panel in inches; sets the figure size.
    suptitle : str or None, default=None
        Figure title.

    Returns
    -------
    figure : matplotlib Figure
        The figure; its first ``n`` axes are the panels, in order, and the
        next one, if any, is the colour bar.

    Examples
    --------
    >>> fig = plot_anomaly_grid(images, maps, scores=scores)  # doctest: +SKIP
    """
    plt = _import_pyplot("plot_anomaly_grid")
    images = [_check_image(im, f"images[{i}]") for i, im in enumerate(images)]
    n = len(images)
    if n == 0:
        raise ValueError("images must hold at least one image; got none.")
    if len(anomaly_maps) != n:
        raise ValueError(
            f"anomaly_maps must have one map per image ({n}); got {len(anomaly_maps)}."
        )
    maps = [
        _check_map(m, im.shape[:2], f"anomaly_maps[{i}]")
        for i, (m, im) in enumerate(zip(anomaly_maps, images))
    ]
    masks = _as_list(masks, n, "masks")
    titles = _as_list(titles, n, "titles")
    scores = _as_list(None if scores is None else np.ravel(scores), n, "scores")
    if int(ncols) < 1:
        raise ValueError(f"ncols must be a positive int; got {ncols!r}.")
    ncols = min(int(ncols), n)
    nrows = math.ceil(n / ncols)

    low, high = _finite_range(maps)
    vmin = low if vmin is None else vmin
    vmax = high if vmax is None else vmax
    # Constrained layout leaves room for the titles and the shared colour bar.
    figure = plt.figure(
        figsize=(panel_size * ncols + (1.0 if colorbar else 0.0), panel_size * nrows),
        layout="constrained",
    )
    axes = figure.subplots(nrows, ncols, squeeze=False).ravel()
    for ax in axes[n:]:
        ax.remove()
    axes = axes[:n]

    displays = []
    for i, ax in enumerate(axes):
        title = titles[i]
        if scores[i] is not None:
            score_text = f"score {float(scores[i]):.3g}"
            title = score_text if title is None else f"{title}\n{score_text}"
        display = AnomalyMapDisplay(
            images[i], maps[i], mask=masks[i], threshold=threshold, title=title
        ).plot(
            ax=ax,
            alpha=alpha,
            cmap=cmap,
            vmin=vmin,
            vmax=vmax,
            colorbar=False,
            mask_color=mask_color,
            threshold_color=threshold_color,
            linewidth=linewidth,
            legend=False,
        )
        ax.title.set_fontsize("medium")
        displays.append(display)

    # One legend for the whole figure: per-panel legends would hide defects.
    handles = []
    if any(d.mask_contour_ is not None for d in displays):
        handles.append(_legend_line(mask_color, "-", 2, "ground truth"))
    if threshold is not None:
        handles.append(
            _legend_line(
                threshold_color, _THRESHOLD_STYLE, 2, f"score \u2265 {threshold:.3g}"
            )
        )
    if handles:
        try:
            # Outside the panels, so no defect is hidden (matplotlib >= 3.7).
            legend = figure.legend(
                handles=handles, loc="outside lower center", ncols=len(handles)
            )
        except ValueError:
            legend = figure.legend(handles=handles, loc="lower center")
        legend.get_frame().set_facecolor("0.35")
        for text in legend.get_texts():
            text.set_color("white")
    if colorbar:
        cbar = figure.colorbar(
            displays[0].overlay_, ax=list(axes), shrink=min(1.0, 0.5 + 0.25 * nrows)
        )
        cbar.set_label("anomaly score")
        cbar.solids.set_alpha(1.0)
    if suptitle is not None:
        figure.suptitle(suptitle)
    return figure
