"""Tests of skpadim.datasets: folder loaders, ELPV and synthetic defects."""

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from skpadim.datasets import (
    MVTEC_AD_CATEGORIES,
    SYNTHETIC_DEFECT_KINDS,
    add_synthetic_defect,
    load_elpv,
    load_image_folder,
    load_mask,
    load_mvtec_ad,
    make_synthetic_defects,
)


def _write_png(path, array):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.asarray(array, dtype=np.uint8)).save(path)


def _write_image(path, value=100):
    _write_png(path, np.full((8, 8, 3), value))


# --------------------------------------------------------------------------
# MVTec AD layout
# --------------------------------------------------------------------------


@pytest.fixture
def mvtec_root(tmp_path):
    """A two-category MVTec tree: widget is complete, other only has train."""
    root = tmp_path / "mvtec"
    widget = root / "widget"
    for name in ("001.png", "000.png", "002.png"):
        _write_image(widget / "train" / "good" / name)
    for name in ("000.png", "001.png"):
        _write_image(widget / "test" / "good" / name)
        _write_image(widget / "test" / "crack" / name, value=30)
        mask = np.zeros((8, 8))
        mask[2:4, 3:6] = 255
        _write_png(
            widget / "ground_truth" / "crack" / name.replace(".", "_mask."), mask
        )
    # Files the loader must ignore: wrong suffix, hidden file.
    (widget / "train" / "good" / "notes.txt").write_text("not an image")
    _write_image(widget / "train" / "good" / ".hidden.png")
    _write_image(root / "other" / "train" / "good" / "000.png")
    return root


def test_load_mvtec_ad_fields(mvtec_root):
    data = load_mvtec_ad(mvtec_root, "widget")
    widget = mvtec_root / "widget"
    assert data.train_paths == [
        str(widget / "train" / "good" / f"00{i}.png") for i in range(3)
    ]
    assert data.test_paths == [
        str(widget / "test" / "crack" / "000.png"),
        str(widget / "test" / "crack" / "001.png"),
        str(widget / "test" / "good" / "000.png"),
        str(widget / "test" / "good" / "001.png"),
    ]
    assert data.test_labels.dtype == np.int64
    assert data.test_labels.tolist() == [-1, -1, 1, 1]
    assert data.test_defect_types == ["crack", "crack", "good", "good"]
    gt = widget / "ground_truth" / "crack"
    assert data.test_mask_paths == [
        str(gt / "000_mask.png"),
        str(gt / "001_mask.png"),
        None,
        None,
    ]
    assert data.category == "widget"
    assert data.root == str(mvtec_root)


def test_load_mask(mvtec_root, tmp_path):
    data = load_mvtec_ad(mvtec_root, "widget")
    mask = load_mask(data.test_mask_paths[0], (8, 8, 3))
    assert mask.dtype == bool and mask.shape == (8, 8)
    expected = np.zeros((8, 8), dtype=bool)
    expected[2:4, 3:6] = True
    np.testing.assert_array_equal(mask, expected)
    empty = load_mask(None, (8, 8))
    assert empty.dtype == bool and not empty.any()
    # Masks stored as 0/1 rather than 0/255 are read too.
    _write_png(tmp_path / "binary.png", expected)
    np.testing.assert_array_equal(load_mask(tmp_path / "binary.png"), expected)


def test_load_mask_errors(mvtec_root):
    with pytest.raises(ValueError, match="needs shape"):
        load_mask(None)
    path = mvtec_root / "widget" / "ground_truth" / "crack" / "000_mask.png"
    with pytest.raises(ValueError, match=r"shape \(8, 8\); expected \(4, 4\)"):
        load_mask(path, (4, 4))


