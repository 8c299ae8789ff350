"""POST/GET/DELETE /api/datasets/: real uploads inspected by kd_core, errors that say what is wrong."""

import datetime
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
    # Ingested in the request: the store replaces the upload, and the row counts the store's bytes.
    store = Path(settings.MEDIA_ROOT) / row.store
    assert not row.file and (store / "meta.json").is_file()
    assert row.size == sum(p.stat().st_size for p in store.rglob("*") if p.is_file())


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
    path = Path(settings.MEDIA_ROOT) / Dataset.objects.get(pk=dataset["id"]).store
    assert path.is_dir()
    with django_capture_on_commit_callbacks(execute=True):
        response = owner_client.delete(f"/api/datasets/{dataset['id']}/")
    assert response.status_code == 204
    assert not Dataset.objects.filter(pk=dataset["id"]).exists()
    assert not path.exists() and stored_files() == []


def test_delete_refused_while_an_experiment_uses_it(owner, make_experiment, owner_client):
    experiment = make_experiment(owner, status=Experiment.RUNNING)
    response = owner_client.delete(f"/api/datasets/{experiment.dataset_id}/")
    assert response.status_code == 409
    assert str(experiment.pk) in response.json()["error"]
    experiment.status = Experiment.SUCCEEDED
    experiment.save()
    assert owner_client.delete(f"/api/datasets/{experiment.dataset_id}/").status_code == 204


# --- large uploads: ingested by a worker task, not in the request (more in test_dataset_ingest.py) -----


def _ingest_messages(broker_redis) -> list[dict]:
    import base64
    import json

    found = []
    for raw in broker_redis.lrange("default", 0, -1):
        message = json.loads(raw)
        if message["headers"]["task"] == "workers.ingest_dataset":
            found.append({"args": json.loads(base64.b64decode(message["body"]))[0]})
    return found


def test_large_upload_is_202_ingesting_then_ready_by_the_worker_task(
    owner_client, settings, broker_redis, django_capture_on_commit_callbacks
):
    from workers import ingest

    settings.KD_SYNC_INSPECT_MAX_BYTES = 100  # lowers the ingest threshold too (unless set on its own)
    if broker_redis is not None:
        broker_redis.delete("default")
    with django_capture_on_commit_callbacks(execute=True):
        response = owner_client.post("/api/datasets/", {"file": upload("big.npz", npz_bytes(n=60))})
    assert response.status_code == 202, response.content
    body = response.json()
    assert body["status"] == "ingesting" and body["error"] is None and body["progress"] == 0
    assert body["num_samples"] is None and body["num_classes"] is None and body["input_shape"] is None
    assert body["size"] > 100
    if broker_redis is not None:
        assert _ingest_messages(broker_redis) == [{"args": [body["id"]]}]

    # A dataset still ingesting cannot be trained on.
    with django_capture_on_commit_callbacks(execute=True):
        refused = owner_client.post(
            "/api/experiments/",
            {"kind": "train", "dataset": body["id"], "model": {"arch": "mlp", "hidden": [8]}},
            content_type="application/json",
        )
    assert refused.status_code == 400 and "ingested" in refused.json()["error"]

    assert ingest.run(body["id"]) == "ready"  # what the worker task runs
    shown = owner_client.get(f"/api/datasets/{body['id']}/").json()
    assert shown["status"] == "ready" and shown["error"] is None
    assert shown["num_samples"] == 60 and shown["num_classes"] == 3 and shown["splits"]["train"] > 0
    assert ingest.run(body["id"]) == "gone"  # a redelivered message changes nothing


def test_large_bad_upload_fails_with_the_reason_and_its_file_deleted(owner_client, settings):
    import io

    import numpy as np

    from workers import ingest

    settings.KD_SYNC_INSPECT_MAX_BYTES = 100
    buffer = io.BytesIO()
    x = np.ones((60, 4), dtype=np.float32)
    x[7, 2] = np.nan
    np.savez(buffer, x=x, y=np.arange(60) % 3)
    response = owner_client.post("/api/datasets/", {"file": upload("nan.npz", buffer.getvalue())})
    assert response.status_code == 202, response.content
    assert len(stored_files()) == 1
    assert ingest.run(response.json()["id"]) == "failed"
    shown = owner_client.get(f"/api/datasets/{response.json()['id']}/").json()
    assert shown["status"] == "failed"
    assert shown["error"].startswith("nan.npz: ") and "NaN" in shown["error"] and "sample 7" in shown["error"]
    assert stored_files() == []


def test_small_upload_stays_synchronous_under_the_threshold(owner_client, settings):
    settings.KD_SYNC_INSPECT_MAX_BYTES = 10**9
    response = owner_client.post("/api/datasets/", {"file": upload("small.npz", npz_bytes(n=60))})
    assert response.status_code == 201 and response.json()["status"] == "ready"


def test_a_lost_ingest_message_is_sent_again_by_cleanup(owner_client, settings, broker_redis):
    from django.utils import timezone

    from workers import ingest, jobs

    settings.KD_SYNC_INSPECT_MAX_BYTES = 100
    response = owner_client.post("/api/datasets/", {"file": upload("lost.npz", npz_bytes(n=60))})
    assert response.status_code == 202
    assert ingest.sweep_stale() == 0  # fresh: its message may still wait in the queue
    Dataset.objects.filter(pk=response.json()["id"]).update(
        created=timezone.now() - datetime.timedelta(hours=2)
    )
    assert jobs.cleanup() == 0 and ingest.sweep_stale() == 1  # enqueued again; a duplicate is harmless
    assert ingest.run(response.json()["id"]) == "ready"
