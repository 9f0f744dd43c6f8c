"""CUDA: the model a GPU fits is the one the CPU fits, and travels back to a CPU.

Skipped on machines without a CUDA GPU.

Tolerances
----------
On the GPU, cuDNN picks its own convolution algorithms (other summation
orders than the CPU's oneDNN kernels) and, by default on Ampere and later
GPUs, runs float32 convolutions in TF32, which keeps only 10 bits of
mantissa (a relative rounding of about 5e-4 per product). The CPU-vs-GPU
comparisons therefore turn TF32 off (:func:`exact_float32`), leaving the
float32 reordering differences (about 1e-6 relative in the embeddings).
The Mahalanobis whitening amplifies them, by up to ``1 / sqrt(epsilon)``
= 10 along directions the few training images do not span, so maps and
scores are compared at ``rtol=1e-3`` of their scale: loose enough for any
algorithm choice, tight enough to catch a wrong channel, position or
preprocessing step (those change scores by percent). With the default TF32
settings only the ranking is compared.
"""

import pickle
from contextlib import contextmanager

import numpy as np
import pytest
import torch

from skpadim import PadimDetector

from conftest import SMALL, smooth_texture

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA GPU"
)

RTOL = 1e-3


@contextmanager
def exact_float32():
    """Run float32 cuDNN convolutions and cuBLAS matmuls without TF32."""
    saved = (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32)
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def assert_scaled_close(got, expected, rtol=RTOL):
    """Equal to ``rtol`` of the largest magnitude of ``expected``."""
    expected = np.asarray(expected)
    scale = float(np.nanmax(np.abs(expected)))
    np.testing.assert_allclose(got, expected, rtol=rtol, atol=rtol * scale)


@pytest.fixture(scope="module")
def train():
    return smooth_texture(np.random.default_rng(0), 12)


@pytest.fixture(scope="module")
def test_images():
    """Plain images and images with bright squares: a wide range of scores."""
    images = smooth_texture(np.random.default_rng(1), 8)
    for image, size in zip(images[4:], [6, 10, 14, 18]):
        image[8 : 8 + size, 20 : 20 + size] = 255
    return images


@pytest.fixture(scope="module")
def cpu_model(train):
    return PadimDetector(**{**SMALL, "device": "cpu"}).fit(train)


@pytest.fixture(scope="module")
def cuda_model(train):
    with exact_float32():
        return PadimDetector(**{**SMALL, "device": "cuda"}).fit(train)


def test_cuda_fit_runs_on_the_gpu(cuda_model):
    assert cuda_model.feature_extractor_.device_.type == "cuda"
    assert cuda_model.gaussian_.moments_.scatter.device.type == "cuda"


def test_cuda_and_cpu_fits_agree(cuda_model, cpu_model, test_images):
    # Same seed: same random-init weights and the same kept channels.
    np.testing.assert_array_equal(
        cuda_model.feature_extractor_.channel_indices_,
        cpu_model.feature_extractor_.channel_indices_,
    )
    assert_scaled_close(cuda_model.gaussian_.location_, cpu_model.gaussian_.location_)
    with exact_float32():
        cuda_maps = cuda_model.anomaly_maps(test_images)
        cuda_scores = cuda_model.score_samples(test_images)
    assert_scaled_close(cuda_maps, cpu_model.anomaly_maps(test_images))
    assert_scaled_close(cuda_scores, cpu_model.score_samples(test_images))
    # The training scores are leave-one-out: dividing by one minus each
    # image's leverage (down to about 0.05 with 12 images and 16 features)
    # amplifies differences up to 20 times.
    assert_scaled_close(
        cuda_model.train_scores_, cpu_model.train_scores_, rtol=20 * RTOL
    )


def test_cuda_with_default_tf32_ranks_like_the_cpu(cpu_model, train, test_images):
    det = PadimDetector(**{**SMALL, "device": "cuda"}).fit(train)
    scores = det.score_samples(test_images)
    assert np.corrcoef(scores, cpu_model.score_samples(test_images))[0, 1] > 0.999


def test_cuda_fitted_model_predicts_the_same_on_the_cpu(cuda_model, test_images):
    with exact_float32():
        expected = cuda_model.score_samples(test_images)
        expected_maps = cuda_model.anomaly_maps(test_images)
        expected_labels = cuda_model.predict(test_images)
    loaded = pickle.loads(pickle.dumps(cuda_model))
    # A run-time parameter: the detector passes it on to its fitted extractor.
    loaded.set_params(device="cpu")
    scores = loaded.score_samples(test_images)
    assert loaded.feature_extractor_.device_.type == "cpu"
    assert_scaled_close(scores, expected)
    assert_scaled_close(loaded.anomaly_maps(test_images), expected_maps)
    # The same labels, except for images within rounding of the threshold.
    assert loaded.offset_ == cuda_model.offset_
    clear = np.abs(expected - cuda_model.offset_) > 10 * RTOL * np.abs(expected).max()
    np.testing.assert_array_equal(
        loaded.predict(test_images)[clear], expected_labels[clear]
    )


def test_float16_on_cuda_runs_in_half_precision(cuda_model, train, test_images):
    det = PadimDetector(**{**SMALL, "device": "cuda", "precision": "float16"})
    det.fit(train)
    network = det.feature_extractor_._get_runtime().network
    seen = []
    hook = network.register_forward_hook(
        lambda module, inputs, outputs: seen.extend(t.dtype for t in outputs)
    )
    try:
        scores = det.score_samples(test_images)
    finally:
        hook.remove()
    assert seen and set(seen) == {torch.float16}
    assert np.all(np.isfinite(scores))
    assert np.all(np.isfinite(det.gaussian_.whitening_))
    with exact_float32():
        full = cuda_model.score_samples(test_images)
    assert np.corrcoef(scores, full)[0, 1] > 0.99


@pytest.mark.parametrize(
    ("cls", "extra"),
    [
        ("PatchCoreDetector", {"coreset_size": 0.5}),
        ("SpadeDetector", {"n_neighbors": 3}),
        ("GaussianADDetector", {}),
    ],
)
def test_family_fitted_on_cuda_scores_the_same_on_the_cpu(
    cls, extra, train, test_images
):
    import skpadim

    params = {**SMALL, **extra}
    cpu = getattr(skpadim, cls)(**{**params, "device": "cpu"}).fit(train)
    with exact_float32():
        gpu = getattr(skpadim, cls)(**{**params, "device": "cuda"}).fit(train)
        expected = gpu.score_samples(test_images)
    assert gpu.feature_extractor_.device_.type == "cuda"
    assert_scaled_close(expected, cpu.score_samples(test_images), rtol=10 * RTOL)
    loaded = pickle.loads(pickle.dumps(gpu)).set_params(device="cpu")
    assert_scaled_close(loaded.score_samples(test_images), expected, rtol=10 * RTOL)
