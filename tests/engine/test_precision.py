"""The GPU path's config on the CPU: precision (the loop's one policy), channels_last, memory figures."""

import dataclasses

import pytest
import torch
from safetensors.torch import save_file

from kd_core.config import parse_config
from kd_core.data import load_dataset
from kd_core.device import autocast_dtype, peak_memory
from kd_core.errors import ConfigError
from kd_core.loop import Precision
from kd_core.models import build_model
from kd_core.runner import run_experiment
from kd_core.sinks import ListSink
from kd_core.trainer import train_model

CNN = {"arch": "cnn", "channels": [4, 8], "hidden": [16]}


@pytest.fixture(scope="module")
def digits():
    ds = load_dataset("digits")
    return dataclasses.replace(ds, x_train=ds.x_train[:256], y_train=ds.y_train[:256])


def _cfg(**kw):
    return parse_config(
        {"dataset": "digits", "epochs": 2, "batch_size": 32, "lr": 0.01, "log_every": 4, **kw}
    )


def _model(ds, spec=None):
    torch.manual_seed(0)
    return build_model(
        spec or {"arch": "mlp", "hidden": [16]}, ds.input_shape, ds.num_classes, ds.preprocessing
    )


def _record_inputs(model, kind):
    """What the first layer of `kind` sees in training mode: (dtype of its output, channels_last input)."""
    seen = []
    layer = next(m for m in model.modules() if isinstance(m, kind))

    def hook(module, args, out):
        if module.training:
            seen.append(
                (out.dtype, args[0].dim() == 4 and args[0].is_contiguous(memory_format=torch.channels_last))
            )

    layer.register_forward_hook(hook)
    return seen


# ---------------------------------------------------------------- config


def test_defaults_and_valid_values():
    c = parse_config({"dataset": "digits"})
    assert (c.precision, c.channels_last, c.compile) == ("auto", False, False)
    c = parse_config({"dataset": "digits", "precision": "bf16", "channels_last": True, "compile": True})
    assert (c.precision, c.channels_last, c.compile) == ("bf16", True, True)


@pytest.mark.parametrize(
    ("data", "field", "needle"),
    [
        ({"precision": "half"}, "precision", "'precision' must be one of auto, fp32, bf16, fp16; got 'half'"),
        ({"precision": None}, "precision", "'precision' must be one of"),
        ({"channels_last": 1}, "channels_last", "'channels_last' must be true or false, got 1"),
        ({"compile": "yes"}, "compile", "'compile' must be true or false, got 'yes'"),
    ],
)
def test_bad_values_are_named(data, field, needle):
    with pytest.raises(ConfigError) as info:
        parse_config({"dataset": "digits", **data})
    assert needle in str(info.value) and field in info.value.fields


def test_every_bad_field_at_once():
    with pytest.raises(ConfigError) as info:
        parse_config({"dataset": "digits", "precision": "int8", "channels_last": "no", "compile": 0})
    assert {"precision", "channels_last", "compile"} <= set(info.value.fields)


# ---------------------------------------------------------------- the policy on a CPU


def test_the_policy_on_the_cpu():
    cpu = torch.device("cpu")
    assert autocast_dtype(cpu) is None and autocast_dtype(cpu, "fp32") is None
    assert autocast_dtype(cpu, "bf16") is torch.bfloat16  # CPU autocast, asked for explicitly
    with pytest.raises(ConfigError, match="'fp16' runs on a CUDA GPU only"):
        autocast_dtype(cpu, "fp16")
    assert Precision(cpu).name == "fp32" and Precision(cpu, "bf16").name == "bf16"


