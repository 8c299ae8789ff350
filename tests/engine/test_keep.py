"""keep "last" for codistillation: every replica (in one process or as a group) ends with its last weights."""

import pytest

from kd_core.codistill import MemoryExchange, run_codistill, run_codistill_group
from kd_core.codistill.common import make_model
from kd_core.config import parse_config
from kd_core.data import load_dataset
from kd_core.sinks import ListSink

SYNTH = {"n_samples": 300, "n_features": 8, "n_classes": 3}


@pytest.fixture(scope="module")
def data():
    return load_dataset("synthetic", options=SYNTH, seed=0)


def _config(keep: str, **codistill):
    return parse_config({
        "kind": "codistill", "dataset": "synthetic", "data_options": SYNTH, "model": {"arch": "mlp", "hidden": [16]},
        "epochs": 50, "max_steps": 40, "batch_size": 32, "lr": 0.3, "log_every": 2, "seed": 3, "keep": keep,
        "codistill": {"replicas": 2, "burn_in_steps": 8, "exchange_every": 5, **codistill},
    })  # fmt: skip


def test_in_process_replicas_keep_their_last_weights(data, tmp_path):
    sink = ListSink()
    result = run_codistill(_config("last"), data, out_dir=tmp_path, sink=sink, export=False)
    for k in range(2):
        curve = dict(sink.series(f"replica{k}/val/acc"))
        assert result.metrics[f"replica{k}_kept_step"] == 40
        assert result.metrics[f"replica{k}_val_acc"] == pytest.approx(curve[40], abs=1e-6)
    assert 0.0 <= result.metrics["test_churn"] <= 1.0  # churn of the last weights, in the result
    # The same run keeping the best weights reports the best point of each curve instead.
    best = run_codistill(_config("best"), data, out_dir=tmp_path / "b", sink=ListSink(), export=False)
    assert any(best.metrics[f"replica{k}_kept_step"] < 40 for k in range(2))


def test_a_group_keeps_its_last_weights(data, tmp_path):
    cfg = _config("last", placement="workers")
    exchange = MemoryExchange()
    exchange.publish(1, 8, make_model(cfg, data, 1, "cpu").state_dict())
    sink = ListSink()
    result = run_codistill_group(cfg, data, 0, exchange, out_dir=tmp_path / "g0", sink=sink)
    curve = dict(sink.series("replica0/val/acc"))
    assert result.metrics["kept_step"] == 40
    assert result.metrics["val_acc"] == pytest.approx(curve[40], abs=1e-6)
