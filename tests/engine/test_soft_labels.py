"""Soft-label teachers in the engine: the file's checks, coverage, and distill runs that use its logits."""

import numpy as np
import pytest
import torch

from kd_core.checkpoints import load_teacher
from kd_core.config import ExperimentConfig
from kd_core.data import load_dataset
from kd_core.errors import CheckpointError, ConfigError
from kd_core.runner import run_experiment
from kd_core.sinks import ListSink
from kd_core.soft_labels import read_soft_labels, split_rows
from kd_core.trainer import split_tensors


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """digits as an uploaded NPZ, so the dataset has a store and a stable sample index."""
    from sklearn.datasets import load_digits

    d = load_digits()
    path = tmp_path_factory.mktemp("data") / "digits.npz"
    np.savez(path, x=(d.data / 16.0).astype(np.float32), y=d.target.astype(np.int64))
    return load_dataset(path, seed=0)


@pytest.fixture(scope="module")
def predictions(store, tmp_path_factory):
    """A teacher trained on the store, and its logits on every stored sample (by store row)."""
    out = tmp_path_factory.mktemp("teacher")
    cfg = ExperimentConfig(kind="train", epochs=8, lr=0.01, model={"arch": "mlp", "hidden": [64]})
    result = run_experiment(cfg, dataset=store, out_dir=out, sink=ListSink(), device="cpu", export=False)
    n = sum(len(split_rows(store, s)) for s in ("train", "val", "test"))
    logits = np.zeros((n, 10), dtype=np.float32)
    with torch.no_grad():
        for split in ("train", "val", "test"):
            x, _ = split_tensors(store, split, torch.device("cpu"))
            logits[split_rows(store, split)] = result.model.eval()(x).numpy()
    return logits, result.metrics["test_acc"]


def _npz(path, index, **arrays):
    np.savez(path, index=np.asarray(index, dtype=np.int64), **arrays)
    return path


def _distill(store, path, tmp_path, **fields):
    cfg = ExperimentConfig(
        kind="distill", teacher=str(path), epochs=12, lr=0.01, model={"arch": "mlp", "hidden": [32]}, **fields
    )
    with load_teacher(path, num_classes=10) as teacher:
        return run_experiment(
            cfg, dataset=store, teacher=teacher, out_dir=tmp_path, sink=ListSink(), device="cpu", export=False
        )


def test_a_student_follows_full_soft_labels(store, predictions, tmp_path):
    logits, _ = predictions
    path = _npz(tmp_path / "soft.npz", np.arange(len(logits)), logits=logits.astype(np.float16))
    m = _distill(store, path, tmp_path / "run").metrics
    assert m["teacher_coverage"] == 1.0
    assert m["test_agreement"] >= 0.9
    assert m["test_kl_to_teacher"] is not None and m["teacher_params"] is None


