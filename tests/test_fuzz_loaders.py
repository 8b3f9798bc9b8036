"""Fuzzing the suspect-data loaders: every generated file either loads as a valid dataset or is refused
with a one-line DataError (exit 2 on the command line): never another exception, never code executed.

Each loader sees over 1,000 distinct generated inputs per run (the count is asserted): truncations,
bit flips and overwritten spans of valid files, rewritten .npy headers (odd dtypes, object arrays,
huge, negative and mismatched shapes, bad versions, unparsable text), pickle payloads, and PNG folders
with nested or empty folders, other formats named .png, 16-bit and palette images, mixed sizes and
headers that declare decompression bombs.
"""

from __future__ import annotations

import functools
import hashlib
import io
import struct
import subprocess
import sys
import tempfile
import zipfile
import zlib
from pathlib import Path

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from numpy.lib import format as npy
from PIL import Image

from infusion_audit.data import ImageDataset, load_npz, load_png_folder
from infusion_audit.errors import DataError

EXAMPLES = 1200  # generated per loader; the tests assert at least 1,000 of them are distinct files
FUZZ = settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
                suppress_health_check=list(HealthCheck))


def check_outcome(load, path: Path) -> str:
    """Load `path`: a valid dataset, or a one-line DataError; anything else fails the test."""
    try:
        ds = load(path)
    except DataError as exc:
        assert "\n" not in str(exc) and str(exc), repr(exc)
        return "refused"
    assert isinstance(ds, ImageDataset) and ds.x.ndim == 4 and ds.x.dtype == np.float32 and len(ds) > 0
    assert np.isfinite(ds.x).all() and ds.y.min() >= 0 and ds.y.max() < ds.num_classes
    return "loaded"