def test_bf16_on_the_cpu_trains_under_autocast_without_a_loss_scaler(digits):
    model = _model(digits)
    seen = _record_inputs(model, torch.nn.Linear)
    out = train_model(model, digits, _cfg(precision="bf16", epochs=5), sink=ListSink(), device="cpu")
    assert seen and all(dtype == torch.bfloat16 for dtype, _ in seen)
    assert out.precision == "bf16" and out.run_metrics()["precision"] == "bf16"
    full = train_model(
        _model(digits), digits, _cfg(precision="fp32", epochs=5), sink=ListSink(), device="cpu"
    )
    # It learns as well as fp32 does, give or take bf16's rounding.
    assert out.best["val_acc"] > 0.7 and out.best["val_loss"] == pytest.approx(
        full.best["val_loss"], rel=0.05
    )
    assert all(v.dtype == torch.float32 for v in model.state_dict().values())  # weights stay fp32


def test_auto_and_fp32_on_the_cpu_compute_in_fp32(digits):
    for precision in ("auto", "fp32"):
        model = _model(digits)
        seen = _record_inputs(model, torch.nn.Linear)
        out = train_model(model, digits, _cfg(precision=precision), sink=ListSink(), device="cpu")
        assert {dtype for dtype, _ in seen} == {torch.float32} and out.precision == "fp32"


def test_fp16_on_the_cpu_is_refused_before_any_work(digits, tmp_path):
    with pytest.raises(ConfigError, match="CUDA GPU only"):
        train_model(_model(digits), digits, _cfg(precision="fp16"), sink=ListSink(), device="cpu")
    sink = ListSink()
    with pytest.raises(ConfigError, match="CUDA GPU only"):
        run_experiment(_cfg(precision="fp16"), dataset=digits, out_dir=tmp_path, sink=sink, device="cpu")
    assert not sink.rows and not (tmp_path / "result.json").exists()


# ---------------------------------------------------------------- channels_last


def test_channels_last_feeds_nhwc_batches_and_leaves_ordinary_weights(digits, tmp_path):
    plain = train_model(_model(digits, CNN), digits, _cfg(), sink=ListSink(), device="cpu")
    model = _model(digits, CNN)
    seen = _record_inputs(model, torch.nn.Conv2d)
    out = train_model(model, digits, _cfg(channels_last=True), sink=ListSink(), device="cpu")
    assert seen and all(nhwc for _, nhwc in seen)
    assert not out.notes
    # The same arithmetic in another memory order: the same run up to float rounding.
    assert out.best["val_loss"] == pytest.approx(plain.best["val_loss"], rel=1e-3)
    # Back to the default layout, so exports (safetensors refuses non-contiguous tensors) just work.
    state = model.state_dict()
    assert all(v.is_contiguous() for v in state.values())
    save_file(dict(state), str(tmp_path / "m.safetensors"))


def test_channels_last_on_vectors_is_a_no_op_with_a_note(tmp_path):
    ds = load_dataset("synthetic", options={"n_samples": 120, "n_features": 6, "n_classes": 3}, seed=0)
    config = parse_config({"dataset": "synthetic", "epochs": 1, "batch_size": 16, "channels_last": True,
                           "model": {"arch": "mlp", "hidden": [8]}})  # fmt: skip
    result = run_experiment(config, dataset=ds, out_dir=tmp_path, sink=ListSink(), device="cpu", export=False)
    assert any(n.startswith("channels_last: ignored") for n in result.metrics["notes"])


# ---------------------------------------------------------------- memory figures


def test_the_cpu_reports_the_process_peak_rss_under_its_own_name(digits, tmp_path):
    sink = ListSink()
    result = run_experiment(_cfg(), dataset=digits, out_dir=tmp_path, sink=sink, device="cpu", export=False)
    m = result.metrics
    assert m["precision"] == "fp32" and "notes" not in m
    assert 10 < m["process_peak_rss_mb"] < 1e6
    assert not any(k.startswith("gpu") for k in m)
    assert not any("gpu/" in name for name in sink.names())  # GPU series only where there is a GPU
    # The figure is the peak: at least what the process holds now.
    assert peak_memory(torch.device("cpu"))["process_peak_rss_mb"] >= 10
