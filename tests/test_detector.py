"""PadimDetector end to end: statistics, scores, maps, determinism, persistence."""

import joblib
import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.metrics import roc_auc_score

from skpadim import PadimDetector, PatchFeatureExtractor

from conftest import smooth_texture
from test_gaussian import reference_mahalanobis, reference_moments


def test_statistics_match_numpy_reference(small_params, images):
    det = PadimDetector(**small_params).fit(images)
    embeddings = det.feature_extractor_.transform(images).astype(np.float64)
    means, covs = reference_moments(embeddings)
    moments = det.gaussian_.moments_
    scale = np.abs(covs).max()
    np.testing.assert_allclose(
        moments.mean.numpy(), means, atol=1e-6 * np.abs(means).max()
    )
    np.testing.assert_allclose(moments.scatter.numpy() / 11, covs, atol=1e-6 * scale)


def test_maps_are_the_smoothed_mahalanobis_distances(small_params, images):
    det = PadimDetector(**small_params, sigma=0).fit(images[:8])
    test = images[8:]
    embeddings = det.feature_extractor_.transform(test).astype(np.float64)
    train = det.feature_extractor_.transform(images[:8]).astype(np.float64)
    means, covs = reference_moments(train)
    expected = reference_mahalanobis(embeddings, means, covs, det.epsilon)
    up = torch.nn.functional.interpolate(
        torch.from_numpy(expected)[:, None], size=(64, 64), mode="bilinear"
    )[:, 0].numpy()
    maps = det.anomaly_maps(test)
    np.testing.assert_allclose(maps, up, rtol=1e-4)
    np.testing.assert_allclose(
        -det.score_samples(test), up.reshape(4, -1).max(1), rtol=1e-4
    )


def test_partial_fit_in_uneven_batches_equals_fit(small_params, images):
    full = PadimDetector(**small_params).fit(images)
    streamed = PadimDetector(**small_params)
    for chunk in np.split(images, [3, 4, 9]):
        streamed.partial_fit(chunk)
    assert streamed.n_samples_seen_ == 12
    # The backbone's float32 output depends slightly on the batch composition,
    # so compare relative to the scatter's scale (exact data: test_gaussian).
    expected = full.gaussian_.moments_.scatter.numpy()
    np.testing.assert_allclose(
        streamed.gaussian_.moments_.scatter,
        expected,
        atol=1e-6 * np.abs(expected).max(),
    )
    np.testing.assert_allclose(
        streamed.score_samples(images), full.score_samples(images), rtol=1e-4
    )
    assert len(streamed.train_scores_) == 12


def test_same_seed_is_bit_identical_and_seeds_differ(small_params, images):
    a = PadimDetector(**small_params).fit(images)
    b = PadimDetector(**small_params).fit(images)
    np.testing.assert_array_equal(a.score_samples(images), b.score_samples(images))
    np.testing.assert_array_equal(
        a.anomaly_maps(images[:2]), b.anomaly_maps(images[:2])
    )
    c = PadimDetector(**{**small_params, "random_state": 1}).fit(images)
    assert not np.array_equal(
        a.feature_extractor_.channel_indices_, c.feature_extractor_.channel_indices_
    )


def paste_patches(rng, images, size=14):
    """Paste a bright checkerboard patch into each image; return images, masks."""
    out, masks = images.copy(), np.zeros(images.shape[:3], bool)
    checker = (np.indices((size, size)).sum(0) % 4 < 2) * 255
    for img, mask in zip(out, masks):
        y, x = rng.integers(4, img.shape[0] - size - 4, size=2)
        img[y : y + size, x : x + size] = checker[..., None]
        mask[y : y + size, x : x + size] = True
    return out, masks


def test_separates_defective_from_normal_images():
    rng = np.random.default_rng(0)
    train = smooth_texture(rng, 40)
    normal = smooth_texture(rng, 10)
    defective, masks = paste_patches(rng, smooth_texture(rng, 10))
    X = np.concatenate([normal, defective])
    y = np.r_[np.ones(10), -np.ones(10)]
    det = PadimDetector(
        backbone="resnet18",
        weights=None,
        image_size=64,
        n_features=32,
        random_state=0,
        device="cpu",
    ).fit(train)
    image_auc = roc_auc_score(y, det.decision_function(X))
    maps = det.anomaly_maps(defective)
    pixel_auc = roc_auc_score(masks.ravel(), maps.ravel())
    assert image_auc > 0.9, image_auc
    assert pixel_auc > 0.85, pixel_auc
    assert (det.predict(defective) == -1).mean() > 0.8


def test_outlier_contract(fitted, images):
    scores = fitted.score_samples(images)
    decision = fitted.decision_function(images)
    np.testing.assert_allclose(decision, scores - fitted.offset_)
    labels = fitted.predict(images)
    assert labels.dtype.kind == "i" and set(labels) <= {-1, 1}
    np.testing.assert_array_equal(labels == 1, decision >= 0)
    # Training scores are leave-one-out, so lower (more anomalous) than in-sample.
    assert (fitted.train_scores_ < scores).all()


