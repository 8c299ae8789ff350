"""A user's whole path on a real stack: upload, train a teacher, distill live over a WebSocket, download, cancel."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from tests.integration.client import Api
from tests.integration.jobs import (
    accuracy_of_downloads,
    follow,
    points,
    wait_for,
    wait_for_metrics,
    write_digits_npz,
)
from tests.stack import Stack


@pytest.fixture(scope="module")
def digits(api: Api, tmp_path_factory: pytest.TempPathFactory) -> tuple[int, Path]:
    path = write_digits_npz(tmp_path_factory.mktemp("data") / "digits.npz")
    body = api.upload("/api/datasets/", {"name": "digits-it"}, path)
    assert body["num_samples"] == 1797 and body["num_classes"] == 10
    return body["id"], path


@pytest.fixture(scope="module")
def teacher(api: Api, digits: tuple[int, Path]) -> int:
    """A teacher trained here by a real `train` job; its model is listed among the checkpoints."""
    config = {"kind": "train", "name": "it-teacher", "dataset": digits[0], "model": {"arch": "mlp", "hidden": [128]},
              "epochs": 15, "log_every": 10}  # fmt: skip
    experiment_id = api.post("/api/experiments/", config)["id"]
    exp = wait_for(api, experiment_id)
    assert exp["status"] == "succeeded", exp
    assert exp["metrics"]["test_acc"] > 0.85
    rows = api.get("/api/checkpoints/")["checkpoints"]
    ids = [c["id"] for c in rows if c.get("source_experiment") == experiment_id]
    assert len(ids) == 1, rows
    return ids[0]


def test_distill_streams_live_metrics_and_downloads_match(
    live_stack: Stack, api: Api, digits: tuple[int, Path], teacher: int, tmp_path: Path
) -> None:
    dataset_id, npz = digits
    config = {"kind": "distill", "name": "it-distill", "dataset": dataset_id, "teacher": teacher,
              "model": {"arch": "mlp", "hidden": [32]}, "epochs": 120, "log_every": 5,
              "temperature": 4.0, "alpha": 0.9}  # fmt: skip
    submitted = time.time()
    experiment_id = api.post("/api/experiments/", config)["id"]
    wait_for_metrics(api, experiment_id)
    history, messages, reconnects = follow(live_stack.ws_url, api, experiment_id)
    assert reconnects == 0, "the live socket dropped and the client had to reconnect"
    exp = wait_for(api, experiment_id)
    assert exp["status"] == "succeeded", exp
    assert exp["error"] == ""

    # One step arrives as {"type":"metric",...}; a sink flush of several steps as {"type":"metrics","points":[...]}.
    live = [
        p
        for m in messages
        for p in ([m] if m["type"] == "metric" else m.get("points", []) if m["type"] == "metrics" else [])
    ]
    assert live, "the job was running when the socket opened, so some metrics must arrive live"
    live_keys = [(name, int(m["step"])) for m in live for name in m["values"]]
    assert len(live_keys) == len(set(live_keys)), "a live (series, step) arrived twice"
    final = points(api.get(f"/api/experiments/{experiment_id}/metrics/")["series"])
    merged = points(history) | {(name, int(m["step"])): v for m in live for name, v in m["values"].items()}
    assert merged.keys() == final.keys(), f"gap: missing {sorted(final.keys() - merged.keys())[:5]}"
    assert all(abs(merged[k] - final[k]) < 1e-9 for k in final)
    statuses = [m for m in messages if m["type"] == "status"]
    assert statuses and statuses[-1]["status"] == "succeeded"
    assert all(m["time"] >= submitted - 1 for m in live)

    from kd_core.config import parse_config
    from kd_core.runner import load_experiment_dataset

    test_x, test_y = load_experiment_dataset(parse_config({"dataset": str(npz)})).split("test")
    accs = accuracy_of_downloads(api, experiment_id, test_x, test_y, tmp_path)
    for fmt, acc in accs.items():
        assert acc == pytest.approx(exp["metrics"]["test_acc"], abs=1e-6), (fmt, accs, exp["metrics"])
    assert exp["metrics"]["student_params"] < exp["metrics"]["teacher_params"]


def test_cancel_a_running_job_keeps_what_it_trained(api: Api, digits: tuple[int, Path]) -> None:
    config = {"kind": "train", "name": "it-long", "dataset": digits[0], "model": {"arch": "mlp", "hidden": [32]},
              "epochs": 20000, "log_every": 20}  # fmt: skip
    experiment_id = api.post("/api/experiments/", config)["id"]
    wait_for_metrics(api, experiment_id)
    asked = time.monotonic()
    api.post(f"/api/experiments/{experiment_id}/cancel/")
    exp = wait_for(api, experiment_id, timeout=30)
    took = time.monotonic() - asked
    assert exp["status"] == "cancelled", exp
    assert took < 10, f"cancel took {took:.1f}s"
    model = api.download(f"/api/experiments/{experiment_id}/download/?format=safetensors")
    assert len(model) > 1000
    assert 0 < exp["progress"] < 1


def test_a_job_that_cannot_run_fails_with_kd_cores_reason(api: Api, tmp_path: Path) -> None:
    """A CNN on flat feature vectors passes the config check but not the model builder in the worker."""
    import numpy as np

    flat = tmp_path / "flat.npz"
    rng = np.random.default_rng(0)
    np.savez(flat, x=rng.random((60, 10), dtype=np.float32), y=np.arange(60) % 3)
    dataset_id = api.upload("/api/datasets/", {"name": "flat"}, flat)["id"]
    config = {"kind": "train", "dataset": dataset_id, "model": {"arch": "cnn", "channels": [4]}, "epochs": 1}
    exp = wait_for(api, api.post("/api/experiments/", config)["id"])
    assert exp["status"] == "failed", exp
    assert "cnn" in exp["error"] and "Traceback" not in exp["error"] and "internal error" not in exp["error"]
