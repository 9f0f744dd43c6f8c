"""Tests of skpadim.plotting: AnomalyMapDisplay and plot_anomaly_grid."""

import numpy as np
import pytest

matplotlib = pytest.importorskip("matplotlib")
matplotlib.use("Agg")  # no display needed, and no window left behind

import matplotlib.pyplot as plt  # noqa: E402
from PIL import Image  # noqa: E402

from skpadim import PadimDetector  # noqa: E402
from skpadim.plotting import AnomalyMapDisplay, plot_anomaly_grid  # noqa: E402

from conftest import SMALL, smooth_texture  # noqa: E402


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")


@pytest.fixture
def example():
    """A grey image, a map peaking on a square, and the square's mask."""
    rng = np.random.default_rng(0)
    image = rng.integers(60, 200, size=(40, 48), dtype=np.uint8)
    mask = np.zeros((40, 48), dtype=bool)
    mask[10:20, 12:24] = True
    anomaly_map = rng.random((40, 48)) + 3.0 * mask
    return image, anomaly_map, mask


@pytest.fixture(scope="module")
def detector():
    images = smooth_texture(np.random.default_rng(0), 8)
    return PadimDetector(**SMALL).fit(images)


def test_plot_sets_attributes(example):
    image, anomaly_map, _ = example
    display = AnomalyMapDisplay(image, anomaly_map, title="an image")
    assert display.plot() is display
    assert isinstance(display.ax_, matplotlib.axes.Axes)
    assert display.figure_ is display.ax_.figure
    assert isinstance(display.image_, matplotlib.image.AxesImage)
    assert isinstance(display.overlay_, matplotlib.image.AxesImage)
    assert isinstance(display.colorbar_, matplotlib.colorbar.Colorbar)
    assert display.mask_contour_ is None
    assert display.threshold_contour_ is None
    assert display.ax_.get_title() == "an image"
    # Grey images are drawn in grey on their fixed 0-255 scale.
    assert display.image_.get_cmap().name == "gray"
    assert display.image_.get_clim() == (0, 255)
    # The overlay's colour scale defaults to the map's range.
    low, high = display.overlay_.get_clim()
    assert low == pytest.approx(anomaly_map.min())
    assert high == pytest.approx(anomaly_map.max())


def test_plot_on_given_axes_without_colorbar(example):
    image, anomaly_map, _ = example
    fig, ax = plt.subplots()
    display = AnomalyMapDisplay(image, anomaly_map).plot(
        ax=ax, colorbar=False, vmin=0.0, vmax=10.0, alpha=0.3, cmap="jet"
    )
    assert display.ax_ is ax
    assert display.figure_ is fig
    assert display.colorbar_ is None
    assert len(fig.axes) == 1
    assert display.overlay_.get_clim() == (0.0, 10.0)
    assert display.overlay_.get_alpha() == 0.3
    assert display.overlay_.get_cmap().name == "jet"


def test_mask_and_threshold_contours(example):
    image, anomaly_map, mask = example
    display = AnomalyMapDisplay.from_predictions(
        image, anomaly_map, mask=mask, threshold=2.0
    )
    assert isinstance(display, AnomalyMapDisplay)
    assert display.mask_contour_ is not None
    assert display.mask_contour_.levels.tolist() == [0.5]
    # The outline of the 10 x 12 square passes through its edge pixel centres.
    (outline,) = display.mask_contour_.allsegs[0]
    assert outline[:, 0].min() == pytest.approx(11.5, abs=0.5)
    assert outline[:, 0].max() == pytest.approx(23.5, abs=0.5)
    assert outline[:, 1].min() == pytest.approx(9.5, abs=0.5)
    assert outline[:, 1].max() == pytest.approx(19.5, abs=0.5)
    assert display.threshold_contour_ is not None
    assert display.threshold_contour_.levels.tolist() == [2.0]
    labels = [t.get_text() for t in display.ax_.get_legend().get_texts()]
    assert labels[0] == "ground truth"
    assert labels[1].startswith("score")


def test_empty_mask_and_unreached_threshold_draw_nothing(example):
    image, anomaly_map, _ = example
    with np.errstate(all="raise"):
        display = AnomalyMapDisplay.from_predictions(
            image,
            anomaly_map,
            mask=np.zeros_like(anomaly_map, dtype=bool),
            threshold=anomaly_map.max() + 1,
        )
    assert display.mask_contour_ is None
    assert display.threshold_contour_ is None


def test_nan_regions_are_transparent(example):
    image, anomaly_map, mask = example
    anomaly_map = anomaly_map.copy()
    anomaly_map[:5] = np.nan
    anomaly_map[:, -4:] = np.nan
    display = AnomalyMapDisplay.from_predictions(
        image, anomaly_map, mask=mask, threshold=2.0
    )
    low, high = display.overlay_.get_clim()
    assert np.isfinite(low) and np.isfinite(high)
    assert high == pytest.approx(np.nanmax(anomaly_map))
    rgba = display.overlay_.to_rgba(anomaly_map)
    assert np.all(rgba[:5, :, 3] == 0)
    assert np.all(rgba[5:, :-4, 3] > 0)
    display.figure_.canvas.draw()  # rendering with NaN must not fail


def test_all_nan_map_still_draws(example):
    image, _, _ = example
    display = AnomalyMapDisplay(image, np.full(image.shape, np.nan), threshold=1.0)
    display.plot()
    assert display.threshold_contour_ is None
    display.figure_.canvas.draw()


