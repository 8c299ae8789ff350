"""Datasets ingested into a store: 202 ingesting with progress on a worker, ready/failed, one writer, index CSV.

The worker task's function (`workers.ingest.run`) is called directly, as the worker would; kd_core's real
store is written under the test's MEDIA_ROOT.
"""

from __future__ import annotations

import csv
import datetime
import io
from pathlib import Path

import numpy as np
import pytest
from django.conf import settings
from django.utils import timezone

from tests.api.conftest import npz_bytes, upload
from webapp.studio.models import Dataset

pytestmark = pytest.mark.django_db


def stored_files() -> list[Path]:
    root = Path(settings.MEDIA_ROOT)
    return sorted(p for p in root.rglob("*") if p.is_file()) if root.exists() else []


def store_dirs() -> list[Path]:
    root = Path(settings.MEDIA_ROOT) / "stores"
    return sorted(p.parent for p in root.rglob("meta.json")) if root.exists() else []


def _big_upload(client, settings, name: str = "big.npz", content: bytes | None = None) -> dict:
    settings.KD_SYNC_INGEST_MAX_BYTES = 100  # every upload goes to the worker
    response = client.post("/api/datasets/", {"file": upload(name, content or npz_bytes(n=60))})
    assert response.status_code == 202, response.content
    return response.json()


def _index(client, dataset_id: int) -> list[dict]:
    response = client.get(f"/api/datasets/{dataset_id}/index/?format=csv")
    assert response.status_code == 200, response.content
    assert response["Content-Type"].startswith("text/csv")
    text = b"".join(response.streaming_content).decode()
    return list(csv.DictReader(io.StringIO(text)))


def test_large_upload_is_ingested_by_the_worker_then_ready(
    owner_client, settings, django_capture_on_commit_callbacks
):
    from workers import ingest

    body = _big_upload(owner_client, settings)
    assert body["status"] == "ingesting" and body["progress"] == 0 and body["error"] is None
    assert body["num_samples"] is None
    refused = owner_client.post(
        "/api/experiments/",
        {"kind": "train", "dataset": body["id"], "model": {"arch": "mlp", "hidden": [8]}},
        content_type="application/json",
    )
    assert refused.status_code == 400 and "still being ingested" in refused.json()["error"]

    with django_capture_on_commit_callbacks(execute=True):  # the worker commits as it goes
        assert ingest.run(body["id"]) == "ready"  # what the worker task runs
    shown = owner_client.get(f"/api/datasets/{body['id']}/").json()
    assert shown["status"] == "ready" and shown["progress"] == 1 and shown["error"] is None
    assert shown["num_samples"] == 60 and shown["num_classes"] == 3 and shown["input_shape"] == [4]
    row = Dataset.objects.get(pk=body["id"])
    assert not row.file and row.store.startswith(f"stores/{row.owner_id}/{row.pk}/")
    # The upload is gone: the store replaced it, and the row counts the store's bytes.
    assert store_dirs() == [Path(settings.MEDIA_ROOT) / row.store]
    assert all("stores" in p.parts for p in stored_files())
    assert row.size == sum(
        p.stat().st_size for p in (Path(settings.MEDIA_ROOT) / row.store).rglob("*") if p.is_file()
    )
    assert ingest.run(body["id"]) == "gone"  # a redelivered message changes nothing
    assert store_dirs() == [Path(settings.MEDIA_ROOT) / row.store]

    created = owner_client.post(
        "/api/experiments/",
        {"kind": "train", "dataset": body["id"], "model": {"arch": "mlp", "hidden": [8]}},
        content_type="application/json",
    )
    assert created.status_code == 201, created.content


def test_a_duplicate_delivery_finds_the_row_held_and_writes_nothing(owner_client, settings):
    from workers import ingest

    body = _big_upload(owner_client, settings)
    token = ingest.claim(body["id"])  # a first delivery holds the row
    assert token
    assert ingest.run(body["id"]) == "busy"
    assert store_dirs() == []
    row = Dataset.objects.get(pk=body["id"])
    assert row.status == "ingesting" and row.ingest_token == token and row.attempts == 1


