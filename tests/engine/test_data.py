"""The dataset layer: built-ins, NPZ/CSV/ZIP round trips, refusals, splits, transfer sets, inspection."""

from __future__ import annotations

import base64
import io
import json
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from kd_core.data import BUILTIN_DATASETS, Dataset, inspect_dataset, load_dataset
from kd_core.data import images as images_mod
from kd_core.errors import DatasetError


def _all_x(ds: Dataset) -> np.ndarray:
    return np.concatenate([ds.x_train, ds.x_val, ds.x_test])


# ---------- built-in datasets ----------


def test_builtin_names():
    assert set(BUILTIN_DATASETS) == {"digits", "synthetic"}


def test_digits_shapes_range_and_determinism():
    ds = load_dataset("digits")
    assert ds.format == "builtin" and ds.is_image and ds.labeled
    assert ds.input_shape == (1, 8, 8) and ds.num_classes == 10
    assert ds.class_names == [str(i) for i in range(10)]
    assert ds.num_samples == 1797
    assert ds.x_train.dtype == np.float32 and ds.y_train.dtype == np.int64
    assert ds.x_train.shape[1:] == (1, 8, 8)
    x = _all_x(ds)
    assert x.min() == 0.0 and x.max() == 1.0
    assert (len(ds.x_val), len(ds.x_test)) == (180, 359)  # 10 % and 20 % of 1797, rounded half up
    # Images: one mean/std per channel, taken on the training split; arrays stay raw.
    assert len(ds.preprocessing["mean"]) == 1 and len(ds.preprocessing["std"]) == 1
    assert ds.preprocessing["mean"][0] == pytest.approx(float(ds.x_train.mean()), rel=1e-5)
    assert ds.preprocessing["std"][0] == pytest.approx(float(ds.x_train.std()), rel=1e-4)
    again = load_dataset("digits")
    assert again.fingerprint == ds.fingerprint
    np.testing.assert_array_equal(again.y_train, ds.y_train)
    other = load_dataset("digits", seed=1)
    assert other.fingerprint != ds.fingerprint
    assert not np.array_equal(other.y_train, ds.y_train)


def test_synthetic_options_shapes_and_determinism():
    opts = {"n_samples": 300, "n_features": 7, "n_classes": 3, "seed": 5}
    ds = load_dataset("synthetic", options=opts)
    assert ds.input_shape == (7,) and ds.num_classes == 3 and not ds.is_image
    assert ds.num_samples == 300
    assert len(ds.preprocessing["mean"]) == 7
    assert load_dataset("synthetic", options=opts).fingerprint == ds.fingerprint
    assert load_dataset("synthetic", options={**opts, "seed": 6}).fingerprint != ds.fingerprint
    default = load_dataset("synthetic")
    assert default.num_samples == 2000 and default.input_shape == (20,) and default.num_classes == 4


@pytest.mark.parametrize(
    "opts, needle",
    [
        ({"n_classes": 1}, "n_classes"),
        ({"n_samples": "many"}, "n_samples"),
        ({"label_noise": 1.5}, "label_noise"),
        ({"n_clases": 3}, "unknown dataset option"),
    ],
)
def test_synthetic_bad_options(opts, needle):
    with pytest.raises(DatasetError, match=needle):
        load_dataset("synthetic", options=opts)


def test_label_noise_flips_exact_fraction_of_train_labels_only():
    opts = {"n_samples": 1000, "n_classes": 5}
    clean = load_dataset("synthetic", options=opts)
    noisy = load_dataset("synthetic", options={**opts, "label_noise": 0.3})
    np.testing.assert_array_equal(clean.x_train, noisy.x_train)
    changed = clean.y_train != noisy.y_train
    assert changed.sum() == round(0.3 * len(clean.y_train))
    np.testing.assert_array_equal(clean.y_val, noisy.y_val)
    np.testing.assert_array_equal(clean.y_test, noisy.y_test)
    # Every flipped label went to some class, each class receiving some.
    assert set(np.unique(noisy.y_train[changed])) == set(range(5))
    assert clean.fingerprint != noisy.fingerprint


# ---------- splits ----------


