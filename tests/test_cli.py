"""The ``skpadim`` command line: fit -> score round trip, maps, info, errors."""

import csv
import io
import subprocess
import sys
import types

import joblib
import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

import skpadim
from skpadim import PadimDetector, _cli

# A tiny random-init model, given the way a user would: every value type that
# --set parses (str, None, int, tuple, float) appears once.
SMALL = [
    "backbone=resnet18",
    "weights=None",
    "n_features=8",
    "image_size=(32, 32)",
    "contamination=0.2",
    "random_state=0",
    "device=cpu",
]
SET_ARGS = [arg for item in SMALL for arg in ("--set", item)]

# One training image per accepted suffix, in any case, some in a subfolder.
TRAIN_FILES = [
    "a.png",
    "b.PNG",
    "c.jpeg",
    "d.bmp",
    "sub/e.TIF",
    "sub/f.tiff",
    "sub/g.webp",
    "sub/h.Jpg",
]


def texture(rng, height=32, width=32):
    """A smooth random RGB image: 4x4-pixel blocks of similar colours."""
    base = rng.normal(size=(height // 4, width // 4, 3))
    up = np.kron(base, np.ones((4, 4, 1)))
    return np.clip(128 + 20 * up, 0, 255).astype(np.uint8)


def save(path, pixels):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)


def invoke(*args):
    return CliRunner().invoke(_cli.main, [str(a) for a in args])


def assert_fails(result, code, *texts):
    """A clean failure: the exit code, the message, and no traceback."""
    assert result.exit_code == code, result.output
    assert isinstance(result.exception, SystemExit), result.exception
    assert "Traceback" not in result.output
    for text in texts:
        assert text in result.output


@pytest.fixture(scope="module")
def train_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("train")
    rng = np.random.default_rng(0)
    for name in TRAIN_FILES:
        save(root / name, texture(rng))
    # Not images, or OS debris: must be skipped, or the fit would fail on them.
    (root / "notes.txt").write_text("not an image")
    (root / "sub" / "._e.png").write_bytes(b"\x00AppleDouble")
    (root / ".cache").mkdir()
    (root / ".cache" / "x.png").write_bytes(b"broken")
    return root


@pytest.fixture(scope="module")
def fit_result(train_dir, tmp_path_factory):
    """The one real fit of this module: (model path, CliRunner result)."""
    path = tmp_path_factory.mktemp("model") / "model.joblib"
    result = invoke("fit", train_dir, "-o", path, *SET_ARGS)
    assert result.exit_code == 0, result.output
    return path, result


@pytest.fixture(scope="module")
def model(fit_result):
    return fit_result[0]


@pytest.fixture(scope="module")
def test_images(tmp_path_factory):
    """Images to score: normal-looking ones of two sizes, and a noise image."""
    root = tmp_path_factory.mktemp("test")
    rng = np.random.default_rng(1)
    save(root / "x.png", texture(rng))
    save(root / "deep" / "y.png", texture(rng, 40, 24))
    save(root / "noise.png", rng.integers(0, 256, (32, 32, 3), dtype=np.uint8))
    return root


def read_csv(text):
    return list(csv.DictReader(io.StringIO(text)))


# ------------------------------------------------------------------ fit
def test_fit_saves_the_model_with_the_set_parameters(model):
    det = joblib.load(model)
    assert isinstance(det, PadimDetector)
    params = det.get_params()
    assert params["backbone"] == "resnet18"
    assert params["weights"] is None
    assert params["n_features"] == 8
    assert params["image_size"] == (32, 32)
    assert params["contamination"] == 0.2
    assert params["verbose"] == 1  # progress bar by default
    # Every suffix found, nothing hidden or foreign.
    assert det.n_samples_seen_ == len(TRAIN_FILES)


def test_fit_prints_a_summary(fit_result):
    path, result = fit_result
    det = joblib.load(path)
    summary = result.stdout.strip().splitlines()[-1]
    assert summary.startswith("PadimDetector: fitted on 8 images in ")
    assert f"offset_={det.offset_:.6g}" in summary


def test_find_images_is_recursive_sorted_and_case_insensitive(train_dir):
    found = _cli.find_images(train_dir)
    assert [p.relative_to(train_dir).as_posix() for p in found] == TRAIN_FILES


@pytest.mark.parametrize(
    "text, value",
    [
        ("8", 8),
        ("0.5", 0.5),
        ("(256, 224)", (256, 224)),
        ("None", None),
        ("True", True),
        ("resnet18", "resnet18"),
        ("/models/resnet 18.pth", "/models/resnet 18.pth"),
        ("a=b", "a=b"),  # only the first "=" separates the key
    ],
)
def test_set_values_are_literals_else_strings(text, value):
    assert _cli.parse_settings(None, None, [f"key={text}"]) == {"key": value}


def test_verbose_set_by_the_user_is_kept():
    assert _cli.make_detector(PadimDetector, {}).verbose == 1
    assert _cli.make_detector(PadimDetector, {"verbose": 0}).verbose == 0


# ------------------------------------------------------------------ score
def test_score_rows_are_the_detectors_own_scores(model, train_dir, test_images):
    out = test_images.parent / "scores.csv"
    result = invoke("score", model, test_images / "noise.png", train_dir, "--csv", out)
    assert result.exit_code == 0, result.output
    rows = read_csv(out.read_text())

    paths = [str(test_images / "noise.png")]
    paths += [str(p) for p in _cli.find_images(train_dir)]
    assert [row["path"] for row in rows] == paths
    det = joblib.load(model)
    np.testing.assert_allclose(
        [float(r["anomaly_score"]) for r in rows], -det.score_samples(paths), rtol=1e-9
    )
    np.testing.assert_allclose(
        [float(r["decision"]) for r in rows], det.decision_function(paths), rtol=1e-9
    )
    names = {1: "normal", -1: "anomalous"}
    assert [r["label"] for r in rows] == [names[v] for v in det.predict(paths)]
    # Both labels occur, so the mapping is really exercised.
    assert {r["label"] for r in rows} == {"normal", "anomalous"}
    assert "map" not in rows[0]


def test_score_prints_the_csv_without_csv_option(model, test_images):
    result = invoke("score", model, test_images / "x.png")
    assert result.exit_code == 0, result.output
    (row,) = read_csv(result.stdout)
    det = joblib.load(model)
    expected = det.decision_function([str(test_images / "x.png")])[0]
    assert float(row["decision"]) == pytest.approx(expected, rel=1e-9)


def test_maps_writes_one_overlay_per_image_at_its_size(model, test_images, tmp_path):
    out = tmp_path / "scores.csv"
    maps = tmp_path / "maps"
    result = invoke("score", model, test_images, "--csv", out, "--maps", maps)
    assert result.exit_code == 0, result.output

    rows = read_csv(out.read_text())
    written = sorted(p.relative_to(maps).as_posix() for p in maps.rglob("*.png"))
    assert written == ["deep/y.png", "noise.png", "x.png"]
    for row in rows:
        with Image.open(row["path"]) as image, Image.open(row["map"]) as overlay:
            assert overlay.size == image.size
            assert overlay.mode == "RGB"
            # An overlay, not a copy of the image.
            assert not np.array_equal(np.asarray(overlay), np.asarray(image))


def test_maps_names_are_unique(model, tmp_path):
    rng = np.random.default_rng(2)
    for name in ("one/a.png", "two/a.png", "two/a.jpg"):
        save(tmp_path / name, texture(rng))
    maps = tmp_path / "maps"
    result = invoke(
        "score", model, tmp_path / "one/a.png", tmp_path / "two", "--maps", maps
    )
    assert result.exit_code == 0, result.output
    rows = read_csv(result.stdout)
    assert [r["map"] for r in rows] == [
        str(maps / n) for n in ("a.png", "a-1.png", "a-2.png")
    ]
    assert sorted(p.name for p in maps.iterdir()) == ["a-1.png", "a-2.png", "a.png"]


def test_overlay_colours_by_level_and_leaves_nan_alone():
    image = Image.fromarray(np.full((2, 3, 3), 100, np.uint8))
    amap = np.array([[0.0, 1.0, np.nan], [0.5, 2.0, -1.0]], np.float32)
    out = np.asarray(_cli.overlay(image, amap, 0.0, 1.0)).astype(int)
    np.testing.assert_array_equal(out[0, 2], [100, 100, 100])  # outside the crop
    np.testing.assert_array_equal(out[0, 1], out[1, 1])  # clipped at high
    np.testing.assert_array_equal(out[0, 0], out[1, 2])  # clipped at low
    assert out[0, 1, 0] > out[0, 0, 0]  # hot is redder than cold


def test_maps_need_a_detector_with_maps(model, test_images, monkeypatch):
    class ImageLevelOnly:  # like GaussianADDetector: no anomaly_maps
        offset_ = 0.0

    monkeypatch.setattr(_cli, "load_model", lambda path: (ImageLevelOnly(), []))
    result = invoke("score", model, test_images, "--maps", test_images / "m")
    assert_fails(result, 1, "ImageLevelOnly", "no anomaly maps")


# ------------------------------------------------------------------ info
def test_info_describes_the_model(model):
    det = joblib.load(model)
    result = invoke("info", model)
    assert result.exit_code == 0, result.output
    assert "detector: PadimDetector" in result.output
    assert f"threshold offset_: {det.offset_!r}" in result.output
    assert "training images: 8" in result.output
    assert "frame size: 32 x 32" in result.output
    assert f"saved by: skpadim {skpadim.__version__}" in result.output
    assert "n_features = 8" in result.output


def test_info_reports_a_version_mismatch(model, monkeypatch):
    monkeypatch.setattr(skpadim, "__version__", "99.0")
    result = invoke("info", model)
    assert result.exit_code == 0, result.output
    assert "Warning: Loading a PadimDetector saved by skpadim" in result.output
    assert "saved by: another skpadim version" in result.output


# ------------------------------------------------------------------ export
def test_export_without_the_exporter_says_what_to_install(model, monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "skpadim.export", None)  # import fails
    result = invoke("export", model, tmp_path / "m.onnx")
    assert_fails(result, 1, "ONNX export needs skpadim[onnx]")


def test_export_calls_to_onnx(model, monkeypatch, tmp_path):
    calls = []
    fake = types.ModuleType("skpadim.export")
    fake.to_onnx = lambda det, path: calls.append((det, path))
    monkeypatch.setitem(sys.modules, "skpadim.export", fake)
    result = invoke("export", model, tmp_path / "m.onnx")
    assert result.exit_code == 0, result.output
    ((det, path),) = calls
    assert isinstance(det, PadimDetector) and path == tmp_path / "m.onnx"


# ------------------------------------------------------------------ errors
def test_missing_train_dir(tmp_path):
    result = invoke("fit", tmp_path / "nope", "-o", tmp_path / "m.joblib")
    assert_fails(result, 2, "does not exist")


def test_no_images_found(tmp_path, model):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("x")
    result = invoke("fit", tmp_path / "empty", "-o", tmp_path / "m.joblib")
    assert_fails(result, 1, "No images found")
    result = invoke("score", model, tmp_path / "empty")
    assert_fails(result, 1, "No images found")


def test_unknown_parameter_lists_the_valid_ones(train_dir, tmp_path):
    result = invoke("fit", train_dir, "-o", tmp_path / "m.joblib", "--set", "nfeat=8")
    assert_fails(result, 2, "nfeat", "n_features", "contamination")


def test_set_without_equals_sign(train_dir, tmp_path):
    result = invoke(
        "fit", train_dir, "-o", tmp_path / "m.joblib", "--set", "n_features"
    )
    assert_fails(result, 2, "key=value")


@pytest.mark.parametrize(
    "setting, message",
    [
        # sklearn's parameter validation (an InvalidParameterError)
        ("n_features=-3", "'n_features' parameter of PadimDetector"),
        # the detector's own checks (plain ValueErrors)
        ("backbone=resnet_19", "Unknown backbone 'resnet_19'"),
        ("weights=/no/such/file.pth", "existing state-dict file"),
    ],
)
def test_invalid_value_shows_the_estimators_message(
    train_dir, tmp_path, setting, message
):
    args = [*SET_ARGS, "--set", setting]
    result = invoke("fit", train_dir, "-o", tmp_path / "m.joblib", *args)
    assert_fails(result, 1, message)
    assert not (tmp_path / "m.joblib").exists()


def test_missing_detector_class(train_dir, tmp_path, monkeypatch):
    # Public names are imported lazily: drop it from the export table too.
    monkeypatch.delitem(skpadim._EXPORTS, "CflowDetector")
    monkeypatch.delattr(skpadim, "CflowDetector", raising=False)
    result = invoke(
        "fit", train_dir, "-o", tmp_path / "m.joblib", "--detector", "cflow"
    )
    assert_fails(result, 1, "skpadim.CflowDetector", "not available")


def test_output_folder_must_exist(train_dir, tmp_path):
    result = invoke("fit", train_dir, "-o", tmp_path / "no" / "m.joblib")
    assert_fails(result, 1, "does not exist")


@pytest.mark.parametrize("command", ["score", "info", "export"])
def test_unreadable_model_file(tmp_path, train_dir, command):
    bad = tmp_path / "bad.joblib"
    bad.write_bytes(b"this is not a pickle")
    extra = {"score": [train_dir], "info": [], "export": [tmp_path / "m.onnx"]}
    result = invoke(command, bad, *extra[command])
    assert_fails(result, 1, "Could not load a model from")


def test_not_a_skpadim_model(tmp_path, train_dir):
    from sklearn.ensemble import IsolationForest

    path = tmp_path / "iforest.joblib"
    joblib.dump(IsolationForest().fit(np.zeros((4, 2))), path)
    result = invoke("score", path, train_dir)
    assert_fails(result, 1, "IsolationForest, not a skpadim detector")


def test_unreadable_image(model, tmp_path):
    (tmp_path / "broken.png").write_bytes(b"not a png")
    result = invoke("score", model, tmp_path / "broken.png")
    assert_fails(result, 1, "Could not read image file")


# ------------------------------------------------------------------ entry point
def test_version():
    result = invoke("--version")
    assert result.exit_code == 0
    assert result.output.strip() == f"skpadim, version {skpadim.__version__}"


def test_python_dash_m_help():
    proc = subprocess.run(
        [sys.executable, "-m", "skpadim", "--help"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    for command in ("fit", "score", "export", "info"):
        assert command in proc.stdout
