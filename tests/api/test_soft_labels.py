"""Soft-label teachers through the API: upload checks, coverage, the rules on their use, and a distill job."""

import csv
import io
from pathlib import Path

import numpy as np
import pytest
from django.conf import settings

from tests.api.conftest import upload
from webapp.studio.models import Checkpoint, Experiment

pytestmark = pytest.mark.django_db


def index_rows(client, dataset_id: int) -> list[dict]:
    response = client.get(f"/api/datasets/{dataset_id}/index/?format=csv")
    assert response.status_code == 200
    text = b"".join(response.streaming_content).decode()
    return list(csv.DictReader(io.StringIO(text)))


def npz(**arrays) -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return buffer.getvalue()


def post_soft(client, dataset_id, content: bytes, name: str = "soft"):
    data = {"name": name, "file": upload("preds.npz", content)}
    if dataset_id is not None:
        data["dataset"] = dataset_id
    return client.post("/api/checkpoints/", data)


def stored_files() -> list[Path]:
    root = Path(settings.MEDIA_ROOT) / "checkpoints"
    return [p for p in root.rglob("*") if p.is_file()] if root.exists() else []


def test_upload_reports_format_classes_and_train_coverage(owner, make_dataset, owner_client):
    dataset = make_dataset(owner, n=60, classes=3)
    rows = index_rows(owner_client, dataset["id"])
    train = [int(r["index"]) for r in rows if r["split"] == "train"]
    covered = train[: len(train) // 2] + [int(r["index"]) for r in rows if r["split"] == "test"]
    logits = np.random.default_rng(0).normal(size=(len(covered), 3)).astype(np.float16)
    response = post_soft(owner_client, dataset["id"], npz(index=np.array(covered, np.int64), logits=logits))
    assert response.status_code == 201, response.content
    body = response.json()
    assert body["format"] == "soft_labels" and body["num_classes"] == 3 and body["input_shape"] == [4]
    assert body["dataset"] == dataset["id"]
    assert body["coverage"] == pytest.approx((len(train) // 2) / len(train))
    assert Checkpoint.objects.get(pk=body["id"]).coverage == body["coverage"]
    # probs work too, and a full file covers everything.
    probs = np.full((60, 3), 1 / 3, np.float32)
    response = post_soft(owner_client, dataset["id"], npz(index=np.arange(60), probs=probs))
    assert response.status_code == 201, response.content
    assert response.json()["coverage"] == 1.0


@pytest.mark.parametrize(
    "arrays, message",
    [
        (lambda: {"index": np.array([0, 0, 1]), "logits": np.zeros((3, 3), np.float32)}, "more than once"),
        (
            lambda: {"index": np.array([0, 1, 60]), "logits": np.zeros((3, 3), np.float32)},
            "holds 60, outside",
        ),
        (
            lambda: {"index": np.arange(3), "logits": np.zeros((3, 5), np.float32)},
            "5 classes but the dataset has 3",
        ),
        (lambda: {"index": np.arange(3), "logits": np.array([[0, np.inf, 0]] * 3, np.float32)}, "non-finite"),
        (lambda: {"index": np.arange(3), "probs": np.full((3, 3), 0.5, np.float32)}, "not 1"),
        (lambda: {"index": np.arange(3)}, "exactly one of 'logits' or 'probs'"),
    ],
)
def test_bad_files_are_refused_and_not_kept(owner, make_dataset, owner_client, arrays, message):
    dataset = make_dataset(owner, n=60, classes=3)
    response = post_soft(owner_client, dataset["id"], npz(**arrays()))
    assert response.status_code == 400
    assert message in response.json()["error"] and response.json()["error"].startswith("preds.npz: ")
    assert not Checkpoint.objects.filter(format="soft_labels").exists()
    assert stored_files() == []


def test_a_pickle_or_non_npz_is_refused(owner, make_dataset, owner_client):
    dataset = make_dataset(owner)
    response = post_soft(
        owner_client, dataset["id"], npz(index=np.arange(2), logits=np.array([[object()]] * 2))
    )
    assert response.status_code == 400 and "Python objects" in response.json()["error"]
    response = post_soft(owner_client, dataset["id"], b"not a zip at all")
    assert response.status_code == 400 and "not an NPZ archive" in response.json()["error"]


def test_dataset_is_required_and_must_have_an_index(owner, owner_client, django_capture_on_commit_callbacks):
    response = post_soft(owner_client, None, npz(index=np.arange(3), logits=np.zeros((3, 10), np.float32)))
    assert response.status_code == 400 and "send 'dataset'" in response.json()["error"]
    # A built-in dataset (by name in an experiment) has no stable index to refer to.
    with django_capture_on_commit_callbacks():
        owner_client.post(
            "/api/experiments/",
            {"kind": "train", "dataset": "digits", "epochs": 1},
            content_type="application/json",
        )
    from webapp.studio.models import Dataset

    builtin = Dataset.objects.get(owner=owner, format="builtin")
    response = post_soft(
        owner_client, builtin.pk, npz(index=np.arange(3), logits=np.zeros((3, 10), np.float32))
    )
    assert response.status_code == 400 and "no stable sample index" in response.json()["error"]


def _soft_teacher(owner, make_dataset, owner_client) -> tuple[dict, int]:
    dataset = make_dataset(owner, n=60, classes=3)
    logits = np.random.default_rng(1).normal(size=(60, 3)).astype(np.float32)
    response = post_soft(owner_client, dataset["id"], npz(index=np.arange(60), logits=logits))
    assert response.status_code == 201, response.content
    return dataset, response.json()["id"]


def test_distill_rules_augment_and_other_datasets(
    owner, make_dataset, owner_client, django_capture_on_commit_callbacks
):
    dataset, teacher = _soft_teacher(owner, make_dataset, owner_client)
    base = {"kind": "distill", "dataset": dataset["id"], "teacher": teacher, "epochs": 1,
            "model": {"arch": "mlp", "hidden": [8]}}  # fmt: skip
    with django_capture_on_commit_callbacks():
        response = owner_client.post(
            "/api/experiments/", {**base, "augment": "noise"}, content_type="application/json"
        )
    assert response.status_code == 400 and "cannot score augmented inputs" in response.json()["error"]
    with django_capture_on_commit_callbacks():
        response = owner_client.post(
            "/api/experiments/",
            {**base, "sweep": {"augment": ["none", "noise"]}},
            content_type="application/json",
        )
    assert response.status_code == 400 and "augment must be 'none'" in response.json()["error"]
    other = make_dataset(owner, name="other", n=60, classes=3)
    with django_capture_on_commit_callbacks():
        response = owner_client.post(
            "/api/experiments/", {**base, "dataset": other["id"]}, content_type="application/json"
        )
    assert response.status_code == 400 and "refer to that dataset's samples" in response.json()["error"]
    # A sweep over methods with the soft-label teacher is accepted.
    with django_capture_on_commit_callbacks():
        response = owner_client.post(
            "/api/experiments/",
            {**base, "sweep": {"method": ["hinton", "dkd", "dist"]}},
            content_type="application/json",
        )
    assert response.status_code == 201, response.content
    configs = [e.config for e in Experiment.objects.filter(owner=owner, kind="distill")]
    assert sorted(c["method"] for c in configs) == ["dist", "dkd", "hinton"]


@pytest.mark.django_db(transaction=True)
def test_a_distill_job_uses_the_soft_labels(owner, make_dataset, owner_client, settings, tmp_path):
    from workers import jobs

    settings.KD_STATE_DIR = str(tmp_path / "state")
    settings.STATE_DIR = str(tmp_path / "state")
    dataset = make_dataset(owner, n=90, classes=3)
    rows = index_rows(owner_client, dataset["id"])
    # "Predictions" that say the class is the sample index mod 3 (the labels of npz_bytes), for 2/3 of the samples.
    covered = np.array([int(r["index"]) for r in rows if int(r["index"]) % 3 != 1], np.int64)
    logits = np.eye(3, dtype=np.float32)[covered % 3] * 4.0
    response = post_soft(owner_client, dataset["id"], npz(index=covered, logits=logits))
    assert response.status_code == 201, response.content
    teacher = response.json()["id"]
    response = owner_client.post(
        "/api/experiments/",
        {"kind": "distill", "dataset": dataset["id"], "teacher": teacher, "epochs": 2, "method": "dist",
         "model": {"arch": "mlp", "hidden": [8]}},
        content_type="application/json",
    )  # fmt: skip
    assert response.status_code == 201, response.content
    exp_id = response.json()["id"]
    jobs.run(exp_id)
    exp = Experiment.objects.get(pk=exp_id)
    assert exp.status == "succeeded", exp.error
    m = exp.metrics
    assert m["method"] == "dist" and m["teacher_coverage"] == pytest.approx(response_coverage(rows, covered))
    assert m["test_agreement"] is not None and m["test_kl_to_teacher"] is not None


def response_coverage(rows: list[dict], covered: np.ndarray) -> float:
    train = [int(r["index"]) for r in rows if r["split"] == "train"]
    return float(np.isin(train, covered).mean())
