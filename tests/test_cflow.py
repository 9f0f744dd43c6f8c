"""CflowDetector: CFLOW-AD trained in torch, deterministic, honest threshold.

Tiny setup: random-init ResNet-18 on 32-48 px textures, two coupling blocks,
an 8-channel condition, one or two epochs. Each fit takes well under a
second on one core.
"""

import math
import pickle
import pickletools
import subprocess
import sys
import textwrap

import joblib
import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score
from test_detector import paste_patches

from skpadim import _cflow, _features, _resources
from skpadim._cflow import CflowDetector, _flow_n_parameters, _regroup
from skpadim._flow import FlowPyramid, positional_encoding
from skpadim._parallel import torch_threads
from skpadim.backbones import get_backbone_spec

from conftest import smooth_texture

TINY = dict(
    backbone="resnet18",
    weights=None,
    image_size=32,
    n_coupling_blocks=2,
    condition_dim=8,
    fiber_batch_size=64,
    max_iter=2,
    random_state=0,
    device="cpu",
)
# 32 px, layer2-4 of ResNet-18: grids of 4x4, 2x2 and 1x1 fibers.
GRIDS = ((4, 4), (2, 2), (1, 1))
X = smooth_texture(np.random.default_rng(0), 20, size=32)


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """The flows' steps are tiny matmuls: on a busy machine two OpenMP threads
    spin-wait on each other and run them ~10x slower than one thread."""
    with torch_threads(1):
        yield


@pytest.fixture(scope="module")
def fitted():
    return CflowDetector(**TINY).fit(X)


def held_out_taps(det, images):
    """The fitted extractor's taps of ``images``, level by level."""
    from skpadim._images import check_images

    batches = det.feature_extractor_.embed_batches(check_images(images), kind="taps")
    taps = [features for _, features in batches]
    return [torch.cat(level) for level in zip(*taps)]


def level_log_probs(det, images):
    """Per-dimension log-likelihood of every fiber, level by level."""
    pyramid = det.flow_.new_pyramid("cpu")
    with torch.no_grad():
        return [
            pyramid.level_log_prob(level, tap)
            for level, tap in enumerate(held_out_taps(det, images))
        ]


def standard_normal_log_probs(det, images):
    """Known answer for an untrained flow (the identity): the standard normal
    log-density per dimension of the raw features."""
    return [
        (-0.5 * tap.square() - 0.5 * math.log(2 * math.pi)).mean(dim=1)
        for tap in held_out_taps(det, images)
    ]


def mean_over_levels(log_probs):
    return float(np.mean([lp.double().mean().item() for lp in log_probs]))


# ------------------------------------------------------------------ training
def test_default_taps_and_one_flow_per_level(fitted):
    assert fitted.feature_extractor_.layers_ == ("layer2", "layer3", "layer4")
    assert fitted.flow_.level_channels == (128, 256, 512)  # every channel kept
    lite = CflowDetector()._resolve_layers(get_backbone_spec("efficientnet_lite0"))
    assert tuple(lite) == ("block4", "block10", "block15")


def test_training_lowers_the_held_out_nll():
    # 40 px: 5x5, 3x3 and 2x2 grids; held-out images never trained on.
    images = smooth_texture(np.random.default_rng(1), 16, size=40)
    params = {**TINY, "image_size": 40, "validation_fraction": 0.25}
    short = CflowDetector(**{**params, "max_iter": 1}).fit(images)
    long = CflowDetector(**{**params, "max_iter": 4}).fit(images)
    held = images[long.validation_indices_]
    assert len(held) == 4
    np.testing.assert_array_equal(short.validation_indices_, long.validation_indices_)
    untrained = mean_over_levels(standard_normal_log_probs(long, held))
    after_one = mean_over_levels(level_log_probs(short, held))
    after_four = mean_over_levels(level_log_probs(long, held))
    assert untrained < after_one < after_four, (untrained, after_one, after_four)
    assert after_four - untrained > 0.1  # nats per dimension
    assert long.n_iter_ == 4 and len(long.loss_curve_) == 4
    assert long.loss_curve_[-1] < long.loss_curve_[0]


