"""Parallel and distributed fitting, reduced precision, memory guard, prefetching.

Fitting is a map-reduce: every job turns its chunk of images into partial
``PatchMoments`` and the parent merges them. These tests check the reduce
step on its own (any split, any merge order), then that ``n_jobs`` (local
processes) and a Dask cluster give the model a single process gives, in the
input order, and finally the safety nets around a fit: the precision
parameter, the memory guard and the prefetching image reader.
"""

import os

import joblib
import numpy as np
import pytest
import torch
from PIL import Image

from skpadim import PadimDetector, PatchMoments, _features, _resources
from skpadim._images import check_images
from skpadim._parallel import tree_reduce

from conftest import SMALL, smooth_texture

# ----------------------------------------------------------------- helpers


def assert_moments_close(got, expected, rtol=1e-6):
    """Equal counts; mean and scatter equal to ``rtol`` of their largest entry.

    The tolerance is relative to each array's scale rather than entrywise:
    near-zero covariances carry no relative precision worth checking.
    """
    assert got.count == expected.count
    for name in ("mean", "scatter"):
        a, b = getattr(got, name), getattr(expected, name)
        scale = float(b.abs().max())
        torch.testing.assert_close(a, b, rtol=rtol, atol=rtol * scale)


def assert_scaled_close(got, expected, rtol):
    """Arrays equal to ``rtol`` of the largest magnitude of ``expected``."""
    expected = np.asarray(expected)
    scale = float(np.nanmax(np.abs(expected)))
    np.testing.assert_allclose(got, expected, rtol=rtol, atol=rtol * scale)


def write_pngs(folder, images, prefix="image"):
    """Save uint8 images as (lossless) PNG files; return their paths as str."""
    paths = []
    for i, image in enumerate(images):
        path = os.path.join(folder, f"{prefix}_{i:03d}.png")
        Image.fromarray(image).save(path)
        paths.append(path)
    return paths


def with_bright_squares(images, sizes, value=255):
    """Copies of ``images`` with a square of growing ``sizes`` painted on each."""
    out = images.copy()
    for image, size in zip(out, sizes):
        image[8 : 8 + size, 20 : 20 + size] = value
    return out


def refuse_network(*args, **kwargs):
    raise AssertionError("the backbone must not be built")


# ----------------------------------------------------------- mergeable parts

N_POSITIONS, N_SAMPLES, N_DIMS = 7, 41, 5


@pytest.fixture(scope="module")
def samples():
    """(positions, samples, features) with a large common offset.

    The offset makes a naive sum-of-squares merge lose most of its digits, so
    an inexact merge formula would show.
    """
    rng = np.random.default_rng(0)
    x = rng.normal(size=(N_POSITIONS, N_SAMPLES, N_DIMS))
    x = 1e3 + x * rng.uniform(0.1, 10.0, size=N_DIMS)
    return torch.from_numpy(x)


def random_parts(x, rng):
    """Moments of a random partition of the samples of ``x``.

    The partition is not contiguous, includes two single-sample parts and may
    include empty ones; half of the parts are streamed through ``update`` in
    random mini-batches, the others made in one ``from_batch``.
    """
    n = x.shape[1]
    n_parts = int(rng.integers(2, 9))
    labels = rng.integers(0, n_parts, size=n)
    labels[rng.choice(n, size=2, replace=False)] = [n_parts, n_parts + 1]
    parts = []
    for label in range(n_parts + 2):
        members = x[:, np.flatnonzero(labels == label)]
        if members.shape[1] == 0:
            parts.append(PatchMoments.empty(x.shape[0], x.shape[2]))
        elif rng.random() < 0.5:
            parts.append(PatchMoments.from_batch(members))
        else:
            part = PatchMoments.empty(x.shape[0], x.shape[2])
            cuts = np.sort(rng.choice(np.arange(1, members.shape[1] + 1), size=2))
            for chunk in np.split(np.arange(members.shape[1]), cuts):
                if len(chunk):
                    part.update(members[:, chunk])
            parts.append(part)
    return parts


def merge_in_random_order(parts, rng):
    """Merge two randomly chosen parts at a time until one is left."""
    parts = list(parts)
    while len(parts) > 1:
        i, j = rng.choice(len(parts), size=2, replace=False)
        merged = parts[i].merge(parts[j])
        parts = [p for k, p in enumerate(parts) if k not in (i, j)] + [merged]
    return parts[0]


