"""Issue 9 on a real stack: a plain torchvision state dict uploaded with its preprocessing is a teacher; a timm
student and a torchvision student started from an uploaded checkpoint (`init`) are distilled from it; all four
downloads load without the project and agree. Skipped where torchvision/timm do not import (torch 2.13)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from kd_core.models.library import available
from tests.integration.client import Api
from tests.integration.jobs import accuracy_of_downloads, wait_for

pytestmark = pytest.mark.skipif(
    not (available("torchvision") and available("timm")),
    reason="torchvision/timm do not import here (torch 2.13)",
)
IMAGENET = {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}


def settled(api: Api, checkpoint: dict, timeout: float = 120) -> dict:
    """The checkpoint once its inspection (in the request, or on a worker for a large file) has finished."""
    deadline = time.monotonic() + timeout
    while checkpoint["status"] == "inspecting" and time.monotonic() < deadline:
        time.sleep(0.5)
        checkpoint = api.get(f"/api/checkpoints/{checkpoint['id']}/")
    assert checkpoint["status"] == "ready", checkpoint
    return checkpoint


def test_library_teacher_init_and_students_through_the_api(api: Api, tmp_path: Path) -> None:
    import torchvision

    rng = np.random.default_rng(0)
    y = np.arange(120) % 3
    x = rng.uniform(0, 0.4, size=(120, 3, 32, 32)).astype(np.float32)
    x[np.arange(120), y] += 0.6
    np.savez(tmp_path / "images.npz", x=x, y=y)
    dataset = api.upload("/api/datasets/", {"name": "lib-images"}, tmp_path / "images.npz")

    torch.manual_seed(0)
    torch.save(torchvision.models.resnet18(num_classes=3).state_dict(), tmp_path / "resnet18.pt")
    teacher = api.upload(
        "/api/checkpoints/",
        {
            "name": "tv-resnet18",
            "arch": json.dumps({"arch": "torchvision", "name": "resnet18"}),
            "preprocessing": json.dumps(IMAGENET),
            "dataset": str(dataset["id"]),
        },
        tmp_path / "resnet18.pt",
    )
    teacher = settled(api, teacher)  # 45 MB: above the in-request limit, a worker inspects it
    assert teacher["format"] == "state_dict" and teacher["num_classes"] == 3
    assert teacher["preprocessing"] == IMAGENET

    # "ImageNet" weights for the student: 1000 classes, so its head is re-initialised for 3.
    torch.save(torchvision.models.mobilenet_v3_small(num_classes=1000).state_dict(), tmp_path / "mnv3.pt")
    start = api.upload(
        "/api/checkpoints/",
        {"name": "mnv3-pretrained", "preprocessing": json.dumps(IMAGENET)},
        tmp_path / "mnv3.pt",
    )
    start = settled(api, start)
    common = {
        "kind": "distill",
        "dataset": dataset["id"],
        "teacher": teacher["id"],
        "epochs": 1,
        "batch_size": 16,
    }
    ids = {
        "timm": api.post(
            "/api/experiments/", {**common, "model": {"arch": "timm", "name": "mobilenetv3_small_100"}}
        )["id"],
        "init": api.post(
            "/api/experiments/",
            {**common, "model": {"arch": "torchvision", "name": "mobilenet_v3_small"}, "init": start["id"]},
        )["id"],
    }
    from kd_core.config import parse_config
    from kd_core.runner import load_experiment_dataset

    test_x, test_y = load_experiment_dataset(parse_config({"dataset": str(tmp_path / "images.npz")})).split(
        "test"
    )
    for name, experiment_id in ids.items():
        exp = wait_for(api, experiment_id, timeout=600)
        assert exp["status"] == "succeeded", exp
        m = exp["metrics"]
        assert m["student_latency_ms"] > 0 and m["teacher_params"] == 11_178_051
        if name == "init":
            assert m["init_head_reinitialised"] is True and m["init_preprocessing"] == "checkpoint"
        accs = accuracy_of_downloads(api, experiment_id, test_x, test_y, tmp_path / name)
        assert set(accs) == {"safetensors", "torchscript", "onnx", "exported_program"}
        for fmt, acc in accs.items():
            assert acc == pytest.approx(m["test_acc"], abs=1e-6), (name, fmt, accs, m)
