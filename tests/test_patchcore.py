"""PatchCoreDetector against slow, obvious numpy/scipy references on tiny inputs.

The references are built from the raw backbone taps (the network rebuilt from
the fitted weights, no fused BatchNorm, no channels-last): a 3x3 mean with the
zero padding counted (scipy's uniform_filter), bilinear upsampling of layer3,
scipy's cdist for every distance, and the image score re-weighting of the
paper's eq. 7 as anomalib implements it, written out in numpy.
"""

import copy
import itertools
import math

import numpy as np
import pytest
import sklearn
import torch
import torch.nn.functional as F
from scipy.ndimage import uniform_filter
from scipy.spatial.distance import cdist
from scipy.special import softmax
from test_detector import paste_patches
from threadpoolctl import threadpool_limits

import skpadim._memory_bank as memory_bank
import skpadim._patchcore as patchcore
from skpadim import PatchCoreDetector, PatchMemoryBank
from skpadim.backbones import build_feature_network

from conftest import smooth_texture

SIZE = 48  # layer2 grid 6x6, layer3 grid 3x3: 36 patches of 384 dims per image
GRID = 36
BASE = dict(
    backbone="resnet18",
    weights=None,
    image_size=SIZE,
    random_state=0,
    batch_size=8,
    device="cpu",
    sigma=0.0,
)
MEAN = np.array([0.485, 0.456, 0.406])
STD = np.array([0.229, 0.224, 0.225])


# ------------------------------------------------------------- references
def reference_features(det, X):
    """Locally aware patch features (n, 384, 6, 6), float64, from raw taps."""
    state = {
        k: torch.from_numpy(np.array(v))
        for k, v in det.feature_extractor_.backbone_state_.items()
    }
    network = build_feature_network("resnet18", ("layer2", "layer3"), weights=state)
    x = ((X / 255.0 - MEAN) / STD).transpose(0, 3, 1, 2).astype(np.float32)
    with torch.no_grad():
        layer2, layer3 = (t.double().numpy() for t in network.eval()(torch.tensor(x)))
    # 3x3 mean, stride 1, zero padding counted (mode="constant", cval=0).
    layer2 = uniform_filter(layer2, size=(1, 1, 3, 3), mode="constant")
    layer3 = uniform_filter(layer3, size=(1, 1, 3, 3), mode="constant")
    layer3 = F.interpolate(
        torch.from_numpy(layer3),
        size=layer2.shape[-2:],
        mode="bilinear",
        align_corners=False,
    ).numpy()
    return np.concatenate([layer2, layer3], axis=1)


def as_patches(features):
    """(n, d, h, w) -> (n, h*w, d), row-major positions."""
    n, d = features.shape[:2]
    return features.reshape(n, d, -1).transpose(0, 2, 1)


def reference_scores(test, bank, n_neighbors, test_ids=None, bank_ids=None):
    """Patch scores (n, P) and eq. 7 image scores (n,) of test patches (n, P, d).

    With ids, bank entries of a test image's own id are never used (neither
    as its patches' neighbours nor as support of the re-weighting).
    """
    patch_scores, image_scores = [], []
    for i, patches in enumerate(test):
        eligible = np.ones(len(bank), bool)
        if test_ids is not None:
            eligible = bank_ids != test_ids[i]
        distances = cdist(patches, bank)
        distances[:, ~eligible] = np.inf
        scores = distances.min(axis=1)
        patch_scores.append(scores)
        best = scores.argmax()  # the test patch with the largest score: s*
        if n_neighbors == 1:
            image_scores.append(scores[best])
            continue
        anchor = distances[best].argmin()  # its nearest bank entry m*
        to_anchor = cdist(bank[anchor : anchor + 1], bank)[0]
        to_anchor[~eligible] = np.inf
        b = min(n_neighbors, int(eligible.sum()))
        support = np.argsort(to_anchor, kind="stable")[:b]  # N_b(m*), m* first
        weights = softmax(np.linalg.norm(patches[best] - bank[support], axis=1))
        image_scores.append((1 - weights[0]) * scores[best])
    return np.array(patch_scores), np.array(image_scores)


