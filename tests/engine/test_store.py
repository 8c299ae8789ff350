"""The on-disk dataset store: every format round-trips, splits and sources are kept, failures leave nothing."""

from __future__ import annotations

import io
import json
import os
import socket
import struct
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest

from kd_core.config import ExperimentConfig
from kd_core.data import inspect_dataset, load_dataset
from kd_core.data.store import IngestStopped, ingest, is_store, open_store
from kd_core.errors import DatasetError
from kd_core.runner import load_experiment_dataset


def _jpeg(arr: np.ndarray, quality: int = 95) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def _png(arr: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def _images(n_per_class: int = 6, classes: str = "abc", side: int = 8) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(1)
    return {
        f"{c}/{i:03d}.png": rng.integers(0, 255, (side, side, 3), dtype=np.uint8)
        for c in classes
        for i in range(n_per_class)
    }


def _zip(path: Path, members: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return path


def _leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


# ---------- round trips ----------


def test_npz_round_trip_keeps_dtype_values_splits_and_sources(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.integers(0, 255, (40, 3, 5, 5)).astype(np.uint8)
    x_val = rng.integers(0, 255, (6, 3, 5, 5)).astype(np.uint8)
    y, y_val = np.arange(40) % 4, np.arange(6) % 4
    np.savez_compressed(
        tmp_path / "u8.npz", x=x, y=y, x_val=x_val, y_val=y_val, class_names=np.array(list("abcd"))
    )
    summary = ingest(tmp_path / "u8.npz", tmp_path / "store")
    st = open_store(tmp_path / "store")
    assert st.meta["x_dtype"] == "uint8" and st.meta["x_scale"] == 1.0 and st.meta["given_splits"] == ["val"]
    np.testing.assert_array_equal(st.x, np.concatenate([x, x_val]))
    np.testing.assert_array_equal(st.y, np.concatenate([y, y_val]))
    np.testing.assert_array_equal(st.split, [-1] * 40 + [1] * 6)
    assert list(st.sources())[:2] == ["x[0]", "x[1]"] and list(st.sources())[40] == "x_val[0]"
    assert summary["splits"] == {"train": 32, "val": 6, "test": 8} and summary["class_names"] == list("abcd")

    ds = load_dataset(tmp_path / "store")
    assert ds.x_dtype == "uint8" and ds.x_scale == 1.0 and ds.store_path == str(tmp_path / "store")
    np.testing.assert_array_equal(ds.x_val, x_val.astype(np.float32))  # given split kept, in file order
    idx = np.array([5, 0, 5, 17])
    xb, yb = ds.read("train", idx)
    assert xb.dtype == np.uint8
    np.testing.assert_array_equal(xb, np.asarray(ds.x_train)[idx])
    np.testing.assert_array_equal(yb, ds.y_train[idx])
    assert ds.split_size("test") == 8 and ds.nbytes_float32("train") == 32 * 75 * 4
    xt, yt = ds.tensors("val")
    assert str(xt.dtype) == "torch.float32" and tuple(xt.shape) == (6, 3, 5, 5) and yt is not None
    # Statistics from the histogram pass equal the float computation over the training split.
    train = np.asarray(ds.x_train, dtype=np.float64)
    np.testing.assert_allclose(ds.preprocessing["mean"], train.mean(axis=(0, 2, 3)), rtol=1e-6)
    np.testing.assert_allclose(ds.preprocessing["std"], train.std(axis=(0, 2, 3)), rtol=1e-6)


def test_csv_string_labels_round_trip(tmp_path):
    path = tmp_path / "t.csv"
    path.write_text("a,b,kind\n" + "".join(f"{i},{i * 0.5},{'dog' if i % 3 else 'cat'}\n" for i in range(30)))
    ingest(path, tmp_path / "s", options={"label_column": "kind"})
    st = open_store(tmp_path / "s")
    assert st.meta["class_names"] == ["cat", "dog"] and st.meta["x_dtype"] == "float32"
    np.testing.assert_array_equal(st.x[:, 0], np.arange(30, dtype=np.float32))
    np.testing.assert_array_equal(st.y, [0 if i % 3 == 0 else 1 for i in range(30)])
    assert list(st.sources())[0] == "line 2"
    assert load_dataset(path, options={"label_column": "kind"}).class_names == ["cat", "dog"]


def test_zip_and_folder_give_the_same_store(tmp_path):
    pixels = _images()
    members = {f"train/{k}": _png(v) for k, v in pixels.items()}
    members.update({f"val/{k}": _png(v) for k, v in list(pixels.items())[:6]})
    _zip(tmp_path / "imgs.zip", members)
    folder = tmp_path / "imgs"
    for name, data in members.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(data)
    a = ingest(tmp_path / "imgs.zip", tmp_path / "from_zip", options={"image_size": 8})
    b = ingest(folder, tmp_path / "from_folder", options={"image_size": 8})
    za, fb = open_store(tmp_path / "from_zip"), open_store(tmp_path / "from_folder")
    np.testing.assert_array_equal(za.x, fb.x)
    np.testing.assert_array_equal(za.y, fb.y)
    assert list(za.sources()) == list(fb.sources())
    assert za.meta["x_dtype"] == "uint8" and za.meta["x_scale"] == pytest.approx(1 / 255)
    assert za.meta["format"] == "zip" and fb.meta["format"] == "folder"
    # The ZIP's val/ folder is the val split; raw pixels are stored NCHW.
    assert a["splits"]["val"] == 6 and b["splits"]["val"] == 6
    first = list(za.sources()).index("train/a/000.png")
    np.testing.assert_array_equal(za.x[first], pixels["a/000.png"].transpose(2, 0, 1))
    ds = load_dataset(tmp_path / "from_zip")
    np.testing.assert_allclose(
        np.asarray(ds.x_val)[0], pixels["a/000.png"].transpose(2, 0, 1) / 255, atol=1e-7
    )


def test_ingest_is_stable_and_config_takes_a_store(tmp_path):
    _zip(tmp_path / "d.zip", {k: _png(v) for k, v in _images().items()})
    s1 = ingest(tmp_path / "d.zip", tmp_path / "one")
    s2 = ingest(tmp_path / "d.zip", tmp_path / "two")
    assert s1["fingerprint"] == s2["fingerprint"]
    assert list(open_store(tmp_path / "one").sources()) == list(open_store(tmp_path / "two").sources())
    ds = load_experiment_dataset(ExperimentConfig(dataset=str(tmp_path / "one")))
    assert ds.num_samples == 18 and ds.fingerprint == load_dataset(tmp_path / "two").fingerprint
    assert inspect_dataset(tmp_path / "one") == s1


# ---------- bad input leaves nothing behind ----------


def test_truncated_jpeg_is_skipped_and_counted(tmp_path):
    members = {k: _jpeg(v) for k, v in _images(side=32).items()}
    members["b/002.png"] = members["b/002.png"][: len(members["b/002.png"]) // 2]
    _zip(tmp_path / "t.zip", members)
    summary = ingest(tmp_path / "t.zip", tmp_path / "s")
    assert summary["num_samples"] == 17 and summary["skipped_count"] == 1
    assert summary["skipped"][0]["name"] == "b/002.png"
    assert "b/002.png" not in list(open_store(tmp_path / "s").sources())


def test_zip_whose_declared_sizes_lie_is_refused(tmp_path):
    path = _zip(tmp_path / "lie.zip", {k: _png(v) for k, v in _images().items()})
    data = bytearray(path.read_bytes())
    central = data.find(b"PK\x01\x02")
    (size,) = struct.unpack_from("<I", data, central + 24)
    struct.pack_into("<I", data, central + 24, size - 7)  # the first member claims 7 bytes fewer
    path.write_bytes(bytes(data))
    with pytest.raises(DatasetError, match="declared size"):
        ingest(path, tmp_path / "s")
    assert not (tmp_path / "s").exists() and _leftovers(tmp_path) == []


def test_should_stop_mid_ingest_leaves_nothing(tmp_path):
    _zip(tmp_path / "d.zip", {k: _png(v) for k, v in _images(n_per_class=70).items()})
    calls: list[float] = []

    def stop() -> bool:
        calls.append(1)
        return len(calls) >= 2

    with pytest.raises(IngestStopped):
        ingest(tmp_path / "d.zip", tmp_path / "s", should_stop=stop)
    assert not (tmp_path / "s").exists() and _leftovers(tmp_path) == []
    # Progress is reported, ends at 1, and a later ingest to the same place works.
    seen: list[float] = []
    ingest(tmp_path / "d.zip", tmp_path / "s", progress=seen.append)
    assert seen == sorted(seen) and seen[-1] == 1.0 and len(seen) > 2


def test_full_disk_during_ingest_leaves_nothing(tmp_path):
    np.savez(tmp_path / "big.npz", x=np.ones((2000, 100), np.float32), y=np.arange(2000) % 2)
    code = (
        "import resource, signal, sys\n"
        "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"  # so a write past the limit fails with EFBIG
        "from kd_core.data.store import ingest\n"
        "from kd_core.errors import DatasetError\n"
        "resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, 200_000))\n"
        "try:\n"
        "    ingest(sys.argv[1], sys.argv[2])\n"
        "except DatasetError as exc:\n"
        "    print('refused:', exc)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path / "big.npz"), str(tmp_path / "s")],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert "refused: the disk is full" in out.stdout, out.stdout + out.stderr
    assert not (tmp_path / "s").exists() and _leftovers(tmp_path) == []


def test_a_killed_ingests_leftovers_are_removed(tmp_path):
    np.savez(tmp_path / "a.npz", x=np.ones((10, 2)), y=np.arange(10) % 2)
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    host = "".join(c if c.isalnum() else "_" for c in socket.gethostname())[:40]
    stale = tmp_path / f".s.ingest-{host}-{dead.stdout.strip()}-deadbeef"
    stale.mkdir()
    (stale / "x.npy").write_bytes(b"half")
    ingest(tmp_path / "a.npz", tmp_path / "s")
    assert is_store(tmp_path / "s") and _leftovers(tmp_path) == []
    with pytest.raises(DatasetError, match="already exists"):
        ingest(tmp_path / "a.npz", tmp_path / "s")


def test_folder_symlink_out_of_the_root_is_refused(tmp_path):
    root = tmp_path / "root"
    for name, arr in _images().items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(_png(arr))
    outside = tmp_path / "secret.png"
    outside.write_bytes(_png(np.zeros((8, 8, 3), np.uint8)))
    (root / "a" / "inside.png").symlink_to(root / "b" / "000.png")  # stays inside: used
    summary = ingest(root, tmp_path / "ok")
    assert summary["num_samples"] == 19
    (root / "a" / "evil.png").symlink_to(outside)
    with pytest.raises(DatasetError, match="symbolic link pointing outside"):
        ingest(root, tmp_path / "bad")
    (root / "a" / "evil.png").unlink()
    (root / "c" / "up").symlink_to(tmp_path)
    with pytest.raises(DatasetError, match="symbolic link pointing outside"):
        ingest(root, tmp_path / "bad")
    assert not (tmp_path / "bad").exists()


# ---------- bounded memory ----------


def test_ingesting_an_npz_larger_than_a_chunk_keeps_memory_bounded(tmp_path):
    # 120 MB of deflated uint8 images, 15x the 8 MiB chunk: resident memory must not grow with it.
    n = 4000
    with zipfile.ZipFile(tmp_path / "big.npz", "w", zipfile.ZIP_DEFLATED, compresslevel=1) as zf:
        with zf.open("x.npy", "w", force_zip64=True) as f:
            np.lib.format.write_array_header_1_0(
                f, {"descr": "|u1", "fortran_order": False, "shape": (n, 3, 100, 100)}
            )
            block = (np.arange(400 * 30000) % 251).astype(np.uint8).tobytes()
            for _ in range(n // 400):
                f.write(block)
        with zf.open("y.npy", "w") as f:
            np.lib.format.write_array(f, np.arange(n) % 10)
    code = (
        "import sys\n"
        "from kd_core.data.store import ingest\n"
        "def status(key):\n"
        "    return next(int(l.split()[1]) for l in open('/proc/self/status') if l.startswith(key))\n"
        "before = status('VmRSS')\n"
        "open('/proc/self/clear_refs', 'w').write('5')\n"  # resets the peak (VmHWM) to the current RSS
        "info = ingest(sys.argv[1], sys.argv[2])\n"
        "print(info['num_samples'], (status('VmHWM') - before) // 1024)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path / "big.npz"), str(tmp_path / "s")],
        capture_output=True, text=True, timeout=300, check=True,
    )  # fmt: skip
    samples, grown_mib = (int(v) for v in out.stdout.split())
    assert samples == n and grown_mib < 48, f"RSS grew by {grown_mib} MiB ingesting 120 MB"
    assert os.path.getsize(tmp_path / "s" / "x.npy") > n * 30000
    assert json.loads((tmp_path / "s" / "meta.json").read_text())["x_dtype"] == "uint8"


def test_split_views_pickle_without_copying_the_store(tmp_path):
    import pickle

    np.savez(tmp_path / "a.npz", x=np.arange(200, dtype=np.float32).reshape(50, 4), y=np.arange(50) % 2)
    ds = load_dataset(tmp_path / "a.npz")
    again = pickle.loads(pickle.dumps(ds))
    assert len(pickle.dumps(ds.x_train)) < 2000  # row indices and the file path, not the rows
    np.testing.assert_array_equal(np.asarray(again.x_train), np.asarray(ds.x_train))
    assert again.fingerprint == ds.fingerprint