def test_probs_and_partial_coverage(store, predictions, tmp_path):
    logits, _ = predictions
    rng = np.random.default_rng(0)
    keep = np.sort(rng.permutation(len(logits))[: len(logits) // 2])  # half the samples, shuffled order below
    shuffled = rng.permutation(keep)
    probs = torch.softmax(torch.as_tensor(logits[shuffled]), 1).numpy()
    path = _npz(tmp_path / "probs.npz", shuffled, probs=probs)
    m = _distill(store, path, tmp_path / "run", method="dkd", method_options={"warmup_epochs": 2}).metrics
    train = split_rows(store, "train")
    assert m["teacher_coverage"] == pytest.approx(np.isin(train, keep).mean())
    test = split_rows(store, "test")
    assert m["test_teacher_coverage"] == pytest.approx(np.isin(test, keep).mean())
    assert m["test_agreement"] >= 0.85  # measured over the covered test samples only


def test_augment_is_refused(store, predictions, tmp_path):
    logits, _ = predictions
    path = _npz(tmp_path / "soft.npz", np.arange(len(logits)), logits=logits)
    with pytest.raises(ConfigError, match="cannot score augmented inputs"):
        _distill(store, path, tmp_path / "run", augment="noise")


def test_an_unlabeled_transfer_set_must_be_covered(store, predictions, tmp_path):
    import dataclasses

    logits, _ = predictions
    unlabeled = dataclasses.replace(store, y_train=None, num_classes=None)
    path = _npz(tmp_path / "soft.npz", np.arange(100), logits=logits[:100])
    cfg = ExperimentConfig(kind="distill", teacher=str(path), epochs=1, model={"arch": "mlp", "hidden": [8]})
    with (
        load_teacher(path) as teacher,
        pytest.raises(ConfigError, match="every training sample needs a prediction"),
    ):
        run_experiment(
            cfg, dataset=unlabeled, teacher=teacher, out_dir=tmp_path, sink=ListSink(), device="cpu"
        )


def test_a_builtin_dataset_has_no_index(predictions, tmp_path):
    logits, _ = predictions
    path = _npz(tmp_path / "soft.npz", np.arange(len(logits)), logits=logits)
    with pytest.raises(CheckpointError, match="built-in dataset"):
        _distill(load_dataset("digits"), path, tmp_path / "run")


@pytest.mark.parametrize(
    "arrays, message",
    [
        ({"logits": np.zeros((3, 4), np.float32)}, "'index' array"),
        ({"index": np.arange(3)}, "exactly one of 'logits' or 'probs'"),
        ({"index": np.arange(3), "logits": np.zeros((3, 4)), "probs": np.zeros((3, 4))}, "exactly one"),
        (
            {"index": np.arange(3), "logits": np.zeros((2, 4), np.float32)},
            "'index' has 3 rows but 'logits' has 2",
        ),
        ({"index": np.arange(3), "logits": np.zeros(3, np.float32)}, "2-D float16/float32"),
        ({"index": np.arange(3).astype(np.float32), "logits": np.zeros((3, 4), np.float32)}, "1-D integer"),
        ({"index": np.array([0, 1, 1]), "logits": np.zeros((3, 4), np.float32)}, "sample 1 more than once"),
        ({"index": np.array([0, 1, 50]), "logits": np.zeros((3, 4), np.float32)}, "holds 50, outside"),
        ({"index": np.array([0, -1, 2]), "logits": np.zeros((3, 4), np.float32)}, "holds -1, outside"),
        ({"index": np.arange(3), "logits": np.array([[0, 1, np.nan, 0]] * 3, np.float32)}, "non-finite"),
        ({"index": np.arange(3), "probs": np.full((3, 4), 0.3, np.float32)}, "sums to 1.2000, not 1"),
        ({"index": np.arange(3), "probs": np.array([[1.5, -0.5, 0, 0]] * 3, np.float32)}, "negative"),
        ({"index": np.arange(3), "logits": np.zeros((3, 5), np.float32)}, "5 classes but the dataset has 4"),
        ({"index": np.arange(3), "logits": np.array([[object()]] * 3, dtype=object)}, "Python objects"),
    ],
)
def test_bad_files_are_refused_in_words(tmp_path, arrays, message):
    path = tmp_path / "bad.npz"
    np.savez(path, **arrays)
    with pytest.raises(CheckpointError) as info:
        read_soft_labels(path, num_samples=10, num_classes=4)
    assert message in str(info.value)


def test_probs_become_log_probabilities(tmp_path):
    probs = np.array([[0.5, 0.5, 0.0], [0.1, 0.2, 0.7]], np.float32)
    labels = read_soft_labels(_npz(tmp_path / "p.npz", [4, 2], probs=probs), num_samples=5, num_classes=3)
    assert labels.index.tolist() == [2, 4]  # sorted by index, rows follow
    back = torch.softmax(torch.as_tensor(labels.logits), 1).numpy()
    assert back == pytest.approx(probs[[1, 0]], abs=1e-6)
    assert np.isfinite(labels.logits).all()
