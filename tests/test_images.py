"""Input validation, lazy loading and the preprocessing geometry."""

import struct
import zlib

import numpy as np
import pytest
import torch
from PIL import ExifTags, Image, ImageFile, ImageOps, UnidentifiedImageError

from skpadim._images import (
    Preprocessing,
    _as_rgb,
    _to_float_pixels,
    check_images,
    check_size,
    read_image,
    read_image_shape,
)


def test_each_input_kind_loads_the_same_pixels(tmp_path):
    rng = np.random.default_rng(0)
    arrays = rng.integers(0, 256, size=(3, 20, 30, 3), dtype=np.uint8)
    paths = []
    for i, a in enumerate(arrays):
        paths.append(tmp_path / f"{i}.png")
        Image.fromarray(a).save(paths[-1])
    pils = [Image.fromarray(a) for a in arrays]
    loaded = [
        _read(X) for X in (arrays, list(arrays), paths, [str(p) for p in paths], pils)
    ]
    for other in loaded[1:]:
        np.testing.assert_array_equal(other, loaded[0])
    np.testing.assert_allclose(loaded[0], arrays / 255.0, rtol=1e-6)


def test_grayscale_is_replicated_after_resizing_and_floats_pass_through():
    gray = np.random.default_rng(1).random((2, 8, 9))
    (batch,) = check_images(gray).batches(4)
    assert batch[0].shape == (8, 9, 1)  # one channel to resize, not three
    np.testing.assert_allclose(batch[1][..., 0], gray[1], rtol=1e-6)
    (batch,) = check_images(gray[..., None]).batches(4)
    assert batch[0].shape == (8, 9, 1)
    prep = Preprocessing((5, 6), None, (0.1, 0.2, 0.3), (0.5, 0.25, 0.125))
    rgb = prep([np.repeat(b, 3, axis=2) for b in batch], "cpu")
    assert torch.equal(prep(batch, "cpu"), rgb)
    # The public reader gives what the detectors see: RGB.
    assert read_image(Image.fromarray((gray[0] * 255).astype(np.uint8))).shape == (
        8,
        9,
        3,
    )


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


