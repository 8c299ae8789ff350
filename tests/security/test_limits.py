"""A hostile (or careless) user against the limits: huge names, too many jobs, sweeps, storage and points.

Each case is refused with a 4xx and a reason, leaves no row or file behind, and the next request works.
"""

from __future__ import annotations

import io
import math
import time
import tracemalloc
import zipfile
from pathlib import Path

import numpy as np
import pytest
from django.core.files.uploadedfile import SimpleUploadedFile

from kd_core.limits import MAX_CLASSES
from tests.api.conftest import npz_bytes
from webapp.studio.models import Checkpoint, Dataset, Experiment, MetricPoint

pytestmark = pytest.mark.django_db


def _upload(name: str, content: bytes) -> SimpleUploadedFile:
    return SimpleUploadedFile(name, content, content_type="application/octet-stream")


def _files(settings) -> list[Path]:
    root = Path(settings.MEDIA_ROOT)
    return sorted(p for p in root.rglob("*") if p.is_file()) if root.exists() else []


def _refused(response, status: int, *fragments: str) -> str:
    assert response.status_code == status, response.content[:500]
    assert response["Content-Type"] == "application/json"
    assert len(response.content) < 2000, "a refusal must not echo what it refused"
    reason = response.json()["error"]
    for fragment in fragments:
        assert fragment in reason, reason
    return reason


def _still_fine(client) -> None:
    response = client.get("/api/datasets/")
    assert response.status_code == 200
    assert len(response.content) < 100_000


def _npz_with_names(names) -> bytes:
    buffer = io.BytesIO()
    x = np.zeros((30, 4), dtype=np.float32)
    np.savez_compressed(buffer, x=x, y=np.arange(30) % 3, class_names=names)
    return buffer.getvalue()


def _post_experiment(client, body, capture):
    with capture(execute=True):
        return client.post("/api/experiments/", body, content_type="application/json")


def _config(dataset_id: int, **extra) -> dict:
    return {
        "kind": "train",
        "dataset": dataset_id,
        "model": {"arch": "mlp", "hidden": [8]},
        "epochs": 1,
        **extra,
    }


# --- bounded strings ------------------------------------------------------------------------------


def test_a_20_million_character_class_name_is_a_short_400(owner_client, settings):
    """The issue's case: a 235 KB NPZ whose one class name is 20 million characters."""
    content = _npz_with_names(np.array(["a" * 20_000_000, "b", "c"]))
    assert len(content) < 300_000
    started = time.perf_counter()
    response = owner_client.post("/api/datasets/", {"name": "huge", "file": _upload("huge.npz", content)})
    _refused(response, 400, "huge.npz", "class_names", "20,000,000 characters", "at most 200")
    assert time.perf_counter() - started < 10
    assert not Dataset.objects.exists() and _files(settings) == []
    _still_fine(owner_client)


@pytest.mark.parametrize(
    "filename, content, fragments",
    [
        ("many.npz", _npz_with_names(np.array([f"c{i}" for i in range(MAX_CLASSES + 1)])),
         [f"{MAX_CLASSES + 1} classes", f"at most {MAX_CLASSES}"]),
        ("wide.npz", _npz_with_names(np.array([b"x" * 300, b"b", b"c"])), ["class name 0 is 300 characters"]),
        ("nul.npz", _npz_with_names(np.array(["a\x00b", "b", "c"])), ["control character"]),
        ("label.csv", b"f,label\n1,cat\n2," + b"d" * 500 + b"\n3,cat\n", ["label of 500 characters"]),
        ("column.csv", b"f," + b"c" * 300 + b",label\n1,2,0\n3,4,1\n", ["column 2 is 300 characters"]),
    ],
)  # fmt: skip
def test_oversized_class_and_column_names_are_refused(owner_client, settings, filename, content, fragments):
    response = owner_client.post("/api/datasets/", {"name": "d", "file": _upload(filename, content)})
    _refused(response, 400, filename, *fragments)
    assert not Dataset.objects.exists() and _files(settings) == []
    _still_fine(owner_client)


def test_a_zip_class_folder_name_is_a_class_name(owner_client, settings):
    from PIL import Image

    png = io.BytesIO()
    Image.new("RGB", (4, 4)).save(png, format="PNG")
    archive = io.BytesIO()
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("f" * 250 + "/a.png", png.getvalue())
        zf.writestr("dog/b.png", png.getvalue())
    response = owner_client.post("/api/datasets/", {"file": _upload("folders.zip", archive.getvalue())})
    _refused(response, 400, "250 characters long")
    assert not Dataset.objects.exists() and _files(settings) == []


