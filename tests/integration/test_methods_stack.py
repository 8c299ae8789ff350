"""Issue 11 on a real stack, through the API: DKD and DIST distillations with fidelity metrics, a soft-label
teacher built from a model's predictions on the dataset's index, and a `keep: "last"` codistillation's churn."""

from __future__ import annotations

import csv
import io
import math
import re
from pathlib import Path

import numpy as np
import pytest

from tests.integration.client import Api
from tests.integration.jobs import wait_for, write_digits_npz

FIDELITY = ("val_agreement", "test_agreement", "val_kl_to_teacher", "test_kl_to_teacher")


@pytest.fixture(scope="module")
def digits(api: Api, tmp_path_factory: pytest.TempPathFactory) -> tuple[int, np.ndarray, list[dict]]:
    """The digits NPZ uploaded as a dataset: (its id, the file's x, its index CSV rows as dicts)."""
    path = write_digits_npz(tmp_path_factory.mktemp("methods") / "digits.npz")
    dataset_id = api.upload("/api/datasets/", {"name": "digits-methods"}, path)["id"]
    text = api.download(f"/api/datasets/{dataset_id}/index/?format=csv").decode()
    with np.load(path) as d:
        x = d["x"]
    return dataset_id, x, list(csv.DictReader(io.StringIO(text)))


@pytest.fixture(scope="module")
def teacher(api: Api, digits: tuple[int, np.ndarray, list[dict]]) -> tuple[int, int]:
    """A teacher trained here by a `train` job: (its experiment id, its checkpoint id)."""
    config = {"kind": "train", "name": "methods-teacher", "dataset": digits[0],
              "model": {"arch": "mlp", "hidden": [64]}, "epochs": 12, "log_every": 20}  # fmt: skip
    experiment_id = api.post("/api/experiments/", config)["id"]
    exp = wait_for(api, experiment_id)
    assert exp["status"] == "succeeded", exp
    assert exp["metrics"]["test_acc"] > 0.85, exp["metrics"]
    ids = [
        c["id"]
        for c in api.get("/api/checkpoints/")["checkpoints"]
        if c.get("source_experiment") == experiment_id
    ]
    assert len(ids) == 1
    return experiment_id, ids[0]


def row_of(source: str) -> int:
    """The NPZ row an index line names ("x[17]")."""
    found = re.fullmatch(r"x\[(\d+)\]", source)
    assert found, f"not an NPZ row: {source!r}"
    return int(found.group(1))


def test_dkd_and_dist_side_by_side_report_fidelity(
    api: Api, digits: tuple[int, np.ndarray, list[dict]], teacher: tuple[int, int]
) -> None:
    config = {"kind": "distill", "name": "methods", "dataset": digits[0], "teacher": teacher[1],
              "model": {"arch": "mlp", "hidden": [32]}, "epochs": 10, "log_every": 20, "temperature": 4,
              "sweep": {"method": ["dkd", "dist"]}}  # fmt: skip
    ids = api.post("/api/experiments/", config)["ids"]
    assert len(ids) == 2
    for experiment_id, method in zip(ids, ("dkd", "dist")):
        exp = wait_for(api, experiment_id)
        assert exp["status"] == "succeeded", exp
        m = exp["metrics"]
        assert exp["config"]["method"] == method and m["method"] == method
        assert m["test_acc"] > 0.8, (method, m)
        for key in FIDELITY:
            assert isinstance(m[key], float) and math.isfinite(m[key]), (method, key, m)
        assert 0.8 < m["test_agreement"] <= 1 and m["test_kl_to_teacher"] >= 0, (method, m)
        series = api.get(f"/api/experiments/{experiment_id}/metrics/")["series"]
        assert "val/agreement" in series and "val/kl_to_teacher" in series


def test_soft_label_teacher_from_a_models_predictions(
    api: Api, digits: tuple[int, np.ndarray, list[dict]], teacher: tuple[int, int], tmp_path: Path
) -> None:
    import torch

    from kd_core.checkpoints import load_student

    dataset_id, x, index = digits
    model_file = tmp_path / "teacher.safetensors"
    model_file.write_bytes(api.download(f"/api/experiments/{teacher[0]}/download/?format=safetensors"))
    # The teacher's predictions on the rows the index names, written in a shuffled order: the index column,
    # not the file's order, says which sample each row of logits is for.
    order = np.random.default_rng(1).permutation(len(index))
    sample = np.array([int(index[i]["index"]) for i in order], dtype=np.int64)
    rows = np.array([row_of(index[i]["source"]) for i in order])
    with torch.no_grad():
        logits = load_student(model_file)(torch.from_numpy(x[rows].astype(np.float32))).numpy()
    np.savez(tmp_path / "soft.npz", index=sample, logits=logits.astype(np.float32))
    soft = api.upload(
        "/api/checkpoints/",
        {"name": "teacher-predictions", "dataset": str(dataset_id)},
        tmp_path / "soft.npz",
    )
    assert soft["format"] == "soft_labels" and soft["num_classes"] == 10 and soft["coverage"] == 1.0, soft

    config = {"kind": "distill", "name": "from-soft-labels", "dataset": dataset_id, "teacher": soft["id"],
              "model": {"arch": "mlp", "hidden": [64]}, "epochs": 20, "log_every": 20, "temperature": 4}  # fmt: skip
    exp = wait_for(api, api.post("/api/experiments/", config)["id"])
    assert exp["status"] == "succeeded", exp
    m = exp["metrics"]
    assert m["teacher_coverage"] == 1.0 and m["test_agreement"] >= 0.9, m
    assert math.isfinite(m["test_kl_to_teacher"]), m


def test_keep_last_codistillation_reports_churn_of_its_replicas(
    api: Api, digits: tuple[int, np.ndarray, list[dict]], tmp_path: Path
) -> None:
    import onnxruntime as ort

    dataset_id, x, index = digits
    config = {"kind": "codistill", "name": "codistill-last", "dataset": dataset_id, "keep": "last",
              "model": {"arch": "mlp", "hidden": [32]}, "epochs": 20, "max_steps": 160, "log_every": 20,
              "codistill": {"replicas": 2, "burn_in_steps": 40, "exchange_every": 20}}  # fmt: skip
    exp = wait_for(api, api.post("/api/experiments/", config)["id"], timeout=180)
    assert exp["status"] == "succeeded", exp
    m = exp["metrics"]
    assert m["kept"] == "last", m
    assert 0 <= m["churn"] <= 1 and 0 <= m["test_churn"] <= 1, m
    # The replicas' downloads are their last weights: their disagreement on the test split is the reported churn.
    test_rows = [row_of(r["source"]) for r in index if r["split"] == "test"]
    inputs = x[test_rows].astype(np.float32)
    preds = []
    for k in (0, 1):
        model = api.download(f"/api/experiments/{exp['id']}/download/?format=onnx&replica={k}")
        session = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
        preds.append(session.run(["logits"], {"input": inputs})[0].argmax(axis=1))
    assert float((preds[0] != preds[1]).mean()) == pytest.approx(m["test_churn"], abs=1.5 / len(test_rows))
