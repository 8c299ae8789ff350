"""Inspection of large checkpoint uploads on a worker: the file is read (in kd_core's sandbox) and the row settled."""

from __future__ import annotations

import datetime
import logging
from pathlib import PurePath

from django.utils import timezone

log = logging.getLogger(__name__)

# A row still "inspecting" after this long lost its worker (the task is acknowledged on receipt).
STALE_INSPECTION_S = 3600.0


def inspect_checkpoint(checkpoint_id: int) -> str:
    """Inspect an "inspecting" checkpoint row's file and record the answer or the reason; returns the outcome.

    TorchScript and ONNX files run in a sandbox child under the default limits (KD_SANDBOX_*), sized
    against the dataset named at upload, if any.
    """
    from kd_core.checkpoints import inspect_checkpoint as inspect_file
    from kd_core.errors import CheckpointError
    from webapp.studio import services
    from webapp.studio.models import Checkpoint
    from webapp.studio.storage import local_path

    row = (
        Checkpoint.objects.select_related("dataset")
        .filter(pk=checkpoint_id, status=Checkpoint.INSPECTING)
        .first()
    )
    if row is None:
        return "gone"  # deleted meanwhile, or already settled
    file_name = row.file.name
    shown = PurePath(file_name).name
    dataset = row.dataset
    try:
        with local_path(row.file) as path:
            info = inspect_file(
                str(path),
                arch=row.arch,
                input_shape=tuple(dataset.input_shape) if dataset and dataset.input_shape else None,
                num_classes=dataset.num_classes if dataset else None,
                preprocessing=row.preprocessing,
            )
    except CheckpointError as exc:
        services.fail_checkpoint_inspection(
            checkpoint_id, file_name, services.refusal_message(shown, shown, exc)
        )
        return "failed"
    except Exception as exc:  # noqa: BLE001 - the row must settle whatever went wrong
        log.exception("inspecting checkpoint %s failed", checkpoint_id)
        services.fail_checkpoint_inspection(
            checkpoint_id, file_name, f"{shown}: inspection failed ({type(exc).__name__})"
        )
        return "failed"
    return "ready" if services.finish_checkpoint_inspection(checkpoint_id, info) else "gone"


def fail_stale_inspections(max_age_s: float = STALE_INSPECTION_S) -> int:
    """Fail checkpoint rows left inspecting longer than `max_age_s` and delete their files; returns how many."""
    from webapp.studio import services
    from webapp.studio.models import Checkpoint

    cutoff = timezone.now() - datetime.timedelta(seconds=max_age_s)
    stale = Checkpoint.objects.filter(status=Checkpoint.INSPECTING, created__lt=cutoff).values_list(
        "pk", "file"
    )
    reason = "inspection did not finish (the worker stopped); upload the file again"
    return sum(services.fail_checkpoint_inspection(pk, name, reason) for pk, name in stale)