def covering(points, chosen):
    return cdist(points, points[list(chosen)]).min(axis=1).max()


def bilinear(scores, size):
    """(n, h, w) -> (n, size, size), bilinear with half-pixel centres."""
    up = F.interpolate(
        torch.from_numpy(scores)[:, None], size=(size, size), mode="bilinear"
    )
    return up[:, 0].numpy()


# --------------------------------------------------------------- fixtures
@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    # Tiny tensors: on a shared, loaded machine, extra OpenMP/BLAS threads
    # only spin (a module runs several times faster on one thread).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with threadpool_limits(1):
            yield
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(0)
    train = smooth_texture(rng, 8, size=SIZE)
    normal = smooth_texture(rng, 3, size=SIZE)
    defective, _ = paste_patches(rng, smooth_texture(rng, 3, size=SIZE), size=12)
    return train, np.concatenate([normal, defective])


@pytest.fixture(scope="module")
def full(data):
    """Every training patch in the bank; re-weighting over 3 neighbours."""
    return PatchCoreDetector(**BASE, coreset_size=1.0, n_neighbors=3).fit(data[0])


@pytest.fixture(scope="module")
def reference(full, data):
    train, test = data
    return as_patches(reference_features(full, train)), as_patches(
        reference_features(full, test)
    )


def scale_of(x):
    return np.abs(x).max()


# ------------------------------------------------------------------ tests
def test_locally_aware_features_match_raw_taps(full, data):
    train, test = data
    for X in (train, test):
        expected = reference_features(full, X)
        got = full.feature_extractor_.transform(X)
        assert got.shape == expected.shape == (len(X), 384, 6, 6)
        np.testing.assert_allclose(got, expected, atol=1e-5 * scale_of(expected))


def test_full_coreset_keeps_every_training_patch(full, reference):
    bank = full.memory_bank_
    train_patches = reference[0].reshape(-1, 384)
    assert bank.bank_.shape == (8 * GRID, 384)
    assert bank.n_patches_seen_ == 8 * GRID
    np.testing.assert_allclose(
        bank.bank_, train_patches, atol=1e-5 * scale_of(train_patches)
    )
    np.testing.assert_array_equal(bank.bank_sources_, np.repeat(np.arange(8), GRID))


def test_patch_scores_are_the_distance_to_the_nearest_bank_entry(full, data, reference):
    train, test = reference
    expected, _ = reference_scores(test, train.reshape(-1, 384), 1)
    expected = expected.reshape(-1, 6, 6)
    # The head itself, on the extractor's features ...
    features = torch.from_numpy(full.feature_extractor_.transform(data[1]))
    patch, _ = full.memory_bank_.score_batch(features)
    np.testing.assert_allclose(patch.numpy(), expected, rtol=1e-4)
    # ... and the maps (sigma=0): the patch scores upsampled bilinearly.
    maps = full.anomaly_maps(data[1], resolution="model")
    np.testing.assert_allclose(maps, bilinear(expected, SIZE), rtol=1e-4)
    np.testing.assert_allclose(full.anomaly_maps(data[1]), maps)


def test_image_score_is_the_reweighted_largest_patch_score(full, data, reference):
    train, test = reference
    bank = train.reshape(-1, 384)
    _, expected = reference_scores(test, bank, 3)
    got = -full.score_samples(data[1])
    np.testing.assert_allclose(got, expected, rtol=1e-4)
    # Re-weighting multiplies by 1 - softmax weight, which lies in (0, 1).
    plain, _ = reference_scores(test, bank, 1)
    assert np.all(got < plain.max(axis=1))