# --------------------------------------------------------------------------- .npz files
class Hostile:
    """Unpickling this creates a file: proof that code ran."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def npy_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=array.dtype.hasobject)
    return buf.getvalue()


def raw_npy(header: dict | str, data: bytes, version: tuple[int, int] = (1, 0)) -> bytes:
    """A .npy stream with any header: a dict (written as numpy writes it) or raw header text."""
    if isinstance(header, dict):
        buf = io.BytesIO()
        (npy.write_array_header_1_0 if version == (1, 0) else npy.write_array_header_2_0)(buf, header)
        return buf.getvalue() + data
    text = header.encode("latin1", "replace")
    length = struct.pack("<H", len(text)) if version == (1, 0) else struct.pack("<I", len(text))
    return npy.magic(*version) + length + text + data


def zip_bytes(members: dict[str, bytes], compressed: bool) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED if compressed else zipfile.ZIP_STORED) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return buf.getvalue()


X_DTYPES = ["u1", "<f4", ">f4", "<f8", "<f2", "<i4", "|b1", "<c8", "<U2", "|S3", "<m8[s]"]
Y_DTYPES = ["<i8", "|i1", "|u1", ">i4", "<f8", "<f4", "|b1", "<U1"]
DESCRS = ["|O", "<f4", "|u1", ">f8", "|V8", "<U4", "|S0", [("a", "<f4")], ("<f4", (2,)), "<M8[D]", "<q",
          "not a dtype", 7]
HEADER_TEXTS = ["{'descr': '<f4', 'fortran_order': False, 'shape': (4, 1, 2, 2)}",
                "{'descr': '<f4', 'fortran_order': 0, 'shape': [4]}",
                "{'descr': '<f4', 'shape': (2,), 'extra': 1, 'fortran_order': False}",
                "{[1]: 2}", "(" * 150 + ")" * 150, "1" * 5000,
                "{'descr': '<f4', 'fortran_order': False, 'shape': (4,)}" + " " * 20000]  # over numpy's header limit
SHAPES = st.lists(st.one_of(st.integers(0, 6), st.sampled_from([-1, 10**6, 2**31, 2**62, 10**20])),
                  min_size=0, max_size=5).map(tuple)


def mostly(valid, *odd):
    """Valid values three times as often as each odd one, so that a share of the files is a real dataset."""
    return st.sampled_from([valid] * 3 * max(1, len(odd)) + list(odd))


@st.composite
def array_members(draw) -> dict[str, bytes]:
    """x and y as numpy writes them, with odd dtypes, shapes, values and label lengths."""
    n = draw(st.integers(1, 5) | st.just(0))
    x_shape = draw(mostly((n, 1, 4, 4), (n, 3, 2, 2), (n, 4, 4), (n, 16), (n,), (n, 1, 1, 2, 2)))
    x_dtype = np.dtype(draw(mostly("u1", *X_DTYPES)))
    values = draw(mostly("unit", "wide", "nan"))
    rng = np.random.default_rng(draw(st.integers(0, 2**16)))
    x = rng.random(x_shape) * (300 if values == "wide" else 1)
    if values == "nan" and x.size:
        x.flat[0] = np.nan
    with np.errstate(invalid="ignore"):
        x = (x * (255 if x_dtype == np.uint8 else 1)).astype(x_dtype)
    y_dtype = np.dtype(draw(mostly("<i8", *Y_DTYPES)))
    y = rng.integers(draw(mostly(0, -3)), draw(mostly(4, 1, 2000)),
                     size=draw(mostly(n, max(n - 1, 0), n + 1))).astype(y_dtype)
    members = {"x.npy": npy_bytes(x), "y.npy": npy_bytes(y)}
    dropped = draw(mostly(None, "x.npy", "y.npy"))
    if dropped:
        del members[dropped]
    if draw(st.booleans()):
        members["extra.npy"] = npy_bytes(np.zeros(3))
    return members


@st.composite
def header_members(draw) -> dict[str, bytes]:
    """x with a rewritten header: any descr and shape, data of any length, versions 1-3, raw header text."""
    kind = draw(st.sampled_from(["dict", "dict", "text"]))
    if kind == "dict":
        header: dict | str = {"descr": draw(st.sampled_from(DESCRS)), "shape": draw(SHAPES),
                              "fortran_order": draw(st.booleans())}
    else:
        header = draw(st.text(max_size=80) | st.sampled_from(HEADER_TEXTS))
    version = draw(st.sampled_from([(1, 0), (2, 0), (3, 0), (9, 9)]))
    data = bytes(draw(st.integers(0, 300)))
    x = raw_npy(header, data, version if version in ((1, 0), (2, 0)) else (1, 0))
    if version not in ((1, 0), (2, 0)):  # the same stream labelled with another version
        x = npy.MAGIC_PREFIX + bytes(version) + x[8:]
    y = npy_bytes(np.arange(4) % 2)
    return {"x.npy": x, "y.npy": y}


@st.composite
def npz_files(draw, marker: Path) -> bytes:
    source = draw(st.sampled_from(["arrays", "arrays", "header", "pickle"]))
    if source == "arrays":
        members = draw(array_members())
    elif source == "header":
        members = draw(header_members())
    else:  # an object array whose unpickling would create the marker file
        obj = np.empty(2, dtype=object)
        obj[:] = [Hostile(marker), 1]
        good = {"x.npy": npy_bytes(np.zeros((2, 1, 2, 2), np.float32)), "y.npy": npy_bytes(np.array([0, 1]))}
        members = {**good, draw(st.sampled_from(["x.npy", "y.npy"])): npy_bytes(obj)}
    blob = bytearray(zip_bytes(members, compressed=draw(st.booleans())))
    damage = draw(mostly("none", "truncate", "flip", "overwrite"))
    if damage == "truncate":
        del blob[draw(st.integers(0, len(blob) - 1)):]
    elif damage == "flip":
        for pos in draw(st.lists(st.integers(0, len(blob) * 8 - 1), min_size=1, max_size=8)):
            blob[pos // 8] ^= 1 << (pos % 8)
    elif damage == "overwrite":
        start = draw(st.integers(0, len(blob) - 1))
        patch = draw(st.binary(min_size=1, max_size=16))
        blob[start:start + len(patch)] = patch
    return bytes(blob)


def test_fuzzed_npz_files_load_or_are_refused_in_one_line(tmp_path):
    marker = tmp_path / "code-ran"
    seen: dict[str, str] = {}

    @FUZZ
    @given(st.data())
    def check(data):
        blob = data.draw(npz_files(marker))
        path = tmp_path / "suspect.npz"
        path.write_bytes(blob)
        seen[hashlib.sha256(blob).hexdigest()] = check_outcome(load_npz, path)

    check()
    outcomes = list(seen.values())
    print(f"npz fuzz: {len(seen)} distinct files, {outcomes.count('loaded')} loaded, "
          f"{outcomes.count('refused')} refused")
    assert len(seen) >= 1000 and outcomes.count("loaded") >= 50 and outcomes.count("refused") >= 500
    assert not marker.exists()


# --------------------------------------------------------------------------- PNG folders
@functools.lru_cache(maxsize=None)  # the same few images recur across examples
def png_bytes(mode: str, size: tuple[int, int], seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    w, h = size
    if mode == "I;16":
        im = Image.fromarray(rng.integers(0, 65535, (h, w), dtype=np.uint16))
    elif mode == "1":
        im = Image.fromarray(rng.integers(0, 2, (h, w), dtype=np.uint8) * 255).convert("1")
    elif mode == "P":
        im = Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).convert("P")
    else:
        bands = len(mode)  # L, LA, RGB, RGBA: numpy's band count names the mode
        im = Image.fromarray(rng.integers(0, 255, (h, w, bands) if bands > 1 else (h, w), dtype=np.uint8))
    buf = io.BytesIO()
    im.save(buf, "PNG")
    return buf.getvalue()


@functools.lru_cache(maxsize=None)
def other_format(fmt: str, seed: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (4, 4, 3), dtype=np.uint8)).save(buf, fmt)
    return buf.getvalue()


def png_declaring(width: int, height: int) -> bytes:
    """A tiny PNG whose IHDR declares width x height (CRC fixed): a decompression bomb by its header."""
    blob = bytearray(png_bytes("L", (4, 4), 0))
    ihdr = bytearray(blob[12:29])  # b"IHDR" + 13 bytes of fields
    ihdr[4:12] = struct.pack(">II", width, height)
    blob[12:29] = ihdr
    blob[29:33] = struct.pack(">I", zlib.crc32(bytes(ihdr)))
    return bytes(blob)


ENTRY = st.one_of(
    st.tuples(st.just("png"), st.sampled_from(["L", "L", "RGB", "RGB", "LA", "RGBA", "P", "1", "I;16"]),
              st.sampled_from([(4, 4), (4, 4), (4, 4), (3, 4), (1, 1)]), st.integers(0, 50)),
    st.tuples(st.just("damaged"), st.sampled_from(["truncate", "flip", "overwrite"]),
              st.integers(0, 10**6), st.binary(min_size=1, max_size=8)),
    st.tuples(st.just("other"), st.sampled_from(["JPEG", "GIF", "BMP", "TIFF", "WEBP"]), st.integers(0, 5)),
    st.tuples(st.just("bomb"), st.sampled_from([(100_000, 100_000), (10_000, 9_000), (1, 2**31 - 1)])),
    st.tuples(st.just("bytes"), st.binary(max_size=64)),
    st.tuples(st.just("folder"), st.sampled_from(["sub", "nested.png"])),
    st.tuples(st.just("ignored"), st.sampled_from([".hidden.png", "notes.txt", "readme"])),
)


def write_entry(folder: Path, i: int, entry: tuple) -> None:
    kind = entry[0]
    path = folder / f"{i:02d}.png"
    if kind == "png":
        path.write_bytes(png_bytes(entry[1], entry[2], entry[3]))
    elif kind == "damaged":
        blob = bytearray(png_bytes("L", (4, 4), i))
        pos = entry[2] % len(blob)
        if entry[1] == "truncate":
            del blob[pos:]
        elif entry[1] == "flip":
            blob[pos] ^= 1 << (entry[2] % 8)
        else:
            blob[pos:pos + len(entry[3])] = entry[3]
        path.write_bytes(bytes(blob))
    elif kind == "other":
        path.write_bytes(other_format(entry[1], entry[2]))
    elif kind == "bomb":
        path.write_bytes(png_declaring(*entry[1]))
    elif kind == "bytes":
        path.write_bytes(entry[1])
    elif kind == "folder":
        (folder / entry[1]).mkdir(exist_ok=True)
        (folder / entry[1] / "inside.png").write_bytes(png_bytes("L", (4, 4), 0))
    else:
        (folder / entry[1]).write_bytes(png_bytes("L", (4, 4), 1))


FOLDERS = st.lists(st.lists(ENTRY, max_size=4), max_size=4)  # classes, each a list of entries


def test_a_header_numpy_cannot_tokenize_is_refused_in_one_line(tmp_path):
    """Found by the fuzzer: a one-byte header ")" makes numpy's header parser raise tokenize.TokenError."""
    path = tmp_path / "torn.npz"
    y = io.BytesIO()
    np.save(y, np.zeros(4, np.int64))
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("x.npy", b"\x93NUMPY\x01\x00" + struct.pack("<H", 1) + b")")
        archive.writestr("y.npy", y.getvalue())
    try:
        load_npz(path)
    except DataError as exc:
        assert str(exc).startswith(f"{path}[x]: not a readable .npy array header") and "\n" not in str(exc)
    else:
        raise AssertionError("a torn header was loaded")