def _ided_npz(tmp_path: Path, counts: list[int]) -> Path:
    """Feature 0 is a unique sample id, so splits can be checked for overlap and coverage."""
    y = np.concatenate([np.full(c, k) for k, c in enumerate(counts)])
    x = np.stack([np.arange(len(y)), y * 10.0], axis=1).astype(np.float32)
    path = tmp_path / "ided.npz"
    np.savez(path, x=x, y=y)
    return path


def test_splits_stratified_seeded_disjoint(tmp_path):
    path = _ided_npz(tmp_path, [200, 100, 50])
    ds = load_dataset(path, seed=3, val_fraction=0.2, test_fraction=0.2)
    ids = [set(a[:, 0].astype(int)) for a in (ds.x_train, ds.x_val, ds.x_test)]
    assert ids[0] | ids[1] | ids[2] == set(range(350))
    assert sum(len(s) for s in ids) == 350
    assert (len(ds.x_val), len(ds.x_test)) == (70, 70)
    for y in (ds.y_val, ds.y_test):
        np.testing.assert_array_equal(np.bincount(y), [40, 20, 10])  # exact class proportions
    same = load_dataset(path, seed=3, val_fraction=0.2, test_fraction=0.2)
    np.testing.assert_array_equal(same.x_val, ds.x_val)
    other = load_dataset(path, seed=4, val_fraction=0.2, test_fraction=0.2)
    assert not np.array_equal(np.sort(other.x_val[:, 0]), np.sort(ds.x_val[:, 0]))
    # Splits are not ordered by class.
    assert not np.all(np.diff(ds.y_train) >= 0)


def test_split_falls_back_to_shuffle_for_tiny_classes(tmp_path):
    path = _ided_npz(tmp_path, [40, 1])
    ds = load_dataset(path, val_fraction=0.1, test_fraction=0.2)
    assert (len(ds.x_train), len(ds.x_val), len(ds.x_test)) == (29, 4, 8)
    assert ds.num_classes == 2


def test_zero_fractions_keep_everything_for_training(tiny_npz):
    ds = load_dataset(tiny_npz, val_fraction=0.0, test_fraction=0.0)
    assert len(ds.x_train) == 60 and ds.x_val.shape == (0, 5) and ds.y_test.shape == (0,)


def test_too_few_samples_to_split(tmp_path):
    path = tmp_path / "two.npz"
    np.savez(path, x=np.zeros((2, 3)), y=np.array([0, 1]))
    with pytest.raises(DatasetError, match="too few"):
        load_dataset(path, val_fraction=0.4, test_fraction=0.4)


# ---------- NPZ ----------


def test_npz_round_trip(tiny_npz, tiny_arrays):
    ds = load_dataset(tiny_npz, seed=0)
    assert ds.format == "npz" and ds.name == "tiny" and not ds.is_image
    assert ds.class_names == ["a", "b", "c"] and ds.num_classes == 3
    assert ds.input_shape == (5,)
    x = _all_x(ds)
    # Raw values preserved (no normalisation), every row present once.
    order = np.lexsort(x.T)
    np.testing.assert_array_equal(x[order], tiny_arrays["x"][np.lexsort(tiny_arrays["x"].T)])
    assert ds.preprocessing["mean"] == pytest.approx(ds.x_train.mean(axis=0).tolist(), rel=1e-5, abs=1e-6)
    assert ds.class_counts() == np.bincount(ds.y_train).tolist()


def test_npz_given_splits_used_as_is(tmp_path):
    rng = np.random.default_rng(0)
    arrays = {
        "x": rng.normal(size=(30, 4)),
        "y": np.arange(30) % 3,
        "x_val": rng.normal(size=(7, 4)),
        "y_val": np.arange(7) % 3,
        "x_test": rng.normal(size=(5, 4)),
        "y_test": np.arange(5) % 3,
    }
    path = tmp_path / "given.npz"
    np.savez(path, **arrays)
    ds = load_dataset(path)
    assert (len(ds.x_train), len(ds.x_val), len(ds.x_test)) == (30, 7, 5)
    np.testing.assert_array_equal(ds.x_val, arrays["x_val"].astype(np.float32))
    np.testing.assert_array_equal(ds.y_test, arrays["y_test"])


def test_npz_only_val_given_carves_test(tmp_path):
    path = tmp_path / "val_only.npz"
    np.savez(
        path,
        x=np.random.default_rng(0).normal(size=(50, 2)),
        y=np.arange(50) % 2,
        x_val=np.zeros((4, 2)),
        y_val=[0, 1, 0, 1],
    )
    ds = load_dataset(path, test_fraction=0.2)
    assert (len(ds.x_train), len(ds.x_val), len(ds.x_test)) == (40, 4, 10)