def test_every_fiber_is_used_once_per_epoch(monkeypatch):
    seen = []
    original = FlowPyramid.fiber_loss

    def recording(self, level, fibers, conds):
        seen.append((level, len(fibers)))
        return original(self, level, fibers, conds)

    monkeypatch.setattr(FlowPyramid, "fiber_loss", recording)
    # 18 trained images, 16 + 4 + 1 fibers each: 288, 72 and 18 per level and
    # epoch, in chunks of at most 50; no remainder dropped.
    det = CflowDetector(**{**TINY, "fiber_batch_size": 50}).fit(X)
    assert len(det.validation_indices_) == 2
    n_trained = len(X) - 2
    for level, (h, w) in enumerate(GRIDS):
        sizes = [n for lev, n in seen if lev == level]
        assert sum(sizes) == det.n_iter_ * n_trained * h * w
        assert max(sizes) <= 50
        assert len(sizes) == det.n_iter_ * math.ceil(n_trained * h * w / 50)


def test_learning_does_not_depend_on_batch_size(fitted):
    other = CflowDetector(**TINY, batch_size=3).fit(X)
    np.testing.assert_allclose(
        other.score_samples(X), fitted.score_samples(X), rtol=1e-4, atol=1e-6
    )


# -------------------------------------------------------------- determinism
def test_same_seed_gives_bit_identical_scores(fitted):
    again = CflowDetector(**TINY).fit(X)
    np.testing.assert_array_equal(again.score_samples(X), fitted.score_samples(X))
    np.testing.assert_array_equal(again.anomaly_maps(X[:3]), fitted.anomaly_maps(X[:3]))
    for name, value in fitted.flow_.state_.items():
        np.testing.assert_array_equal(again.flow_.state_[name], value)
    other = CflowDetector(**{**TINY, "random_state": 1}).fit(X)
    assert not np.array_equal(other.score_samples(X), fitted.score_samples(X))


def test_results_do_not_depend_on_the_global_rng(fitted):
    torch.manual_seed(123)
    again = CflowDetector(**TINY).fit(X)
    np.testing.assert_array_equal(again.score_samples(X), fitted.score_samples(X))


def test_training_leaves_the_global_rng_alone(fitted):
    from skpadim._cache import FeatureCache

    cache = FeatureCache()
    cache.append(held_out_taps(fitted, X[:6]))
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    CflowDetector(**TINY)._train(
        cache, None, None, warm=False, one_epoch=False, seeds=(0, 1), device="cpu"
    )
    np.testing.assert_array_equal(torch.rand(3), expected)


def test_an_image_scores_the_same_alone_or_in_a_batch(fitted):
    batch = X[:5]
    together = fitted.score_samples(batch)
    alone = np.array([fitted.score_samples(image[None])[0] for image in batch])
    np.testing.assert_allclose(alone, together, rtol=1e-5)
    maps = fitted.anomaly_maps(batch)
    np.testing.assert_allclose(fitted.anomaly_maps(batch[2:3])[0], maps[2], rtol=1e-5)


def test_patch_scores_follow_the_documented_formula(fitted):
    head = fitted.flow_
    trained = np.setdiff1d(np.arange(len(X)), fitted.validation_indices_)
    log_probs = level_log_probs(fitted, X[trained])
    # c_l is the largest training log-likelihood of each level.
    np.testing.assert_allclose(
        head.log_prob_max_, [lp.max().item() for lp in log_probs], rtol=1e-6
    )
    # n_levels - sum of exp(log p - c_l), coarse levels upsampled (bilinear,
    # half-pixel centres): by hand for one image, with numpy.
    image = X[trained[:1]]
    taps = held_out_taps(fitted, image)
    patch, image_score = head.score_batch(taps)
    assert image_score is None and patch.shape == (1, 4, 4)
    expected = np.full((4, 4), 3.0)
    for level, lp in enumerate(level_log_probs(fitted, image)):
        s = np.exp(lp[0].double().numpy() - head.log_prob_max_[level])
        expected -= bilinear(s, 4)
    np.testing.assert_allclose(patch[0].numpy(), expected, rtol=1e-5, atol=1e-6)


def bilinear(grid, size):
    """Upsample a square grid to size x size, half-pixel centres, edge clamped."""
    n = grid.shape[0]
    coords = np.clip((np.arange(size) + 0.5) * n / size - 0.5, 0, n - 1)
    lo = np.floor(coords).astype(int)
    hi = np.minimum(lo + 1, n - 1)
    frac = coords - lo
    weights = np.zeros((size, n))
    np.add.at(weights, (np.arange(size), lo), 1 - frac)
    np.add.at(weights, (np.arange(size), hi), frac)
    return weights @ grid @ weights.T


