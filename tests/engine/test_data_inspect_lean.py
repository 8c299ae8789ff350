"""inspect_dataset on NPZ files reads x from disk in chunks: same answer and errors as loading, little memory."""

from __future__ import annotations

import io
import re
import tracemalloc
import zipfile
from pathlib import Path

import numpy as np
import pytest

from kd_core.data import describe_dataset, inspect_dataset, load_dataset
from kd_core.errors import DatasetError


def _save(path: Path, compressed: bool = False, **arrays) -> Path:
    (np.savez_compressed if compressed else np.savez)(path, **arrays)
    return path


def _cases() -> list[dict]:
    rng = np.random.default_rng(3)
    return [
        {"x": rng.normal(size=(57, 5)).astype(np.float32), "y": np.arange(57) % 4},
        {"x": rng.normal(size=(40, 3)), "y": np.arange(40) % 2, "class_names": np.array(["cat", "dog"])},
        {"x": rng.integers(0, 255, size=(30, 1, 6, 6)).astype(np.uint8), "y": np.arange(30) % 3},
        {"x": rng.normal(size=(25, 2, 3)).astype(np.float32)},  # unlabelled, 3-D: a warning
        {
            "x": rng.normal(size=(30, 4)),
            "y": np.arange(30) % 3,
            "x_val": rng.normal(size=(6, 4)),
            "y_val": np.arange(6) % 3,
            "extra": np.ones(2),
        },
        {"x": np.asfortranarray(rng.normal(size=(20, 3))), "y": np.arange(20) % 2},
    ]


@pytest.mark.parametrize("compressed", [False, True])
@pytest.mark.parametrize("case", range(len(_cases())))
def test_inspection_equals_describing_the_loaded_dataset(tmp_path, case, compressed):
    path = _save(tmp_path / "data.npz", compressed, **_cases()[case])
    assert inspect_dataset(path) == describe_dataset(load_dataset(path))


REFUSED = [
    {"x": np.array([[1.0, 2.0]] * 9 + [[1.0, np.nan]]), "y": np.zeros(10, int)},
    {"x": np.ones((10, 2)), "y": np.array([0, 1, -1, 0, 1, 0, 1, 0, 1, 0])},
    {"x": np.ones((10, 2)), "y": np.zeros(9, int)},
    {"x": np.ones((0, 2)), "y": np.zeros(0, int)},
    {"x": np.ones(10), "y": np.zeros(10, int)},
    {"x": np.array([["a", "b"]] * 10), "y": np.zeros(10, int)},
    {"x": np.ones((10, 2)), "y": np.array(["a"] * 10)},
    {"x": np.ones((10, 2)), "y": np.arange(10) % 3, "class_names": np.array(["a", "b"])},
    {"y": np.zeros(10, int)},
    {"x": np.ones((10, 8, 8, 3)), "y": np.zeros(10, int)},
    {"x": np.ones((10, 2)), "x_val": np.ones((3, 3)), "y": np.zeros(10, int), "y_val": np.zeros(3, int)},
    {
        "x": np.ones((10, 2)),
        "y": np.zeros(10, int),
        "x_val": np.ones((3, 2)) * np.inf,
        "y_val": np.zeros(3, int),
    },
    {"x": np.ones((10, 2)), "y": np.zeros(10, int), "x_val": np.ones((3, 2))},
    {"x": np.ones((10, 2)), "y_test": np.zeros(3, int)},
]


@pytest.mark.parametrize("compressed", [False, True])
@pytest.mark.parametrize("case", range(len(REFUSED)))
def test_inspection_refuses_with_the_loaders_message(tmp_path, case, compressed):
    path = _save(tmp_path / "bad.npz", compressed, **REFUSED[case])
    with pytest.raises(DatasetError) as loaded:
        load_dataset(path)
    with pytest.raises(DatasetError, match=re.escape(str(loaded.value))):
        inspect_dataset(path)