def test_preprocessing_writes_the_batch_in_the_requested_memory_format():
    prep = Preprocessing((12, 10), None, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    rng = np.random.default_rng(3)
    images = [rng.random((9, 14, 3), dtype=np.float32) for _ in range(3)]
    plain = prep(images, "cpu")
    last = prep(images, "cpu", torch.channels_last)
    assert last.is_contiguous(memory_format=torch.channels_last)
    assert plain.is_contiguous()
    torch.testing.assert_close(last, plain, rtol=0, atol=0)
    mean = torch.tensor(prep.mean).view(3, 1, 1)
    std = torch.tensor(prep.std).view(3, 1, 1)
    resized = torch.nn.functional.interpolate(
        torch.from_numpy(images[1]).permute(2, 0, 1)[None],
        size=(12, 10),
        mode="bilinear",
        antialias=True,
        align_corners=False,
    )[0]
    torch.testing.assert_close(last[1], (resized - mean) / std)


@pytest.mark.parametrize("image_size", [(9, 14), (12, 10)])
def test_uint8_frames_are_scaled_in_the_normalising_pass(image_size):
    # Without resizing, uint8 pixels go straight into the batch: x / (255 std)
    # - mean / std, one rounding away from (x / 255 - mean) / std; with
    # resizing they are made float first, exactly as the float path does.
    prep = Preprocessing(image_size, None, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    rng = np.random.default_rng(4)
    pixels = [rng.integers(0, 256, (9, 14, 3), dtype=np.uint8) for _ in range(2)]
    pixels.append(rng.integers(0, 256, (9, 14, 1), dtype=np.uint8))  # grayscale
    floats = [_to_float_pixels(p) for p in pixels]
    got = prep(pixels, "cpu", torch.channels_last)
    want = prep(floats, "cpu", torch.channels_last)
    if image_size == (9, 14):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    else:
        assert torch.equal(got, want)


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


# --- Every input kind and encoding reads the same pixels ----------------------


def _levels(shape):
    """Distinct 8-bit levels in a fixed, asymmetric pattern."""
    return (np.arange(np.prod(shape)).reshape(shape) * 37 % 256).astype(np.uint8)


def _save(image, path, **kwargs):
    image.save(path, **kwargs)
    return path


def _read(X):
    """The pixels of X as the detectors see them: grayscale replicated to RGB
    (which the preprocessing does, after resizing)."""
    batches = check_images(X).batches(2)
    pixels = [_as_rgb(_to_float_pixels(i)) for b in batches for i in b]
    return np.stack(pixels)


def test_colour_inputs_of_every_kind_read_the_same(tmp_path):
    pictures = np.stack([_levels((6, 10, 3)), 255 - _levels((6, 10, 3))])
    expected = pictures.astype(np.float32) / np.float32(255)
    inputs = {
        "png-8": [
            _save(Image.fromarray(p), tmp_path / f"{i}.png")
            for i, p in enumerate(pictures)
        ],
        "pil": [Image.fromarray(p) for p in pictures],
        "uint8": pictures,
        "float64": pictures / 255.0,
        "uint16": pictures.astype(np.uint16) * 257,  # v * 257 / 65535 == v / 255
        "uint16-list": list(pictures.astype(np.uint16) * 257),
    }
    for name, X in inputs.items():
        got = _read(X)
        assert got.dtype == np.float32 and got.shape == (2, 6, 10, 3), name
        np.testing.assert_allclose(got, expected, rtol=0, atol=1e-7, err_msg=name)


def test_grayscale_inputs_of_every_kind_and_depth_read_the_same(tmp_path):
    # Pillow holds 16-bit and float pixels only in single-channel modes.
    pictures = np.stack([_levels((6, 10)), 255 - _levels((6, 10))])
    expected = np.repeat(pictures[..., None], 3, axis=3) / np.float32(255)
    sixteen = pictures.astype(np.uint16) * 257
    floats = pictures.astype(np.float32) / np.float32(255)

    def files(arrays, ext):
        return [
            _save(Image.fromarray(a), tmp_path / f"{a.dtype}-{i}.{ext}")
            for i, a in enumerate(arrays)
        ]

    inputs = {
        "png-8": files(pictures, "png"),
        "png-16": files(sixteen, "png"),
        "tiff-16": files(sixteen, "tiff"),
        "tiff-int32": files(sixteen.astype(np.int32), "tiff"),
        "tiff-float32": files(floats, "tiff"),
        "pil-16": [Image.fromarray(a) for a in sixteen],
        "pil-float32": [Image.fromarray(a) for a in floats],
        "uint8": pictures,
        "uint16": sixteen,
        "float32": floats,
    }
    assert Image.open(inputs["png-16"][0]).mode == "I;16"
    assert Image.open(inputs["tiff-int32"][0]).mode == "I"
    assert Image.open(inputs["tiff-float32"][0]).mode == "F"
    for name, X in inputs.items():
        np.testing.assert_allclose(_read(X), expected, rtol=0, atol=1e-7, err_msg=name)


# --- Shapes and dtypes of arrays ---------------------------------------------


@pytest.mark.parametrize("channels", [3, 4])
def test_a_single_image_without_batch_axis_is_ambiguous(channels):
    image = np.zeros((20, 30, channels), np.uint8)
    with pytest.raises(ValueError, match="Reshape your data") as info:
        check_images(image)
    message = str(info.value)
    assert "X[..., None]" in message and "(20, 30, " in message
    fix = "X[None]" if channels == 3 else "X[None, ..., :3]"
    assert f"pass {fix} (shape (1, 20, 30, 3))" in message
    # The two fixes it suggests are both accepted.
    assert len(check_images(image[..., None])) == 20
    if channels == 3:
        assert len(check_images(image[None])) == 1


def test_three_d_arrays_of_other_widths_are_grayscale_batches():
    for width in (1, 2, 5):
        images = check_images(np.zeros((4, 6, width), np.uint8))
        assert len(images) == 4 and images.shapes == [(6, width)] * 4


def test_list_items_are_single_images_even_when_rgb_shaped():
    images = check_images([np.zeros((20, 30, 3), np.uint8)])
    assert len(images) == 1 and images.shapes == [(20, 30)]


@pytest.mark.parametrize(
    "X",
    [np.zeros((2, 5, 6, 4), np.uint8), [np.zeros((5, 6, 4), np.uint8)]],
    ids=["stack", "list"],
)
def test_arrays_with_alpha_are_refused(X):
    with pytest.raises(ValueError, match=r"C in \{1, 3\}.*\[\.\.\., :3\]"):
        check_images(X)


@pytest.mark.parametrize("dtype", [np.int8, np.int32, np.int64, np.uint32, bool])
def test_integer_dtypes_without_a_full_scale_are_refused(dtype):
    with pytest.raises(TypeError, match="uint8 .*uint16 .*float"):
        check_images(np.zeros((2, 5, 6), dtype))


def test_big_endian_uint16_is_scaled_like_native():
    values = np.array([[0, 257, 65535]], ">u2")
    (batch,) = check_images(values[None, :, :, None]).batches(1)
    np.testing.assert_allclose(batch[0][0, :, 0], [0, 1 / 255, 1], rtol=1e-7)


# --- Every Pillow mode, from a PIL image and from a file -------------------------


def _mode_image(mode, values, palette=None):
    image = Image.new(mode, (len(values), 1))
    for x, value in enumerate(values):
        image.putpixel((x, 0), value)
    if palette is not None:
        image.putpalette(palette)
    return image


def _sixteen_bit(mode, dtype):
    values = np.array([0, 13107, 65535], dtype)
    return Image.frombytes(mode, (3, 1), values.tobytes())


GRAY = ("gray",)
# mode -> (image, expected RGB row written by hand, tolerance, file format or None)
MODES = {
    "1": (_mode_image("1", [0, 1, 0]), [GRAY, 0, 1, 0], 0, "png"),
    "L": (_mode_image("L", [0, 51, 255]), [GRAY, 0, 0.2, 1], 0, "png"),
    "P": (
        _mode_image("P", [0, 1, 1], [255, 0, 0, 0, 0, 255]),
        [(1, 0, 0), (0, 0, 1), (0, 0, 1)],
        0,
        "png",
    ),
    "PA": (
        _mode_image("PA", [(0, 0), (1, 255), (1, 9)], [255, 0, 0, 0, 0, 255]),
        [(1, 0, 0), (0, 0, 1), (0, 0, 1)],
        0,
        None,
    ),
    "LA": (
        _mode_image("LA", [(51, 0), (255, 9), (0, 255)]),
        [GRAY, 0.2, 1, 0],
        0,
        "png",
    ),
    # Premultiplied: 50 at alpha 128 is 50 * 255 / 128 = 99.6 un-premultiplied.
    "La": (
        _mode_image("La", [(50, 128), (0, 0), (255, 255)]),
        [GRAY, 99.6 / 255, 0, 1],
        1 / 255,
        None,
    ),
    "RGB": (_mode_image("RGB", [(255, 0, 51)] * 3), [(1, 0, 0.2)] * 3, 0, "png"),
    "RGBA": (
        _mode_image("RGBA", [(255, 0, 51, 0), (0, 255, 0, 128), (0, 0, 0, 255)]),
        [(1, 0, 0.2), (0, 1, 0), (0, 0, 0)],
        0,
        "png",
    ),
    "RGBX": (_mode_image("RGBX", [(255, 0, 51, 0)] * 3), [(1, 0, 0.2)] * 3, 0, None),
    "RGBa": (
        _mode_image("RGBa", [(100, 50, 0, 128), (0, 0, 0, 0), (255, 255, 255, 255)]),
        [(199.2 / 255, 99.6 / 255, 0), (0, 0, 0), (1, 1, 1)],
        1 / 255,
        None,
    ),
    "CMYK": (
        _mode_image("CMYK", [(0, 0, 0, 0), (255, 0, 0, 0), (0, 0, 0, 255)]),
        [(1, 1, 1), (0, 1, 1), (0, 0, 0)],
        0,
        "tiff",
    ),
    "YCbCr": (
        _mode_image("YCbCr", [(51, 128, 128), (255, 128, 128), (0, 128, 128)]),
        [GRAY, 0.2, 1, 0],
        1 / 255,
        "tiff",
    ),
    "LAB": (
        _mode_image("LAB", [(0, 128, 128), (255, 128, 128), (0, 128, 128)]),
        [GRAY, 0, 1, 0],
        2 / 255,
        "tiff",
    ),
    "HSV": (
        _mode_image("HSV", [(0, 255, 255), (85, 255, 255), (0, 0, 51)]),
        [(1, 0, 0), (0, 1, 0), (0.2, 0.2, 0.2)],
        0,
        None,
    ),
    "I;16": (_sixteen_bit("I;16", "<u2"), [GRAY, 0, 0.2, 1], 0, "png"),
    "I;16L": (_sixteen_bit("I;16L", "<u2"), [GRAY, 0, 0.2, 1], 0, None),
    "I;16B": (_sixteen_bit("I;16B", ">u2"), [GRAY, 0, 0.2, 1], 0, "tiff"),
    "I;16N": (_sixteen_bit("I;16N", "=u2"), [GRAY, 0, 0.2, 1], 0, None),
    "I": (_mode_image("I", [0, 13107, 65535]), [GRAY, 0, 0.2, 1], 0, "tiff"),
    "F": (_mode_image("F", [0.0, 0.2, 1.0]), [GRAY, 0, np.float32(0.2), 1], 0, "tiff"),
}


def _expected_row(row):
    if row[0] == GRAY:
        return np.repeat(np.array(row[1:], np.float64)[:, None], 3, axis=1)
    return np.array(row, np.float64)


def test_the_mode_table_covers_every_pillow_mode():
    assert set(MODES) == set(Image.MODES)


@pytest.mark.parametrize("mode", sorted(MODES))
def test_every_pillow_mode_is_read_at_full_fidelity(mode, tmp_path):
    image, row, atol, file_format = MODES[mode]
    assert image.mode == mode
    sources = {"pil": [image]}
    if file_format is not None:
        path = _save(image, tmp_path / f"image.{file_format}")
        with Image.open(path) as reread:
            assert reread.mode == mode  # the file really stores this mode
        sources["file"] = [path]
        sources["lazy pil"] = [Image.open(path)]
    for name, X in sources.items():
        got = _read(X)[0]
        assert got.shape == (1, 3, 3) and got.dtype == np.float32, name
        np.testing.assert_allclose(
            got[0], _expected_row(row), rtol=0, atol=atol + 1e-7, err_msg=name
        )


@pytest.mark.parametrize(
    "mode, values, match",
    [
        ("I", [0, 65536], r"0-65535; got values in \[0, 65536\]"),
        ("I", [-1, 5], r"0-65535; got values in \[-1, 5\]"),
        ("F", [0.0, 1.5], r"in \[0, 1\]; got values in \[0, 1\.5\]"),
        ("F", [-0.25, 0.5], r"in \[0, 1\]; got values in \[-0\.25, 0\.5\]"),
        ("F", [0.0, float("nan")], "NaN or infinity"),
    ],
)
def test_pixels_outside_the_documented_range_name_the_file(
    mode, values, match, tmp_path
):
    path = _save(_mode_image(mode, values), tmp_path / "odd.tiff")
    with pytest.raises(ValueError, match=match) as info:
        _read([path])
    assert "odd.tiff" in str(info.value)
    with pytest.raises(ValueError, match=match):
        _read([_mode_image(mode, values)])


# --- EXIF orientation ------------------------------------------------------------

# How a camera stores an upright picture under each EXIF Orientation value
# (EXIF 2.3, tag 0x0112); e.g. 6: "the 0th row is the visual right-hand side
# and the 0th column the visual top", i.e. turned 90 degrees anticlockwise.
STORED = {
    1: lambda a: a,
    2: lambda a: a[:, ::-1],
    3: lambda a: a[::-1, ::-1],
    4: lambda a: a[::-1],
    5: lambda a: a.swapaxes(0, 1),
    6: lambda a: np.rot90(a, 1),
    7: lambda a: np.rot90(a, 2).swapaxes(0, 1),
    8: lambda a: np.rot90(a, -1),
}


def _with_orientation(array, orientation, path, **kwargs):
    exif = Image.Exif()
    exif[ExifTags.Base.Orientation] = orientation
    return _save(
        Image.fromarray(np.ascontiguousarray(array)), path, exif=exif, **kwargs
    )


@pytest.mark.parametrize("orientation", sorted(STORED))
def test_exif_orientation_is_applied_to_pixels_and_shapes(orientation, tmp_path):
    upright = _levels((4, 7, 3))
    path = _with_orientation(
        STORED[orientation](upright), orientation, tmp_path / "o.png"
    )
    expected = upright / np.float32(255)
    # Pillow's own reading of the tag, as a second reference.
    with Image.open(path) as image:
        shown = np.asarray(ImageOps.exif_transpose(image))
    np.testing.assert_array_equal(shown, upright)
    for X in ([path], [Image.open(path)], [Image.open(path).copy()]):
        images = check_images(X)
        assert images.image_shapes() == [(4, 7)]
        np.testing.assert_allclose(_read(images)[0], expected, rtol=0, atol=1e-7)
    assert read_image_shape(path) == (4, 7)


def test_exif_orientation_of_a_jpeg(tmp_path):
    upright = np.zeros((16, 32), np.uint8)
    upright[:8, :8] = 255  # a white block in the top-left corner
    path = _with_orientation(np.rot90(upright, 1), 6, tmp_path / "o.jpg", quality=95)
    (got,) = _read([path])
    assert got.shape == (16, 32, 3)
    np.testing.assert_allclose(got[..., 0], upright / 255.0, atol=0.1)


def test_checking_decodes_no_pixels(tmp_path, monkeypatch):
    path = _with_orientation(_levels((4, 7, 3)), 6, tmp_path / "o.png")
    lazy = Image.open(path)

    def no_decoding(*args):
        raise AssertionError("pixels were decoded")

    monkeypatch.setattr(ImageFile.ImageFile, "load", no_decoding)
    assert check_images([lazy]).image_shapes() == [(7, 4)]
    assert check_images([path]).image_shapes() == [(7, 4)]  # headers only
    monkeypatch.setattr(Image, "open", no_decoding)
    check_images([path, str(path)])  # not even opened


# --- Errors ----------------------------------------------------------------------

# What Pillow and its format plugins raise while opening or decoding.
PILLOW_ERRORS = [
    UnidentifiedImageError("cannot identify image file"),
    Image.DecompressionBombError("Image size (9 pixels) exceeds limit"),
    SyntaxError("not a TIFF file"),
    OSError("image file is truncated"),
    ValueError("tile cannot extend outside image"),
    EOFError("no more images in file"),
    struct.error("unpack requires a buffer of 4 bytes"),
    zlib.error("Error -3 while decompressing data"),
    KeyError("unknown raw mode"),
    TypeError("an integer is required"),
    IndexError("list index out of range"),
]


@pytest.mark.parametrize("error", PILLOW_ERRORS, ids=lambda e: type(e).__name__)
def test_every_decoding_error_names_the_file(error, tmp_path, monkeypatch):
    path = _save(Image.new("RGB", (4, 4)), tmp_path / "picture.png")

    def failing_open(*args, **kwargs):
        raise error

    monkeypatch.setattr(Image, "open", failing_open)
    images = check_images([path, path])
    pattern = r"Could not read image file '.*picture\.png': expected an image"
    for read in (_read, lambda X: X.image_shapes()):
        with pytest.raises(ValueError, match=pattern) as info:
            read(images)
        assert type(error).__name__ in str(info.value)
        assert info.value.__cause__ is error


def test_a_truncated_file_is_named(tmp_path):
    noise = np.random.default_rng(0).integers(0, 256, (64, 64, 3), np.uint8)
    path = _save(Image.fromarray(noise), tmp_path / "cut.png")
    path.write_bytes(path.read_bytes()[:2000])  # of about 12 kB
    images = check_images([path])
    assert images.image_shapes() == [(64, 64)]  # the header survived
    with pytest.raises(ValueError, match=r"Could not read image file '.*cut\.png'"):
        _read(images)
    with pytest.raises(ValueError, match=r"PIL image from file '.*cut\.png'"):
        _read([Image.open(path)])


def test_a_file_that_is_no_image_is_named(tmp_path):
    path = tmp_path / "notes.png"
    path.write_bytes(b"just some text, not a picture")
    with pytest.raises(ValueError, match=r"notes\.png.*UnidentifiedImageError"):
        _read([path])


def test_the_decompression_bomb_limit_is_named(tmp_path, monkeypatch):
    path = _save(Image.new("L", (8, 8)), tmp_path / "big.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 10)  # 64 > 2 * 10 pixels
    pattern = r"big\.png.*DecompressionBombError.*MAX_IMAGE_PIXELS = 10"
    with pytest.raises(ValueError, match=pattern):
        _read([path])
    with pytest.raises(ValueError, match=pattern):
        check_images([path]).image_shapes()


def test_a_file_the_system_cannot_read_raises_its_os_error(tmp_path):
    path = _save(Image.new("L", (4, 4)), tmp_path / "gone.png")
    images = check_images([path])
    path.unlink()  # deleted between checking and reading
    with pytest.raises(FileNotFoundError, match=r"gone\.png"):
        _read(images)


# --- Empty images ----------------------------------------------------------------


@pytest.mark.parametrize(
    "X, match",
    [
        (
            [np.zeros((4, 4, 3)), np.zeros((0, 5, 3))],
            r"Image 1 of the list is empty: shape \(0, 5, 3\)",
        ),
        (
            [np.zeros((4, 4)), np.zeros((4, 0), np.uint8)],
            r"Image 1 of the list is empty",
        ),
        # Shapes are checked before any pixel range, so the bad range of item 0 waits.
        ([np.full((4, 4), 2.0), np.zeros((0, 5))], r"Image 1 of the list is empty"),
        (
            [Image.new("RGB", (4, 4)), Image.new("RGB", (0, 5))],
            r"PIL image 1 of the list is empty: size 0x5",
        ),
        (np.zeros((2, 0, 5, 3), np.uint8), r"at least 1x1 pixels"),
    ],
    ids=["array-item", "gray-item", "before-ranges", "pil-item", "stack"],
)
def test_empty_images_are_named_at_check_time(X, match):
    with pytest.raises(ValueError, match=match):
        check_images(X)


def test_read_image_reads_one_file_or_pil_image_upright(tmp_path):
    upright = np.array([[0, 257, 65535], [13107, 0, 0]], np.uint16)
    path = _with_orientation(np.rot90(upright, 1), 6, tmp_path / "one.png")
    expected = np.repeat(upright[..., None] / 65535.0, 3, axis=2)
    for source in (path, str(path), Image.open(path)):
        got = read_image(source)
        assert got.shape == (2, 3, 3) and got.dtype == np.float32
        np.testing.assert_allclose(got, expected, rtol=0, atol=1e-7)
