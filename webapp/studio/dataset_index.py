"""A dataset's sample index as CSV (`index,split,label,source`), streamed block by block from its store.

`split` is what experiments train on: the split the file gave, else the seeded split kd_core carves at load
time, computed by the same function (`kd_core.data.store.store_dataset`, SPLIT_SEED, the config's default
fractions), so the index agrees with training (a test checks it against `load_experiment_dataset`). Labels are class ids (empty for an unlabelled sample); `source` is the
store's `sources.txt` line: the CSV/NPZ row, the ZIP member or the imported file's relative path.

A dataset uploaded before the store existed has no index yet: the first request for one (`ensure_store`)
enqueues its conversion (workers/ingest.py `convert`; the row stays ready meanwhile) and answers 409 saying
it is being converted. The store is ingested from the same upload with the same options, so its index and
splits are those the upload's jobs already trained on.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from webapp.studio.auth import ApiError
from webapp.studio.models import Dataset

BLOCK = 65_536  # rows per chunk: a few MB of text at most
SPLIT_NAMES = ("train", "val", "test")


def sample_splits(store_dir: Path) -> tuple[np.ndarray, np.ndarray]:
    """(labels int64 (N,), split int8 (N,): 0 train, 1 val, 2 test) as experiments see them.

    kd_core.runner.load_experiment_dataset loads a store with kd_core.data.store.store_dataset at
    SPLIT_SEED and the config's fractions; this calls the same function with the default fractions
    (without the training statistics, which the index does not need) and reads back each split's
    sample indices.
    """
    from kd_core.config import ExperimentConfig
    from kd_core.data.store import open_store, store_dataset
    from kd_core.runner import SPLIT_SEED

    fields = ExperimentConfig.__dataclass_fields__
    store = open_store(store_dir)
    dataset = store_dataset(
        store,
        seed=SPLIT_SEED,
        val_fraction=fields["val_fraction"].default,
        test_fraction=fields["test_fraction"].default,
        stats=False,
    )
    out = np.full(len(store.y), -1, dtype=np.int8)
    for code, name in enumerate(SPLIT_NAMES):
        out[np.asarray(getattr(dataset, f"x_{name}").index)] = code
    return np.asarray(store.y), out


# A conversion asked for but not yet taken by a worker is asked for again after this long (a lost message).
ASK_AGAIN_AFTER_S = 60.0


def ensure_store(dataset: Dataset) -> str:
    """The dataset's store name; else ApiError 409 saying why there is none (yet).

    A dataset uploaded before the store existed gets its conversion enqueued (once: a conditional UPDATE of
    `heartbeat` marks the request) and the answer says it is being converted.
    """
    if dataset.status != Dataset.READY:
        raise ApiError(
            f"dataset {dataset.pk} is {dataset.status}; its index can be listed once it is ready", 409
        )
    if dataset.store:
        return dataset.store
    if dataset.format == "builtin" or not dataset.file:
        raise ApiError(f"dataset {dataset.pk} is a built-in dataset: it has no stored samples to list", 409)
    if dataset.error:
        raise ApiError(
            f"dataset {dataset.pk} was uploaded before the dataset store existed and {dataset.error}; "
            "upload the file again as a new dataset",
            409,
        )
    request_conversion(dataset.pk)
    raise ApiError(
        f"dataset {dataset.pk} was uploaded before the dataset store existed and is being converted to it now "
        "(a worker ingests its upload; it stays usable meanwhile); ask again in a minute",
        409,
    )


def request_conversion(dataset_id: int) -> bool:
    """Enqueue the conversion of a ready dataset that has an upload but no store, unless one is already
    running or was asked for less than ASK_AGAIN_AFTER_S ago; True when enqueued."""
    import datetime

    from django.db.models import Q
    from django.utils import timezone

    from webapp.studio.services import enqueue_ingest

    now = timezone.now()
    waited = now - datetime.timedelta(seconds=ASK_AGAIN_AFTER_S)
    rows = Dataset.objects.filter(pk=dataset_id, status=Dataset.READY, store="", ingest_token="", error="")
    rows = rows.exclude(file="").filter(Q(heartbeat__isnull=True) | Q(heartbeat__lt=waited))
    if not rows.update(heartbeat=now):
        return False
    enqueue_ingest(dataset_id)  # workers/ingest.py sees a ready row without a store and converts it
    return True


def csv_chunks(dataset: Dataset) -> Iterator[str]:
    """The CSV text, a block of rows at a time; ApiError (409) now, before streaming, when there is no store."""
    from django.conf import settings

    from webapp.studio.stores import local_store

    store_dir = local_store(ensure_store(dataset), Path(settings.STATE_DIR) / "stores")
    return _rows(store_dir)


def _rows(store_dir: Path) -> Iterator[str]:
    y, splits = sample_splits(store_dir)
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["index", "split", "label", "source"])
    with open(store_dir / "sources.txt", encoding="utf-8", newline="\n") as sources:
        for start in range(0, len(y), BLOCK):
            labels = np.asarray(y[start : start + BLOCK])
            for offset, label in enumerate(labels.tolist()):
                i = start + offset
                source = sources.readline().rstrip("\n")
                writer.writerow([i, SPLIT_NAMES[splits[i]], "" if label < 0 else label, source])
            yield buffer.getvalue()
            buffer.seek(0)
            buffer.truncate()
    yield buffer.getvalue()