def test_a_bad_upload_fails_with_the_reason_and_leaves_nothing(owner_client, settings):
    from workers import ingest

    buffer = io.BytesIO()
    x = np.ones((60, 4), dtype=np.float32)
    x[7, 2] = np.nan
    np.savez(buffer, x=x, y=np.arange(60) % 3)
    body = _big_upload(owner_client, settings, "nan.npz", buffer.getvalue())
    assert len(stored_files()) == 1
    assert ingest.run(body["id"]) == "failed"
    shown = owner_client.get(f"/api/datasets/{body['id']}/").json()
    assert shown["status"] == "failed" and shown["error"].startswith("nan.npz: ") and "NaN" in shown["error"]
    assert stored_files() == []
    used = owner_client.post(
        "/api/experiments/",
        {"kind": "train", "dataset": body["id"], "model": {"arch": "mlp", "hidden": [8]}},
        content_type="application/json",
    )
    assert used.status_code == 400 and "failed" in used.json()["error"] and "NaN" in used.json()["error"]


def test_deleting_while_ingesting_stops_the_ingest_and_leaves_nothing(
    owner_client, settings, django_capture_on_commit_callbacks
):
    from kd_core.errors import DatasetError
    from webapp.studio import stores
    from workers import ingest

    body = _big_upload(owner_client, settings, content=npz_bytes(n=3000, features=64))
    row = Dataset.objects.get(pk=body["id"])
    token = ingest.claim(row.pk)
    attempt = ingest.Attempt(row.pk, token)
    seen = []

    def progress(fraction: float) -> None:
        seen.append(fraction)
        if len(seen) == 1:  # the user deletes the dataset while the worker writes its store
            with django_capture_on_commit_callbacks(execute=True):
                assert owner_client.delete(f"/api/datasets/{row.pk}/").status_code == 204
            attempt._last_check = 0.0  # the next should_stop reads the row now, not half a second later

    source = Path(settings.MEDIA_ROOT) / row.file.name
    # Stopped by should_stop, or by its folder vanishing under it: either way a DatasetError, and the
    # worker (which sees the row gone) records nothing.
    with pytest.raises(DatasetError):
        stores.ingest_to_storage(
            source, f"{row.store_folder}/{token}", progress=progress, should_stop=attempt.should_stop
        )
    assert attempt.should_stop() and seen  # the worker sees the row gone: it records nothing
    assert not Dataset.objects.filter(pk=row.pk).exists()
    assert stored_files() == [] and store_dirs() == []
    assert ingest.run(row.pk) == "gone"


def test_a_finished_store_of_a_deleted_dataset_is_removed(
    owner_client, settings, django_capture_on_commit_callbacks
):
    from workers import ingest

    body = _big_upload(owner_client, settings)
    token = ingest.claim(body["id"])
    Dataset.objects.filter(pk=body["id"]).update(ingest_token="")  # as if the first holder never was
    with django_capture_on_commit_callbacks(execute=True):
        owner_client.delete(f"/api/datasets/{body['id']}/")
    assert token and ingest.run(body["id"]) == "gone"
    assert stored_files() == [] and store_dirs() == []


def test_a_killed_worker_is_restarted_then_failed_after_max_attempts(owner_client, settings):
    from workers import ingest

    settings.KD_MAX_ATTEMPTS = 2
    body = _big_upload(owner_client, settings)
    row = Dataset.objects.get(pk=body["id"])
    token = ingest.claim(row.pk)
    # The worker died mid-write: a partial attempt folder and a heartbeat that stopped.
    partial = Path(settings.MEDIA_ROOT) / row.store_folder / token / "x.npy"
    partial.parent.mkdir(parents=True)
    partial.write_bytes(b"half")
    assert ingest.sweep_stale() == 0  # its heartbeat is fresh: the worker may still be writing
    old = timezone.now() - datetime.timedelta(seconds=settings.KD_INGEST_STALE_S + 1)
    Dataset.objects.filter(pk=row.pk).update(heartbeat=old)
    assert ingest.sweep_stale() == 1  # restarted: claim cleared, partial files removed, enqueued again
    row.refresh_from_db()
    assert row.status == "ingesting" and row.ingest_token == "" and row.progress == 0
    assert not partial.exists()

    second = ingest.claim(row.pk)
    Dataset.objects.filter(pk=row.pk).update(heartbeat=old)
    assert second and ingest.sweep_stale() == 1  # the second death: attempts reached the limit
    row.refresh_from_db()
    assert row.status == "failed" and "stopped 2 times" in row.error
    assert stored_files() == []


