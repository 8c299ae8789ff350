"""`time_limit_s`: the config field, and a run that reaches it stops, keeps what it trained and says why."""

import dataclasses
import json

import pytest

from kd_core.config import ExperimentConfig, parse_config
from kd_core.data import load_dataset
from kd_core.errors import ConfigError
from kd_core.runner import TimeLimit, run_experiment
from kd_core.sinks import ListSink


@pytest.mark.parametrize("bad", [0, -5, "60", True, 1e12])
def test_time_limit_must_be_a_sensible_number_of_seconds(bad) -> None:
    with pytest.raises(ConfigError, match="time_limit_s"):
        parse_config({"dataset": "digits", "time_limit_s": bad})


def test_time_limit_is_optional_and_becomes_a_float() -> None:
    assert parse_config({"dataset": "digits"}).time_limit_s is None
    assert parse_config({"dataset": "digits", "time_limit_s": 90}).time_limit_s == 90.0


def test_time_limit_wraps_another_stop_signal() -> None:
    asked = TimeLimit(lambda: True, None)
    assert asked() and not asked.reached
    spent = TimeLimit(lambda: False, 0.0)
    assert spent() and spent.reached
    assert not TimeLimit(lambda: False, 3600)()


def test_a_run_reaching_its_time_limit_exports_what_it_trained(tmp_path) -> None:
    ds = load_dataset("digits")
    ds = dataclasses.replace(ds, x_train=ds.x_train[:256], y_train=ds.y_train[:256])
    config = ExperimentConfig(
        kind="train", epochs=100_000, time_limit_s=1.0, model={"arch": "mlp", "hidden": [8]}
    )
    result = run_experiment(config, dataset=ds, out_dir=tmp_path, sink=ListSink(), device="cpu")
    assert result.stopped and result.metrics["stopped_by"] == "time_limit"
    assert 0 < result.metrics["steps"] < 100_000 * 4
    assert set(result.files) == {"safetensors", "torchscript", "onnx", "exported_program"}
    saved = json.loads((tmp_path / "result.json").read_text())
    assert saved["stopped"] and saved["metrics"]["stopped_by"] == "time_limit"