# ------------------------------------------------------------ the threshold
def test_offset_comes_from_held_out_images_never_trained_on(fitted):
    held = fitted.validation_indices_
    assert len(held) == math.ceil(0.1 * len(X)) == len(fitted.train_scores_)
    np.testing.assert_allclose(
        fitted.train_scores_, fitted.score_samples(X[held]), rtol=1e-5
    )
    quantile = np.percentile(fitted.train_scores_, 1.0)
    assert fitted.offset_ == pytest.approx(quantile, rel=1e-3, abs=1e-3)
    assert fitted.n_samples_seen_ == len(X)
    # Known answer: the same flows as a fit on the trained images alone.
    trained = np.setdiff1d(np.arange(len(X)), held)
    alone = CflowDetector(**TINY, validation_fraction=0).fit(X[trained])
    for name, value in fitted.flow_.state_.items():
        np.testing.assert_array_equal(alone.flow_.state_[name], value)


def test_without_a_held_out_split_the_threshold_is_in_sample():
    det = CflowDetector(**TINY, validation_fraction=0).fit(X)
    assert len(det.validation_indices_) == 0
    assert len(det.train_scores_) == len(X)
    np.testing.assert_allclose(det.train_scores_, det.score_samples(X), rtol=1e-5)


def test_fit_predict_labels_every_image():
    det = CflowDetector(**TINY, contamination=0.2)
    labels = det.fit_predict(X)
    assert labels.shape == (len(X),) and set(labels) <= {-1, 1}
    np.testing.assert_array_equal(labels, det.predict(X))
    # Nothing held out: in-sample scores flag exactly the contamination.
    labels = det.set_params(validation_fraction=0).fit_predict(X)
    assert (labels == -1).mean() == pytest.approx(0.2)


def test_regrouping_cuts_the_stream_into_fixed_groups():
    stream = torch.arange(23 * 2, dtype=torch.float32).reshape(23, 2, 1, 1)
    batches = [[stream[i : i + 5], 2 * stream[i : i + 5]] for i in range(0, 23, 5)]
    groups = list(_regroup(batches, 4))
    assert [len(g[0]) for g in groups] == [4, 4, 4, 4, 4, 3]
    torch.testing.assert_close(torch.cat([g[0] for g in groups]), stream)
    torch.testing.assert_close(torch.cat([g[1] for g in groups]), 2 * stream)


# ------------------------------------------------- early stopping, continuing
def test_early_stopping_stops_and_keeps_the_best_epoch():
    det = CflowDetector(
        **{**TINY, "max_iter": 6},
        early_stopping=True,
        validation_fraction=0.2,
        n_iter_no_change=1,
        tol=1e9,  # no epoch improves enough: stop after 1 + 1 stale epochs
    ).fit(X)
    assert det.n_iter_ == 3 and len(det.validation_scores_) == 3
    assert det.best_validation_score_ == max(det.validation_scores_)
    # The kept flows score the held-out images at the best epoch's value.
    held = X[det.validation_indices_]
    assert len(held) == 4
    np.testing.assert_allclose(
        mean_over_levels(level_log_probs(det, held)),
        det.best_validation_score_,
        rtol=1e-5,
    )


def test_early_stopping_restores_the_weights_of_the_best_epoch(monkeypatch):
    scripted = iter([1.0, 3.0, 2.0, 2.5, 2.0, 2.0])
    monkeypatch.setattr(_cflow, "_mean_log_prob", lambda pyramid, cache: next(scripted))
    det = CflowDetector(
        **{**TINY, "max_iter": 6}, early_stopping=True, n_iter_no_change=1, tol=0.0
    ).fit(X)
    assert det.validation_scores_ == [1.0, 3.0, 2.0, 2.5]  # 2 stale epochs > 1
    assert det.n_iter_ == 4 and det.best_validation_score_ == 3.0
    # The kept flows are those after epoch 2: a 2-epoch fit's, bit for bit.
    two = CflowDetector(**{**TINY, "max_iter": 2}).fit(X)
    for name, value in two.flow_.state_.items():
        np.testing.assert_array_equal(det.flow_.state_[name], value)
    np.testing.assert_array_equal(det.score_samples(X), two.score_samples(X))


def test_without_early_stopping_the_training_loss_can_stop_it():
    det = CflowDetector(**{**TINY, "max_iter": 10}, n_iter_no_change=1, tol=1e9).fit(X)
    assert det.n_iter_ == 3 and det.validation_scores_ is None
    assert det.best_validation_score_ is None


