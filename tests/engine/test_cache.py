"""Teacher-logit cache: the teacher runs once per (teacher, dataset, split) and never on stale augmented views."""

import dataclasses

import numpy as np
import pytest
import torch

from kd_core.cache import TeacherLogitCache
from kd_core.checkpoints import load_teacher
from kd_core.config import ExperimentConfig
from kd_core.data import load_dataset
from kd_core.export import export_model
from kd_core.models import build_model
from kd_core.runner import run_experiment
from kd_core.sinks import ListSink
from kd_core.trainer import train_model


class CountingTeacher:
    """A real Teacher behind a wrapper that counts the forward passes and the samples it saw."""

    def __init__(self, teacher):
        self.inner = teacher
        self.calls = 0
        self.samples = 0

    def logits(self, x):
        self.calls += 1
        self.samples += x.shape[0]
        return self.inner.logits(x)

    def to(self, device):
        self.inner.to(device)
        return self

    def eval(self):
        self.inner.eval()
        return self

    def __getattr__(self, name):  # fingerprint, num_params, input_shape, num_classes, module, device
        return getattr(self.inner, name)


@pytest.fixture(scope="module")
def digits():
    ds = load_dataset("digits")
    return dataclasses.replace(ds, x_train=ds.x_train[:256], y_train=ds.y_train[:256])


@pytest.fixture(scope="module")
def teacher_file(digits, tmp_path_factory):
    torch.manual_seed(0)
    model = build_model({"arch": "mlp", "hidden": [32]}, digits.input_shape, 10, digits.preprocessing)
    train_model(model, digits, ExperimentConfig(epochs=2, lr=0.01), sink=ListSink(), device="cpu")
    out = tmp_path_factory.mktemp("teacher")
    x = torch.as_tensor(digits.x_val[:4])
    return export_model(model, out, basename="teacher", sample_inputs=x, formats=["safetensors"])[
        "safetensors"
    ]


def _distill(**kw):
    base = {
        "kind": "distill",
        "teacher": "t",
        "epochs": 2,
        "batch_size": 64,
        "model": {"arch": "mlp", "hidden": [8]},
    }
    return ExperimentConfig(**{**base, **kw})


def test_second_run_with_the_cache_does_not_call_the_teacher(digits, teacher_file, tmp_path):
    cache_dir = tmp_path / "cache"
    first = CountingTeacher(load_teacher(teacher_file))
    r1 = run_experiment(
        _distill(),
        dataset=digits,
        teacher=first,
        out_dir=tmp_path / "a",
        sink=ListSink(),
        device="cpu",
        cache_dir=cache_dir,
        export=False,
    )
    n_all = len(digits.x_train) + len(digits.x_val) + len(digits.x_test)
    assert first.samples == n_all  # once per split, not once per epoch
    assert len(list(cache_dir.glob("*.npy"))) == 3

    # Another temperature and alpha: a sweep pays for the teacher once.
    second = CountingTeacher(load_teacher(teacher_file))
    r2 = run_experiment(
        _distill(temperature=2.0, alpha=0.5),
        dataset=digits,
        teacher=second,
        out_dir=tmp_path / "b",
        sink=ListSink(),
        device="cpu",
        cache_dir=cache_dir,
        export=False,
    )
    assert second.calls == 0
    assert r2.metrics["teacher_acc"] == r1.metrics["teacher_acc"]


def test_cached_logits_equal_the_teachers(digits, teacher_file, tmp_path):
    teacher = load_teacher(teacher_file)
    x = torch.as_tensor(digits.x_val)
    cache = TeacherLogitCache(tmp_path)
    got = cache.logits(teacher, digits, "val", x)
    # Stored as fp16 (half the disk of a large transfer set): equal to about 3 significant digits.
    torch.testing.assert_close(got, teacher.logits(x), rtol=1e-3, atol=1e-3)
    again = TeacherLogitCache(tmp_path).logits(teacher, digits, "val", x)  # from disk
    assert torch.equal(again, got)
    # Another dataset fingerprint or split is another key.
    keys = {
        TeacherLogitCache.key(teacher.fingerprint, digits.fingerprint, "val", len(x)),
        TeacherLogitCache.key(teacher.fingerprint, digits.fingerprint, "train", len(x)),
        TeacherLogitCache.key(teacher.fingerprint, "other", "val", len(x)),
        TeacherLogitCache.key("other", digits.fingerprint, "val", len(x)),
    }
    assert len(keys) == 4


def test_a_damaged_cache_file_is_recomputed(digits, teacher_file, tmp_path):
    teacher = CountingTeacher(load_teacher(teacher_file))
    x = torch.as_tensor(digits.x_val)
    cache = TeacherLogitCache(tmp_path)
    good = cache.logits(teacher, digits, "val", x)
    (path,) = tmp_path.glob("*.npy")
    path.write_bytes(b"not an npy file")
    assert torch.equal(TeacherLogitCache(tmp_path).logits(teacher, digits, "val", x), good)
    np.save(path, np.zeros((3, 10), dtype=np.float32))  # wrong shape
    assert torch.equal(TeacherLogitCache(tmp_path).logits(teacher, digits, "val", x), good)
    assert teacher.calls == 3


def test_with_augmentation_the_teacher_sees_every_augmented_batch(digits, teacher_file, tmp_path):
    teacher = CountingTeacher(load_teacher(teacher_file))
    cache_dir = tmp_path / "cache"
    result = run_experiment(
        _distill(augment="flip_crop"),
        dataset=digits,
        teacher=teacher,
        out_dir=tmp_path / "a",
        sink=ListSink(),
        device="cpu",
        cache_dir=cache_dir,
        export=False,
    )
    steps = result.metrics["steps"]
    # val and test once (fixed inputs, cached); the train split batch by batch, 2 epochs of it.
    assert teacher.calls == 2 + steps
    assert teacher.samples == len(digits.x_val) + len(digits.x_test) + 2 * len(digits.x_train)
    assert len(list(cache_dir.glob("*.npy"))) == 2  # no train-split entry that augmentation would make stale
