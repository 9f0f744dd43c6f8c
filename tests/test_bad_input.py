"""Bad input: a clear error naming the expected and the given, raised before any
network is built, and a fitted detector left exactly as it was."""

import pickle

import numpy as np
import pytest
import torch
from sklearn.exceptions import NotFittedError

import skpadim._features
from skpadim import (
    CflowDetector,
    GaussianADDetector,
    PadimDetector,
    PatchCoreDetector,
    SpadeDetector,
)

# Every detector of the family, with what makes it small here.
DETECTORS = {
    PadimDetector: {"n_features": 16},
    PatchCoreDetector: {"n_features": 16},
    SpadeDetector: {"n_features": 16, "n_neighbors": 2},
    GaussianADDetector: {"n_features": 16},
    CflowDetector: {"n_features": 16, "max_iter": 1, "condition_dim": 8},
}

rng = np.random.default_rng(0)
GOOD = rng.integers(90, 170, size=(4, 64, 64, 3), dtype=np.uint8)


def _nan_image():
    x = GOOD[:1] / 255.0
    x[0, 3, 3, 0] = np.nan
    return x


def _wrong_architecture_file(tmp_path):
    path = tmp_path / "other.pt"
    torch.save({"conv.weight": torch.zeros(3, 3, 3, 3)}, path)
    return path


def _unreadable_file(tmp_path):
    path = tmp_path / "broken.png"
    path.write_text("not an image")
    return [path, path, path]


# (id, method, X factory, params, exception, message fragment, checked before
# the network is built?)
CASES = [
    (
        "2d-array",
        "fit",
        lambda t: GOOD[:, :, 0, 0],
        {},
        ValueError,
        "shape (n, H, W)",
        True,
    ),
    ("5d-array", "fit", lambda t: GOOD[None], {}, ValueError, "got 5-d", True),
    (
        "4-channels",
        "fit",
        lambda t: np.zeros((3, 8, 8, 4), np.uint8),
        {},
        ValueError,
        "C in {1, 3}",
        True,
    ),
    ("empty-list", "fit", lambda t: [], {}, ValueError, "empty list", True),
    (
        "nan",
        "fit",
        lambda t: np.concatenate([_nan_image(), GOOD[1:] / 255.0]),
        {},
        ValueError,
        "NaN",
        True,
    ),
    (
        "inf-in-list",
        "fit",
        lambda t: [GOOD[0] / 255.0, np.full((8, 8), np.inf)],
        {},
        ValueError,
        "NaN or infinity",
        True,
    ),
    (
        "float-0-255",
        "fit",
        lambda t: GOOD.astype(float),
        {},
        ValueError,
        "Divide by 255",
        True,
    ),
    ("int64", "fit", lambda t: GOOD.astype(np.int64), {}, TypeError, "uint8", True),
    (
        "mixed-list",
        "fit",
        lambda t: [GOOD[0], "a.png"],
        {},
        TypeError,
        "only numpy arrays",
        True,
    ),
    (
        "missing-path",
        "fit",
        lambda t: [t / "nope.png", t / "nope2.png"],
        {},
        ValueError,
        "do not exist",
        True,
    ),
    (
        "unreadable-path",
        "fit",
        _unreadable_file,
        {},
        ValueError,
        "Could not read image file",
        False,
    ),
    (
        "single-path",
        "fit",
        lambda t: "image.png",
        {},
        TypeError,
        "Wrap it in a list",
        True,
    ),
    ("dict", "fit", lambda t: {"a": GOOD}, {}, TypeError, "got dict", True),
    ("one-image", "fit", lambda t: GOOD[:1], {}, ValueError, "Expected at least", True),
    (
        "n_features-too-large",
        "fit",
        lambda t: GOOD,
        {"n_features": 2000},
        ValueError,
        "n_features must be between 1 and",
        True,
    ),
    (
        "n_features-zero",
        "fit",
        lambda t: GOOD,
        {"n_features": 0},
        ValueError,
        "n_features",
        True,
    ),
    (
        "unknown-backbone",
        "fit",
        lambda t: GOOD,
        {"backbone": "vgg99"},
        ValueError,
        "Unknown backbone 'vgg99'",
        True,
    ),
    (
        "bad-device",
        "fit",
        lambda t: GOOD,
        {"device": "gpu0"},
        ValueError,
        "device must be",
        True,
    ),
    (
        "unknown-layer",
        "fit",
        lambda t: GOOD,
        {"layers": ("layer9",)},
        ValueError,
        "layers must be",
        True,
    ),
    (
        "crop-too-large",
        "fit",
        lambda t: GOOD,
        {"crop_size": 80},
        ValueError,
        "crop_size",
        True,
    ),
    (
        "bad-image-size",
        "fit",
        lambda t: GOOD,
        {"image_size": (1, 2, 3)},
        ValueError,
        "image_size",
        True,
    ),
    (
        "contamination",
        "fit",
        lambda t: GOOD,
        {"contamination": 0.7},
        ValueError,
        "contamination",
        True,
    ),
    (
        "negative-sigma",
        "fit",
        lambda t: GOOD,
        {"sigma": -1.0},
        ValueError,
        "sigma",
        True,
    ),
    (
        "missing-weights-file",
        "fit",
        lambda t: GOOD,
        {"weights": "/no/such/file.pth"},
        ValueError,
        "existing state-dict file",
        True,
    ),
    (
        "wrong-architecture",
        "fit",
        lambda t: GOOD,
        {"weights": "WRONG_ARCH"},
        ValueError,
        "do not fit the network",
        False,
    ),
    (
        "predict-4-channels",
        "predict",
        lambda t: np.zeros((2, 64, 64, 4), np.uint8),
        {},
        ValueError,
        "C in {1, 3}",
        True,
    ),
    (
        "maps-resolution",
        "anomaly_maps",
        lambda t: GOOD,
        {"resolution": "full"},
        ValueError,
        "'input' or 'model'",
        True,
    ),
]
if not torch.cuda.is_available():
    CASES.append(
        (
            "cuda-unavailable",
            "fit",
            lambda t: GOOD,
            {"device": "cuda"},
            ValueError,
            "CUDA is not available",
            True,
        )
    )


