"""Distill runs with each method end to end: fidelity metrics next to accuracy, and keep best/last."""

import dataclasses
import json

import pytest
import torch

from kd_core.checkpoints import load_teacher
from kd_core.config import ExperimentConfig
from kd_core.data import load_dataset
from kd_core.errors import ConfigError
from kd_core.runner import run_experiment
from kd_core.sinks import ListSink


@pytest.fixture(scope="module")
def digits():
    ds = load_dataset("digits")
    return dataclasses.replace(ds, x_train=ds.x_train[:384], y_train=ds.y_train[:384])


@pytest.fixture(scope="module")
def teacher(digits, tmp_path_factory):
    out = tmp_path_factory.mktemp("teacher")
    cfg = ExperimentConfig(kind="train", epochs=6, lr=0.01, model={"arch": "mlp", "hidden": [64]})
    run_experiment(cfg, dataset=digits, out_dir=out, sink=ListSink(), device="cpu", export=True)
    return out / "student.safetensors"


def _distill(digits, teacher_path, tmp_path, **fields):
    cfg = ExperimentConfig(
        kind="distill", teacher=str(teacher_path), epochs=10, lr=0.01, model={"arch": "mlp", "hidden": [16]},
        **fields,
    )  # fmt: skip
    sink = ListSink()
    with load_teacher(teacher_path) as t:
        result = run_experiment(
            cfg, dataset=digits, teacher=t, out_dir=tmp_path, sink=sink, device="cpu", export=False
        )
    return result, sink


@pytest.mark.parametrize(
    "fields",
    [
        {"method": "dkd", "method_options": {"warmup_epochs": 1}},
        {"method": "dist"},
        {"method": "hinton", "logit_standardization": True, "temperature": 2.0},
        {"method": "dkd", "logit_standardization": True},
    ],
)
def test_each_method_distills_and_reports_fidelity(digits, teacher, tmp_path, fields):
    result, sink = _distill(digits, teacher, tmp_path, **fields)
    m = result.metrics
    assert m["method"] == fields["method"]
    for key in ("test_acc", "val_agreement", "test_agreement", "val_kl_to_teacher", "test_kl_to_teacher"):
        assert m[key] is not None and m[key] == m[key], key
    assert m["test_agreement"] > 0.7  # the teacher is right on ~90%: the student follows it
    assert 0.0 <= m["test_kl_to_teacher"] < 5.0
    series = {k for _, values in sink.rows for k in values}
    assert {"val/agreement", "val/kl_to_teacher", "train/loss_soft", "train/loss_hard"} <= series
    saved = json.loads((tmp_path / "result.json").read_text())
    assert saved["config"]["method"] == fields["method"]


def test_kl_to_teacher_is_the_direct_mean(digits, teacher, tmp_path):
    from kd_core.trainer import evaluate

    result, _ = _distill(digits, teacher, tmp_path)
    with load_teacher(teacher) as t:
        x = torch.as_tensor(digits.x_test)
        tl = t.logits(x)
    got = evaluate(result.model, x, torch.as_tensor(digits.y_test), teacher_logits=tl)
    with torch.no_grad():
        s = result.model.eval()(x)
    p = tl.softmax(1)
    direct = (p * (tl.log_softmax(1) - s.log_softmax(1))).sum(1).mean()
    assert got["kl_to_teacher"] == pytest.approx(float(direct), rel=1e-4)
    assert result.metrics["test_kl_to_teacher"] == pytest.approx(float(direct), rel=1e-3)


def test_dkd_refuses_an_unlabeled_transfer_set(digits, teacher, tmp_path):
    unlabeled = dataclasses.replace(digits, y_train=None)
    with pytest.raises(ConfigError, match="dkd' needs labels"):
        _distill(unlabeled, teacher, tmp_path, method="dkd")


@pytest.mark.parametrize("kind", ["train", "distill"])
def test_keep_last_reports_and_exports_the_final_weights(digits, teacher, tmp_path, kind):
    results = {}
    for keep in ("best", "last"):
        cfg = ExperimentConfig(
            kind=kind, teacher=str(teacher) if kind == "distill" else None, epochs=5, lr=0.05,
            model={"arch": "mlp", "hidden": [16]}, keep=keep,
        )  # fmt: skip
        sink = ListSink()
        with load_teacher(teacher) as t:
            results[keep] = run_experiment(
                cfg, dataset=digits, teacher=t if kind == "distill" else None, out_dir=tmp_path / keep,
                sink=sink, device="cpu", export=False,
            )  # fmt: skip
        val = [(step, v["val/acc"]) for step, v in sink.rows if "val/acc" in v]
        m = results[keep].metrics
        assert m["kept"] == keep
        if keep == "last":
            assert m["best_epoch"] == pytest.approx(5.0)
            assert m["val_acc"] == pytest.approx(val[-1][1])
        else:
            assert m["val_acc"] == pytest.approx(max(v for _, v in val))
    # Same seed and data: identical training, so the last weights' val accuracy never beats the best's.
    assert results["last"].metrics["val_acc"] <= results["best"].metrics["val_acc"]