def test_fuzzed_png_folders_load_or_are_refused_in_one_line(tmp_path):
    seen: dict[str, str] = {}

    @FUZZ
    @given(FOLDERS, st.booleans())
    def check(classes, loose_file):
        root = Path(tempfile.mkdtemp(dir=tmp_path))  # left for pytest to clean: deleting each costs more than the test
        for c, entries in enumerate(classes):
            (root / f"class{c}").mkdir()
            for i, entry in enumerate(entries):
                write_entry(root / f"class{c}", i, entry)
        if loose_file:  # a file beside the class folders is not a class
            (root / "stray.png").write_bytes(b"not a png")
        digest = hashlib.sha256(repr((classes, loose_file)).encode()).hexdigest()
        seen[digest] = check_outcome(load_png_folder, root)

    check()
    outcomes = list(seen.values())
    print(f"PNG-folder fuzz: {len(seen)} distinct folders, {outcomes.count('loaded')} loaded, "
          f"{outcomes.count('refused')} refused")
    assert len(seen) >= 1000 and outcomes.count("loaded") >= 50 and outcomes.count("refused") >= 500


# --------------------------------------------------------------------------- the command line
def _hostile_cases(tmp_path: Path) -> dict[str, tuple[Path, str]]:
    x, y = np.zeros((4, 1, 8, 8), np.float32), np.arange(4) % 2
    huge = {"descr": "<f4", "fortran_order": False, "shape": (10**12, 1, 8, 8)}
    (tmp_path / "oversized.npz").write_bytes(zip_bytes(
        {"x.npy": raw_npy(huge, b""), "y.npy": npy_bytes(y)}, compressed=False))
    valid = zip_bytes({"x.npy": npy_bytes(x), "y.npy": npy_bytes(y)}, compressed=True)
    (tmp_path / "truncated.npz").write_bytes(valid[:len(valid) // 2])
    obj = np.empty(4, dtype=object)
    obj[:] = [Hostile(tmp_path / "code-ran")] * 4
    (tmp_path / "pickle.npz").write_bytes(zip_bytes({"x.npy": npy_bytes(x), "y.npy": npy_bytes(obj)}, False))
    folder = tmp_path / "folder" / "cat"
    folder.mkdir(parents=True)
    (folder / "a.png").write_bytes(png_bytes("L", (8, 8), 0))
    (folder / "b.png").write_bytes(other_format("JPEG", 0))
    bombs = tmp_path / "bombs" / "cat"
    bombs.mkdir(parents=True)
    (bombs / "bomb.png").write_bytes(png_declaring(100_000, 100_000))
    return {"oversized header": (tmp_path / "oversized.npz", "more than the limit"),
            "truncated": (tmp_path / "truncated.npz", "not a readable .npz"),
            "pickle payload": (tmp_path / "pickle.npz", "pickled objects"),
            "JPEG named .png": (tmp_path / "folder", "a JPEG file named .png"),
            "decompression bomb": (tmp_path / "bombs", "decompression-bomb limit")}


def test_cli_refuses_hostile_files_with_exit_2_and_one_line(tmp_path, capsys):
    """Every case through the command line; the oversized header and the pickle payload also as a user runs
    them (separate processes, default logging, started together): one line on stderr, exit 2, no code run."""
    from infusion_audit.cli import main

    cases = _hostile_cases(tmp_path)
    for case, (path, message) in cases.items():
        code = main(["scan", str(path), "--out", str(tmp_path / "out")])
        err = capsys.readouterr().err.strip()
        assert code == 2 and len(err.splitlines()) == 1 and message in err, f"{case}: exit {code}, {err!r}"
    runs = {case: subprocess.Popen([sys.executable, "-m", "infusion_audit", "scan", str(cases[case][0]), "--out",
                                    str(tmp_path / "out")], stderr=subprocess.PIPE, text=True, cwd=tmp_path)
            for case in ("oversized header", "pickle payload")}
    for case, run in runs.items():
        _, stderr = run.communicate(timeout=120)
        lines = stderr.strip().splitlines()
        assert run.returncode == 2 and len(lines) == 1, f"{case}: exit {run.returncode}, {stderr!r}"
        assert lines[0].startswith("infusion-audit: error: ") and cases[case][1] in lines[0], f"{case}: {lines[0]!r}"
    assert not (tmp_path / "code-ran").exists() and not (tmp_path / "out").exists()
