"""On a real stack: a ZIP of images is ingested by the worker (progress until ready), distilled on, the student
downloaded; a dataset deleted while its ingest runs leaves nothing behind."""

from __future__ import annotations

import csv
import io
import time
import zipfile
from pathlib import Path

import numpy as np

from tests.integration.client import Api
from tests.integration.jobs import wait_for
from tests.stack import Stack

CLASSES = 4


def _zip_of_images(path: Path, per_class: int, side: int, seed: int = 0) -> Path:
    """Class-dependent patterns plus noise, as PNG files in one folder per class (noise keeps them large)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:side, 0:side]
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as zf:
        for c in range(CLASSES):
            pattern = ((np.sin((xx * (c + 1) + yy * (CLASSES - c)) / side * 6) + 1) * 100).astype(np.int16)
            for i in range(per_class):
                noisy = pattern[..., None] + rng.integers(-40, 40, size=(side, side, 3))
                image = Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8))
                buffer = io.BytesIO()
                image.save(buffer, format="PNG")
                zf.writestr(f"class{c}/img{i:04d}.png", buffer.getvalue())
    return path


def _wait_ready(api: Api, dataset_id: int, timeout: float = 180) -> tuple[dict, list[float]]:
    seen: list[float] = []
    deadline = time.monotonic() + timeout
    while True:
        body = api.get(f"/api/datasets/{dataset_id}/")
        if body["status"] != "ingesting":
            return body, seen
        seen.append(body["progress"])
        assert time.monotonic() < deadline, f"dataset {dataset_id} still ingesting after {timeout}s"
        time.sleep(0.1)


def _files_under(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if p.is_file()] if folder.exists() else []


def test_a_zip_is_ingested_distilled_on_and_the_student_downloaded(
    live_stack: Stack, api: Api, tmp_path: Path
) -> None:
    archive = _zip_of_images(tmp_path / "shapes.zip", per_class=100, side=64)
    assert archive.stat().st_size > 1024 * 1024  # above the stack's sync threshold: the worker ingests it
    body = api.upload("/api/datasets/", {"name": "shapes", "image_size": "16"}, archive)
    assert body["status"] == "ingesting" and 0 <= body["progress"] < 1
    ready, progress = _wait_ready(api, body["id"])
    assert ready["status"] == "ready" and ready["error"] is None, ready
    assert (
        ready["num_samples"] == 400
        and ready["num_classes"] == CLASSES
        and ready["input_shape"] == [3, 16, 16]
    )
    assert progress == sorted(progress) and ready["progress"] == 1
    media = live_stack.tmp_dir / "media"
    assert _files_under(media / "datasets") == []  # the upload is gone: the store replaced it

    _, data, _ = api.request("GET", f"/api/datasets/{body['id']}/index/?format=csv")
    rows = list(csv.DictReader(io.StringIO(data.decode())))
    assert len(rows) == 400 and {r["split"] for r in rows} == {"train", "val", "test"}
    assert rows[0]["source"].startswith("class") and rows[0]["source"].endswith(".png")

    teacher_config = {"kind": "train", "name": "it-shapes-teacher", "dataset": body["id"], "epochs": 6,
                      "model": {"arch": "cnn", "channels": [8, 16]}, "log_every": 5}  # fmt: skip
    trained = wait_for(api, api.post("/api/experiments/", teacher_config)["id"], timeout=300)
    assert trained["status"] == "succeeded", trained
    teacher = [
        c["id"]
        for c in api.get("/api/checkpoints/")["checkpoints"]
        if c["source_experiment"] == trained["id"]
    ]
    distill_config = {"kind": "distill", "name": "it-shapes-student", "dataset": body["id"], "teacher": teacher[0],
                      "epochs": 4, "model": {"arch": "mlp", "hidden": [32]}, "log_every": 5}  # fmt: skip
    distilled = wait_for(api, api.post("/api/experiments/", distill_config)["id"], timeout=300)
    assert distilled["status"] == "succeeded", distilled
    assert distilled["metrics"]["test_acc"] > 1.5 / CLASSES, distilled["metrics"]  # it learned something
    student = api.download(f"/api/experiments/{distilled['id']}/download/?format=safetensors")
    assert len(student) > 1000


def test_deleting_while_ingesting_leaves_nothing(live_stack: Stack, api: Api, tmp_path: Path) -> None:
    archive = _zip_of_images(tmp_path / "big.zip", per_class=600, side=96, seed=1)
    body = api.upload("/api/datasets/", {"name": "doomed", "image_size": "96"}, archive)
    assert body["status"] == "ingesting"
    deadline = time.monotonic() + 120
    while True:  # delete once the worker is writing its store
        shown = api.get(f"/api/datasets/{body['id']}/")
        if shown["status"] != "ingesting" or shown["progress"] > 0:
            break
        assert time.monotonic() < deadline, shown
        time.sleep(0.02)
    assert shown["status"] == "ingesting", f"ingested before it could be deleted: {shown}"
    code, _, _ = api.request("DELETE", f"/api/datasets/{body['id']}/")
    assert code == 204
    media = live_stack.tmp_dir / "media"

    def leftovers() -> list[Path]:
        mine = [f for folder in media.glob(f"stores/*/{body['id']}") for f in folder.rglob("*")]
        return mine + _files_under(media / "datasets")

    deadline = time.monotonic() + 60
    while leftovers():  # the worker notices within half a second and removes what it was writing
        assert time.monotonic() < deadline, leftovers()
        time.sleep(0.2)
    time.sleep(2)
    assert leftovers() == []  # and nothing reappears afterwards
    assert not list(media.glob(f"stores/*/{body['id']}"))