def test_partial_fit_runs_one_epoch_like_a_warm_start_of_one():
    first = CflowDetector(**{**TINY, "max_iter": 3}).partial_fit(X)
    assert first.n_iter_ == 1  # a first partial_fit is one epoch, not max_iter
    one = CflowDetector(**{**TINY, "max_iter": 1}).fit(X)
    np.testing.assert_array_equal(first.score_samples(X), one.score_samples(X))

    head = one.flow_
    before = {k: v.copy() for k, v in head.state_.items()}
    one.partial_fit(X)
    assert one.n_iter_ == 2 and len(one.loss_curve_) == 2
    assert one.n_samples_seen_ == 2 * len(X)
    assert len(one.train_scores_) == 2 * len(one.validation_indices_)
    # The previous head was replaced, not changed in place.
    assert one.flow_ is not head
    for name, value in before.items():
        np.testing.assert_array_equal(head.state_[name], value)
    # Known answer: one epoch from the same flows, the same shuffles.
    warm = CflowDetector(**{**TINY, "max_iter": 1}).fit(X)
    warm.set_params(warm_start=True).fit(X)
    assert warm.n_iter_ == 2 and warm.n_samples_seen_ == len(X)
    for name, value in warm.flow_.state_.items():
        np.testing.assert_array_equal(one.flow_.state_[name], value)


def test_warm_start_continues_and_cold_start_restarts(fitted):
    warm = CflowDetector(**TINY, warm_start=True).fit(X)
    warm.fit(X)
    assert warm.n_iter_ == 4
    assert warm.loss_curve_[:2] == fitted.loss_curve_
    # It went on from the trained flows: its third epoch beats a fresh first.
    assert warm.loss_curve_[2] < fitted.loss_curve_[0]
    cold = CflowDetector(**TINY).fit(X)
    cold.fit(X)
    assert cold.n_iter_ == 2
    np.testing.assert_array_equal(cold.score_samples(X), fitted.score_samples(X))
    warm.set_params(condition_dim=12)
    with pytest.raises(ValueError, match="Cannot continue training"):
        warm.fit(X)
    assert warm.n_iter_ == 4  # a failed fit leaves the model as it was


# -------------------------------------------------------------- persistence
def pickled_modules(obj):
    strings, modules = [], set()
    for opcode, arg, _ in pickletools.genops(pickle.dumps(obj, protocol=5)):
        if isinstance(arg, str):
            strings.append(arg)
        if opcode.name == "STACK_GLOBAL":
            modules.add(strings[-2])
        elif opcode.name == "GLOBAL":
            modules.add(arg.split(" ")[0])
    return modules