@pytest.fixture(scope="module", params=list(DETECTORS), ids=lambda c: c.__name__)
def detector(request):
    cls = request.param
    return cls(
        backbone="resnet18",
        weights=None,
        image_size=64,
        random_state=0,
        device="cpu",
        **DETECTORS[cls],
    ).fit(GOOD)


def snapshot(det):
    # The whole fitted state, as it would be saved; plus the parameters.
    return {"state": pickle.dumps(det), "params": det.get_params()}


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input_raises_clearly_and_leaves_the_model_intact(
    case, detector, tmp_path, monkeypatch
):
    _, method, make_X, params, error, message, before_network = case
    if not hasattr(detector, method) or not set(params) <= {
        *detector.get_params(),
        "resolution",
    }:
        pytest.skip(f"{type(detector).__name__} has no {method} or parameters {params}")
    X = make_X(tmp_path)
    params = dict(params)
    if params.get("weights") == "WRONG_ARCH":
        params["weights"] = _wrong_architecture_file(tmp_path)
    call_kwargs = (
        {"resolution": params.pop("resolution")} if "resolution" in params else {}
    )
    before = snapshot(detector)
    scores_before = detector.score_samples(GOOD)
    if before_network:

        def no_network(*args, **kwargs):
            raise AssertionError("a network was built before the input was checked")

        monkeypatch.setattr(skpadim._features, "build_feature_network", no_network)
    try:
        # A parameter out of its constraints is refused by set_params already;
        # anything else by the call.
        with pytest.raises(error, match=_escape(message)):
            detector.set_params(**params)
            getattr(detector, method)(X, **call_kwargs)
    finally:
        detector.set_params(**before["params"])
        monkeypatch.undo()
    after = snapshot(detector)
    assert after["params"] == before["params"]
    assert after["state"] == before["state"]
    np.testing.assert_array_equal(detector.score_samples(GOOD), scores_before)


def _escape(message):
    import re

    return re.escape(message)


@pytest.mark.parametrize(
    "method", ["predict", "score_samples", "decision_function", "anomaly_maps"]
)
def test_methods_before_fit_raise_not_fitted(method):
    with pytest.raises(NotFittedError, match="not fitted"):
        getattr(PadimDetector(), method)(GOOD)


def test_error_messages_name_the_given_value():
    with pytest.raises(ValueError, match="got 449"):
        PadimDetector(backbone="resnet18", weights=None, n_features=449).fit(GOOD)
    with pytest.raises(TypeError, match=r"got a list of \['ndarray', 'str'\]"):
        PadimDetector().fit([GOOD[0], "a.png"])
