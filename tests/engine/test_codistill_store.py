"""Codistillation groups over a dataset store: worker processes get the store's path, not a copy of x."""

from __future__ import annotations

import numpy as np
import pytest

from kd_core.codistill import load_saved_dataset, run_codistill, save_dataset
from kd_core.data import load_dataset
from kd_core.data.dataset import SplitView
from kd_core.data.store import ingest
from kd_core.sinks import ListSink
from tests.engine.test_codistill import SYNTH, config


@pytest.fixture(scope="module")
def stored(tmp_path_factory):
    data = load_dataset("synthetic", options=SYNTH, seed=0)
    tmp = tmp_path_factory.mktemp("store")
    x = np.concatenate([data.x_train, data.x_val, data.x_test]).astype(np.float32)
    y = np.concatenate([data.y_train, data.y_val, data.y_test])
    np.savez(tmp / "synth.npz", x=x, y=y)
    ingest(tmp / "synth.npz", tmp / "store")
    ds = load_dataset(tmp / "store")
    assert ds.store_path and isinstance(ds.x_train, SplitView)
    return ds


def test_a_store_dataset_is_saved_as_its_path_and_rows(stored, tmp_path):
    save_dataset(stored, tmp_path)
    with np.load(tmp_path / "arrays.npz") as npz:
        assert not {"x_train", "x_val", "x_test"} & set(npz.files)
    back = load_saved_dataset(tmp_path)
    assert back.store_path == stored.store_path and back.fingerprint == stored.fingerprint
    for split in ("train", "val", "test"):
        idx = np.arange(stored.split_size(split))[::-1]
        (xa, ya), (xb, yb) = back.read(split, idx), stored.read(split, idx)
        assert isinstance(back.split(split)[0], SplitView)
        assert np.array_equal(xa, xb) and np.array_equal(ya, yb)


def test_a_group_of_two_processes_trains_on_the_store(stored, tmp_path):
    result = run_codistill(config(replicas=1, group_size=2), stored, out_dir=tmp_path, sink=ListSink())
    folder = tmp_path / "codistill-job" / "group0"
    assert (folder / "rank0.digest").read_text() == (folder / "rank1.digest").read_text()
    assert "safetensors" in result.files
