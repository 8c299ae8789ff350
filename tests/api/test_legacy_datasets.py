"""Datasets uploaded before the store existed (ready, an upload, no store) are converted to a store on first use.

The index of such a dataset answers 409 "being converted" and enqueues the conversion once; the worker's
function (`workers.ingest.run`, what `workers.ingest_dataset` runs) gives the row its store, after which the
index lists the samples with the splits its jobs trained on. Messages really go through Celery's broker
(Redis database 15 when a Redis is reachable, see conftest.py); no worker runs here.
"""

from __future__ import annotations

import csv
import datetime
import io
from pathlib import Path

import numpy as np
import pytest
from django.conf import settings
from django.core.files.base import ContentFile
from django.utils import timezone

from tests.api.conftest import npz_bytes
from webapp.studio.models import Dataset, Experiment

pytestmark = pytest.mark.django_db


def legacy_dataset(owner, content: bytes | None = None, name: str = "old.npz") -> Dataset:
    """A row as the version before the store left it: ready, its upload kept, no store."""
    row = Dataset(
        owner=owner, name="old", format="npz", status=Dataset.READY, progress=1.0,
        inspection={"num_samples": 90, "num_classes": 3, "input_shape": [4]},
    )  # fmt: skip
    row.file.save(name, ContentFile(content if content is not None else npz_bytes(n=90)), save=False)
    row.size = row.file.size
    row.save()
    return row


def queued(broker_redis, dataset_id: int) -> int | None:
    """`workers.ingest_dataset` messages for this dataset waiting on `default` (None with the in-memory broker)."""
    import base64
    import json

    if broker_redis is None:
        return None
    count = 0
    for raw in broker_redis.lrange("default", 0, -1):
        message = json.loads(raw)
        if message["headers"]["task"] == "workers.ingest_dataset":
            count += json.loads(base64.b64decode(message["body"]))[0] == [dataset_id]
    return count


def index_rows(client, dataset_id: int) -> list[dict]:
    response = client.get(f"/api/datasets/{dataset_id}/index/?format=csv")
    assert response.status_code == 200, response.content
    return list(csv.DictReader(io.StringIO(b"".join(response.streaming_content).decode())))


def store_dirs() -> list[Path]:
    root = Path(settings.MEDIA_ROOT) / "stores"
    return sorted(p.parent for p in root.rglob("meta.json")) if root.exists() else []


def test_first_use_converts_it_and_the_index_keeps_the_splits_jobs_used(
    owner, owner_client, broker_redis, django_capture_on_commit_callbacks, monkeypatch, tmp_path
):
    from kd_core.config import parse_config
    from kd_core.runner import load_experiment_dataset
    from workers import ingest

    row = legacy_dataset(owner)
    upload = Path(settings.MEDIA_ROOT) / row.file.name
    before = queued(broker_redis, row.pk)
    with django_capture_on_commit_callbacks(execute=True):
        first = owner_client.get(f"/api/datasets/{row.pk}/index/?format=csv")
        again = owner_client.get(f"/api/datasets/{row.pk}/index/?format=csv")
    for answer in (first, again):
        assert answer.status_code == 409 and "being converted" in answer.json()["error"], answer.content
    if before is not None:
        assert queued(broker_redis, row.pk) == before + 1  # asked twice, enqueued once
    # Still usable meanwhile: ready, and experiments can be created on it.
    assert owner_client.get(f"/api/datasets/{row.pk}/").json()["status"] == "ready"
    created = owner_client.post(
        "/api/experiments/",
        {"kind": "train", "dataset": row.pk, "model": {"arch": "mlp", "hidden": [8]}},
        content_type="application/json",
    )
    assert created.status_code == 201, created.content
    Experiment.objects.filter(pk=created.json()["id"]).update(status=Experiment.SUCCEEDED)

    # What a job trained on before the conversion: the upload, loaded from its file.
    monkeypatch.setenv("KD_STORE_CACHE", str(tmp_path / "cache"))
    config = parse_config({"kind": "train", "dataset": row.pk, "model": {"arch": "mlp"}})
    config.dataset = str(upload)
    before_conversion = load_experiment_dataset(config)

    assert ingest.run(row.pk) == "converted"  # the worker task
    row.refresh_from_db()
    assert row.status == "ready" and row.store.startswith(f"{row.store_folder}/") and not row.file
    assert not upload.exists() and store_dirs() == [Path(settings.MEDIA_ROOT) / row.store]
    assert row.inspection["class_counts"] and row.error == "" and row.ingest_token == ""
    assert ingest.run(row.pk) == "gone"  # a duplicate message changes nothing

    rows = index_rows(owner_client, row.pk)
    assert [int(r["index"]) for r in rows] == list(range(90))
    assert [int(r["label"]) for r in rows] == [i % 3 for i in range(90)]
    for split in ("train", "val", "test"):
        listed = sorted(int(r["index"]) for r in rows if r["split"] == split)
        assert listed == sorted(np.asarray(getattr(before_conversion, f"x_{split}").index).tolist())


