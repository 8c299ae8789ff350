"""`devices: N` for a train job: N data-parallel processes (gloo on CPU) through the codistillation group machinery."""

from __future__ import annotations

import json

import pytest

from kd_core.config import parse_config
from kd_core.errors import ConfigError
from kd_core.runner import load_experiment_dataset, run_experiment
from kd_core.sinks import ListSink

BASE = {
    "kind": "train",
    "dataset": "digits",
    "model": {"arch": "mlp", "hidden": [32]},
    "epochs": 3,
    "batch_size": 64,
}


def test_two_cpu_processes_end_where_one_process_does_at_the_same_global_batch(tmp_path):
    two = parse_config({**BASE, "devices": 2})
    result = run_experiment(
        two, dataset=load_experiment_dataset(two), out_dir=tmp_path / "two", sink=ListSink(), device="cpu"
    )
    # The same loop in one process: one codistillation group of one worker, the same global batch of 64.
    one = parse_config(
        {**BASE, "kind": "codistill", "codistill": {"replicas": 1, "group_size": 1, "burn_in_steps": 0}}
    )
    alone = run_experiment(
        one,
        dataset=load_experiment_dataset(one),
        out_dir=tmp_path / "one",
        sink=ListSink(),
        device="cpu",
        export=False,
    )
    m = result.metrics
    assert m["devices"] == 2 and isinstance(m["student_params"], int)
    assert m["test_acc"] == pytest.approx(alone.metrics["test_acc"], abs=0.02)
    assert m["val_acc"] == pytest.approx(alone.metrics["val_acc"], abs=0.02)
    assert set(result.files) == {"safetensors", "torchscript", "onnx", "exported_program"}
    saved = json.loads((tmp_path / "two" / "result.json").read_text())
    assert saved["config"]["kind"] == "train" and saved["config"]["devices"] == 2
    assert not any(k.startswith("replica") or k == "best_replica" for k in saved["metrics"])


@pytest.mark.parametrize(
    "extra, needle",
    [
        ({"kind": "distill", "teacher": "t.safetensors"}, "for distill it is not supported yet"),
        ({"init": "w.pt"}, "cannot start from 'init'"),
        ({"devices": 0}, "'devices' must be >= 1"),
    ],
)
def test_devices_refusals_say_why(extra, needle):
    with pytest.raises(ConfigError, match=needle):
        parse_config({**BASE, "devices": 2, **extra})
