"""Bounded strings in the engine: class names, column names and metadata are refused whole, never cut."""

from __future__ import annotations

import json
import time
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
from safetensors.torch import save_file

from kd_core.checkpoints import inspect_checkpoint
from kd_core.config import parse_config
from kd_core.data import inspect_dataset, load_dataset
from kd_core.errors import CheckpointError, ConfigError, DatasetError
from kd_core.limits import MAX_CLASSES, MAX_NAME_CHARS, name_problem
from kd_core.models import build_model

X = np.random.default_rng(0).normal(size=(30, 4)).astype(np.float32)
Y = np.arange(30) % 3


def _npz(tmp_path: Path, class_names, compressed: bool = True) -> Path:
    path = tmp_path / "d.npz"
    (np.savez_compressed if compressed else np.savez)(path, x=X, y=Y, class_names=class_names)
    return path


def _both(path: Path, match: str, options=None) -> None:
    """The full loader and the memory-lean inspection refuse alike."""
    with pytest.raises(DatasetError, match=match):
        load_dataset(path, options=options)
    with pytest.raises(DatasetError, match=match):
        inspect_dataset(path, options=options)


def test_name_problem():
    assert name_problem("a" * MAX_NAME_CHARS, "x") is None
    assert "201 characters long; at most 200" in name_problem("a" * 201, "'name'")
    assert "control character" in name_problem("a\x00b", "class name 0")
    assert "control character" in name_problem("two\nlines", "class name 0")
    assert name_problem("ünïcødé ✓ 猫", "x") is None


def test_a_20_million_character_class_name_is_refused_from_the_header(tmp_path):
    """The issue's file: one huge name in a small compressed NPZ; refused before the array is loaded."""
    path = _npz(tmp_path, np.array(["a" * 20_000_000, "b", "c"]))
    assert path.stat().st_size < 1_000_000
    tracemalloc.start()
    started = time.perf_counter()
    with pytest.raises(DatasetError, match=r"up to 20,000,000 characters long; at most 200") as info:
        inspect_dataset(path)
    elapsed = time.perf_counter() - started
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert len(str(info.value)) < 300  # the reason, never the name
    assert peak < 5 * 1024**2, f"{peak / 2**20:.0f} MiB held to refuse it"
    assert elapsed < 5
    with pytest.raises(DatasetError, match="at most 200"):
        load_dataset(path)


@pytest.mark.parametrize("compressed", [True, False])
def test_class_names_over_the_count_are_refused(tmp_path, compressed):
    names = np.array([f"c{i}" for i in range(MAX_CLASSES + 1)])
    _both(_npz(tmp_path, names, compressed), f"lists {MAX_CLASSES + 1} classes; at most {MAX_CLASSES}")


def test_a_class_name_just_over_the_limit_is_refused_by_length(tmp_path):
    # Bytes of UTF-8: 201 characters pass the header's width bound and are refused once decoded.
    _both(_npz(tmp_path, np.array([b"a" * 201, b"b", b"c"])), "class name 0 is 201 characters long")
    _both(_npz(tmp_path, np.array(["ok", "a" * 201, "c"])), "names up to 201 characters long")
    # Exactly at the limit is fine, in full.
    ds = load_dataset(_npz(tmp_path, np.array(["a" * 200, "b", "c"])))
    assert ds.class_names[0] == "a" * 200


def test_control_characters_in_class_names_are_refused(tmp_path):
    _both(_npz(tmp_path, np.array(["a\x00b", "new\nline", "c"])), "class name 0 holds a control character")


def test_csv_label_and_column_names_are_bounded(tmp_path):
    long_label = tmp_path / "label.csv"
    long_label.write_text("f1,label\n1.0,cat\n2.0," + "x" * 300 + "\n3.0,dog\n")
    _both(long_label, r"row 2 \(line 3\) has a 'label' label of 300 characters; a label is at most 200")
    long_column = tmp_path / "column.csv"
    long_column.write_text("f1," + "c" * 5000 + ",label\n1,2,0\n3,4,1\n5,6,0\n")
    _both(long_column, "the name of CSV column 2 is 5,000 characters long")
    ok = tmp_path / "ok.csv"
    ok.write_text("f1,label\n" + "".join(f"{i}.0,{'n' * 200 if i % 2 else 'm'}\n" for i in range(20)))
    assert "n" * 200 in load_dataset(ok).class_names
    with pytest.raises(DatasetError, match="'label_column' is 1,000 characters long"):
        inspect_dataset(ok, options={"label_column": "l" * 1000})


def test_zip_class_folder_names_are_bounded(make_zip, png_bytes):
    long_folder = make_zip({f"{'k' * 250}/a.png": png_bytes(), "dog/b.png": png_bytes()}, name="long.zip")
    _both(long_folder, "is 250 characters long; at most 200")
    control = make_zip({"ca\tt/a.png": png_bytes(), "dog/b.png": png_bytes()}, name="ctl.zip")
    _both(control, "control character")


def test_npz_array_names_are_bounded(tmp_path):
    path = tmp_path / "d.npz"
    np.savez(path, x=X, y=Y, **{"n" * 300: np.zeros(2)})
    _both(path, "an array name in the NPZ file is 300 characters long")


def test_checkpoint_metadata_class_names_are_bounded(tmp_path):
    model = build_model({"arch": "mlp", "hidden": [8]}, (4,), 3).eval()
    tensors = {k: v.contiguous() for k, v in model.state_dict().items()}

    def write(names) -> Path:
        path = tmp_path / "m.safetensors"
        meta = {"class_names": json.dumps(names), "input_shape": json.dumps([4]), "num_classes": "3"}
        save_file(tensors, str(path), metadata=meta)
        return path

    arch = {"arch": "mlp", "hidden": [8]}
    with pytest.raises(CheckpointError, match=f"lists {MAX_CLASSES + 1} class names; at most {MAX_CLASSES}"):
        inspect_checkpoint(str(write([f"c{i}" for i in range(MAX_CLASSES + 1)])), arch=arch)
    with pytest.raises(
        CheckpointError, match="class name 1 in its metadata is 5,000 characters long"
    ) as info:
        inspect_checkpoint(str(write(["a", "b" * 5000, "c"])), arch=arch)
    assert len(str(info.value)) < 300
    with pytest.raises(CheckpointError, match="control character"):
        inspect_checkpoint(str(write(["a", "b\r\n", "c"])), arch=arch)
    assert inspect_checkpoint(str(write(["a", "b" * 200, "c"])), arch=arch)["class_names"][1] == "b" * 200


def test_experiment_names_are_bounded():
    base = {"dataset": "digits"}
    assert parse_config({**base, "name": "n" * 200}).name == "n" * 200
    with pytest.raises(ConfigError, match="'name' is 201 characters long"):
        parse_config({**base, "name": "n" * 201})
    with pytest.raises(ConfigError, match="control character"):
        parse_config({**base, "name": "a\x00"})