@pytest.mark.parametrize("seed", range(8))
def test_moments_of_any_split_merge_to_the_whole(samples, seed):
    rng = np.random.default_rng(seed)
    whole = PatchMoments.from_batch(samples)
    parts = random_parts(samples, rng)
    before = [part.copy() for part in parts]

    shuffled = [parts[i] for i in rng.permutation(len(parts))]
    assert_moments_close(tree_reduce(shuffled, PatchMoments.merge), whole)
    assert_moments_close(merge_in_random_order(parts, rng), whole)
    folded = parts[-1]
    for part in parts[-2::-1]:
        folded = part.merge(folded)
    assert_moments_close(folded, whole)

    # merge returns new objects: the parts (which a parent process may still
    # hold, e.g. in the list of job results) are left as they were.
    for part, copy in zip(parts, before):
        assert_moments_close(part, copy, rtol=0)


def test_streaming_updates_equal_one_batch(samples):
    whole = PatchMoments.from_batch(samples)
    streamed = PatchMoments.empty(N_POSITIONS, N_DIMS)
    for i in range(N_SAMPLES):  # one sample at a time: the hardest case
        streamed.update(samples[:, i : i + 1])
    assert_moments_close(streamed, whole)


def test_copy_and_to_are_independent_of_the_original(samples):
    first = PatchMoments.from_batch(samples[:, :10])
    snapshot = first.copy()
    copied = first.copy().update(samples[:, 10:])
    assert_moments_close(first, snapshot, rtol=0)
    assert copied.count == N_SAMPLES
    moved = first.to("cpu")
    assert moved.mean.device.type == "cpu"
    assert_moments_close(moved, first, rtol=0)


def test_merge_with_empty_and_mismatched_moments(samples):
    part = PatchMoments.from_batch(samples)
    empty = PatchMoments.empty(N_POSITIONS, N_DIMS)
    assert_moments_close(empty.merge(part), part, rtol=0)
    assert_moments_close(part.merge(empty), part, rtol=0)
    assert empty.merge(empty.copy()).count == 0
    with pytest.raises(ValueError, match="different shapes"):
        part.merge(PatchMoments.empty(N_POSITIONS, N_DIMS + 1))


# ---------------------------------------------------- local parallel jobs


@pytest.fixture(scope="module")
def train():
    return smooth_texture(np.random.default_rng(0), 12)


@pytest.fixture(scope="module")
def test_images():
    """Seven images whose scores clearly differ: three plain, four with a
    bright square of a different size each. Seven, so that two jobs get
    chunks of unequal length (4 and 3)."""
    plain = smooth_texture(np.random.default_rng(1), 7)
    return np.concatenate([plain[:3], with_bright_squares(plain[3:], [6, 10, 14, 18])])


@pytest.fixture(scope="module")
def png_paths(tmp_path_factory, train, test_images):
    folder = tmp_path_factory.mktemp("pngs")
    return (
        write_pngs(folder, train, prefix="train"),
        write_pngs(folder, test_images, prefix="test"),
    )


@pytest.fixture(scope="module")
def serial(train):
    return PadimDetector(**SMALL, n_jobs=1).fit(train)


@pytest.fixture(scope="module")
def parallel(train):
    return PadimDetector(**SMALL, n_jobs=2).fit(train)


def assert_same_model(got, expected):
    """Statistics to 1e-6 of their scale; derived float32 state and scores to 1e-5."""
    assert got.n_samples_seen_ == expected.n_samples_seen_
    assert got.frame_shape_ == expected.frame_shape_
    assert got.gaussian_.feature_shape_ == expected.gaussian_.feature_shape_
    np.testing.assert_array_equal(
        got.feature_extractor_.channel_indices_,
        expected.feature_extractor_.channel_indices_,
    )
    assert_moments_close(got.gaussian_.moments_, expected.gaussian_.moments_)
    assert_scaled_close(got.gaussian_.location_, expected.gaussian_.location_, 1e-6)
    # The whitening factors are float32 and come out of a Cholesky
    # factorisation, which amplifies rounding differences a little.
    assert_scaled_close(got.gaussian_.whitening_, expected.gaussian_.whitening_, 1e-5)
    np.testing.assert_allclose(got.train_scores_, expected.train_scores_, rtol=1e-5)
    np.testing.assert_allclose(got.offset_, expected.offset_, rtol=1e-5)


def test_parallel_fit_equals_serial_fit(parallel, serial):
    assert_same_model(parallel, serial)


def test_parallel_scoring_keeps_input_order(parallel, serial, test_images):
    expected = serial.score_samples(test_images)
    # Distinct scores, so that a reordering could not go unnoticed.
    assert len(np.unique(np.round(expected, 3))) == len(expected)
    perm = np.random.default_rng(0).permutation(len(test_images))
    assert not np.array_equal(perm, np.arange(len(perm)))

    np.testing.assert_allclose(
        parallel.score_samples(test_images[perm]), expected[perm], rtol=1e-5
    )
    maps = serial.anomaly_maps(test_images)
    assert_scaled_close(parallel.anomaly_maps(test_images[perm]), maps[perm], 1e-5)