def test_small_upload_is_ingested_in_the_request_and_answers_201(
    owner_client, settings, django_capture_on_commit_callbacks
):
    with django_capture_on_commit_callbacks(execute=True):
        response = owner_client.post("/api/datasets/", {"file": upload("small.npz", npz_bytes(n=60))})
    assert response.status_code == 201, response.content
    body = response.json()
    assert body["status"] == "ready" and body["progress"] == 1 and body["num_samples"] == 60
    row = Dataset.objects.get(pk=body["id"])
    assert row.store and not row.file and store_dirs() == [Path(settings.MEDIA_ROOT) / row.store]
    assert all("stores" in p.parts for p in stored_files())  # the upload is gone: the store replaced it


def test_index_lists_every_sample_with_the_split_training_uses(owner_client, owner):
    from kd_core.config import parse_config
    from kd_core.runner import load_experiment_dataset
    from webapp.studio.stores import local_store

    body = owner_client.post("/api/datasets/", {"file": upload("idx.npz", npz_bytes(n=90))}).json()
    rows = _index(owner_client, body["id"])
    assert [int(r["index"]) for r in rows] == list(range(90))
    assert {r["source"] for r in rows} and all(r["source"] for r in rows)
    assert [int(r["label"]) for r in rows] == [i % 3 for i in range(90)]
    row = Dataset.objects.get(pk=body["id"])
    config = parse_config({"kind": "train", "dataset": body["id"], "model": {"arch": "mlp"}})
    config.dataset = str(local_store(row.store, Path(settings.STATE_DIR) / "stores"))
    loaded = load_experiment_dataset(config)
    x_all = np.load(Path(config.dataset) / "x.npy")
    for split in ("train", "val", "test"):
        mine = sorted(int(r["index"]) for r in rows if r["split"] == split)
        assert len(mine) == loaded.split_size(split)
        # The same samples, not only the same count: compare the rows' raw inputs as sets.
        x, _ = loaded.read(split, np.arange(loaded.split_size(split)))
        assert sorted(map(bytes, np.asarray(x))) == sorted(map(bytes, x_all[mine]))


def test_index_refuses_what_has_no_store(owner_client, other_client, settings):
    body = _big_upload(owner_client, settings)
    ingesting = owner_client.get(f"/api/datasets/{body['id']}/index/?format=csv")
    assert ingesting.status_code == 409 and "ingesting" in ingesting.json()["error"]
    assert other_client.get(f"/api/datasets/{body['id']}/index/").status_code == 404
    assert owner_client.get(f"/api/datasets/{body['id']}/index/?format=json").status_code == 400


def test_experiments_get_the_store_directory(owner, owner_client, make_experiment, tmp_path):
    from workers.records import resolve_inputs

    experiment = make_experiment(owner)
    config, dataset, _ = resolve_inputs(experiment, tmp_path)
    store = Path(config.dataset)
    assert (store / "meta.json").is_file() and store == Path(settings.MEDIA_ROOT) / experiment.dataset.store
    assert dataset.num_samples == 60


def test_the_quota_counts_stores_and_fails_an_ingest_that_passes_it(owner, owner_client, settings):
    from workers import ingest

    body = _big_upload(owner_client, settings)
    upload_size = Dataset.objects.get(pk=body["id"]).size
    settings.KD_STORAGE_QUOTA_BYTES = upload_size + 10  # the upload fits, its store (larger) does not
    assert ingest.run(body["id"]) == "failed"
    row = Dataset.objects.get(pk=body["id"])
    assert row.status == "failed" and "storage quota exceeded" in row.error and row.size == 0
    assert stored_files() == []


def test_old_inspecting_rows_are_ingested_under_the_new_name(owner_client, settings):
    """A message of the old task name (queued before the upgrade) ingests the row."""
    from workers import tasks

    body = _big_upload(owner_client, settings)
    assert tasks.inspect_upload.run(body["id"]) == "ready"
