"""POST/GET/DELETE /api/datasets/: real uploads inspected by kd_core, errors that say what is wrong."""

from pathlib import Path

import pytest
from django.conf import settings

from tests.api.conftest import npz_bytes, upload
from webapp.studio.models import Dataset, Experiment

pytestmark = pytest.mark.django_db


def stored_files() -> list[Path]:
    root = Path(settings.MEDIA_ROOT)
    return [p for p in root.rglob("*") if p.is_file()] if root.exists() else []


def test_upload_npz_answers_what_was_found(owner_client):
    response = owner_client.post(
        "/api/datasets/", {"name": "blobs", "file": upload("blobs.npz", npz_bytes(n=60))}
    )
    assert response.status_code == 201, response.content
    body = response.json()
    assert {
        "id",
        "name",
        "format",
        "num_samples",
        "num_classes",
        "input_shape",
        "class_names",
        "status",
    } <= set(body)
    assert body["name"] == "blobs"
    assert body["format"] == "npz"
    assert body["num_samples"] == 60
    assert body["num_classes"] == 3
    assert body["input_shape"] == [4]
    assert body["status"] == "ready"
    row = Dataset.objects.get(pk=body["id"])
    assert Path(row.file.path).is_file() and row.size == row.file.size


def test_upload_csv_with_label_column(owner_client):
    rows = ["a,b,target"] + [f"{i * 0.1:.1f},{i % 5},{'cat' if i % 2 else 'dog'}" for i in range(30)]
    response = owner_client.post(
        "/api/datasets/", {"file": upload("pets.csv", "\n".join(rows).encode()), "label_column": "target"}
    )
    assert response.status_code == 201, response.content
    body = response.json()
    assert body["name"] == "pets"  # from the file name when none is given
    assert body["format"] == "csv"
    assert body["num_classes"] == 2
    assert sorted(body["class_names"]) == ["cat", "dog"]
    assert body["options"] == {"label_column": "target"}


def test_bad_extension_is_refused(owner_client):
    response = owner_client.post("/api/datasets/", {"file": upload("data.pkl", b"\x80\x04junk")})
    assert response.status_code == 400
    assert ".npz" in response.json()["error"] and "data.pkl" in response.json()["error"]
    assert not Dataset.objects.exists()
    assert stored_files() == []


def test_malformed_npz_gives_kd_core_reason_and_leaves_nothing(owner_client):
    response = owner_client.post(
        "/api/datasets/", {"file": upload("broken.npz", b"this is not a zip archive")}
    )
    assert response.status_code == 400
    assert "not an NPZ archive" in response.json()["error"]
    assert not Dataset.objects.exists()
    assert stored_files() == []


def test_npz_without_x_names_the_missing_array(owner_client):
    import io

    import numpy as np

    buffer = io.BytesIO()
    np.savez(buffer, features=np.zeros((4, 2), dtype=np.float32))
    response = owner_client.post("/api/datasets/", {"file": upload("nox.npz", buffer.getvalue())})
    assert response.status_code == 400
    assert "'x'" in response.json()["error"]
    assert stored_files() == []


def test_missing_file_field(owner_client):
    response = owner_client.post("/api/datasets/", {"name": "nothing"})
    assert response.status_code == 400
    assert "'file'" in response.json()["error"]


def test_json_body_is_refused(owner_client):
    response = owner_client.post("/api/datasets/", {"name": "x"}, content_type="application/json")
    assert response.status_code == 400
    assert "multipart" in response.json()["error"]


def test_upload_over_the_limit_is_413_and_leaves_nothing(owner_client, settings):
    settings.KD_MAX_UPLOAD_BYTES = 1024
    response = owner_client.post("/api/datasets/", {"file": upload("big.npz", npz_bytes(n=400))})
    assert response.status_code == 413
    assert "limit" in response.json()["error"]
    assert not Dataset.objects.exists()
    assert stored_files() == []


def test_list_and_show_only_own(owner, other, make_dataset, owner_client, other_client):
    mine = make_dataset(owner, "mine")
    theirs = make_dataset(other, "theirs")
    listed = owner_client.get("/api/datasets/").json()["datasets"]
    assert [d["id"] for d in listed] == [mine["id"]]
    shown = owner_client.get(f"/api/datasets/{mine['id']}/").json()
    assert shown["num_samples"] == 60 and shown["splits"]["train"] > 0 and "preview" in shown
    assert owner_client.get(f"/api/datasets/{theirs['id']}/").status_code == 404
    assert owner_client.delete(f"/api/datasets/{theirs['id']}/").status_code == 404
    assert Dataset.objects.filter(pk=theirs["id"]).exists()


def test_delete_removes_row_and_file(owner, make_dataset, owner_client, django_capture_on_commit_callbacks):
    dataset = make_dataset(owner)
    path = Path(Dataset.objects.get(pk=dataset["id"]).file.path)
    with django_capture_on_commit_callbacks(execute=True):
        response = owner_client.delete(f"/api/datasets/{dataset['id']}/")
    assert response.status_code == 204
    assert not Dataset.objects.filter(pk=dataset["id"]).exists()
    assert not path.exists()


def test_delete_refused_while_an_experiment_uses_it(owner, make_experiment, owner_client):
    experiment = make_experiment(owner, status=Experiment.RUNNING)
    response = owner_client.delete(f"/api/datasets/{experiment.dataset_id}/")
    assert response.status_code == 409
    assert str(experiment.pk) in response.json()["error"]
    experiment.status = Experiment.SUCCEEDED
    experiment.save()
    assert owner_client.delete(f"/api/datasets/{experiment.dataset_id}/").status_code == 204