def test_one_neighbour_gives_the_plain_max(full, data, reference):
    assert full.memory_bank_.n_neighbors == 3  # the detector's parameter
    head = copy.copy(full.memory_bank_)
    head.n_neighbors = 1
    train, test = reference
    patch, image = reference_scores(test, train.reshape(-1, 384), 1)
    np.testing.assert_allclose(image, patch.max(axis=1))
    ext = full.feature_extractor_
    _, got = head.score_batch(torch.from_numpy(ext.transform(data[1])))
    np.testing.assert_allclose(got.numpy(), image, rtol=1e-4)
    ids = np.arange(8)
    _, honest = reference_scores(
        train, train.reshape(-1, 384), 1, ids, np.repeat(ids, GRID)
    )
    features = torch.from_numpy(ext.transform(data[0]))
    _, got = head.score_batch(features, sample_ids=torch.arange(8))
    np.testing.assert_allclose(got.numpy(), honest, rtol=1e-4)


def test_training_scores_exclude_the_own_image(full, data, reference):
    train = reference[0]
    ids = np.arange(8)
    sources = np.repeat(ids, GRID)
    patch, image = reference_scores(train, train.reshape(-1, 384), 3, ids, sources)
    np.testing.assert_allclose(-full.train_scores_, image, rtol=1e-4)
    # The 1% quantile of the honest scores (less a rounding margin).
    assert full.offset_ == pytest.approx(np.percentile(-image, 1), rel=1e-3)
    # The honest patch scores, through the head with sample ids.
    features = torch.from_numpy(full.feature_extractor_.transform(data[0]))
    got, _ = full.memory_bank_.score_batch(features, sample_ids=torch.arange(8))
    np.testing.assert_allclose(got.numpy().reshape(8, -1), patch, rtol=1e-4)
    assert np.all(patch > 0)  # in-sample, every patch would score 0