def test_names_are_refused_not_cut(
    owner, owner_client, make_dataset, settings, django_capture_on_commit_callbacks
):
    response = owner_client.post("/api/datasets/", {"name": "n" * 201, "file": _upload("a.npz", npz_bytes())})
    _refused(response, 400, "'name' is 201 characters long; at most 200")
    response = owner_client.post("/api/datasets/", {"file": _upload("f" * 230 + ".npz", npz_bytes())})
    _refused(response, 400, "the file name", "send a shorter 'name'")
    response = owner_client.post(
        "/api/datasets/", {"name": "tab\there", "file": _upload("a.npz", npz_bytes())}
    )
    _refused(response, 400, "control character")
    response = owner_client.post(
        "/api/checkpoints/", {"name": "c" * 5000, "file": _upload("m.safetensors", b"x")}
    )
    _refused(response, 400, "5,000 characters")
    assert not Dataset.objects.exists() and not Checkpoint.objects.exists() and _files(settings) == []

    dataset = make_dataset(owner)
    capture = django_capture_on_commit_callbacks
    _refused(
        _post_experiment(owner_client, _config(dataset["id"], name="e" * 201), capture), 400, "201 characters"
    )
    # A name that fits alone but not with the sweep label is refused, not cut.
    body = _config(dataset["id"], name="s" * 195, sweep={"lr": [0.1, 0.01]})
    _refused(_post_experiment(owner_client, body, capture), 400, "with the sweep label", "shorten 'name'")
    assert not Experiment.objects.exists()
    # With no name, the default one is shortened to leave the label whole.
    long_dataset = make_dataset(owner, name="d" * 200)
    ids = _post_experiment(
        owner_client, _config(long_dataset["id"], sweep={"lr": [0.1, 0.01]}), capture
    ).json()["ids"]
    names = [Experiment.objects.get(pk=i).name for i in ids]
    assert (
        all(len(n) <= 200 for n in names) and names[0].endswith("[lr=0.1]") and names[1].endswith("[lr=0.01]")
    )


# --- per-user limits ------------------------------------------------------------------------------


def test_queued_jobs_per_user_are_limited(
    owner, other, owner_client, other_client, make_dataset, settings, django_capture_on_commit_callbacks
):
    settings.KD_MAX_ACTIVE_JOBS = 3
    capture = django_capture_on_commit_callbacks
    dataset = make_dataset(owner)["id"]
    for _ in range(2):
        assert _post_experiment(owner_client, _config(dataset), capture).status_code == 201
    # A sweep that would pass the limit creates nothing.
    sweep = _config(dataset, sweep={"lr": [0.1, 0.01]})
    _refused(_post_experiment(owner_client, sweep, capture), 429, "2 queued or running", "limit of 3")
    assert Experiment.objects.count() == 2
    assert _post_experiment(owner_client, _config(dataset), capture).status_code == 201
    _refused(_post_experiment(owner_client, _config(dataset), capture), 429, "limit of 3", "cancel")
    # Another user is not affected; finished jobs do not count.
    assert _post_experiment(other_client, _config(make_dataset(other)["id"]), capture).status_code == 201
    first = Experiment.objects.filter(owner=owner).order_by("pk").first()
    assert owner_client.post(f"/api/experiments/{first.pk}/cancel/").status_code == 200
    assert _post_experiment(owner_client, _config(dataset), capture).status_code == 201


def test_sweep_size_is_limited_before_anything_is_created(
    owner, owner_client, make_dataset, settings, django_capture_on_commit_callbacks
):
    settings.KD_MAX_SWEEP_SIZE = 4
    capture = django_capture_on_commit_callbacks
    dataset = make_dataset(owner)["id"]
    body = _config(dataset, sweep={"lr": [0.1, 0.2, 0.3], "seed": [1, 2]})
    _refused(_post_experiment(owner_client, body, capture), 400, "would create 6 experiments", "at most 4")
    # A sweep whose size would be astronomically large is refused as quickly, without multiplying it out.
    huge = {key: list(range(1, 1000)) for key in ("seed", "epochs", "batch_size", "max_steps")}
    started = time.perf_counter()
    _refused(_post_experiment(owner_client, _config(dataset, sweep=huge), capture), 400, "at most 4")
    assert time.perf_counter() - started < 5
    assert not Experiment.objects.exists()
    assert (
        _post_experiment(owner_client, _config(dataset, sweep={"lr": [0.1, 0.2]}), capture).status_code == 201
    )


def test_storage_quota_refuses_uploads_and_leaves_nothing(owner, other, owner_client, other_client, settings):
    one = npz_bytes(n=200, features=8)
    settings.KD_STORAGE_QUOTA_BYTES = int(len(one) * 1.5)
    assert (
        owner_client.post("/api/datasets/", {"name": "a", "file": _upload("a.npz", one)}).status_code == 201
    )
    files = _files(settings)
    response = owner_client.post("/api/datasets/", {"name": "b", "file": _upload("b.npz", one)})
    reason = _refused(response, 413, "storage quota exceeded", "you use", "MiB of", "this file is")
    assert reason.count("MiB") == 3
    response = owner_client.post("/api/checkpoints/", {"name": "c", "file": _upload("c.safetensors", one)})
    _refused(response, 413, "storage quota exceeded")
    assert Dataset.objects.count() == 1 and not Checkpoint.objects.exists() and _files(settings) == files
    # Another user has their own quota; deleting makes room again.
    assert (
        other_client.post("/api/datasets/", {"name": "a", "file": _upload("a.npz", one)}).status_code == 201
    )
    assert (
        owner_client.delete(f"/api/datasets/{Dataset.objects.filter(owner=owner).get().pk}/").status_code
        == 204
    )
    assert (
        owner_client.post("/api/datasets/", {"name": "b", "file": _upload("b.npz", one)}).status_code == 201
    )