def test_an_active_experiment_keeps_the_upload_until_the_sweep_after_it(owner, owner_client, make_experiment):
    from workers import ingest

    row = legacy_dataset(owner)
    upload = Path(settings.MEDIA_ROOT) / row.file.name
    running = make_experiment(owner, status=Experiment.RUNNING, dataset=row.pk)
    assert ingest.run(row.pk) == "converted"
    row.refresh_from_db()
    assert row.store and row.file and upload.exists()  # the running job may still open it
    assert index_rows(owner_client, row.pk)  # the store serves the index already
    assert ingest.sweep_stale() == 0  # still running: kept
    Experiment.objects.filter(pk=running.pk).update(status=Experiment.SUCCEEDED)
    assert ingest.sweep_stale() == 1
    row.refresh_from_db()
    assert not row.file and not upload.exists() and store_dirs() == [Path(settings.MEDIA_ROOT) / row.store]


def test_a_file_the_store_refuses_stays_ready_and_the_index_says_why(owner, owner_client, broker_redis):
    from workers import ingest

    row = legacy_dataset(owner, content=b"not an npz archive at all", name="broken.npz")
    owner_client.get(f"/api/datasets/{row.pk}/index/")  # asks for the conversion
    assert ingest.run(row.pk) == "failed"
    row.refresh_from_db()
    assert row.status == "ready" and row.file and not row.store and row.ingest_token == ""
    assert row.error.startswith("could not be converted to the dataset store: broken.npz")
    assert store_dirs() == []
    before = queued(broker_redis, row.pk)
    answer = owner_client.get(f"/api/datasets/{row.pk}/index/")
    assert answer.status_code == 409
    assert (
        "could not be converted" in answer.json()["error"]
        and "upload the file again" in answer.json()["error"]
    )
    assert queued(broker_redis, row.pk) == before  # not asked again: it would fail the same way


def test_a_killed_conversion_is_restarted_then_given_up(owner, settings):
    from workers import ingest

    settings.KD_MAX_ATTEMPTS = 2
    row = legacy_dataset(owner)
    token = ingest.claim_conversion(row.pk)
    assert token and ingest.run(row.pk) == "busy"  # one writer at a time
    partial = Path(settings.MEDIA_ROOT) / row.store_folder / token / "x.npy"
    partial.parent.mkdir(parents=True)
    partial.write_bytes(b"half")
    assert ingest.sweep_stale() == 0  # a fresh heartbeat: the worker may still be writing
    old = timezone.now() - datetime.timedelta(seconds=settings.KD_INGEST_STALE_S + 1)
    Dataset.objects.filter(pk=row.pk).update(heartbeat=old)
    assert ingest.sweep_stale() == 1  # restarted: claim cleared, partial files removed, enqueued again
    row.refresh_from_db()
    assert row.status == "ready" and row.ingest_token == "" and row.file and not partial.exists()

    assert ingest.claim_conversion(row.pk)
    Dataset.objects.filter(pk=row.pk).update(heartbeat=old)
    assert ingest.sweep_stale() == 1  # the second death: recorded, not retried
    row.refresh_from_db()
    assert row.status == "ready" and row.file and "stopped 2 times" in row.error
    assert ingest.claim_conversion(row.pk) is None


def test_built_ins_have_no_index_and_others_cannot_ask(owner_client, other_client, owner):
    from webapp.studio.services import builtin_dataset

    builtin = builtin_dataset(owner, "digits")
    answer = owner_client.get(f"/api/datasets/{builtin.pk}/index/")
    assert answer.status_code == 409 and "built-in" in answer.json()["error"]
    row = legacy_dataset(owner)
    assert other_client.get(f"/api/datasets/{row.pk}/index/").status_code == 404
    row.refresh_from_db()
    assert row.heartbeat is None  # nothing was asked for on the owner's behalf


def test_soft_labels_for_an_old_dataset_start_its_conversion(
    owner, owner_client, broker_redis, django_capture_on_commit_callbacks
):
    from tests.api.test_soft_labels import npz, post_soft

    row = legacy_dataset(owner)
    before = queued(broker_redis, row.pk)
    soft = npz(index=np.arange(90), logits=np.zeros((90, 3), np.float32))
    with django_capture_on_commit_callbacks(execute=True):
        response = post_soft(owner_client, row.pk, soft)
    assert response.status_code == 409 and "being converted" in response.json()["error"], response.content
    if before is not None:
        assert queued(broker_redis, row.pk) == before + 1
    from webapp.studio.models import Checkpoint

    assert not Checkpoint.objects.filter(owner=owner).exists()