def test_nan_deep_in_a_later_chunk_names_its_sample(tmp_path, monkeypatch):
    from kd_core.data import store as lean

    monkeypatch.setattr(lean, "CHUNK_BYTES", 64)  # 4 samples of 4 float32 per chunk
    x = np.ones((50, 4), dtype=np.float32)
    x[37, 1] = np.inf
    path = _save(tmp_path / "deep.npz", x=x, y=np.arange(50) % 2)
    with pytest.raises(DatasetError, match=r"'x' contains NaN or infinite values \(first in sample 37\)"):
        inspect_dataset(path)


def test_truncated_member_is_refused(tmp_path):
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": "<f4", "fortran_order": False, "shape": (1000, 10)})
    path = tmp_path / "short.npz"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("x.npy", buf.getvalue() + b"\0" * 64)
    with pytest.raises(DatasetError, match="cannot read the NPZ file"):
        inspect_dataset(path)


@pytest.mark.parametrize("compressed", [False, True])
def test_inspecting_a_100mb_npz_does_not_allocate_the_array(tmp_path, compressed):
    # 100 MB of float32 x; the loader would hold it (and a split copy) in memory.
    n, features = 25_000, 1000
    x = np.lib.format.open_memmap(tmp_path / "x.npy", mode="w+", dtype=np.float32, shape=(n, features))
    for start in range(0, n, 5000):
        x[start : start + 5000] = np.float32(start / n)
    x.flush()
    path = tmp_path / "big.npz"
    method = zipfile.ZIP_DEFLATED if compressed else zipfile.ZIP_STORED
    with zipfile.ZipFile(path, "w", method, compresslevel=1 if compressed else None) as zf:
        zf.write(tmp_path / "x.npy", "x.npy")
        with zf.open("y.npy", "w") as f:
            np.lib.format.write_array(f, np.arange(n) % 10)
    del x
    (tmp_path / "x.npy").unlink()
    tracemalloc.start()
    try:
        info = inspect_dataset(path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert info["num_samples"] == n and info["splits"] == {"train": 17_500, "val": 2_500, "test": 5_000}
    assert info["class_counts"] == [1750] * 10 and len(info["fingerprint"]) == 64
    assert peak < 40 * 1024**2, f"peak {peak / 1024**2:.0f} MiB while inspecting a 100 MB array"


def _csv(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


CSV_GOOD = [
    ("a,b,label\n" + "".join(f"{i * 0.5},{i % 7},{i % 3}\n" for i in range(40)), None),
    (
        "f1;f2;kind\n" + "".join(f"{i};{-i * 1e-3};{'cat' if i % 2 else 'dog'}\n" for i in range(30)),
        {"label_column": "kind"},
    ),
    ("x,y2\n" + "".join(f"{i},{i * i}\n" for i in range(25)), None),  # no label column: a transfer set
    ("a,Label\n\n" + "".join(f"{i},{i % 2}\n\n" for i in range(20)), None),  # blank lines, label case-folded
]
CSV_BAD = [
    "a,b,label\n1,2,0\n3,nan,1\n" + "4,5,0\n" * 10,
    "a,b,label\n1,2,0\n3,4,1\n" + "4,inf,0\n" * 10,
    "a,b,label\n1,2,0\n3,x,1\n",
    "a,b,label\n1,2,0\n3,4\n",
    "a,b,label\n1,2,0\n3,4, \n",
    "a,b,label\n",
    "a,b,label\n1,2,0\n3,4,-1\n",
    "a,b,label\n1,2,0\n3,4,0.5\n",
    "a,b,label\n1,2,0\n3,4,100000\n",
    "a,b,label\n1,nan,0\n3,x,1\n",  # a bad field later wins over an earlier NaN, as in the loader
    "a,b,label\n1,1e39,0\n" + "3,4,1\n" * 10,  # finite as float64, infinite as float32
]


@pytest.mark.parametrize("case", range(len(CSV_GOOD)))
def test_csv_inspection_equals_describing_the_loaded_dataset(tmp_path, case):
    text, options = CSV_GOOD[case]
    path = _csv(tmp_path / "table.csv", text)
    assert inspect_dataset(path, options=options) == describe_dataset(load_dataset(path, options=options))


@pytest.mark.parametrize("case", range(len(CSV_BAD)))
def test_csv_inspection_refuses_with_the_loaders_message(tmp_path, case, monkeypatch):
    from kd_core.data import store as lean

    monkeypatch.setattr(
        lean, "CHUNK_BYTES", 32
    )  # spill every two rows: the bad value's row must still be right
    path = _csv(tmp_path / "bad.csv", CSV_BAD[case])
    with pytest.raises(DatasetError) as loaded:
        load_dataset(path)
    with pytest.raises(DatasetError, match=re.escape(str(loaded.value))):
        inspect_dataset(path)


def test_inspecting_a_csv_keeps_only_labels_in_memory(tmp_path, monkeypatch):
    from kd_core.data import store as lean

    monkeypatch.setattr(lean, "CHUNK_BYTES", 256 * 1024)
    rows, cols = 10_000, 100  # 8 MB of float64 values: what the loader holds, before its float32 copy
    x = np.round(np.random.default_rng(0).normal(size=(rows, cols)), 3)
    path = tmp_path / "wide.csv"
    header = ",".join(f"f{i}" for i in range(cols)) + ",label"
    np.savetxt(
        path, np.column_stack([x, np.arange(rows) % 4]), fmt="%g", delimiter=",", header=header, comments=""
    )
    tracemalloc.start()
    try:
        info = inspect_dataset(path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert info["num_samples"] == rows and info["num_classes"] == 4 and info["input_shape"] == [cols]
    assert peak < 4 * 1024**2, f"peak {peak / 1024**2:.1f} MiB while inspecting 8 MB of values"


def _zip_cases(png) -> list[tuple[dict[str, bytes], dict | None]]:
    noisy = np.random.default_rng(0).integers(0, 255, size=(9, 7, 3), dtype=np.uint8)
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(noisy).save(buf, format="PNG")
    return [
        ({f"{c}/{i}.png": png((20 * i, 100 if c == "a" else 5, 7)) for c in "abc" for i in range(6)}, None),
        ({f"g{c}/{i}.png": png(30 * i + c, mode="L") for c in range(2) for i in range(5)}, {"image_size": 6}),
        (
            {
                **{f"data/train/{c}/{i}.png": png((i, 9, 200)) for c in "xy" for i in range(5)},
                **{f"data/val/{c}/{i}.png": png((9, i, 9)) for c in "xy" for i in range(2)},
                "data/train/x/notes.txt": b"hi",
                "data/train/y/bad.png": b"not a png",
                "data/train/y/noise.png": buf.getvalue(),
            },
            {"image_size": [5, 7]},
        ),
    ]


@pytest.mark.parametrize("case", range(3))
def test_zip_inspection_equals_describing_the_loaded_dataset(make_zip, png_bytes, case):
    members, options = _zip_cases(png_bytes)[case]
    path = make_zip(members, f"images{case}.zip")
    assert inspect_dataset(path, options=options) == describe_dataset(load_dataset(path, options=options))


@pytest.mark.parametrize(
    "members",
    [
        {"a/readme.txt": b"hi", "b/data.csv": b"1,2"},
        {},
        {"val/a/1.png": b"x"},
        {"a/1.png": b"not a png", "b/2.png": b"nor this"},
        {"../evil/1.png": b"x"},
    ],
)
def test_zip_inspection_refuses_with_the_loaders_message(make_zip, members):
    path = make_zip(members, "bad.zip")
    with pytest.raises(DatasetError) as loaded:
        load_dataset(path)
    with pytest.raises(DatasetError, match=re.escape(str(loaded.value))):
        inspect_dataset(path)