def test_train_scores_are_scores_of_a_refit_without_the_image(small_params):
    images = smooth_texture(np.random.default_rng(5), 30)
    params = {**small_params, "n_features": 8}
    det = PadimDetector(**params).fit(images)
    for i in (0, 7):
        without = PadimDetector(**params).fit(np.delete(images, i, axis=0))
        refit_score = without.score_samples(images[i : i + 1])[0]
        # Exact but for the epsilon term, bounded by 1 / (2 (n - 2)): see
        # skpadim._gaussian.leave_one_out.
        assert det.train_scores_[i] == pytest.approx(refit_score, rel=1 / (2 * 28))


def test_fit_predict_flags_the_contamination_fraction(small_params):
    X = smooth_texture(np.random.default_rng(1), 20)
    det = PadimDetector(**small_params, contamination=0.2)
    labels = det.fit_predict(X)
    assert (labels == -1).sum() == 4
    np.testing.assert_array_equal(
        labels, np.where(det.train_scores_ >= det.offset_, 1, -1)
    )
    # predict on images the model has seen scores them in-sample: fewer flags.
    assert (det.predict(X) == -1).sum() <= 4


def test_all_input_kinds_give_the_same_scores(fitted, images, tmp_path):
    paths = [tmp_path / f"{i}.png" for i in range(3)]
    for path, image in zip(paths, images):
        Image.fromarray(image).save(path)
    expected = fitted.score_samples(images[:3])
    for X in (
        list(images[:3]),
        paths,
        [Image.open(p) for p in paths],
        images[:3] / 255.0,
    ):
        np.testing.assert_allclose(fitted.score_samples(X), expected, rtol=1e-5)


def test_grayscale_and_mixed_sizes(small_params):
    rng = np.random.default_rng(2)
    gray = smooth_texture(rng, 6, channels=1)[..., 0]
    det = PadimDetector(**small_params).fit(gray)
    mixed = [gray[0], np.pad(gray[1], ((0, 16), (0, 40)), mode="edge")]
    maps = det.anomaly_maps(mixed)
    assert isinstance(maps, list) and [m.shape for m in maps] == [(64, 64), (80, 104)]
    assert det.anomaly_maps(gray[:2], resolution="model").shape == (2, 64, 64)


def test_non_square_frame_and_crop(small_params, images):
    det = PadimDetector(
        **{**small_params, "image_size": (64, 96), "crop_size": (48, 80)}
    )
    det.fit(images)
    assert det.frame_shape_ == (48, 80)
    maps = det.anomaly_maps(images[:2])
    assert maps.shape == (2, 64, 64)
    assert np.isnan(maps[:, :8]).all() and not np.isnan(maps[:, 8:56, 6:58]).any()
    assert det.anomaly_maps(images[:2], resolution="model").shape == (2, 48, 80)


def test_image_size_none_keeps_the_input_size(small_params):
    X = smooth_texture(np.random.default_rng(3), 5, size=48)
    det = PadimDetector(**{**small_params, "image_size": None}).fit(X)
    assert det.frame_shape_ == (48, 48)
    with pytest.raises(ValueError, match="image_size=None"):
        det.score_samples(smooth_texture(np.random.default_rng(3), 2, size=64))


def test_pca_reduction_matches_projecting_the_full_embedding(small_params, images):
    ext = PatchFeatureExtractor(**{**small_params, "reduction": "pca"}).fit(images)
    full = PatchFeatureExtractor(**{**small_params, "n_features": 448}).fit(images)
    emb_full = full.transform(images).astype(np.float64)
    # "random" with all 448 channels is the full embedding in channel order.
    projected = np.einsum(
        "kc,nchw->nkhw", ext.components_, emb_full - ext.pca_mean_[:, None, None]
    )
    np.testing.assert_allclose(ext.transform(images), projected, rtol=1e-3, atol=1e-3)
    det = PadimDetector(**{**small_params, "reduction": "pca"}).fit(images)
    assert np.isfinite(det.score_samples(images)).all()


def test_joblib_round_trip_gives_identical_scores(fitted, images, tmp_path):
    path = tmp_path / "padim.joblib"
    joblib.dump(fitted, path)
    loaded = joblib.load(path)
    np.testing.assert_array_equal(
        loaded.score_samples(images), fitted.score_samples(images)
    )
    np.testing.assert_array_equal(
        loaded.anomaly_maps(images[:2]), fitted.anomaly_maps(images[:2])
    )
    with pytest.raises(ValueError, match="cannot continue partial_fit"):
        loaded.partial_fit(images)


def test_refit_with_other_n_features_rebuilds_everything(fitted, images):
    fitted.set_params(n_features=8, layers=("layer1", "layer2")).fit(images)
    assert fitted.gaussian_.location_.shape[1] == 8
    assert fitted.feature_extractor_.n_channels_ == 192
    assert np.isfinite(fitted.score_samples(images)).all()


def test_default_detector_works_offline():
    X = smooth_texture(np.random.default_rng(4), 4)
    det = PadimDetector(image_size=64, device="cpu").fit(X)
    assert det.feature_extractor_.n_features_ == 100
    assert det.gaussian_.feature_shape_ == (100, 16, 16)


def test_predict_masks_threshold_the_maps(fitted, images):
    maps = fitted.anomaly_maps(images[:3])
    threshold = float(np.median(maps))
    masks = fitted.predict_masks(images[:3], threshold)
    assert masks.dtype == bool and masks.shape == maps.shape
    np.testing.assert_array_equal(masks, maps >= threshold)
