"""ONNX export: ONNX Runtime against the Python detectors.

The exported graph is an independent implementation of scoring (a module
built from the fitted arrays, run by ONNX Runtime's kernels), so agreement
to float32 rounding checks both sides. Images are given at the frame size,
where the uint8 input of the graph is exactly what the detector reads.
"""

import os

import joblib
import numpy as np
import pytest
from PIL import Image
from sklearn.exceptions import NotFittedError

from skpadim import (
    GaussianADDetector,
    PadimDetector,
    PatchCoreDetector,
    SpadeDetector,
)
from skpadim.export import frame_images, to_onnx

from conftest import SMALL, smooth_texture

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

RTOL = 1e-4


def cflow_detector(**params):
    from skpadim._cflow import CflowDetector

    return CflowDetector(
        max_iter=1, condition_dim=8, n_coupling_blocks=2, **{**SMALL, **params}
    )


# name -> factory of an unfitted detector with a tiny random-init backbone.
DETECTORS = {
    "padim": lambda: PadimDetector(**SMALL),
    "padim-pca": lambda: PadimDetector(**{**SMALL, "reduction": "pca"}),
    "padim-nonsquare-sigma0": lambda: PadimDetector(
        **{**SMALL, "image_size": (48, 40), "sigma": 0.0}
    ),
    "patchcore": lambda: PatchCoreDetector(**{**SMALL, "n_features": None}),
    "patchcore-no-reweighting": lambda: PatchCoreDetector(
        **{**SMALL, "n_neighbors": 1}
    ),
    # Even patch_size: the averaged taps grow by one and are resampled back
    # onto the finest tap's grid; 56 px gives a non-integer upsampling ratio.
    "patchcore-even-patch": lambda: PatchCoreDetector(
        **{**SMALL, "patch_size": 2, "image_size": 56}
    ),
    "spade": lambda: SpadeDetector(**{**SMALL, "n_neighbors": 3}),
    "spade-kappa": lambda: SpadeDetector(
        **{**SMALL, "n_neighbors": 4, "n_pixel_neighbors": 3, "reduction": "pca"}
    ),
    "gaussian-ad": lambda: GaussianADDetector(**SMALL),
    "cflow": cflow_detector,
}


@pytest.fixture(scope="module")
def train_images():
    return smooth_texture(np.random.default_rng(0), 8)


@pytest.fixture(scope="module")
def test_images():
    images = smooth_texture(np.random.default_rng(1), 3)
    images[0, 20:30, 24:36] = 255  # a defect
    return images


@pytest.fixture(scope="module")
def fitted(train_images):
    """Fitted detectors by name, each fitted once per module (lazily)."""
    cache = {}

    def get(name):
        if name not in cache:
            if name == "cflow":
                pytest.importorskip("skpadim._cflow")
            cache[name] = DETECTORS[name]().fit(train_images)
        return cache[name]

    return get


def session(path):
    return ort.InferenceSession(os.fspath(path), providers=["CPUExecutionProvider"])


def run(path, images):
    sess = session(path)
    names = [o.name for o in sess.get_outputs()]
    return dict(zip(names, sess.run(None, {"images": images})))


def assert_agree(actual, expected):
    # Scores and maps are distances (>= 0); the atol only guards values that
    # are zero up to rounding.
    expected = np.asarray(expected, dtype=np.float64)
    atol = 1e-6 * float(np.abs(expected).max())
    np.testing.assert_allclose(actual, expected, rtol=RTOL, atol=atol)


@pytest.mark.parametrize("name", list(DETECTORS))
def test_onnx_runtime_matches_the_detector(name, fitted, test_images, tmp_path):
    detector = fitted(name)
    images = frame_images(detector, test_images)
    path = to_onnx(detector, tmp_path / f"{name}.onnx")
    out = run(path, images)

    assert out["scores"].dtype == np.float32 and out["scores"].shape == (3,)
    assert_agree(out["scores"], -detector.score_samples(images))
    if isinstance(detector, GaussianADDetector):
        assert list(out) == ["scores"]
        return
    assert list(out) == ["scores", "maps"]
    assert out["maps"].shape == (3, *detector.frame_shape_)
    assert_agree(out["maps"], detector.anomaly_maps(images, resolution="model"))
    if name != "cflow":  # one epoch of training does not find it
        assert out["scores"].argmax() == 0  # the defect stands out