@pytest.mark.parametrize(
    "make_image",
    [
        pytest.param(lambda im: np.repeat(im[..., None], 3, axis=2), id="rgb"),
        pytest.param(lambda im: im[..., None], id="one-channel"),
        pytest.param(lambda im: im / 255.0, id="float"),
        pytest.param(lambda im: Image.fromarray(im), id="pil"),
    ],
)
def test_image_kinds(example, make_image):
    image, anomaly_map, _ = example
    display = AnomalyMapDisplay(make_image(image), anomaly_map).plot()
    assert display.image_.get_array().shape[:2] == image.shape


def test_image_path(example, tmp_path):
    image, anomaly_map, mask = example
    path = tmp_path / "cell.png"
    Image.fromarray(image).save(path)
    mask_path = tmp_path / "cell_mask.png"
    Image.fromarray(mask.astype(np.uint8) * 255).save(mask_path)
    display = AnomalyMapDisplay(path, anomaly_map, mask=mask_path).plot()
    np.testing.assert_array_equal(display.image_.get_array(), image)
    assert display.mask_contour_ is not None


def test_shape_mismatch_raises(example):
    image, anomaly_map, mask = example
    with pytest.raises(ValueError, match="resolution='input'"):
        AnomalyMapDisplay(image, anomaly_map[:-1]).plot()
    with pytest.raises(ValueError, match="mask must have the image's shape"):
        AnomalyMapDisplay(image, anomaly_map, mask=mask[:, :-1]).plot()
    with pytest.raises(ValueError, match="one image"):
        AnomalyMapDisplay(np.stack([image] * 2), anomaly_map).plot()


def test_from_estimator(detector):
    image = smooth_texture(np.random.default_rng(1), 1)[0]
    image[20:30, 20:30] = 255  # a bright square the model never saw
    mask = np.zeros(image.shape[:2], dtype=bool)
    mask[20:30, 20:30] = True
    amap = detector.anomaly_maps([image])[0]
    display = AnomalyMapDisplay.from_estimator(
        detector, image, mask=mask, threshold=float(np.median(amap))
    )
    np.testing.assert_allclose(display.overlay_.get_array(), amap, rtol=1e-6)
    assert display.mask_contour_ is not None
    assert display.threshold_contour_ is not None
    score = -detector.score_samples([image])[0]
    label = "normal" if detector.predict([image])[0] == 1 else "anomalous"
    assert display.ax_.get_title() == f"anomaly score {score:.3g} ({label})"


def test_from_estimator_path_and_title(detector, tmp_path):
    image = smooth_texture(np.random.default_rng(2), 1, size=80)[0]
    path = tmp_path / "part.png"
    Image.fromarray(image).save(path)
    _, ax = plt.subplots()
    display = AnomalyMapDisplay.from_estimator(
        detector, str(path), title="", ax=ax, colorbar=False
    )
    # Maps come back on the input's 80 x 80 grid although the model sees 64.
    assert display.overlay_.get_array().shape == (80, 80)
    assert display.ax_ is ax
    assert display.ax_.get_title() == ""


def test_from_estimator_unfitted_raises():
    from sklearn.exceptions import NotFittedError

    image = np.zeros((64, 64, 3), dtype=np.uint8)
    with pytest.raises(NotFittedError):
        AnomalyMapDisplay.from_estimator(PadimDetector(), image)


@pytest.mark.parametrize(("n", "ncols", "shape"), [(5, 3, (2, 3)), (2, 4, (1, 2))])
def test_grid_axes_and_shared_scale(n, ncols, shape):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 255, size=(n, 32, 32, 3), dtype=np.uint8)
    maps = rng.random((n, 32, 32)) * np.arange(1, n + 1)[:, None, None]
    maps[:, :3] = np.nan
    masks = [None] * n
    masks[0] = maps[0] > 0.5
    fig = plot_anomaly_grid(
        images, maps, scores=np.arange(n), masks=masks, ncols=ncols, threshold=0.5
    )
    assert isinstance(fig, matplotlib.figure.Figure)
    assert len(fig.axes) == n + 1  # the panels, then the shared colour bar
    panels = fig.axes[:n]
    for ax in panels:
        assert ax.get_subplotspec().get_gridspec().get_geometry() == shape
    # One colour scale for all panels: the finite range over all maps.
    clims = {ax.get_images()[1].get_clim() for ax in panels}
    assert clims == {(np.nanmin(maps), np.nanmax(maps))}
    assert panels[1].get_title() == "score 1"
    assert fig.legends  # ground truth and threshold are named once per figure
    fig.canvas.draw()


def test_grid_options():
    rng = np.random.default_rng(0)
    images = list(rng.integers(0, 255, size=(3, 24, 24), dtype=np.uint8))
    maps = list(rng.random((3, 24, 24)))
    fig = plot_anomaly_grid(
        images, maps, titles=["a", "b", "c"], colorbar=False, vmin=0, vmax=2
    )
    assert len(fig.axes) == 3
    assert [ax.get_title() for ax in fig.axes] == ["a", "b", "c"]
    assert {ax.get_images()[1].get_clim() for ax in fig.axes} == {(0, 2)}
    with pytest.raises(ValueError, match="one map per image"):
        plot_anomaly_grid(images, maps[:2])
    with pytest.raises(ValueError, match="one entry per image"):
        plot_anomaly_grid(images, maps, scores=[1.0])
