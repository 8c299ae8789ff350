"""`"compile": true`: torch.compile of the training forward, and the eager fallback (with a note) when it fails."""

import dataclasses

import pytest
import torch

from kd_core.config import parse_config
from kd_core.data import load_dataset
from kd_core.models import build_model
from kd_core.runner import run_experiment
from kd_core.sinks import ListSink
from kd_core.trainer import train_model

MLP = {"arch": "mlp", "hidden": [16]}


@pytest.fixture(scope="module")
def digits():
    ds = load_dataset("digits")
    return dataclasses.replace(ds, x_train=ds.x_train[:128], y_train=ds.y_train[:128])


@pytest.fixture(scope="module")
def broken_backend():
    """A torch.compile backend that fails the way a worker without a C++ compiler does, at the first call."""
    name = "kd_test_no_cxx"

    @torch._dynamo.register_backend(name=name)
    def no_cxx(graph_module, example_inputs):
        raise RuntimeError("Compiler: cc is not found (simulated worker without a C++ compiler)")

    return name


def _cfg(**kw):
    return parse_config({"dataset": "digits", "model": MLP, "epochs": 2, "batch_size": 32, "lr": 0.01,
                         "log_every": 2, **kw})  # fmt: skip


def _train(ds, **kw):
    torch.manual_seed(0)
    model = build_model(MLP, ds.input_shape, ds.num_classes, ds.preprocessing)
    sink = ListSink()
    return train_model(model, ds, _cfg(**kw), sink=sink, device="cpu"), sink


def test_a_compiled_forward_trains_like_eager(digits, monkeypatch):
    # aot_eager: Dynamo's capture and AOTAutograd's forward/backward graphs, without a C++ build (fast).
    monkeypatch.setenv("KD_COMPILE_BACKEND", "aot_eager")
    eager, eager_sink = _train(digits)
    compiled, sink = _train(digits, compile=True)
    assert compiled.compiled is True and not compiled.notes
    assert compiled.run_metrics()["compiled"] is True and "compiled" not in eager.run_metrics()
    a, b = eager_sink.series("train/loss"), sink.series("train/loss")
    assert [s for s, _ in a] == [s for s, _ in b]
    assert [v for _, v in b] == pytest.approx([v for _, v in a], rel=1e-4)


def test_a_backend_that_cannot_even_start_falls_back_to_eager_with_a_note(digits, monkeypatch, tmp_path):
    monkeypatch.setenv("KD_COMPILE_BACKEND", "no_such_backend")
    eager = run_experiment(
        _cfg(), dataset=digits, out_dir=tmp_path / "a", sink=ListSink(), device="cpu", export=False
    )
    result = run_experiment(
        _cfg(compile=True),
        dataset=digits,
        out_dir=tmp_path / "b",
        sink=ListSink(),
        device="cpu",
        export=False,
    )
    notes = result.metrics["notes"]
    assert result.metrics["compiled"] is False
    assert len(notes) == 1 and notes[0].startswith("compile: torch.compile failed (InvalidBackend")
    assert "continued without it" in notes[0]
    assert result.metrics["val_loss"] == eager.metrics["val_loss"]  # eager from the first step: the same run


def test_a_compiler_failing_at_the_first_call_falls_back_to_eager_with_a_note(
    digits, monkeypatch, tmp_path, broken_backend
):
    monkeypatch.setenv("KD_COMPILE_BACKEND", broken_backend)
    eager, _ = _train(digits)
    out, sink = _train(digits, compile=True)
    assert out.compiled is False and len(out.notes) == 1
    assert "BackendCompilerFailed" in out.notes[0] and "cc is not found" in out.notes[0]
    assert out.steps == eager.steps and out.best["val_loss"] == eager.best["val_loss"]
    assert sink.series("train/loss") == _train(digits)[1].series("train/loss")


@pytest.mark.slow
def test_inductor_compiles_on_the_cpu_with_gcc(digits, monkeypatch):
    """The real default backend: Inductor generates and builds C++ kernels here (about 30-90 s on 2 busy cores)."""
    monkeypatch.delenv("KD_COMPILE_BACKEND", raising=False)
    eager, _ = _train(digits)
    out, _ = _train(digits, compile=True)
    assert out.compiled is True and not out.notes
    assert out.best["val_loss"] == pytest.approx(eager.best["val_loss"], rel=1e-3)