def test_joblib_round_trip_in_a_fresh_process(fitted, tmp_path):
    assert not any(m.split(".")[0] == "torch" for m in pickled_modules(fitted))
    det = pickle.loads(pickle.dumps(fitted))
    np.testing.assert_array_equal(det.score_samples(X), fitted.score_samples(X))
    # As pickled on a GPU machine: must load and score on a CPU.
    det.device = det.feature_extractor_.device = "cuda"
    joblib.dump(det, tmp_path / "cflow.joblib")
    np.save(tmp_path / "X.npy", X)
    np.save(tmp_path / "expected.npy", fitted.score_samples(X))
    script = textwrap.dedent(
        f"""
        import warnings
        import joblib, numpy as np
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            det = joblib.load({str(tmp_path / "cflow.joblib")!r})
            scores = det.score_samples(np.load({str(tmp_path / "X.npy")!r}))
        assert any("not available here" in str(w.message) for w in caught)
        np.testing.assert_array_equal(
            scores, np.load({str(tmp_path / "expected.npy")!r}))
        print("LOADED-OK", det.n_iter_, det.flow_.level_channels)
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        env={"CUDA_VISIBLE_DEVICES": "", "PATH": "", "OMP_NUM_THREADS": "1"},
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "LOADED-OK 2 (128, 256, 512)" in result.stdout


# --------------------------------------------------------------- end to end
def test_finds_and_locates_pasted_defects():
    rng = np.random.default_rng(0)
    train = smooth_texture(rng, 30, size=48)
    normal = smooth_texture(rng, 10, size=48)
    defective, masks = paste_patches(rng, smooth_texture(rng, 10, size=48), size=12)
    det = CflowDetector(**{**TINY, "image_size": 48}).fit(train)
    y = np.r_[np.ones(10), -np.ones(10)]
    image_auc = roc_auc_score(y, det.decision_function(np.r_[normal, defective]))
    pixel_auc = roc_auc_score(masks.ravel(), det.anomaly_maps(defective).ravel())
    assert image_auc > 0.9, image_auc
    assert pixel_auc > 0.75, pixel_auc
    assert (det.predict(defective) == -1).mean() > 0.8


# ------------------------------------------------------------ bad parameters
def refuse_network(*args, **kwargs):
    raise AssertionError("the backbone must not be built")


@pytest.mark.parametrize(
    "params, match",
    [
        ({"max_iter": 0}, "max_iter"),
        ({"condition_dim": 6}, "multiple of 4"),
        ({"condition_dim": 0}, "condition_dim"),
        ({"validation_fraction": 1.0}, "validation_fraction"),
        ({"validation_fraction": -0.1}, "validation_fraction"),
        ({"early_stopping": True, "validation_fraction": 0.0}, "held-out images"),
        ({"fiber_batch_size": 0}, "fiber_batch_size"),
        ({"learning_rate_init": 0.0}, "learning_rate_init"),
        ({"n_coupling_blocks": 0}, "n_coupling_blocks"),
    ],
)
def test_bad_parameters_fail_before_the_backbone(monkeypatch, params, match):
    monkeypatch.setattr(_features, "build_feature_network", refuse_network)
    with pytest.raises(ValueError, match=match):
        CflowDetector(**{**TINY, **params}).fit(X)


def test_memory_estimate_counts_the_flows_and_refuses_early(monkeypatch):
    pyramid = FlowPyramid([128, 256, 512], 8, 2, random_state=0)
    n_params = sum(p.numel() for p in pyramid.parameters())
    assert n_params == sum(_flow_n_parameters(c, 8, 2) for c in (128, 256, 512))
    det = CflowDetector(**TINY)
    # Flows, gradients, two Adam moments, the head's copy; features on top.
    assert det._fit_nbytes((4, 4), 896, 1) >= 5 * 4 * n_params + 4 * 896
    monkeypatch.setattr(_resources, "available_memory", lambda device: 4 * n_params)
    monkeypatch.setattr(_features, "build_feature_network", refuse_network)
    with pytest.raises(ValueError, match="CflowDetector fit"):
        det.fit(X)


def test_each_training_fiber_gets_the_condition_of_its_position(monkeypatch):
    """_train_epoch's shuffled steps pair every fiber with its own position's
    encoding (fiber (b, i, j) of a tap: position i * w + j)."""
    seen = []
    original = FlowPyramid.fiber_loss

    def recording(self, level, fibers, conds):
        seen.append((level, fibers.clone(), conds.clone()))
        return original(self, level, fibers, conds)

    monkeypatch.setattr(FlowPyramid, "fiber_loss", recording)
    grids = [(3, 5), (2, 2)]
    pyramid = FlowPyramid([4, 6], condition_dim=8, n_coupling_blocks=2, random_state=0)
    group = []
    for channels, (h, w) in zip([4, 6], grids):
        # channel 0 holds the position, channel 1 the image
        tap = torch.zeros(3, channels, h, w)
        tap[:, 0] = torch.arange(h * w, dtype=torch.float32).reshape(h, w)
        tap[:, 1] = torch.arange(3, dtype=torch.float32)[:, None, None]
        group.append(tap)
    optimizers = [_cflow._adam(flow, 1e-3) for flow in pyramid.flows]
    generator = torch.Generator().manual_seed(0)
    _cflow._train_epoch(pyramid, optimizers, [group], 7, generator)
    for level, (h, w) in enumerate(grids):
        encoding = positional_encoding(8, h, w).flatten(1).T
        steps = [(f, c) for lev, f, c in seen if lev == level]
        fibers = torch.cat([f for f, _ in steps])
        conds = torch.cat([c for _, c in steps])
        assert len(fibers) == 3 * h * w
        positions = fibers[:, 0].long()
        np.testing.assert_array_equal(conds, encoding[positions])
        # every (image, position) once, in a shuffled order
        keys = (fibers[:, 1] * h * w + fibers[:, 0]).long()
        assert sorted(keys.tolist()) == list(range(3 * h * w))
        assert keys.tolist() != sorted(keys.tolist())