def test_parallel_fit_and_scoring_on_paths(png_paths, serial, test_images):
    train_paths, test_paths = png_paths
    det = PadimDetector(**SMALL, n_jobs=2).fit(train_paths)
    # PNG is lossless: the same pixels as the arrays the serial model saw.
    assert_same_model(det, serial)

    perm = np.random.default_rng(1).permutation(len(test_paths))
    expected = serial.score_samples(test_images)
    scores = det.score_samples([test_paths[i] for i in perm])
    np.testing.assert_allclose(scores, expected[perm], rtol=1e-5)


def test_unreadable_file_fails_in_a_parallel_job_with_its_name(png_paths, tmp_path):
    train_paths, _ = png_paths
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"this is not an image")
    paths = train_paths[:6] + [str(broken)] + train_paths[6:]
    with pytest.raises(ValueError, match="broken.png"):
        PadimDetector(**SMALL, n_jobs=2).fit(paths)


# -------------------------------------------------------------------- Dask


@pytest.mark.slow  # 25-60 s on a shared 2-core machine: 2 workers import torch
# joblib does not scatter the fitted extractor to the workers (its size is
# not visible to dask.sizeof), so distributed warns that the task graph holds
# the backbone weights; harmless here.
@pytest.mark.filterwarnings("ignore:Sending large graph:UserWarning")
def test_dask_cluster_fit_equals_single_process_fit(png_paths, serial, test_images):
    distributed = pytest.importorskip("distributed")
    train_paths, test_paths = png_paths
    with (
        distributed.LocalCluster(
            n_workers=2,
            threads_per_worker=1,
            processes=True,
            dashboard_address=None,
            # Without a dashboard the scheduler still serves HTTP, on port
            # 8787 by default; a random port avoids a warning (and a clash)
            # when another cluster on the machine holds 8787.
            scheduler_kwargs={"dashboard_address": ":0"},
        ) as cluster,
        distributed.Client(cluster) as client,
    ):
        with (
            distributed.get_task_stream(client=client) as stream,
            joblib.parallel_config(backend="dask"),
        ):
            det = PadimDetector(**SMALL, n_jobs=-1).fit(train_paths)
            scores = det.score_samples(test_paths)
        workers = set(client.scheduler_info()["workers"])
        worker_pids = client.run(os.getpid)

    assert_same_model(det, serial)
    np.testing.assert_allclose(scores, serial.score_samples(test_images), rtol=1e-5)

    # The work ran as tasks of this cluster's scheduler, on its workers,
    # which are other processes than this one. joblib names each task after
    # the function it runs; one chunk per worker core.
    tasks = stream.data
    assert len(tasks) > 0
    assert all(task["status"] == "OK" for task in tasks), tasks
    assert {task["worker"] for task in tasks} <= workers
    keys = [task["key"] for task in tasks]
    assert sum("_chunk_moments" in key for key in keys) == len(workers) == 2
    assert sum("_chunk_outputs" in key for key in keys) >= 2
    assert os.getpid() not in worker_pids.values()


# --------------------------------------------------------------- precision


def test_bfloat16_scores_track_float32(serial, train, test_images):
    det = PadimDetector(**SMALL, precision="bfloat16").fit(train)
    low, full = det.score_samples(test_images), serial.score_samples(test_images)
    # Not bit-identical (the autocast really ran), but the same ranking.
    assert not np.array_equal(low, full)
    assert np.corrcoef(low, full)[0, 1] > 0.99


@pytest.mark.parametrize("precision", ["float64", "half", None])
def test_invalid_precision_is_refused_before_the_backbone(
    monkeypatch, train, precision
):
    monkeypatch.setattr(_features, "build_feature_network", refuse_network)
    with pytest.raises(ValueError, match="precision"):
        PadimDetector(**SMALL, precision=precision).fit(train)


# ------------------------------------------------------------ memory guard

# SMALL: 64 x 64 frames, resnet18's layer1 has stride 4 -> 16 x 16 positions.
SMALL_POSITIONS, SMALL_DIMS = 16 * 16, SMALL["n_features"]


def padim_nbytes(n_positions, n_features, n_jobs=1):
    """The PaDiM statistics at their peak, counted by hand: a float64 scatter
    and a float32 block of pending sums per job while accumulating; at the
    end, the float64 scatter and the float32 whitening factor."""
    return n_positions * n_features**2 * 12 * n_jobs