@pytest.mark.parametrize(
    ("coreset_size", "expected"),
    [(0.1, math.ceil(0.1 * 8 * GRID)), (40, 40)],
)
def test_bank_size_and_entries_are_training_patches(
    coreset_size, expected, data, reference, monkeypatch
):
    calls = []
    select = memory_bank.k_center_greedy

    def spy(x, n, **kwargs):
        calls.append((len(x), n))
        return select(x, n, **kwargs)

    monkeypatch.setattr(memory_bank, "k_center_greedy", spy)
    det = PatchCoreDetector(**BASE, coreset_size=coreset_size).fit(data[0])
    bank = det.memory_bank_
    assert bank.bank_.shape == (expected, 384)
    assert calls == [(8 * GRID, expected)]  # greedy k-center over every patch
    train = reference[0].reshape(-1, 384)
    distances = cdist(bank.bank_, train)
    assert distances.min(axis=1).max() < 1e-5 * scale_of(train)
    np.testing.assert_array_equal(distances.argmin(axis=1) // GRID, bank.bank_sources_)
    assert len(np.unique(distances.argmin(axis=1))) == expected  # distinct


@pytest.mark.parametrize("n_samples", [2, 3])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_coreset_radius_within_twice_the_optimum(n_samples, seed, reference):
    rng = np.random.default_rng(seed)
    patches = reference[0].reshape(-1, 384)
    points = patches[rng.choice(len(patches), 30, replace=False)]
    bank = PatchMemoryBank(
        coreset_size=n_samples, projection_dim=None, random_state=seed
    ).fit(points.astype(np.float32))
    chosen = cdist(bank.bank_, points).argmin(axis=1)
    assert len(set(chosen)) == n_samples
    best = min(
        covering(points, c) for c in itertools.combinations(range(30), n_samples)
    )
    assert covering(points, chosen) <= 2 * best * (1 + 1e-6)


def test_bounded_memory_fit_reduces_buffers(data, monkeypatch):
    # Buffers of about 0.1 MiB: every batch of 2 images (2 x 36 patches of
    # 384 float32) overflows one, so each is reduced to its own coreset.
    reductions = []
    reduce = patchcore._reduce

    def spy(buffer, coreset_size, seed):
        reductions.append(sum(len(p) for p, _ in buffer))
        return reduce(buffer, coreset_size, seed)

    monkeypatch.setattr(patchcore, "_reduce", spy)
    train, test = data
    params = {**BASE, "batch_size": 2, "coreset_size": 0.25}
    with sklearn.config_context(working_memory=0.1):
        det = PatchCoreDetector(**params).fit(train)
    assert len(reductions) >= 3 and sum(reductions) == 8 * GRID
    bank = det.memory_bank_
    assert bank.bank_.shape == (72, 384)  # ceil(0.25 * 288), exactly
    assert bank.n_patches_seen_ == 8 * GRID
    ext = det.feature_extractor_
    train_patches = as_patches(ext.transform(train)).reshape(-1, 384)
    distances = cdist(bank.bank_, train_patches)
    assert distances.min(axis=1).max() < 1e-5 * scale_of(train_patches)
    np.testing.assert_array_equal(distances.argmin(axis=1) // GRID, bank.bank_sources_)
    # Still a detector: the pasted defects score above the normal images.
    scores = det.score_samples(test)
    assert scores[3:].max() < scores[:3].min()
    assert np.isfinite(det.offset_) and det.train_scores_.shape == (8,)


@pytest.mark.slow  # 10-25 s on a shared 2-core machine: 2 loky workers import torch
def test_parallel_fit_is_bit_identical_when_the_buffer_holds_everything(data):
    params = {**BASE, "batch_size": 4, "coreset_size": 0.1}
    serial = PatchCoreDetector(**params).fit(data[0])
    parallel = PatchCoreDetector(**params, n_jobs=2).fit(data[0])
    a, b = serial.memory_bank_, parallel.memory_bank_
    np.testing.assert_array_equal(a.bank_, b.bank_)
    np.testing.assert_array_equal(a.bank_sources_, b.bank_sources_)
    np.testing.assert_array_equal(serial.train_scores_, parallel.train_scores_)
    assert serial.offset_ == parallel.offset_


def test_support_is_capped_by_the_bank(data):
    # 20 bank entries, 1000 asked: the support is the whole bank, or for a
    # training image, every entry of the other images (per image).
    train, test = data
    det = PatchCoreDetector(**BASE, coreset_size=20, n_neighbors=1000).fit(train)
    bank = det.memory_bank_
    ext = det.feature_extractor_
    assert len(np.unique(bank.bank_sources_)) > 2
    counts = np.bincount(bank.bank_sources_, minlength=8)
    assert len(set(counts)) > 1  # the cap differs between training images
    test_patches = as_patches(ext.transform(test)).astype(np.float64)
    _, expected = reference_scores(test_patches, bank.bank_.astype(np.float64), 1000)
    np.testing.assert_allclose(-det.score_samples(test), expected, rtol=1e-4)
    train_patches = as_patches(ext.transform(train)).astype(np.float64)
    ids = np.arange(8)
    _, honest = reference_scores(
        train_patches, bank.bank_.astype(np.float64), 1000, ids, bank.bank_sources_
    )
    np.testing.assert_allclose(-det.train_scores_, honest, rtol=1e-4)


def test_one_test_image_and_batch_size_do_not_change_scores(full, data):
    test = data[1]
    together = full.score_samples(test)
    maps = full.anomaly_maps(test, resolution="model")
    alone = [full.score_samples(test[i : i + 1])[0] for i in range(6)]
    np.testing.assert_allclose(alone, together, rtol=1e-5)
    one_map = full.anomaly_maps(test[4:5], resolution="model")
    assert one_map.shape == (1, SIZE, SIZE)
    np.testing.assert_allclose(one_map[0], maps[4], rtol=1e-5, atol=1e-6)
    # The training images' honest scores, head batches of 1 and of 8.
    features = torch.from_numpy(full.feature_extractor_.transform(data[0]))
    ids = torch.arange(8)
    _, batched = full.memory_bank_.score_batch(features, sample_ids=ids)
    ones = [
        full.memory_bank_.score_batch(features[i : i + 1], sample_ids=ids[i : i + 1])
        for i in range(8)
    ]
    np.testing.assert_allclose(
        np.concatenate([image.numpy() for _, image in ones]), batched, rtol=1e-5
    )


def test_a_bank_from_a_single_image_is_refused_clearly(data):
    # One bank entry: its own image could only be scored against itself.
    with pytest.raises(ValueError, match="coreset_size"):
        PatchCoreDetector(**BASE, coreset_size=1).fit(data[0])