def test_load_mvtec_ad_errors(mvtec_root, tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_mvtec_ad(tmp_path / "nowhere", "widget")
    with pytest.raises(ValueError, match=r"found categories: \['other', 'widget'\]"):
        load_mvtec_ad(mvtec_root, "bottle")
    (mvtec_root / "widget" / "ground_truth" / "crack" / "001_mask.png").unlink()
    with pytest.raises(FileNotFoundError, match="001_mask.png"):
        load_mvtec_ad(mvtec_root, "widget")
    # "other" has training images but no test folder.
    with pytest.raises(ValueError, match="no test images"):
        load_mvtec_ad(mvtec_root, "other")
    _write_image(mvtec_root / "empty" / "test" / "good" / "000.png")
    (mvtec_root / "empty" / "train" / "good").mkdir(parents=True)
    with pytest.raises(ValueError, match="no training images"):
        load_mvtec_ad(mvtec_root, "empty")


def test_mvtec_categories():
    assert len(MVTEC_AD_CATEGORIES) == 15
    assert {"bottle", "metal_nut", "zipper"} <= set(MVTEC_AD_CATEGORIES)


# --------------------------------------------------------------------------
# Image folders
# --------------------------------------------------------------------------


def test_load_image_folder_classes(tmp_path):
    for rel in ("good/a.png", "good/b.JPG", "scratch/c.png", "dent/d.bmp"):
        _write_image(tmp_path / rel)
    (tmp_path / "good" / "readme.md").write_text("skip me")
    (tmp_path / "empty").mkdir()
    data = load_image_folder(tmp_path)
    assert data.paths == sorted(data.paths)
    assert [Path(p).name for p in data.paths] == ["d.bmp", "a.png", "b.JPG", "c.png"]
    assert data.labels.tolist() == [-1, 1, 1, -1]
    assert data.defect_types == ["dent", "good", "good", "scratch"]
    only_png = load_image_folder(tmp_path, extensions=("png",))
    assert [Path(p).name for p in only_png.paths] == ["a.png", "c.png"]
    no_normal = load_image_folder(tmp_path, normal=None)
    assert (no_normal.labels == -1).all()


def test_load_image_folder_all_normal(tmp_path):
    _write_image(tmp_path / "nested" / "ok" / "a.png")
    _write_image(tmp_path / "nested" / "ok" / "b.png")
    data = load_image_folder(tmp_path / "nested", normal="ok")
    assert data.labels.tolist() == [1, 1]
    assert data.defect_types == ["ok", "ok"]
    # A flat folder of images is normal too.
    flat = load_image_folder(tmp_path / "nested" / "ok")
    assert flat.labels.tolist() == [1, 1] and flat.defect_types == ["good", "good"]


def test_load_image_folder_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_image_folder(tmp_path / "missing")
    (tmp_path / "good").mkdir()
    with pytest.raises(ValueError, match="no images found"):
        load_image_folder(tmp_path)
    _write_image(tmp_path / "ok" / "a.png")
    _write_image(tmp_path / "scratch" / "b.png")
    with pytest.raises(ValueError, match=r"found sub-folders \['ok', 'scratch'\]"):
        load_image_folder(tmp_path, normal="normal")
    _write_image(tmp_path / "loose.png")
    with pytest.raises(ValueError, match="both directly and in the sub-folders"):
        load_image_folder(tmp_path)
    with pytest.raises(ValueError, match="extensions"):
        load_image_folder(tmp_path, extensions=())


# --------------------------------------------------------------------------
# ELPV
# --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def elpv_table():
    """labels.csv as parsed independently of skpadim."""
    elpv_dataset = pytest.importorskip("elpv_dataset")
    csv = Path(elpv_dataset.__file__).parent / "data" / "labels.csv"
    table = np.genfromtxt(csv, dtype=None, encoding="utf-8")
    proba = np.array([row[1] for row in table])
    types = np.array([row[2] for row in table])
    return proba, types


def test_load_elpv_counts(elpv_table):
    proba, types = elpv_table
    data = load_elpv()
    n_normal, n_defect = (proba == 0).sum(), (proba >= 0.5).sum()
    assert (data.labels == 1).sum() == n_normal
    assert (data.labels == -1).sum() == n_defect
    assert len(data.paths) == len(data.labels) == n_normal + n_defect
    assert set(np.unique(data.defect_probability)) == {0.0, 2 / 3, 1.0}
    assert all(Path(p).is_absolute() and Path(p).is_file() for p in data.paths)
    assert f"{n_normal} normal (+1)" in data.DESCR


def test_load_elpv_thresholds(elpv_table):
    proba, _ = elpv_table
    strict = load_elpv(min_defect_probability=1.0)
    assert (strict.labels == -1).sum() == (proba == 1).sum()
    assert set(np.unique(strict.defect_probability)) == {0.0, 1.0}
    everything = load_elpv(uncertain="normal")
    assert len(everything.paths) == len(proba)
    assert (everything.labels == -1).sum() == (proba >= 0.5).sum()
    pessimistic = load_elpv(uncertain="anomalous")
    assert (pessimistic.labels == -1).sum() == (proba > 0).sum()


def test_load_elpv_cell_type(elpv_table):
    proba, types = elpv_table
    mono = load_elpv(cell_type="mono")
    assert (mono.cell_type == "mono").all()
    assert (mono.labels == 1).sum() == ((proba == 0) & (types == "mono")).sum()
    poly = load_elpv(cell_type="poly")
    assert len(mono.paths) + len(poly.paths) == len(load_elpv().paths)
    with Image.open(mono.paths[0]) as img:
        assert img.size == (300, 300) and img.mode == "L"


def test_load_elpv_errors(monkeypatch):
    with pytest.raises(ValueError, match="min_defect_probability"):
        load_elpv(min_defect_probability=0)
    with pytest.raises(ValueError, match="uncertain must be one of"):
        load_elpv(uncertain="keep")
    with pytest.raises(ValueError, match="cell_type must be"):
        load_elpv(cell_type="amorphous")
    # A None entry in sys.modules makes the import fail as if not installed.
    monkeypatch.setitem(__import__("sys").modules, "elpv_dataset", None)
    with pytest.raises(ImportError, match=r"pip install skpadim\[elpv\]"):
        load_elpv()


# --------------------------------------------------------------------------
# Synthetic defects
# --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def synthetic():
    pytest.importorskip("skimage")
    return make_synthetic_defects(4, 9, image_size=64, random_state=0)


def test_make_synthetic_defects_shapes(synthetic):
    assert synthetic.images.shape == (13, 64, 64, 3)
    assert synthetic.images.dtype == np.uint8
    assert synthetic.masks.shape == (13, 64, 64) and synthetic.masks.dtype == bool
    assert synthetic.labels.tolist() == [1] * 4 + [-1] * 9
    assert synthetic.defect_types == ["good"] * 4 + list(SYNTHETIC_DEFECT_KINDS) * 3
    # Grayscale texture replicated to RGB.
    np.testing.assert_array_equal(synthetic.images[..., 0], synthetic.images[..., 2])


def test_make_synthetic_defects_masks(synthetic):
    has_defect = synthetic.masks.any(axis=(1, 2))
    np.testing.assert_array_equal(has_defect, synthetic.labels == -1)
    area = synthetic.masks[synthetic.labels == -1].mean(axis=(1, 2))
    assert ((area >= 0.01) & (area <= 0.10)).all(), area


def test_make_synthetic_defects_reproducible(synthetic):
    again = make_synthetic_defects(4, 9, image_size=64, random_state=0)
    np.testing.assert_array_equal(again.images, synthetic.images)
    np.testing.assert_array_equal(again.masks, synthetic.masks)
    other = make_synthetic_defects(4, 9, image_size=64, random_state=1)
    assert not np.array_equal(other.images, synthetic.images)
    assert not np.array_equal(other.masks, synthetic.masks)


def test_make_synthetic_defects_array_texture():
    texture = np.random.RandomState(0).randint(0, 256, (80, 90), dtype=np.uint8)
    data = make_synthetic_defects(
        2, 2, texture=texture, image_size=32, defect_types=["scratch"], random_state=0
    )
    assert data.images.shape == (4, 32, 32, 3)
    assert data.defect_types == ["good", "good", "scratch", "scratch"]


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"n_normal": -1}, "n_normal must be a non-negative int"),
        ({"n_normal": 0, "n_anomalous": 0}, "at least 1"),
        ({"texture": "marble"}, "texture must be one of"),
        ({"texture": np.zeros((64, 64), dtype=float)}, "uint8"),
        ({"image_size": 1000}, "image_size must be an int between 32"),
        ({"defect_types": ("patch", "dent")}, "defect_types must be"),
    ],
)
def test_make_synthetic_defects_errors(kwargs, match):
    pytest.importorskip("skimage")
    params = {"n_normal": 1, "n_anomalous": 1, **kwargs}
    with pytest.raises(ValueError, match=match):
        make_synthetic_defects(
            params.pop("n_normal"), params.pop("n_anomalous"), **params
        )


