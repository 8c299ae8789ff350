"""Soft-label teachers in the web app: the upload of a file of predictions tied to one dataset, and its rules.

The file (`.npz`: `index` + `logits` or `probs`) refers to the dataset's stable sample index (the store's
row numbers, `GET /api/datasets/{id}/index/`). It is checked by kd_core.soft_labels (headers before
values, no pickles) and recorded with `coverage`: the fraction of the dataset's train samples (as the
index lists them, default split fractions) that it covers.
"""

from __future__ import annotations

from pathlib import Path, PurePath
from typing import Any

import numpy as np
from django.conf import settings
from django.core.files.uploadedfile import UploadedFile

from webapp.studio.auth import ApiError
from webapp.studio.models import Checkpoint, Dataset

FORMAT = "soft_labels"


def create_soft_label_checkpoint(
    owner: Any, upload: UploadedFile, name: str | None, dataset: Dataset | None
) -> Checkpoint:
    """Store and check an uploaded soft-label file for `dataset`; on failure nothing remains (400 in words)."""
    from kd_core.errors import CheckpointError
    from kd_core.soft_labels import coverage_of, read_soft_labels
    from webapp.studio import services
    from webapp.studio.dataset_index import ensure_store, sample_splits
    from webapp.studio.storage import local_path
    from webapp.studio.stores import local_store

    if dataset is None:
        raise ApiError(
            "a soft-label file (.npz) holds predictions for one dataset's samples: send 'dataset' (its id) "
            "with it; GET /api/datasets/{id}/index/ lists the sample indices it refers to",
            fields={"dataset": "required for soft labels"},
        )
    if not dataset.store and dataset.format != "builtin" and dataset.file:
        ensure_store(dataset)  # uploaded before stores existed: its conversion starts; 409 says to ask again
    if not dataset.store:
        raise ApiError(
            f"dataset “{dataset.name}” has no stable sample index (a built-in dataset): upload the data as a "
            "dataset, then soft labels for it",
            fields={"dataset": "no sample index"},
        )
    checkpoint = Checkpoint(
        owner=owner, name=services._name(name, PurePath(upload.name).stem), format=FORMAT, dataset=dataset
    )
    checkpoint.file.save(upload.name, upload, save=False)
    with services._refusing(checkpoint.file, upload.name, CheckpointError):
        checkpoint.size = checkpoint.file.size
        store_dir = local_store(dataset.store, Path(settings.STATE_DIR) / "stores")
        labels, splits = sample_splits(store_dir)
        with local_path(checkpoint.file) as path:
            soft = read_soft_labels(path, num_samples=len(labels), num_classes=dataset.num_classes)
        checkpoint.coverage = coverage_of(soft, np.flatnonzero(splits == 0))
        if dataset.num_classes is None and checkpoint.coverage < 1.0:
            raise CheckpointError(
                f"the predictions cover {checkpoint.coverage:.1%} of the training samples of “{dataset.name}”, "
                "which has no labels: every training sample of an unlabeled set needs a prediction"
            )
        checkpoint.num_classes = soft.num_classes
        checkpoint.input_shape = dataset.input_shape
        checkpoint.class_names = dataset.class_names
        checkpoint.save()
    return checkpoint


def check_soft_label_use(teacher: Checkpoint, dataset: Dataset, configs: list[Any]) -> None:
    """A soft-label teacher serves only its own dataset, and never augmented batches (400 in words)."""
    if teacher.format != FORMAT:
        return
    if teacher.dataset_id != dataset.pk:
        theirs = f"“{teacher.dataset.name}”" if teacher.dataset else "a deleted dataset"
        raise ApiError(
            f"teacher “{teacher.name}” is soft labels for {theirs}: its predictions refer to that dataset's "
            f"samples, not to “{dataset.name}”'s",
            fields={"teacher": "soft labels for another dataset"},
        )
    for config in configs:
        if config.augment != "none":
            raise ApiError(
                f"teacher “{teacher.name}” is a file of predictions for the stored samples: it cannot score "
                f"augmented inputs, so augment must be 'none' (got {config.augment!r})",
                fields={"augment": "not with a soft-label teacher"},
            )
