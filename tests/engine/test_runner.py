"""run_experiment end to end on tiny real data: metrics, result.json, exports, early stop, codistill dispatch."""

import dataclasses
import itertools
import json

import onnxruntime as ort
import pytest
import torch

from kd_core.checkpoints import load_student, load_teacher
from kd_core.config import CodistillConfig, ExperimentConfig
from kd_core.data import load_dataset
from kd_core.errors import CheckpointError, ConfigError
from kd_core.runner import RunResult, run_experiment
from kd_core.sinks import ListSink


@pytest.fixture(scope="module")
def digits():
    ds = load_dataset("digits")
    return dataclasses.replace(ds, x_train=ds.x_train[:256], y_train=ds.y_train[:256])


@pytest.fixture(scope="module")
def trained(digits, tmp_path_factory):
    out = tmp_path_factory.mktemp("train")
    cfg = ExperimentConfig(kind="train", epochs=3, lr=0.01, model={"arch": "mlp", "hidden": [32]})
    return out, run_experiment(cfg, dataset=digits, out_dir=out, sink=ListSink(), device="cpu")


def test_train_writes_result_json_and_four_verified_exports(digits, trained):
    out, result = trained
    assert isinstance(result, RunResult) and not result.stopped
    assert set(result.files) == {"safetensors", "torchscript", "onnx", "exported_program"}
    assert {p.name for p in out.iterdir() if not p.name.startswith(".")} == {
        "result.json",
        "student.safetensors",
        "student.ts",
        "student.onnx",
        "student.pt2",
    }
    saved = json.loads((out / "result.json").read_text())
    assert saved["config"]["kind"] == "train" and saved["stopped"] is False
    m = saved["metrics"]
    for key in (
        "val_acc",
        "val_loss",
        "test_acc",
        "student_params",
        "student_size_bytes",
        "student_latency_ms",
        "steps",
        "train_time_s",
        "samples_per_s",
    ):
        assert m[key] is not None, key
    assert m["student_params"] == sum(p.numel() for p in result.model.parameters())
    # The exported files take raw inputs and agree with the trained model.
    x = torch.as_tensor(digits.x_test[:5])
    with torch.no_grad():
        want = result.model.cpu().eval()(x)
    torch.testing.assert_close(load_student(out / "student.safetensors")(x), want, rtol=1e-4, atol=1e-4)
    session = ort.InferenceSession(str(out / "student.onnx"), providers=["CPUExecutionProvider"])
    (got,) = session.run(["logits"], {"input": x.numpy()})
    torch.testing.assert_close(torch.as_tensor(got), want, rtol=1e-4, atol=1e-4)


def test_distill_reports_teacher_figures(digits, trained, tmp_path):
    teacher = load_teacher(trained[0] / "student.safetensors")
    cfg = ExperimentConfig(kind="distill", teacher="t", epochs=2, model={"arch": "mlp", "hidden": [8]})
    result = run_experiment(
        cfg, dataset=digits, teacher=teacher, out_dir=tmp_path, sink=ListSink(), device="cpu", export=False
    )
    m = result.metrics
    assert m["teacher_acc"] == pytest.approx(trained[1].metrics["test_acc"], abs=1e-6)
    assert m["teacher_params"] > m["student_params"]
    assert m["compression"] == pytest.approx(m["teacher_params"] / m["student_params"])
    assert m["teacher_latency_ms"] > 0 and m["speedup"] > 0
    # Medians with their spread and how they were measured, student and teacher alike.
    for who in ("student", "teacher"):
        assert m[f"{who}_latency_ms_p10"] <= m[f"{who}_latency_ms"] <= m[f"{who}_latency_ms_p90"], who
        assert m[f"{who}_latency_repeats"] >= 3
    assert m["latency_batch_size"] == 1 and m["latency_threads"] >= 1
    assert m["speedup"] == pytest.approx(m["teacher_latency_ms"] / m["student_latency_ms"])
    assert 0 <= m["test_agreement"] <= 1
    assert result.files == {} and json.loads((tmp_path / "result.json").read_text())["metrics"]["teacher_acc"]


def test_distill_refuses_a_teacher_that_does_not_fit(trained, tmp_path):
    synthetic = load_dataset("synthetic", options={"n_samples": 200})
    teacher = load_teacher(trained[0] / "student.safetensors")
    with pytest.raises(CheckpointError):
        run_experiment(
            ExperimentConfig(kind="distill", teacher="t"),
            dataset=synthetic,
            teacher=teacher,
            out_dir=tmp_path,
            sink=ListSink(),
            device="cpu",
        )
    with pytest.raises(ConfigError, match="teacher"):
        run_experiment(
            ExperimentConfig(kind="distill", teacher="t"),
            dataset=synthetic,
            out_dir=tmp_path,
            sink=ListSink(),
            device="cpu",
        )


def test_a_stopped_run_still_exports_what_it_trained(digits, tmp_path):
    calls = itertools.count()
    cfg = ExperimentConfig(kind="train", epochs=50, model={"arch": "mlp", "hidden": [8]})
    result = run_experiment(
        cfg,
        dataset=digits,
        out_dir=tmp_path,
        sink=ListSink(),
        device="cpu",
        should_stop=lambda: next(calls) >= 5,
    )
    assert result.stopped and result.metrics["steps"] == 5
    assert all(p.is_file() for p in result.files.values()) and len(result.files) == 4
    assert json.loads((tmp_path / "result.json").read_text())["stopped"] is True


def test_codistill_is_dispatched(digits, tmp_path):
    cfg = ExperimentConfig(
        kind="codistill",
        epochs=3,
        max_steps=6,
        log_every=3,
        model={"arch": "mlp", "hidden": [8]},
        codistill=CodistillConfig(replicas=2, burn_in_steps=2, exchange_every=2),
    )
    sink = ListSink()
    result = run_experiment(cfg, dataset=digits, out_dir=tmp_path, sink=sink, device="cpu")
    assert result.metrics["steps"] == 6 and "val_acc" in result.metrics
    saved = json.loads((tmp_path / "result.json").read_text())
    assert saved["config"]["kind"] == "codistill"
    assert (tmp_path / "student.safetensors").is_file()


def test_a_requeued_run_resumes_from_its_checkpoint_and_cleans_up(digits, tmp_path):
    cfg = ExperimentConfig(kind="train", epochs=4, model={"arch": "mlp", "hidden": [8]})
    ckpt = tmp_path / "train.ckpt"
    calls = itertools.count()
    first = run_experiment(
        cfg,
        dataset=digits,
        out_dir=tmp_path / "a",
        sink=ListSink(),
        device="cpu",
        checkpoint_path=ckpt,
        should_stop=lambda: next(calls) >= 6,
        export=False,
    )
    assert first.stopped and ckpt.is_file()
    sink = ListSink()
    second = run_experiment(
        cfg,
        dataset=digits,
        out_dir=tmp_path / "a",
        sink=sink,
        device="cpu",
        checkpoint_path=ckpt,
        checkpoint_every_s=0.0,
        export=False,
    )
    assert not second.stopped and second.metrics["steps"] == 16
    assert min(step for step, _ in sink.rows) > 6
    assert not ckpt.exists()  # finished: nothing left to resume
