
import numpy as np
import pytest

from infusion_audit.config import PluginSpec
from infusion_audit.data import (DatasetSplit, ImageDataset, build_dataset, cifar10, digits, load_npz,
                                 load_png_folder, load_suspect, read_manifest, save_npz, save_png_folder,
                                 write_poisoned)
from infusion_audit.errors import DataError


def test_digits_split_is_fixed_and_on_the_grid():
    a, b = digits(), digits()
    assert len(a.train) == 1438 and len(a.test) == 359
    np.testing.assert_array_equal(a.train.y, b.train.y)
    assert a.train.grid == 1 / 16 and a.train.value_range == (0.0, 1.0)
    assert np.allclose(a.train.x * 16, np.round(a.train.x * 16))
    assert a.train.input_shape == (1, 8, 8)
    assert digits(seed=1).train.content_hash() != a.train.content_hash()


def test_quantize_rounds_to_grid_and_clips():
    ds = digits().train
    q = ds.quantize(np.array([-0.2, 0.03, 0.04, 1.3], dtype=np.float32))
    np.testing.assert_allclose(q, [0.0, 0.0625 * 0, 0.0625, 1.0], atol=1e-7)


def test_npz_round_trip_uint8_and_float(tmp_path):
    rng = np.random.default_rng(0)
    x8 = rng.integers(0, 256, size=(6, 3, 4, 4), dtype=np.uint8)
    y = np.arange(6) % 3
    np.savez(tmp_path / "u8.npz", x=x8, y=y)
    ds = load_npz(tmp_path / "u8.npz")
    assert ds.grid == pytest.approx(1 / 255) and ds.num_classes == 3
    save_npz(tmp_path / "again.npz", ds)
    with np.load(tmp_path / "again.npz") as f:
        assert f["x"].dtype == np.uint8
        np.testing.assert_array_equal(f["x"], x8)
    grey = digits().train.subset(range(5))
    save_npz(tmp_path / "f.npz", grey)
    back = load_npz(tmp_path / "f.npz", num_classes=10)
    np.testing.assert_array_equal(back.x, grey.x)
    np.testing.assert_array_equal(back.y, grey.y)


def test_png_folder_round_trip_keeps_8bit_values(tmp_path):
    rng = np.random.default_rng(1)
    x = rng.integers(0, 256, size=(5, 3, 6, 6)).astype(np.float32) / 255
    ds = ImageDataset(x, np.array([0, 1, 1, 0, 1]), num_classes=2, grid=1 / 255, class_names=["cat", "dog"])
    save_png_folder(tmp_path / "png", ds)
    back = load_png_folder(tmp_path / "png")
    assert back.class_names == ["cat", "dog"]
    # the folder groups by class; compare as multisets per class
    for c in (0, 1):
        a = np.sort(ds.x[ds.y == c].reshape((ds.y == c).sum(), -1), axis=0)
        b = np.sort(back.x[back.y == c].reshape((back.y == c).sum(), -1), axis=0)
        np.testing.assert_allclose(a, b, atol=1e-6)
    grey = digits().train.subset(range(4))
    save_png_folder(tmp_path / "grey", grey)
    assert load_png_folder(tmp_path / "grey").input_shape == (1, 8, 8)


def test_npz_with_pickled_objects_is_refused(tmp_path):
    np.savez(tmp_path / "evil.npz", x=np.array([object()], dtype=object), y=np.array([0]))
    with pytest.raises(DataError, match="pickled objects"):
        load_npz(tmp_path / "evil.npz")


@pytest.mark.parametrize("x, y, message", [
    (np.zeros((4, 8, 8, 8, 1), np.float32), np.zeros(4, int), "shape"),
    (np.full((4, 1, 8, 8), np.nan, np.float32), np.zeros(4, int), "NaN"),
    (np.zeros((4, 1, 8, 8), np.float32), np.zeros(3, int), "labels must have shape"),
    (np.zeros((4, 1, 8, 8), np.float32), np.array([0, 1, 2, -1]), "labels must lie"),
    (np.zeros((4, 1, 8, 8), np.float32), np.array([0.5, 1, 2, 1]), "integers"),
    (np.zeros((4, 1, 8, 8), np.int32), np.zeros(4, int), "uint8 or float"),
])
def test_bad_arrays_give_one_line_errors(tmp_path, x, y, message):
    np.savez(tmp_path / "bad.npz", x=x, y=y)
    with pytest.raises(DataError, match=message) as info:
        load_npz(tmp_path / "bad.npz")
    assert "\n" not in str(info.value)


