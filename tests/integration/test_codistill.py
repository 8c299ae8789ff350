"""Codistillation spread over Celery tasks (one per group) through the shared state folder, on a real stack."""

from __future__ import annotations

import pytest

from tests.integration.client import Api
from tests.integration.jobs import wait_for, write_digits_npz


@pytest.fixture(scope="module")
def dataset_id(api: Api, tmp_path_factory: pytest.TempPathFactory) -> int:
    path = write_digits_npz(tmp_path_factory.mktemp("codistill") / "digits.npz")
    return api.upload("/api/datasets/", {"name": "digits-codistill"}, path)["id"]


def test_groups_run_as_tasks_exchange_copies_and_combine(api: Api, dataset_id: int) -> None:
    config = {"kind": "codistill", "name": "it-codistill", "dataset": dataset_id,
              "model": {"arch": "mlp", "hidden": [32]}, "epochs": 20, "max_steps": 240, "log_every": 20,
              "codistill": {"replicas": 2, "burn_in_steps": 40, "exchange_every": 20, "placement": "workers"}}  # fmt: skip
    experiment_id = api.post("/api/experiments/", config)["id"]
    exp = wait_for(api, experiment_id, timeout=180)
    assert exp["status"] == "succeeded", exp
    metrics = exp["metrics"]
    assert metrics["val_acc"] > 0.5 and "ensemble_test_acc" in metrics and "group_errors" not in metrics
    series = api.get(f"/api/experiments/{experiment_id}/metrics/")["series"]
    assert "replica0/train/loss" in series and "replica1/train/loss" in series
    # Each group read the other's published copies: the exchange went through the shared folder.
    peer_versions = series["replica0/exchange/peer1_version"] + series["replica1/exchange/peer0_version"]
    assert max(v for _, v in peer_versions) >= 1
    kinds = {(a["kind"], a["replica"]) for a in exp["artifacts"]}
    assert {("onnx", None), ("onnx", 0), ("onnx", 1), ("safetensors", 1)} <= kinds

    import numpy as np
    import onnxruntime as ort

    model = api.download(f"/api/experiments/{experiment_id}/download/?format=onnx&replica=1")
    session = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
    out = session.run(["logits"], {"input": np.zeros((3, 1, 8, 8), np.float32)})[0]
    assert out.shape == (3, 10)
