"""Input validation, lazy loading and the preprocessing geometry."""

import numpy as np
import pytest
import torch
from PIL import Image

from skpadim._images import Preprocessing, check_images, check_size


def test_each_input_kind_loads_the_same_pixels(tmp_path):
    rng = np.random.default_rng(0)
    arrays = rng.integers(0, 256, size=(3, 20, 30, 3), dtype=np.uint8)
    paths = []
    for i, a in enumerate(arrays):
        paths.append(tmp_path / f"{i}.png")
        Image.fromarray(a).save(paths[-1])
    pils = [Image.fromarray(a) for a in arrays]
    loaded = [
        np.concatenate([np.stack(b) for b in check_images(X).batches(2)])
        for X in (arrays, list(arrays), paths, [str(p) for p in paths], pils)
    ]
    for other in loaded[1:]:
        np.testing.assert_array_equal(other, loaded[0])
    np.testing.assert_allclose(loaded[0], arrays / 255.0, rtol=1e-6)


def test_grayscale_is_replicated_and_floats_pass_through():
    gray = np.random.default_rng(1).random((2, 8, 9))
    (batch,) = check_images(gray).batches(4)
    assert batch[0].shape == (8, 9, 3)
    np.testing.assert_allclose(batch[1][..., 2], gray[1], rtol=1e-6)
    (batch,) = check_images(gray[..., None]).batches(4)
    assert batch[0].shape == (8, 9, 3)


def test_lists_of_mixed_sizes_keep_their_shapes():
    images = check_images([np.zeros((10, 12), np.uint8), np.zeros((7, 5, 3), np.uint8)])
    assert images.shapes == [(10, 12), (7, 5)]


def test_paths_are_read_lazily(tmp_path, monkeypatch):
    import skpadim._images as module

    paths = []
    for i in range(20):
        paths.append(tmp_path / f"{i}.png")
        Image.fromarray(np.zeros((4, 4), np.uint8)).save(paths[-1])
    reads = []
    original = module._read_image_file
    monkeypatch.setattr(
        module, "_read_image_file", lambda p: reads.append(p) or original(p)
    )
    for prefetch in (0, 2):
        reads.clear()
        batches = check_images(paths).batches(2, prefetch=prefetch)
        assert reads == []  # validation reads nothing
        next(batches)
        # At most the batch in hand and `prefetch` batches ahead are read.
        assert 2 <= len(reads) <= 2 * (prefetch + 1)
        batches.close()


@pytest.mark.parametrize(
    "size, expected", [(None, None), (5, (5, 5)), ((4, 7), (4, 7)), ([3, 2], (3, 2))]
)
def test_check_size(size, expected):
    assert check_size(size, "image_size") == expected


def test_preprocessing_resizes_crops_and_normalises():
    prep = Preprocessing((40, 60), (20, 30), (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    image = np.full((13, 17, 3), 0.75, np.float32)
    batch = prep([image, image], "cpu")
    assert batch.shape == (2, 3, 20, 30)
    np.testing.assert_allclose(batch.numpy(), 1.0, rtol=1e-5)
    assert prep.crop_box((13, 17)) == (10, 15, 20, 30)


def test_maps_go_back_to_input_pixels_with_nan_outside_the_crop():
    # Input 40x80 -> resized 20x40 -> crop 10x20 at (5, 10): the crop covers
    # input rows 10..29 and columns 20..59 exactly.
    prep = Preprocessing((20, 40), (10, 20), (0, 0, 0), (1, 1, 1))
    maps = torch.arange(200, dtype=torch.float32).view(1, 10, 20)
    out = prep.to_input_frame(maps, (40, 80))[0].numpy()
    inside = np.zeros((40, 80), bool)
    inside[10:30, 20:60] = True
    assert np.isnan(out[~inside]).all() and not np.isnan(out[inside]).any()
    # Inside, it is the bilinear 2x upsampling of the crop's map.
    expected = torch.nn.functional.interpolate(
        maps[None], scale_factor=2, mode="bilinear", align_corners=False
    )[0, 0].numpy()
    np.testing.assert_allclose(out[10:30, 20:60], expected, rtol=1e-5, atol=1e-4)


def test_without_crop_maps_are_resized_to_the_input():
    prep = Preprocessing((16, 16), None, (0, 0, 0), (1, 1, 1))
    maps = torch.rand(1, 16, 16)
    out = prep.to_input_frame(maps, (32, 48))
    assert out.shape == (1, 32, 48) and not torch.isnan(out).any()
    assert prep.to_input_frame(maps, (16, 16)) is maps