def test_image_npz_per_channel_stats(tiny_image_npz):
    ds = load_dataset(tiny_image_npz)
    assert ds.is_image and ds.input_shape == (3, 8, 8)
    assert len(ds.preprocessing["mean"]) == 3
    np.testing.assert_allclose(ds.preprocessing["mean"], ds.x_train.mean(axis=(0, 2, 3)), rtol=1e-5)
    np.testing.assert_allclose(ds.preprocessing["std"], ds.x_train.std(axis=(0, 2, 3)), rtol=1e-4)


def test_three_dimensional_samples_stats_follow_first_axis(tmp_path):
    path = tmp_path / "seq.npz"
    np.savez(path, x=np.random.default_rng(0).normal(size=(30, 2, 5)), y=np.arange(30) % 2)
    ds = load_dataset(path)
    assert ds.input_shape == (2, 5) and not ds.is_image
    np.testing.assert_allclose(ds.preprocessing["mean"], ds.x_train.mean(axis=(0, 2)), rtol=1e-5, atol=1e-6)
    assert any("(N, 1, H, W)" in w for w in ds.info["warnings"])


def test_constant_feature_std_floored_to_one(tmp_path):
    x = np.random.default_rng(0).normal(size=(40, 3))
    x[:, 1] = 7.0
    path = tmp_path / "const.npz"
    np.savez(path, x=x, y=np.arange(40) % 2)
    ds = load_dataset(path)
    assert ds.preprocessing["std"][1] == 1.0 and ds.preprocessing["mean"][1] == pytest.approx(7.0)
    assert ds.preprocessing["std"][0] != 1.0


def test_transfer_set_without_labels(tmp_path, tiny_arrays):
    path = tmp_path / "transfer.npz"
    np.savez(path, x=tiny_arrays["x"])
    ds = load_dataset(path)
    assert not ds.labeled and ds.y_train is None and ds.y_val is None and ds.y_test is None
    assert ds.num_classes is None and ds.class_names == []
    assert ds.num_samples == 60 and ds.class_counts() == []
    fixed = ds.with_num_classes(3)
    assert fixed.num_classes == 3 and fixed.class_names == ["0", "1", "2"]
    assert fixed.fingerprint == ds.fingerprint
    x, y = fixed.tensors("train", "cpu")
    assert y is None and x.dtype == torch.float32 and x.shape == (len(ds.x_train), 5)
    info = inspect_dataset(path)
    json.dumps(info)
    assert info["labeled"] is False and info["num_classes"] is None


def test_transfer_set_class_names_give_count(tmp_path):
    path = tmp_path / "named.npz"
    np.savez(path, x=np.zeros((20, 2)) + np.arange(20)[:, None], class_names=np.array(["x", "y"]))
    ds = load_dataset(path)
    assert not ds.labeled and ds.num_classes == 2
    assert ds.with_num_classes(2) is ds
    with pytest.raises(DatasetError, match="3 classes"):
        ds.with_num_classes(3)


def test_tensors_on_device(tiny_npz):
    ds = load_dataset(tiny_npz)
    x, y = ds.tensors("val", torch.device("cpu"))
    assert x.shape == (6, 5) and y.dtype == torch.int64
    np.testing.assert_array_equal(y.numpy(), ds.y_val)
    with pytest.raises(ValueError):
        ds.tensors("dev", "cpu")


def test_empty_class_reported_not_refused(tmp_path):
    path = tmp_path / "gap.npz"
    y = np.arange(30) % 2
    np.savez(
        path, x=np.random.default_rng(0).normal(size=(30, 3)), y=y, class_names=np.array(["a", "b", "c"])
    )
    ds = load_dataset(path)
    assert ds.num_classes == 3 and ds.empty_classes() == ["c"]
    info = inspect_dataset(path)
    assert info["empty_classes"] == ["c"] and info["class_counts"][2] == 0
    assert any("no training example" in w for w in info["warnings"])
    # Without class names a gap in the integer labels is an empty class too.
    path2 = tmp_path / "gap2.npz"
    np.savez(path2, x=np.zeros((30, 3)), y=np.where(y == 1, 2, 0))
    assert load_dataset(path2).empty_classes() == ["1"]