@pytest.mark.parametrize("name", ["patchcore", "spade"])
def test_neighbours_at_distance_zero_are_exact(
    name, fitted, train_images, test_images, tmp_path
):
    # A training image's patches are in the bank (and its pyramid in SPADE's
    # gallery): distance 0, where the matrix-product form alone would give
    # the square root of its rounding error (~1e-3 of a typical distance);
    # the graph re-ranks exactly. What is left is the backbones' float32
    # rounding (ONNX Runtime's convolutions are not torch's).
    detector = fitted(name)
    path = to_onnx(detector, tmp_path / "m.onnx")
    out = run(path, train_images[:3])
    typical = run(path, test_images)["maps"].max()
    expected = -detector.score_samples(train_images[:3])
    np.testing.assert_allclose(out["scores"], expected, rtol=RTOL, atol=1e-5 * typical)
    maps = detector.anomaly_maps(train_images[:3], resolution="model")
    np.testing.assert_allclose(out["maps"], maps, rtol=RTOL, atol=1e-5 * typical)


@pytest.mark.parametrize("name", ["padim", "patchcore", "spade"])
def test_batch_axis_is_dynamic(name, fitted, test_images, tmp_path):
    detector = fitted(name)
    path = to_onnx(detector, tmp_path / "m.onnx")
    (batch_dim, *frame, channels) = (
        d.dim_param or d.dim_value
        for d in onnx.load(path).graph.input[0].type.tensor_type.shape.dim
    )
    assert batch_dim == "N" and tuple(frame) == detector.frame_shape_
    all_at_once = run(path, test_images)
    one_by_one = [run(path, image[None]) for image in test_images]
    for key in all_at_once:
        stacked = np.concatenate([o[key] for o in one_by_one])
        np.testing.assert_allclose(stacked, all_at_once[key], rtol=1e-5)


def test_static_batch_of_one(fitted, test_images, tmp_path):
    detector = fitted("padim")
    path = to_onnx(detector, tmp_path / "m.onnx", batch_size_dynamic=False)
    sess = session(path)
    assert sess.get_inputs()[0].shape == [1, 64, 64, 3]
    scores, _ = sess.run(None, {"images": test_images[:1]})
    assert_agree(scores, -detector.score_samples(test_images[:1]))
    with pytest.raises(Exception, match="images"):
        sess.run(None, {"images": test_images})


def test_efficientnet_same_padding_at_odd_size(train_images, test_images, tmp_path):
    # Lite0 pads its strided convolutions by a size-dependent amount ("SAME");
    # at an odd frame size a traced padding would be off by one pixel.
    params = {**SMALL, "backbone": "efficientnet_lite0", "weights": "DEFAULT"}
    detector = PatchCoreDetector(**{**params, "image_size": 45, "n_features": 24})
    detector.fit(train_images)
    images = frame_images(detector, test_images)
    out = run(to_onnx(detector, tmp_path / "lite0.onnx"), images)
    assert_agree(out["scores"], -detector.score_samples(images))
    assert_agree(out["maps"], detector.anomaly_maps(images, resolution="model"))


@pytest.mark.parametrize("name", ["padim", "patchcore", "spade"])
def test_file_is_no_larger_than_the_joblib_file(name, fitted, tmp_path):
    # PaDiM's whitening factors are stored packed (half of each matrix), as
    # in the joblib file; a full (P, d, d) constant would double the file.
    detector = fitted(name)
    onnx_size = os.path.getsize(to_onnx(detector, tmp_path / "m.onnx"))
    joblib.dump(detector, tmp_path / "m.joblib")
    assert onnx_size <= 1.1 * os.path.getsize(tmp_path / "m.joblib")