def test_corrupt_or_incomplete_files(tmp_path):
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(DataError, match="not a readable"):
        load_npz(tmp_path / "junk.npz")
    np.savez(tmp_path / "nox.npz", y=np.zeros(3))
    with pytest.raises(DataError, match="missing array"):
        load_npz(tmp_path / "nox.npz")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no class sub-folders"):
        load_png_folder(tmp_path / "empty")
    (tmp_path / "empty" / "a").mkdir()
    with pytest.raises(DataError, match="no PNG files"):
        load_png_folder(tmp_path / "empty")
    (tmp_path / "empty" / "a" / "x.png").write_bytes(b"\x89PNG broken")
    with pytest.raises(DataError, match="not a readable PNG"):
        load_png_folder(tmp_path / "empty")


def test_cifar10_loader_reads_the_official_format(cifar10_root):
    split = cifar10(str(cifar10_root), validation=10)
    assert len(split.train) == 50 and len(split.test) == 10
    assert split.train.input_shape == (3, 32, 32) and split.train.grid == pytest.approx(1 / 255)
    assert split.train.class_names[0] == "airplane"
    full = cifar10(str(cifar10_root), use_test_set=True)
    assert len(full.train) == 60 and len(full.test) == 12
    assert len(load_suspect(cifar10_root)) == 60


def test_modified_cifar10_batch_is_refused_not_unpickled(cifar10_root):
    batch = cifar10_root / "cifar-10-batches-py" / "data_batch_1"
    batch.write_bytes(batch.read_bytes() + b"tampered")
    with pytest.raises(DataError, match="checksum"):
        cifar10(str(cifar10_root))


def test_write_poisoned_manifest_and_overlay(tmp_path):
    clean = digits().train
    idx = [5, 2, 9]
    new_x = clean.quantize(clean.x[idx] + 1 / 16)
    poisoned = clean.with_documents(idx, new_x)
    assert len(poisoned) == len(clean) and clean.x[2].sum() != poisoned.x[2].sum()
    path = write_poisoned(tmp_path / "p", clean, poisoned, idx, config={"attack": "test"})
    manifest = read_manifest(path)
    assert manifest["poisoned_indices"] == [2, 5, 9]
    assert max(manifest["norms"]["linf"]) <= 1 / 16 + 1e-6
    assert manifest["hashes"]["poisoned"] == poisoned.content_hash() != manifest["hashes"]["clean"]
    reloaded = load_npz(tmp_path / "p" / "poisoned.npz", num_classes=10)
    np.testing.assert_allclose(reloaded.x, poisoned.x)
    with np.load(tmp_path / "p" / "documents.npz") as docs:
        np.testing.assert_array_equal(docs["index"], [2, 5, 9])
    with pytest.raises(DataError, match="manifest"):
        (tmp_path / "m.json").write_text("[1, 2]")
        read_manifest(tmp_path / "m.json")


def test_user_dataset_callable(tmp_path, monkeypatch):
    pkg = tmp_path / "myteam"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "data.py").write_text(
        "import numpy as np\n"
        "from infusion_audit.data import DatasetSplit, ImageDataset\n"
        "def make(n=20):\n"
        "    x = np.zeros((n, 1, 4, 4), np.float32); y = np.arange(n) % 2\n"
        "    ds = ImageDataset(x, y, num_classes=2)\n"
        "    return DatasetSplit(ds, ds)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    split = build_dataset(PluginSpec("myteam.data:make", {"n": 6}))
    assert isinstance(split, DatasetSplit) and len(split.train) == 6