def _npz(tmp_path: Path, **arrays) -> Path:
    path = tmp_path / "bad.npz"
    np.savez(path, **arrays)
    return path


@pytest.mark.parametrize(
    "arrays, needle",
    [
        ({"x": np.array([[1.0, np.nan]] * 10), "y": np.zeros(10, int)}, "NaN or infinite.*sample 0"),
        ({"x": np.array([[1.0, np.inf]] * 10), "y": np.zeros(10, int)}, "NaN or infinite"),
        (
            {"x": np.ones((10, 2)), "y": np.array([0, 1, -1, 0, 1, 0, 1, 0, 1, 0])},
            "negative label -1 at index 2",
        ),
        ({"x": np.ones((10, 2)), "y": np.array([0, 1, 0.5, 0, 1, 0, 1, 0, 1, 0])}, "integer labels.*0.5"),
        ({"x": np.ones((10, 2)), "y": np.zeros(9, int)}, "9 labels but its inputs have 10"),
        ({"x": np.ones((10, 2)), "y": np.zeros((10, 2), int)}, "1-D"),
        ({"x": np.ones((0, 2)), "y": np.zeros(0, int)}, "no samples"),
        ({"x": np.ones(10), "y": np.zeros(10, int)}, "shape"),
        ({"x": np.array([["a", "b"]] * 10), "y": np.zeros(10, int)}, "must hold numbers"),
        ({"x": np.ones((10, 2)), "y": np.array(["a"] * 10)}, "strings"),
        (
            {"x": np.ones((10, 2)), "y": np.arange(10) % 3, "class_names": np.array(["a", "b"])},
            "label 2 does not index",
        ),
        ({"y": np.zeros(10, int)}, "no array 'x'"),
        ({"x": np.ones((10, 8, 8, 3)), "y": np.zeros(10, int)}, "channels-last"),
        (
            {
                "x": np.ones((10, 2)),
                "x_val": np.ones((3, 3)),
                "y": np.zeros(10, int),
                "y_val": np.zeros(3, int),
            },
            "x_val",
        ),
        ({"x": np.ones((10, 2)), "y": np.zeros(10, int), "x_val": np.ones((3, 2))}, "needs its labels"),
    ],
)
def test_npz_refusals(tmp_path, arrays, needle):
    with pytest.raises(DatasetError, match=needle):
        load_dataset(_npz(tmp_path, **arrays))


def test_npz_pickled_object_array_refused(tmp_path):
    path = tmp_path / "evil.npz"
    np.savez(path, x=np.array([{"a": 1}, None], dtype=object), y=np.array([0, 1]))
    with pytest.raises(DatasetError, match="Python objects.*refused"):
        load_dataset(path)


def test_npz_oversized_header_refused_before_loading(tmp_path):
    # A member whose header claims a terabyte: refused from the header, nothing allocated.
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        buf, {"descr": "<f4", "fortran_order": False, "shape": (10**6, 10**6)}
    )
    path = tmp_path / "huge.npz"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("x.npy", buf.getvalue() + b"\0" * 64)
    with pytest.raises(DatasetError, match="MiB"):
        load_dataset(path)


def test_not_an_npz_refused(tmp_path):
    path = tmp_path / "fake.npz"
    np.save(tmp_path / "plain.npy", np.ones(3))
    path.write_bytes((tmp_path / "plain.npy").read_bytes())
    with pytest.raises(DatasetError, match="not an NPZ"):
        load_dataset(path)


# ---------- CSV ----------


def test_csv_round_trip_string_labels(tiny_csv):
    ds = load_dataset(tiny_csv)
    assert ds.format == "csv" and ds.input_shape == (3,)
    assert ds.class_names == ["cat", "dog"] and ds.num_classes == 2
    assert ds.num_samples == 40 and ds.labeled
    assert ds.info["feature_names"] == ["f1", "f2", "f3"]
    # cat rows were generated around -3, dog rows around +3.
    assert np.all((ds.x_train.mean(axis=1) > 0) == (ds.y_train == 1))