def test_statistics_estimate_matches_a_fitted_model(serial):
    gaussian = serial.gaussian_
    n_positions, n_dims = gaussian.location_.shape
    held = (
        gaussian.moments_.scatter.numel() * gaussian.moments_.scatter.element_size()
        + gaussian.whitening_.nbytes
    )
    # After the fit the pending float32 block is merged and gone.
    assert gaussian.moments_._pending is None
    assert padim_nbytes(n_positions, n_dims) == held
    assert PadimDetector()._fit_nbytes((16, 16), n_dims, 10) == padim_nbytes(
        n_positions, n_dims
    )
    # Two jobs hold two float64 scatters and two pending blocks at once.
    two = PadimDetector(n_jobs=2)._fit_nbytes((16, 16), n_dims, 10)
    assert two == padim_nbytes(n_positions, n_dims, n_jobs=2)


@pytest.mark.parametrize("method", ["fit", "partial_fit"])
def test_memory_guard_refuses_before_the_backbone(monkeypatch, train, method):
    needed = padim_nbytes(SMALL_POSITIONS, SMALL_DIMS)
    monkeypatch.setattr(_resources, "available_memory", lambda device: needed // 4)
    monkeypatch.setattr(_features, "build_feature_network", refuse_network)
    with pytest.raises(ValueError, match="Reduce n_features") as info:
        getattr(PadimDetector(**SMALL), method)(train)
    message = str(info.value)
    assert "16x16 grid of 16 features" in message
    assert "on cpu" in message


def test_memory_guard_counts_activations_per_job(monkeypatch, train):
    # Enough for the statistics, not for 4 jobs' activations at batch 512.
    needed = padim_nbytes(SMALL_POSITIONS, SMALL_DIMS)
    monkeypatch.setattr(_resources, "available_memory", lambda d: 3 * needed)
    monkeypatch.setattr(_features, "build_feature_network", refuse_network)
    with pytest.raises(ValueError, match="x 4 jobs"):
        PadimDetector(**{**SMALL, "batch_size": 512}, n_jobs=4).fit(train)


def test_memory_guard_lets_a_fit_that_fits_through(monkeypatch, train):
    monkeypatch.setattr(_resources, "available_memory", lambda device: 2**40)
    monkeypatch.setattr(_features, "build_feature_network", refuse_network)
    # Enough memory: the guard passes and the backbone is built next.
    with pytest.raises(AssertionError, match="must not be built"):
        PadimDetector(**SMALL).fit(train)


def test_memory_guard_passes_when_memory_is_unknown(monkeypatch, train):
    monkeypatch.setattr(_resources, "available_memory", lambda device: None)
    monkeypatch.setattr(_features, "build_feature_network", refuse_network)
    with pytest.raises(AssertionError, match="must not be built"):
        PadimDetector(**SMALL).fit(train)


# --------------------------------------------------------------- prefetching


@pytest.fixture(scope="module")
def varied_paths(tmp_path_factory):
    """Ten PNGs of different sizes and contents (grayscale among them)."""
    folder = tmp_path_factory.mktemp("varied")
    rng = np.random.default_rng(3)
    paths, arrays = [], []
    for i in range(10):
        shape = (20 + i, 30 - i) if i % 3 else (24, 24, 3)
        image = rng.integers(0, 256, size=shape, dtype=np.uint8)
        path = os.path.join(folder, f"varied_{i}.png")
        Image.fromarray(image).save(path)
        paths.append(path)
        arrays.append(image)
    return paths, arrays


def test_prefetching_reader_yields_the_same_batches(varied_paths):
    paths, arrays = varied_paths
    images = check_images(paths)
    eager = list(images.batches(4, prefetch=0))
    ahead = list(images.batches(4, prefetch=2))
    assert [len(batch) for batch in eager] == [4, 4, 2]
    assert [len(batch) for batch in ahead] == [4, 4, 2]
    flat_eager = [image for batch in eager for image in batch]
    flat_ahead = [image for batch in ahead for image in batch]
    for got, again, source in zip(flat_eager, flat_ahead, arrays):
        np.testing.assert_array_equal(got, again)
        # 8-bit pixels as decoded (the preprocessing scales them); grayscale
        # stays one channel until the preprocessing has resized it.
        pixels = source if source.ndim == 3 else source[..., None]
        np.testing.assert_array_equal(got, pixels)


@pytest.mark.parametrize("prefetch", [0, 2])
def test_unreadable_file_in_the_middle_is_named(varied_paths, tmp_path, prefetch):
    paths, _ = varied_paths
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG but not really")
    batches = check_images(paths[:5] + [str(broken)] + paths[5:]).batches(
        4, prefetch=prefetch
    )
    # The batch before it still comes out, then its own batch fails.
    assert len(next(batches)) == 4
    with pytest.raises(ValueError, match="broken.png"):
        next(batches)