def test_padim_whitening_is_stored_packed(fitted, tmp_path):
    detector = fitted("padim")
    model = onnx.load(to_onnx(detector, tmp_path / "m.onnx"))
    positions, d = detector.gaussian_.location_.shape
    shapes = [tuple(t.dims) for t in model.graph.initializer]
    assert (positions, d * (d + 1) // 2) in shapes
    assert (positions, d, d) not in shapes


def test_large_constants_go_to_a_side_file(fitted, test_images, tmp_path):
    detector = fitted("padim")
    path = tmp_path / "big.onnx"
    for _ in range(2):  # a second export replaces the side file, never appends
        to_onnx(detector, path, external_data_threshold=1_000_000)
        data = tmp_path / "big.onnx.data"
        assert data.exists()
        sizes = os.path.getsize(path), os.path.getsize(data)
        assert sizes[0] < 1_000_000 < sizes[1]
    single = os.path.getsize(to_onnx(detector, tmp_path / "single.onnx"))
    assert sizes[1] < single
    assert not (tmp_path / "single.onnx.data").exists()
    out = run(path, test_images)
    assert_agree(out["scores"], -detector.score_samples(test_images))


def test_metadata_and_threshold_reproduce_predict(fitted, test_images, tmp_path):
    detector = fitted("patchcore")
    path = to_onnx(detector, tmp_path / "m.onnx", opset=18)
    model = onnx.load(path)
    assert model.opset_import[0].version == 18
    meta = {p.key: p.value for p in model.metadata_props}
    assert meta["detector"] == "PatchCoreDetector"
    assert meta["frame_shape"] == "64,64"
    threshold = float(meta["threshold"])
    assert threshold == -detector.offset_
    scores = run(path, test_images)["scores"]
    labels = np.where(scores > threshold, -1, 1)
    # Equal except where a score lies within rounding of the threshold.
    close = np.isclose(scores, threshold, rtol=RTOL)
    assert (labels == detector.predict(test_images))[~close].all()


def test_resized_and_cropped_images(train_images, tmp_path):
    # The caller resizes and crops: frame_images does it with the detector's
    # own code; only the rounding to uint8 separates the two paths.
    detector = PadimDetector(**{**SMALL, "image_size": 72, "crop_size": (56, 60)})
    detector.fit(train_images)
    raw = smooth_texture(np.random.default_rng(3), 3, size=96)
    frames = frame_images(detector, raw)
    assert frames.shape == (3, 56, 60, 3) and frames.dtype == np.uint8
    out = run(to_onnx(detector, tmp_path / "m.onnx"), frames)
    np.testing.assert_allclose(out["scores"], -detector.score_samples(raw), rtol=0.02)
    maps = detector.anomaly_maps(raw, resolution="model")
    assert np.abs(out["maps"] - maps).max() < 0.05 * maps.max()


def test_frame_images_leaves_frames_alone(fitted, test_images):
    detector = fitted("padim")
    np.testing.assert_array_equal(frame_images(detector, test_images), test_images)
    gray = test_images[..., 0]
    np.testing.assert_array_equal(
        frame_images(detector, gray), np.repeat(gray[..., None], 3, axis=3)
    )


def test_frame_images_matches_the_pillow_recipe(train_images):
    # The module docstring's recipe for deployments without skpadim.
    detector = PadimDetector(**{**SMALL, "image_size": 40, "crop_size": (32, 36)})
    detector.fit(train_images)
    raw = smooth_texture(np.random.default_rng(4), 2, size=96)
    expected = frame_images(detector, raw)
    for image, frame in zip(raw, expected):
        pil = Image.fromarray(image).resize((40, 40), Image.Resampling.BILINEAR)
        top, left = (40 - 32) // 2, (40 - 36) // 2
        recipe = np.asarray(pil.crop((left, top, left + 36, top + 32)))
        assert np.abs(recipe.astype(int) - frame).max() <= 1


def test_frame_images_refuses_other_sizes_without_image_size(train_images):
    detector = PadimDetector(**{**SMALL, "image_size": None}).fit(train_images)
    with pytest.raises(ValueError, match="training size"):
        frame_images(detector, smooth_texture(np.random.default_rng(5), 1, size=32))


def test_refusals(fitted, tmp_path):
    with pytest.raises(NotFittedError):
        to_onnx(PadimDetector(**SMALL), tmp_path / "m.onnx")
    with pytest.raises(TypeError, match="exports skpadim's detectors"):
        to_onnx(object(), tmp_path / "m.onnx")
    for opset in (9, "17", True):
        with pytest.raises(ValueError, match="opset"):
            to_onnx(fitted("padim"), tmp_path / "m.onnx", opset=opset)
    with pytest.raises(ValueError, match="external_data_threshold"):
        to_onnx(fitted("padim"), tmp_path / "m.onnx", external_data_threshold=1.5)


def test_a_head_it_does_not_know_is_refused(fitted, tmp_path):
    class OwnHead:
        input_kind = "concat"

    class OwnDetector(PadimDetector):
        pass

    detector = OwnDetector(**SMALL)
    detector.__dict__.update(fitted("padim").__dict__)
    detector.gaussian_ = OwnHead()
    with pytest.raises(NotImplementedError, match="OwnHead"):
        to_onnx(detector, tmp_path / "m.onnx")
    assert not (tmp_path / "m.onnx").exists()


def test_command_line_export(fitted, test_images, tmp_path):
    from click.testing import CliRunner

    from skpadim._cli import main

    detector = fitted("padim")
    joblib.dump(detector, tmp_path / "m.joblib")
    result = CliRunner().invoke(
        main, ["export", str(tmp_path / "m.joblib"), str(tmp_path / "m.onnx")]
    )
    assert result.exit_code == 0, result.output
    assert "Exported PadimDetector" in result.output
    out = run(tmp_path / "m.onnx", test_images)
    assert_agree(out["scores"], -detector.score_samples(test_images))