@pytest.mark.parametrize("kind", SYNTHETIC_DEFECT_KINDS)
@pytest.mark.parametrize("shape", [(96, 96), (64, 80, 3)])
def test_add_synthetic_defect_is_exact(kind, shape):
    rng = np.random.RandomState(42)
    # A smooth ramp plus noise: mid-grey values, so bright and dark defects
    # both have room to change pixels.
    base = 60 + 100 * np.linspace(0, 1, shape[1]) + rng.normal(0, 10, shape[:2])
    image = np.clip(base, 0, 255).astype(np.uint8)
    if len(shape) == 3:
        image = np.repeat(image[..., None], shape[2], axis=2)
    original = image.copy()
    for seed in range(5):
        defective, mask = add_synthetic_defect(image, kind=kind, random_state=seed)
        assert defective.shape == image.shape and defective.dtype == np.uint8
        assert mask.shape == shape[:2] and mask.dtype == bool
        np.testing.assert_array_equal(defective[~mask], image[~mask])
        change = np.abs(defective[mask].astype(int) - image[mask]).mean()
        assert change > 10, (kind, seed, change)
        assert 0.01 <= mask.mean() <= 0.10
    # The input is left untouched, and a seed fixes the result.
    np.testing.assert_array_equal(image, original)
    first = add_synthetic_defect(image, kind=kind, random_state=7)
    second = add_synthetic_defect(image, kind=kind, random_state=7)
    np.testing.assert_array_equal(first[0], second[0])
    np.testing.assert_array_equal(first[1], second[1])


def test_add_synthetic_defect_errors():
    image = np.zeros((64, 64), dtype=np.uint8)
    with pytest.raises(ValueError, match="kind must be one of"):
        add_synthetic_defect(image, kind="crack")
    with pytest.raises(ValueError, match="at least 32 pixels"):
        add_synthetic_defect(image[:16], kind="blob")
    with pytest.raises(ValueError, match="uint8"):
        add_synthetic_defect(image.astype(float), kind="blob")