def test_a_full_account_is_refused_before_the_body_is_read(owner, owner_client, settings):
    settings.KD_STORAGE_QUOTA_BYTES = 1
    Dataset.objects.create(owner=owner, name="x", format="npz", size=1, inspection={})
    response = owner_client.post("/api/datasets/", {"name": "b", "file": _upload("b.npz", npz_bytes())})
    _refused(response, 413, "storage quota exceeded")
    assert _files(settings) == []


# --- metric points --------------------------------------------------------------------------------


def test_log_every_is_raised_to_keep_series_bounded(
    owner, owner_client, make_dataset, settings, django_capture_on_commit_callbacks
):
    settings.KD_MAX_POINTS_PER_SERIES = 1000
    capture = django_capture_on_commit_callbacks
    dataset = make_dataset(owner, n=600)["id"]  # 600 samples, batch 64: at most 10 steps an epoch
    body = _config(dataset, epochs=1000, batch_size=64, log_every=1)
    response = _post_experiment(owner_client, body, capture)
    assert response.status_code == 201, response.content
    answer = response.json()
    assert "log_every raised from 1 to 10" in answer["notes"][0], answer
    stored = Experiment.objects.get(pk=answer["id"]).config
    assert stored["log_every"] == 10 and stored["epochs"] == 1000  # the stored config is the record
    # max_steps bounds the run too: nothing to raise.
    response = _post_experiment(
        owner_client, _config(dataset, epochs=1000, max_steps=500, log_every=1), capture
    )
    assert response.status_code == 201 and "notes" not in response.json()
    # Validation logs once an epoch, which log_every cannot thin: more epochs than the cap are refused.
    _refused(
        _post_experiment(owner_client, _config(dataset, epochs=5000), capture), 400, "5,000 epochs", "1,000"
    )
    assert Experiment.objects.count() == 2


def test_metrics_of_a_huge_series_are_downsampled_by_the_database(owner, owner_client, make_experiment):
    experiment = make_experiment(owner)
    n = 200_000
    values = [math.sin(i / 700) for i in range(n)]
    values[123_457] = 40.0
    values[7_001] = -40.0
    for start in range(0, n, 20_000):
        MetricPoint.objects.bulk_create(
            MetricPoint(experiment=experiment, name="train/loss", step=i, value=values[i], time=float(i))
            for i in range(start, start + 20_000)
        )
    url = f"/api/experiments/{experiment.pk}/metrics/"
    owner_client.get(url, {"max_points": 10})  # warm-up: first-request imports are not the view's memory
    tracemalloc.start()
    response = owner_client.get(url, {"max_points": 500, "with_time": 1})
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    points = response.json()["series"]["train/loss"]
    assert len(points) <= 500
    assert points[0] == [0, values[0], 0.0] and points[-1] == [n - 1, values[-1], float(n - 1)]
    assert [123_457, 40.0, 123_457.0] in points and [7_001, -40.0, 7_001.0] in points
    assert peak < 5 * 1024**2, f"{peak / 2**20:.1f} MiB for 500 points"
    # The CSV export of the whole series streams: the response holds no body, only a generator.
    response = owner_client.get(url, {"format": "csv"})
    assert response.streaming
    tracemalloc.start()
    lines = sum(chunk.count(b"\n") for chunk in response.streaming_content)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert lines == n + 1
    assert peak < 10 * 1024**2, f"{peak / 2**20:.1f} MiB to stream {n} rows"
    _still_fine(owner_client)


@pytest.mark.asyncio
@pytest.mark.django_db(transaction=True)
async def test_the_csv_export_streams_under_asgi(owner, make_experiment):
    """Under ASGI a sync iterator would be read into a list first; the export hands over page by page."""
    from asgiref.sync import sync_to_async
    from django.test import AsyncClient

    experiment = await sync_to_async(make_experiment)(owner)
    await MetricPoint.objects.abulk_create(
        MetricPoint(experiment=experiment, name="loss", step=i, value=float(i), time=0.0)
        for i in range(12_000)
    )
    client = AsyncClient()
    await client.aforce_login(owner)
    response = await client.get(f"/api/experiments/{experiment.pk}/metrics/", {"format": "csv"})
    assert response.status_code == 200 and response.is_async
    chunks = [chunk async for chunk in response.streaming_content]
    assert len(chunks) >= 3  # pages of rows, not one body
    assert b"".join(chunks).count(b"\n") == 12_001