def test_csv_integer_labels_and_label_column_option(tmp_path):
    path = tmp_path / "ints.csv"
    path.write_text("target;a;b\n" + "".join(f"{i % 3};{i};{i * 0.5}\n" for i in range(30)))
    ds = load_dataset(path, options={"label_column": "target"})
    assert ds.num_classes == 3 and ds.class_names == ["0", "1", "2"] and ds.input_shape == (2,)
    with pytest.raises(DatasetError, match="no label column 'y'"):
        load_dataset(path, options={"label_column": "y"})


def test_csv_without_label_column_is_transfer_set(tmp_path):
    path = tmp_path / "nolabel.csv"
    path.write_text("a,b\n" + "".join(f"{i},{-i}\n" for i in range(20)))
    ds = load_dataset(path)
    assert not ds.labeled and ds.num_classes is None and ds.input_shape == (2,)


@pytest.mark.parametrize(
    "text, needle",
    [
        ("a,b,label\n1,2,0\n3,x,1\n", r"column 'b' is not numeric: row 2 \(line 3\) holds 'x'"),
        ("a,b,label\n1,2,0\n3,,1\n", "column 'b' is not numeric: row 2"),
        ("a,b,label\n1,nan,0\n3,4,1\n", "column 'b' holds nan at row 1"),
        ("a,b,label\n1,2,0\n3,4,-1\n", "labels must be >= 0"),
        ("a,b,label\n1,2,0\n3,4,1.5\n", "must be integers"),
        ("a,b,label\n1,2,0\n3,4\n", "line 3 of the CSV file has 2 fields"),
        ("a,b,label\n", "no data rows"),
        ("", "empty"),
        ("1,2,3\n4,5,6\n", "name the columns"),
        ("a,a,label\n1,2,0\n", "twice"),
        ("label\n0\n1\n", "no feature columns"),
    ],
)
def test_csv_refusals(tmp_path, text, needle):
    path = tmp_path / "bad.csv"
    path.write_text(text)
    with pytest.raises(DatasetError, match=needle):
        load_dataset(path)


# ---------- ZIP of class folders ----------


def test_zip_round_trip_rgb(tiny_zip):
    ds = load_dataset(tiny_zip, options={"image_size": 4})
    assert ds.format == "zip" and ds.is_image and ds.input_shape == (3, 4, 4)
    assert ds.class_names == ["blue", "red"] and ds.num_samples == 20
    x = _all_x(ds)
    assert x.dtype == np.float32 and 0.0 <= x.min() and x.max() <= 1.0
    # Red images are red in channel 0, blue ones in channel 2.
    reds = ds.x_train[ds.y_train == 1]
    assert np.all(reds[:, 0] > 0.75) and np.all(reds[:, 2] < 0.1)
    assert len(ds.preprocessing["mean"]) == 3


def test_zip_grayscale_and_rectangular_size(make_zip, png_bytes):
    members = {
        f"{c}/{i}.png": png_bytes(40 * i + (100 if c == "b" else 0), (10, 6), "L")
        for c in "ab"
        for i in range(4)
    }
    ds = load_dataset(make_zip(members), options={"image_size": [5, 7]}, val_fraction=0, test_fraction=0)
    assert ds.input_shape == (1, 5, 7) and ds.info["color"] == "grayscale"
    # A colour PNG joins the set: now everything is RGB.
    members["a/color.png"] = png_bytes((255, 0, 0))
    jpeg = io.BytesIO()
    Image.new("RGB", (12, 12), (0, 200, 0)).save(jpeg, format="JPEG")
    members["b/photo.JPG"] = jpeg.getvalue()
    ds = load_dataset(
        make_zip(members, "mixed.zip"), options={"image_size": 6}, val_fraction=0, test_fraction=0
    )
    assert ds.input_shape == (3, 6, 6) and ds.num_samples == 10 and ds.info["color"] == "rgb"
    means = ds.x_train.mean(axis=(2, 3))
    green = (means[:, 1] > 0.6) & (means[:, 0] < 0.1) & (means[:, 2] < 0.1)
    assert green.sum() == 1 and ds.class_names[ds.y_train[green][0]] == "b"


def test_zip_split_folders_and_wrapping_folder(make_zip, png_bytes):
    members = {}
    for split, n in (("train", 6), ("val", 2), ("test", 3)):
        for c in ("cat", "dog"):
            for i in range(n):
                members[f"pets/{split}/{c}/{i}.png"] = png_bytes((i, 0, 0) if c == "cat" else (0, 0, i))
    ds = load_dataset(make_zip(members), options={"image_size": 8})
    assert (len(ds.x_train), len(ds.x_val), len(ds.x_test)) == (12, 4, 6)
    assert ds.class_names == ["cat", "dog"]
    np.testing.assert_array_equal(np.bincount(ds.y_test), [3, 3])


def test_zip_skips_non_images_with_reason(make_zip, png_bytes):
    members = {f"{c}/{i}.png": png_bytes((i * 20, 0, 0)) for c in ("a", "b") for i in range(5)}
    members["a/notes.txt"] = b"hello"
    members["b/broken.png"] = b"not really a png"
    members["readme.png"] = png_bytes()
    members["__MACOSX/a/._0.png"] = b"junk"
    ds = load_dataset(make_zip(members))
    assert ds.num_samples == 10
    reasons = {s["name"]: s["reason"] for s in ds.info["skipped"]}
    assert set(reasons) == {"a/notes.txt", "b/broken.png", "readme.png"}
    assert "not a .png" in reasons["a/notes.txt"] and "class folder" in reasons["readme.png"]
    info = inspect_dataset(make_zip(members, "again.zip"))
    assert info["skipped_count"] == 3


@pytest.mark.parametrize(
    "name", ["../evil/x.png", "/etc/x.png", "a/../../x.png", "C:/x.png", "a\\..\\..\\x.png"]
)
def test_zip_path_traversal_refused(make_zip, png_bytes, name):
    members = {"a/1.png": png_bytes(), "b/1.png": png_bytes(), name: png_bytes()}
    with pytest.raises(DatasetError, match="unsafe path"):
        load_dataset(make_zip(members))


def test_zip_without_images_refused(make_zip):
    with pytest.raises(DatasetError, match="no usable images.*not a .png"):
        load_dataset(make_zip({"a/readme.txt": b"hi", "b/data.csv": b"1,2"}))
    with pytest.raises(DatasetError, match="no usable images"):
        load_dataset(make_zip({}, "empty.zip"))


def test_zip_too_many_entries_and_bomb_refused(monkeypatch, tiny_zip):
    monkeypatch.setattr(images_mod, "MAX_ZIP_ENTRIES", 5)
    with pytest.raises(DatasetError, match="20 entries; at most 5"):
        load_dataset(tiny_zip)
    monkeypatch.setattr(images_mod, "MAX_ZIP_ENTRIES", 100)
    monkeypatch.setattr(images_mod, "MAX_ZIP_UNCOMPRESSED", 1000)
    with pytest.raises(DatasetError, match="would unpack"):
        load_dataset(tiny_zip)


def test_zip_real_bomb_entry_refused(make_zip, png_bytes):
    # 3 GiB of zeros does not have to exist: the declared size is what is checked.
    members = {"a/1.png": png_bytes(), "b/1.png": png_bytes()}
    path = make_zip(members)
    with zipfile.ZipFile(path, "a", zipfile.ZIP_DEFLATED) as zf:
        info = zipfile.ZipInfo("a/bomb.png")
        with zf.open(info, "w", force_zip64=True) as f:
            chunk = b"\0" * (1 << 24)
            for _ in range(8):  # 128 MiB, deflates to ~128 KiB
                f.write(chunk)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(images_mod, "MAX_ZIP_UNCOMPRESSED", 64 * 1024**2)
        with pytest.raises(DatasetError, match="would unpack"):
            load_dataset(path)


def test_zip_pixel_cap(monkeypatch, make_zip, png_bytes):
    members = {
        "a/1.png": png_bytes(size=(8, 8)),
        "a/2.png": png_bytes(size=(40, 40)),
        "b/1.png": png_bytes(size=(8, 8)),
    }
    monkeypatch.setattr(images_mod, "MAX_IMAGE_PIXELS", 100)
    ds = load_dataset(make_zip(members), val_fraction=0, test_fraction=0)
    assert ds.num_samples == 2
    assert "pixels" in ds.info["skipped"][0]["reason"]


def test_zip_not_a_zip(tmp_path):
    path = tmp_path / "x.zip"
    path.write_bytes(b"PK nonsense")
    with pytest.raises(DatasetError, match="not a ZIP"):
        load_dataset(path)


# ---------- sources, limits, fingerprint, inspection ----------


def test_bad_sources(tmp_path):
    with pytest.raises(DatasetError, match="unknown dataset 'mnist'"):
        load_dataset("mnist")
    (tmp_path / "d.txt").write_text("1,2")
    with pytest.raises(DatasetError, match="unsupported dataset file type '.txt'"):
        load_dataset(tmp_path / "d.txt")
    with pytest.raises(DatasetError, match="not found"):
        load_dataset(tmp_path / "missing.npz")
    with pytest.raises(DatasetError, match="options"):
        load_dataset("digits", options=["image_size"])


def test_format_option_overrides_extension(tmp_path, tiny_csv):
    blob = tmp_path / "upload_3f9a"
    blob.write_bytes(tiny_csv.read_bytes())
    assert load_dataset(blob, options={"format": "csv"}).num_classes == 2


def test_no_memory_cap_only_disk(tmp_path):
    # Files are streamed into an on-disk store, so size is refused by free disk, not by a memory cap.
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": "<f4", "fortran_order": False, "shape": (10**13, 10)})
    path = tmp_path / "huge.npz"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("x.npy", buf.getvalue() + b"\0" * 64)
    with pytest.raises(DatasetError, match="MiB of disk but only"):
        load_dataset(path)


def test_fingerprint_stable_across_processes_and_sensitive_to_options(tiny_npz, tiny_zip):
    code = "import sys; from kd_core.data import load_dataset; print(load_dataset(sys.argv[1]).fingerprint)"
    out = subprocess.run(
        [sys.executable, "-c", code, str(tiny_npz)], capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == load_dataset(tiny_npz).fingerprint
    assert load_dataset(tiny_npz, val_fraction=0.2).fingerprint != load_dataset(tiny_npz).fingerprint
    small = load_dataset(tiny_zip, options={"image_size": 4}).fingerprint
    assert small != load_dataset(tiny_zip, options={"image_size": 5}).fingerprint
    assert small == load_dataset(tiny_zip, options={"image_size": [4, 4]}).fingerprint


def test_inspect_image_preview(tiny_zip):
    info = inspect_dataset(tiny_zip, options={"image_size": 8})
    text = json.dumps(info)
    assert json.loads(text) == info
    assert info["format"] == "zip" and info["num_samples"] == 20 and info["num_classes"] == 2
    assert info["input_shape"] == [3, 8, 8] and info["labeled"] and info["is_image"]
    assert info["splits"] == {"train": 14, "val": 2, "test": 4}
    assert sum(info["class_counts"]) == 14 and info["empty_classes"] == []
    samples = info["preview"]["samples"]
    assert info["preview"]["kind"] == "image" and 1 <= len(samples) <= 16
    assert {s["label"] for s in samples} == {"red", "blue"}
    img = Image.open(io.BytesIO(base64.b64decode(samples[0]["png"])))
    assert img.format == "PNG" and img.size == (8, 8)


def test_inspect_digits_preview_has_every_class():
    info = inspect_dataset("digits")
    json.dumps(info)
    assert len(info["preview"]["samples"]) == 16
    assert {s["label"] for s in info["preview"]["samples"]} == set(info["class_names"])


def test_inspect_table_preview(tiny_csv):
    info = inspect_dataset(tiny_csv)
    json.dumps(info)
    prev = info["preview"]
    assert prev["kind"] == "table" and prev["columns"] == ["f1", "f2", "f3", "label"]
    assert len(prev["rows"]) == 10 and all(len(r) == 4 for r in prev["rows"])
    assert {r[3] for r in prev["rows"]} <= {"cat", "dog"}
    assert info["labeled"] and not info["is_image"] and info["num_samples"] == 40


def test_inspect_refusal_is_dataset_error(tmp_path):
    path = tmp_path / "bad.csv"
    path.write_text("a,label\nx,0\n")
    with pytest.raises(DatasetError, match="column 'a'"):
        inspect_dataset(path)


def test_uploaded_digits_matches_builtin(digits_npz):
    uploaded = load_dataset(digits_npz)
    builtin = load_dataset("digits")
    np.testing.assert_array_equal(uploaded.x_train, builtin.x_train)
    np.testing.assert_array_equal(uploaded.y_val, builtin.y_val)
    assert uploaded.class_names == builtin.class_names
