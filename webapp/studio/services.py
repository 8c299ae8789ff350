"""What the web side does to the studio's state: uploads, experiments, enqueueing, cancelling.

Views call these and turn `ApiError` into JSON; the worker calls `register_trained_model`. Nothing here
imports `workers`: jobs are enqueued by task name.
"""

from __future__ import annotations

import itertools
import logging
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import PurePath
from typing import Any

from django.conf import settings
from django.contrib.auth import get_user_model
from django.core.files.uploadedfile import UploadedFile
from django.db import transaction
from django.db.models import Sum

from kd_core.config import parse_config, validate_model_spec
from kd_core.errors import CheckpointError, ConfigError, DatasetError
from kd_core.limits import MAX_NAME_CHARS, name_problem
from webapp.celery import app as celery_app
from webapp.env import env_int
from webapp.studio import imports, stores
from webapp.studio.auth import ApiError
from webapp.studio.models import Artifact, Checkpoint, Dataset, Experiment
from webapp.studio.storage import delete_quietly, local_path, save_local_file

log = logging.getLogger(__name__)

DATASET_EXTENSIONS = {".npz": "npz", ".csv": "csv", ".zip": "zip"}
CHECKPOINT_EXTENSIONS = {
    ".safetensors": "safetensors",
    ".pt": "state_dict",
    ".pth": "state_dict",
    ".ts": "torchscript",
    ".onnx": "onnx",
    ".pt2": "exported_program",
}
# Config keys a sweep may vary: the numeric and choice hyperparameters, not the data or the teacher.
SWEEP_KEYS = {
    "epochs", "max_steps", "batch_size", "lr", "optimizer", "momentum", "weight_decay", "schedule", "seed",
    "temperature", "alpha", "soft_loss", "augment", "model",
    "method", "method_options", "logit_standardization", "keep",
    "codistill.replicas", "codistill.burn_in_steps", "codistill.exchange_every", "codistill.loss",
    "codistill.weight", "codistill.exchange", "codistill.data", "codistill.group_size",
}  # fmt: skip


def _extension(filename: str, allowed: dict[str, str], what: str) -> str:
    suffix = PurePath(filename or "").suffix.lower()
    if suffix not in allowed:
        raise ApiError(f"{what} files must end in {', '.join(allowed)}; got {filename!r}")
    return allowed[suffix]


def _name(value: Any, fallback: str) -> str:
    """The given name, else `fallback` (the file's name); refused, never cut, when over the bounds."""
    given = (value if isinstance(value, str) else "").strip()
    name = given or fallback
    problem = name_problem(name, "'name'" if given else "the file name (used as the name when none is given)")
    if problem:
        raise ApiError(problem if given else f"{problem}; send a shorter 'name'")
    return name


# --- storage quota ----------------------------------------------------------------------------


def storage_used(owner) -> int:
    """Bytes the user's datasets, checkpoints and experiment files take in storage."""
    total = 0
    for rows in (
        Dataset.objects.filter(owner=owner),
        Checkpoint.objects.filter(owner=owner),
        Artifact.objects.filter(experiment__owner=owner),
    ):
        total += rows.aggregate(total=Sum("size"))["total"] or 0
    return total


def check_storage_quota(owner, incoming: int) -> None:
    """413 naming used/limit when storing `incoming` more bytes would pass KD_STORAGE_QUOTA_BYTES.

    Called before an upload is written to storage, so a refusal leaves nothing behind (Django removes
    its temporary file when the request ends). Files a job writes are not refused, but count.
    """
    quota = settings.KD_STORAGE_QUOTA_BYTES
    if not quota:
        return
    used = storage_used(owner)
    if used + incoming > quota:
        raise ApiError(
            f"storage quota exceeded: you use {_mib(used)} of {_mib(quota)} and this file is {_mib(incoming)}; "
            "delete datasets, checkpoints or experiments to make room",
            413,
        )


def _mib(n: int) -> str:
    return f"{n / 1024**2:,.1f} MiB"


# --- datasets ---------------------------------------------------------------------------------


# Uploads larger than this are inspected by a worker, not in the request (checkpoints; datasets below).
DEFAULT_SYNC_INSPECT_MAX_BYTES = 64 * 1024 * 1024
# Datasets: ingesting writes the whole store, so the in-request bound is lower than for inspecting.
DEFAULT_SYNC_INGEST_MAX_BYTES = 16 * 1024 * 1024


def sync_inspect_max_bytes() -> int:
    """settings.KD_SYNC_INSPECT_MAX_BYTES, else the environment variable of that name, else 64 MiB."""
    value = getattr(settings, "KD_SYNC_INSPECT_MAX_BYTES", None)
    if value is None:
        value = env_int("KD_SYNC_INSPECT_MAX_BYTES", DEFAULT_SYNC_INSPECT_MAX_BYTES, minimum=0)
    return int(value)


def sync_ingest_max_bytes() -> int:
    """Uploads up to this size are ingested in the request: KD_SYNC_INGEST_MAX_BYTES when set, else the lower
    of 16 MiB and sync_inspect_max_bytes() (so lowering the one knob sends datasets to the worker too)."""
    value = getattr(settings, "KD_SYNC_INGEST_MAX_BYTES", -1)
    if value is None or int(value) < 0:
        return min(DEFAULT_SYNC_INGEST_MAX_BYTES, sync_inspect_max_bytes())
    return int(value)


def create_dataset(owner, upload: UploadedFile, name: str | None, options: dict[str, Any]) -> Dataset:
    """Store an upload and ingest it into its store; on any failure nothing remains.

    Up to `sync_ingest_max_bytes()` the store is written here (the row answers "ready"); a larger file is
    recorded "ingesting" and ingested by `workers.ingest_dataset` on the default queue, which makes the row
    "ready" or "failed" (the reason in `error`, the upload and any partial store deleted). Once the store
    holds the data the upload is deleted: the store replaces it.
    """
    fmt = _extension(upload.name, DATASET_EXTENSIONS, "dataset")
    dataset = Dataset(owner=owner, name=_name(name, PurePath(upload.name).stem), format=fmt, options=options)
    dataset.file.save(upload.name, upload, save=False)  # streamed in chunks to storage
    with _refusing(dataset.file, upload.name, DatasetError):
        dataset.size = dataset.file.size
        if dataset.size > sync_ingest_max_bytes():
            dataset.status, dataset.progress = Dataset.INGESTING, 0.0
            dataset.save()
            enqueue_ingest(dataset.pk)
            return dataset
        dataset.status, dataset.progress = Dataset.INGESTING, 0.0
        dataset.save()  # the store folder is named after the row
        store = f"{dataset.store_folder}/{uuid.uuid4().hex}"
        try:
            with local_path(dataset.file) as path:
                summary, size = stores.ingest_to_storage(path, store, options=options)
        except BaseException:
            stores.delete_tree(dataset.store_folder)
            Dataset.objects.filter(pk=dataset.pk).delete()
            raise
    upload_name = dataset.file.name
    dataset.inspection, dataset.store, dataset.size = jsonable(summary), store, size
    dataset.status, dataset.progress, dataset.file = Dataset.READY, 1.0, ""
    dataset.save()
    delete_quietly(upload_name)  # the row no longer names it
    return dataset


def import_dataset(owner, name: Any, import_path: Any, options: dict[str, Any]) -> Dataset:
    """Register a file or folder under KD_IMPORT_ROOT and enqueue its ingestion; 400 saying why when refused.

    The original is read in place by the worker and never modified or deleted.
    """
    try:
        source = imports.resolve(import_path)
    except imports.ImportRefused as exc:
        raise ApiError(str(exc)) from None
    check_storage_quota(owner, source.size)  # a store takes at least about what it was made from
    dataset = Dataset.objects.create(
        owner=owner,
        name=_name(name, PurePath(source.relative).stem or PurePath(source.relative).name),
        format=source.format,
        import_path=source.relative,
        options=options,
        status=Dataset.INGESTING,
        progress=0.0,
    )
    enqueue_ingest(dataset.pk)
    return dataset


@contextmanager
def _refusing(field_file: Any, upload_name: str, refusal: type[Exception]) -> Iterator[None]:
    """On any failure the stored upload is deleted; kd_core's `refusal` becomes an ApiError naming it once."""
    try:
        yield
    except refusal as exc:
        delete_quietly(field_file.name)
        raise ApiError(refusal_message(upload_name, PurePath(field_file.name).name, exc)) from None
    except BaseException:
        delete_quietly(field_file.name)
        raise


def refusal_message(upload_name: str, stored_name: str, exc: Exception) -> str:
    """'<upload name>: <reason>'; a reason that opens with the stored file's name does not repeat it."""
    reason = str(exc)
    rest = reason[len(stored_name) :] if stored_name and reason.startswith(stored_name) else None
    if rest is not None and rest.startswith(": "):
        reason = rest[2:]
    elif rest is not None and rest.startswith(" "):
        reason = "the file" + rest  # "evil.pt holds ..." -> "evil.pt: the file holds ..."
    return f"{upload_name}: {reason}"


def enqueue_ingest(dataset_id: int) -> None:
    """Send `workers.ingest_dataset` to queue `default` once the row is committed."""

    def send() -> None:
        try:
            celery_app.send_task(
                "workers.ingest_dataset",
                args=[dataset_id],
                queue="default",
                retry=True,
                retry_policy={"max_retries": 2, "interval_start": 0.2, "interval_step": 0.5},
            )
        except Exception as exc:  # noqa: BLE001 - any broker failure means the same to the user
            log.exception("could not enqueue the ingestion of dataset %s", dataset_id)
            fail_ingest(dataset_id, f"could not reach the job queue: {exc}")

    transaction.on_commit(send)


def finish_ingest(dataset_id: int, token: str, store: str, summary: dict[str, Any], size: int) -> bool:
    """Record a finished store under the attempt's `token`; False when the row is gone or another holds it.

    The upload is then deleted: the store replaces it.
    """
    row = Dataset.objects.filter(pk=dataset_id).values_list("file", flat=True).first()
    updated = Dataset.objects.filter(pk=dataset_id, status=Dataset.INGESTING, ingest_token=token).update(
        status=Dataset.READY, store=store, inspection=jsonable(summary), size=size, progress=1.0,
        error="", file="", ingest_token="",
    )  # fmt: skip
    if updated and row:
        delete_quietly(row)  # the row no longer names it
    return bool(updated)


def fail_ingest(dataset_id: int, reason: str, token: str | None = None) -> bool:
    """Mark an ingesting row failed with `reason` (under `token` when given) and delete its upload and
    any store: nothing half-usable remains. False when the row is gone or no longer this attempt's."""
    rows = Dataset.objects.filter(pk=dataset_id, status=Dataset.INGESTING)
    if token is not None:
        rows = rows.filter(ingest_token=token)
    found = rows.values_list("file", "owner_id").first()
    if found is None:
        return False
    updated = rows.update(
        status=Dataset.FAILED, error=reason[:2000], ingest_token="", store="", file="", size=0
    )
    if updated:
        file_name, owner_id = found
        delete_quietly(file_name)
        stores.delete_tree(f"stores/{owner_id}/{dataset_id}")
    return bool(updated)


def builtin_dataset(owner, name: str) -> Dataset:
    """The user's row for a built-in dataset (created on first use), so experiments always point to a row."""
    from kd_core.data import BUILTIN_DATASETS, inspect_dataset

    if name not in BUILTIN_DATASETS:
        raise ApiError(
            f"'dataset' must be the id of one of your datasets or a built-in name ({', '.join(BUILTIN_DATASETS)})"
        )
    existing = Dataset.objects.filter(owner=owner, format="builtin", name=name).first()
    if existing:
        return existing
    try:
        inspection = jsonable(inspect_dataset(name))
    except DatasetError as exc:
        raise ApiError(str(exc)) from None
    return Dataset.objects.create(owner=owner, name=name, format="builtin", inspection=inspection)


def delete_dataset(dataset: Dataset) -> None:
    """Delete the row, its upload and its stores; an ingesting worker notices the row is gone and stops,
    removing what it wrote (its own check, after its last write, covers a store finished meanwhile)."""
    _refuse_if_in_use(Experiment.objects.filter(dataset=dataset), f"dataset {dataset.pk}")
    name, folder = dataset.file.name, dataset.store_folder
    dataset.delete()

    def remove() -> None:
        delete_quietly(name)
        stores.delete_tree(folder)

    transaction.on_commit(remove)


def _refuse_if_in_use(experiments, what: str) -> None:
    busy = list(experiments.filter(status__in=Experiment.ACTIVE).values_list("pk", flat=True)[:5])
    if busy:
        ids = ", ".join(str(i) for i in busy)
        raise ApiError(f"{what} is used by queued or running experiment(s) {ids}; cancel them or wait", 409)


# --- checkpoints ------------------------------------------------------------------------------


def create_checkpoint(
    owner,
    upload: UploadedFile,
    name: str | None,
    arch: Any = None,
    dataset: Dataset | None = None,
    *,
    preprocessing: Any = None,
) -> Checkpoint:
    """Store an uploaded model file, inspect it (never unpickling), record it; on failure nothing remains.

    TorchScript and ONNX files are read only in kd_core's sandbox child, here with a short wall-time limit
    so the web process stays responsive. A file above `sync_inspect_max_bytes()` is recorded "inspecting"
    and settled by `workers.inspect_checkpoint` (ready, or failed with the reason and the file deleted).
    """
    from kd_core.checkpoints import inspect_checkpoint
    from kd_core.sandbox import inspection_limits

    fmt = _extension(upload.name, CHECKPOINT_EXTENSIONS, "checkpoint")
    if arch is not None:
        try:
            arch = validate_model_spec(arch, "arch")
        except ConfigError as exc:
            raise ApiError(str(exc)) from None
    if preprocessing is not None:
        # The normalisation a plain state dict was trained with outside the model (torchvision/timm ones).
        from kd_core.config import validate_preprocessing

        try:
            preprocessing = validate_preprocessing(preprocessing)
        except ConfigError as exc:
            raise ApiError(str(exc)) from None
    input_shape = dataset.input_shape if dataset else None
    num_classes = dataset.num_classes if dataset else None
    checkpoint = Checkpoint(
        owner=owner,
        name=_name(name, PurePath(upload.name).stem),
        format=fmt,
        dataset=dataset,
        preprocessing=preprocessing,
    )
    checkpoint.file.save(upload.name, upload, save=False)
    with _refusing(checkpoint.file, upload.name, CheckpointError):
        checkpoint.size = checkpoint.file.size
        if checkpoint.size > sync_inspect_max_bytes():
            checkpoint.status = Checkpoint.INSPECTING
            checkpoint.arch = arch  # the worker needs it to rebuild a bare state dict
            checkpoint.save()
            _enqueue_checkpoint_inspection(checkpoint.pk, checkpoint.file.name)
            return checkpoint
        with local_path(checkpoint.file) as path:
            info = inspect_checkpoint(
                str(path),
                arch=arch,
                input_shape=input_shape,
                num_classes=num_classes,
                sandbox_limits=inspection_limits(),
                preprocessing=preprocessing,
            )
        _fill_checkpoint(checkpoint, jsonable(info))
        checkpoint.save()
    return checkpoint


def _enqueue_checkpoint_inspection(checkpoint_id: int, file_name: str) -> None:
    """Send `workers.inspect_checkpoint` to queue `default` once the row is committed."""

    def send() -> None:
        try:
            celery_app.send_task(
                "workers.inspect_checkpoint",
                args=[checkpoint_id],
                queue="default",
                retry=True,
                retry_policy={"max_retries": 2, "interval_start": 0.2, "interval_step": 0.5},
            )
        except Exception as exc:  # noqa: BLE001 - any broker failure means the same to the user
            log.exception("could not enqueue the inspection of checkpoint %s", checkpoint_id)
            fail_checkpoint_inspection(checkpoint_id, file_name, f"could not reach the job queue: {exc}")

    transaction.on_commit(send)


def finish_checkpoint_inspection(checkpoint_id: int, info: dict[str, Any]) -> bool:
    """Record a worker's inspection of a checkpoint; False when the row is gone or no longer inspecting."""
    checkpoint = Checkpoint.objects.filter(pk=checkpoint_id, status=Checkpoint.INSPECTING).first()
    if checkpoint is None:
        return False
    _fill_checkpoint(checkpoint, jsonable(info))
    names = ("format", "arch", "num_params", "input_shape", "num_classes")
    fields = {f: getattr(checkpoint, f) for f in names}
    updated = Checkpoint.objects.filter(pk=checkpoint_id, status=Checkpoint.INSPECTING).update(
        status=Checkpoint.READY, error="", class_names=checkpoint.class_names, **fields
    )
    return bool(updated)


def fail_checkpoint_inspection(checkpoint_id: int, file_name: str, reason: str) -> bool:
    """Mark an inspecting checkpoint failed with `reason` and delete its file (nothing half-usable left)."""
    updated = Checkpoint.objects.filter(pk=checkpoint_id, status=Checkpoint.INSPECTING).update(
        status=Checkpoint.FAILED, error=reason[:2000]
    )
    if updated:
        delete_quietly(file_name)
    return bool(updated)


def _fill_checkpoint(checkpoint: Checkpoint, info: dict[str, Any]) -> None:
    checkpoint.format = info.get("format") or checkpoint.format
    checkpoint.arch = info.get("spec")
    checkpoint.num_params = info.get("num_params")
    checkpoint.input_shape = info.get("input_shape")
    checkpoint.num_classes = info.get("num_classes")
    checkpoint.class_names = info.get("class_names") or []


def delete_checkpoint(checkpoint: Checkpoint) -> None:
    _refuse_if_in_use(Experiment.objects.filter(teacher=checkpoint), f"checkpoint {checkpoint.pk}")
    name = checkpoint.file.name
    checkpoint.delete()
    transaction.on_commit(lambda: delete_quietly(name))


def register_trained_model(experiment: Experiment, path: str) -> Checkpoint:
    """List a succeeded experiment's trained model among its owner's checkpoints (the worker calls this).

    `path` is a local safetensors file written by kd_core's export (spec and class names in its
    metadata). The file is copied into storage, so the checkpoint outlives the experiment's artifacts.
    Calling it again for the same experiment returns the existing row.
    """
    existing = Checkpoint.objects.filter(source_experiment=experiment).first()
    if existing:
        return existing
    from kd_core.checkpoints import inspect_checkpoint

    info = jsonable(inspect_checkpoint(str(path)))
    checkpoint = Checkpoint(
        owner_id=experiment.owner_id,
        name=experiment.name[:200],  # the list shows where it came from; the id would be said twice
        format="safetensors",
        # A model trained on hard labels here is how a user gets a teacher; a distilled one is a student.
        role="teacher" if experiment.kind == "train" else "student",
        source_experiment=experiment,
        dataset=experiment.dataset,
    )
    stored, size, _ = save_local_file(
        path, checkpoint.file.field.generate_filename(checkpoint, PurePath(path).name)
    )
    checkpoint.file.name = stored
    checkpoint.size = size
    _fill_checkpoint(checkpoint, info)
    try:
        checkpoint.save()
    except BaseException:
        delete_quietly(stored)
        raise
    return checkpoint


# --- experiments ------------------------------------------------------------------------------


def create_experiments(owner, body: dict[str, Any]) -> list[Experiment]:
    """Validate a config (or a sweep over one), save the experiments as queued, and enqueue them on commit."""
    body = dict(body)
    sweep = body.pop("sweep", None)
    configs = _expand_sweep(body, sweep)
    parsed = []
    for values, label in configs:
        try:
            parsed.append((parse_config(values), label))
        except ConfigError as exc:
            raise ApiError(str(exc) if not label else f"{label}: {exc}", fields=exc.fields) from None
    first = parsed[0][0]
    dataset = _own_dataset(owner, first.dataset)
    teacher = _own_teacher(owner, first.teacher) if first.kind == "distill" else None
    if teacher:
        from webapp.studio.soft_labels import check_soft_label_use

        check_soft_label_use(teacher, dataset, [config for config, _ in parsed])
        _check_teacher_fits(teacher, dataset)
    for config, _label in parsed:
        if config.init is not None:
            config.init = _own_init(owner, config.init).pk
    group = uuid.uuid4().hex if sweep is not None else ""
    experiments = []
    notes = []
    for config, label in parsed:
        config.dataset = dataset.pk
        config.teacher = teacher.pk if teacher else None
        config.name = _experiment_name(config.name, f"{config.kind}-{dataset.name}", label)
        _check_burn_in(config, dataset)
        note = _bound_logging(config, dataset)
        if note:
            notes.append(f"{label}: {note}" if label else note)
    with transaction.atomic():
        _check_active_jobs(owner, len(parsed))
        for config, _label in parsed:
            experiment = Experiment.objects.create(
                owner=owner,
                name=config.name,
                kind=config.kind,
                config=config.to_dict(),
                dataset=dataset,
                teacher=teacher,
                sweep_group=group,
            )
            enqueue_experiment(experiment)
            experiments.append(experiment)
    for experiment in experiments:
        experiment.notes = notes  # not a field: the view adds them to its answer
    return experiments


def _check_teacher_fits(teacher: Checkpoint, dataset: Dataset) -> None:
    """Refuse, in names, a teacher whose classes or input shape differ from the dataset's (it would fail later)."""
    problems = []
    if teacher.num_classes and dataset.num_classes and teacher.num_classes != dataset.num_classes:
        problems.append(f"predicts {teacher.num_classes} classes but the dataset has {dataset.num_classes}")
    t_shape, d_shape = teacher.input_shape, dataset.input_shape
    # A dimension an ONNX file leaves open (a name or None) fits any size.
    if (
        t_shape
        and d_shape
        and (
            len(t_shape) != len(d_shape)
            or any(isinstance(t, int) and t != d for t, d in zip(t_shape, d_shape, strict=False))
        )
    ):
        problems.append(f"takes inputs of shape {_shape(t_shape)} but the dataset's are {_shape(d_shape)}")
    if problems:
        trained = (
            f" (it was trained on “{teacher.dataset.name}”)" if teacher.dataset_id and teacher.dataset else ""
        )
        raise ApiError(
            f"teacher “{teacher.name}” does not fit dataset “{dataset.name}”: it {' and '.join(problems)}"
            f"{trained}. Pick a teacher made for this dataset, or train one on it first",
            fields={"teacher": " and ".join(problems)},
        )


def _shape(shape: list) -> str:
    return "×".join(str(d) if d is not None else "?" for d in shape)


def _check_burn_in(config: Any, dataset: Dataset) -> None:
    """Refuse a codistillation whose burn-in lasts the whole run: it would only train the replicas alone."""
    from kd_core.trainer import batches_per_epoch  # the trainer's own arithmetic, not a copy

    cd = config.codistill
    samples = dataset.num_samples or 0
    if config.kind != "codistill" or cd.replicas < 2 or samples < 1:
        return
    held_out = round(samples * config.val_fraction) + round(samples * config.test_fraction)
    train = max(1, samples - held_out)
    if cd.data == "disjoint":
        train = max(1, train // cd.replicas)
    steps = config.epochs * batches_per_epoch(train, config.batch_size)
    if config.max_steps is not None:
        steps = min(steps, config.max_steps)
    if cd.burn_in_steps >= steps:
        fix = max(0, steps // 4)
        raise ApiError(
            f"codistillation burn-in is {cd.burn_in_steps:,} steps but the run has about {steps:,} steps "
            f"({config.epochs} epochs of {train:,} training samples in batches of {config.batch_size}), so the "
            f"replicas would never learn from each other. Set burn-in below {steps:,} (e.g. {fix:,}) or run "
            "more epochs",
            fields={
                "codistill.burn_in_steps": f"{cd.burn_in_steps:,} ≥ the run's ~{steps:,} steps: try {fix:,}"
            },
        )


def _experiment_name(given: str, default: str, label: str) -> str:
    """The user's name (with the sweep label) in full, or a 400; a default name is shortened to fit."""
    if label and len(label) > MAX_NAME_CHARS - 10:
        raise ApiError(
            f"the sweep label {label[:60]!r}... is {len(label):,} characters; names are at most "
            f"{MAX_NAME_CHARS}: sweep over fewer or shorter values"
        )
    if given:
        name = f"{given} [{label}]" if label else given
        if len(name) > MAX_NAME_CHARS:
            raise ApiError(
                f"'name' with the sweep label would be {len(name)} characters; at most {MAX_NAME_CHARS} "
                f"are allowed: shorten 'name' to {MAX_NAME_CHARS - len(label) - 3}"
            )
        return name
    if not label:
        return default[:MAX_NAME_CHARS]
    return f"{default[: MAX_NAME_CHARS - len(label) - 3]} [{label}]"


def _check_active_jobs(owner, adding: int) -> None:
    """429 when `adding` more would put the user over KD_MAX_ACTIVE_JOBS queued or running experiments.

    Called inside the creating transaction with the user's row locked (PostgreSQL; SQLite's
    IMMEDIATE transactions already serialise writers), so two requests cannot both pass.
    """
    get_user_model().objects.select_for_update().filter(pk=owner.pk).exists()
    limit = settings.KD_MAX_ACTIVE_JOBS
    active = Experiment.objects.filter(owner=owner, status__in=Experiment.ACTIVE).count()
    if active + adding > limit:
        what = f"{adding} more" if adding > 1 else "another"
        raise ApiError(
            f"you have {active} queued or running experiment(s); {what} would pass the limit of {limit}. "
            "Wait for some to finish or cancel them",
            429,
        )


def _bound_logging(config: Any, dataset: Dataset) -> str | None:
    """Raise config.log_every so no series passes KD_MAX_POINTS_PER_SERIES points; what changed, or None.

    The step count is an upper bound (all of the dataset's samples taken as training samples), so the
    stored config, which is the record, never logs more. Validation logs once an epoch, which
    log_every cannot thin, so more epochs than the cap are refused.
    """
    from kd_core.trainer import batches_per_epoch  # the trainer's own arithmetic, not a copy

    cap = settings.KD_MAX_POINTS_PER_SERIES
    samples = dataset.num_samples or 0
    if samples < 1:
        return None
    per_epoch = batches_per_epoch(samples, config.batch_size)
    steps = config.epochs * per_epoch
    if config.max_steps is not None:
        steps = min(steps, config.max_steps)
    epochs_run = -(-steps // per_epoch)
    if config.kind != "codistill" and epochs_run > cap:
        raise ApiError(
            f"{epochs_run:,} epochs would log {epochs_run:,} validation points per series; at most {cap:,} "
            "are kept: use fewer epochs or set max_steps"
        )
    if -(-steps // config.log_every) <= cap:
        return None
    floor = -(-steps // cap)
    note = (
        f"log_every raised from {config.log_every} to {floor}: the run has up to {steps:,} steps and "
        f"each metric series keeps at most {cap:,} points"
    )
    config.log_every = floor
    return note


def _expand_sweep(body: dict[str, Any], sweep: Any) -> list[tuple[dict[str, Any], str]]:
    if sweep is None:
        return [(body, "")]
    if not isinstance(sweep, dict) or not sweep:
        raise ApiError(
            "'sweep' must be an object mapping config keys to lists of values, e.g. {\"alpha\": [0.5, 0.9]}"
        )
    for key, values in sweep.items():
        if key not in SWEEP_KEYS:
            raise ApiError(f"'sweep' cannot vary {key!r}; it can vary {', '.join(sorted(SWEEP_KEYS))}")
        if not isinstance(values, list) or not values:
            raise ApiError(f"'sweep.{key}' must be a non-empty list of values")
    total = 1
    for values in sweep.values():
        total *= len(values)
        if total > settings.KD_MAX_SWEEP_SIZE:  # checked as it grows: 1000 lists of 1000 never multiply out
            break
    if total > settings.KD_MAX_SWEEP_SIZE:
        raise ApiError(
            f"'sweep' would create {_sweep_size(sweep)} experiments; at most {settings.KD_MAX_SWEEP_SIZE} at once"
        )
    keys = list(sweep)
    out = []
    for combo in itertools.product(*(sweep[k] for k in keys)):
        values = {k: (dict(v) if isinstance(v, dict) else v) for k, v in body.items()}
        for key, value in zip(keys, combo):
            if key.startswith("codistill."):
                values["codistill"] = {**(values.get("codistill") or {}), key.split(".", 1)[1]: value}
            else:
                values[key] = value
        label = ", ".join(f"{k}={_short(v)}" for k, v in zip(keys, combo))
        out.append((values, label))
    return out


def _sweep_size(sweep: dict[str, list]) -> str:
    """The product of the list lengths as text, or 'more than 10**100' rather than a huge integer."""
    total = 1
    for values in sweep.values():
        total *= len(values)
        if total > 10**100:
            return "more than 10**100"
    return f"{total:,}"


def _short(value: Any) -> str:
    if isinstance(value, dict):
        return ",".join(f"{k}:{v}" for k, v in value.items())
    return str(value)


def _own_dataset(owner, ref: int | str) -> Dataset:
    if isinstance(ref, str):
        return builtin_dataset(owner, ref)
    dataset = Dataset.objects.filter(owner=owner, pk=ref).first()
    if dataset is None:
        raise ApiError(f"dataset {ref} not found among your datasets", fields={"dataset": "not found"})
    if dataset.status == Dataset.INGESTING:
        raise ApiError(
            f"dataset “{dataset.name}” is still being ingested ({dataset.progress:.0%} done); use it once its "
            "status is ready",
            fields={"dataset": "still being ingested"},
        )
    if dataset.status != Dataset.READY:
        reason = dataset.error or "no reason recorded"
        raise ApiError(
            f"dataset “{dataset.name}” failed and cannot be used: {reason}", fields={"dataset": "failed"}
        )
    return dataset


def _own_init(owner, ref: int | str) -> Checkpoint:
    """The owner's ready weights checkpoint that starts a student (`init`); 400 in words otherwise."""
    if not isinstance(ref, int):
        raise ApiError(
            "'init' must be the id of one of your checkpoints", fields={"init": "pick a checkpoint"}
        )
    row = Checkpoint.objects.filter(owner=owner, pk=ref).first()
    if row is None:
        raise ApiError(
            f"init checkpoint {ref} not found among your checkpoints", fields={"init": "not found"}
        )
    if row.status != Checkpoint.READY:
        raise ApiError(
            f"init checkpoint “{row.name}” is {row.status}, not ready", fields={"init": "not ready"}
        )
    if row.format not in ("safetensors", "state_dict"):
        raise ApiError(
            f"init checkpoint “{row.name}” is a {row.format} file; 'init' takes weights (.safetensors or a .pt "
            "state dict)",
            fields={"init": "not weights"},
        )
    return row


def _own_teacher(owner, ref: int | str | None) -> Checkpoint:
    if not isinstance(ref, int):
        raise ApiError(
            "'teacher' must be the id of one of your checkpoints", fields={"teacher": "pick a teacher"}
        )
    teacher = Checkpoint.objects.filter(owner=owner, pk=ref).first()
    if teacher is None:
        raise ApiError(f"teacher {ref} not found among your checkpoints", fields={"teacher": "not found"})
    if teacher.status == Checkpoint.INSPECTING:
        raise ApiError(
            f"teacher “{teacher.name}” is still being inspected; use it once its status is ready",
            fields={"teacher": "still being inspected"},
        )
    if teacher.status != Checkpoint.READY:
        reason = teacher.error or "no reason recorded"
        raise ApiError(
            f"teacher “{teacher.name}” failed inspection and cannot be used: {reason}",
            fields={"teacher": "failed inspection"},
        )
    return teacher


def enqueue_experiment(experiment: Experiment) -> None:
    """Send `workers.run_experiment` to queue `gpu` once the row is committed (a worker must find it).

    The task id is chosen here and saved on the row, so cancel can revoke a job still in the queue.
    A broker that cannot be reached fails the experiment with that reason rather than the request.
    """
    task_id = str(uuid.uuid4())
    Experiment.objects.filter(pk=experiment.pk).update(celery_task_id=task_id)
    experiment.celery_task_id = task_id
    experiment_id = experiment.pk

    def send() -> None:
        try:
            celery_app.send_task(
                "workers.run_experiment",
                args=[experiment_id],
                queue="gpu",
                task_id=task_id,
                retry=True,
                retry_policy={"max_retries": 2, "interval_start": 0.2, "interval_step": 0.5},
            )
        except Exception as exc:  # noqa: BLE001 - any broker failure means the same to the user
            log.exception("could not enqueue experiment %s", experiment_id)
            experiment.finish(Experiment.FAILED, error=f"could not reach the job queue: {exc}")

    transaction.on_commit(send)


def cancel_experiment(experiment: Experiment) -> Experiment:
    """Queued: revoke and mark cancelled now. Running: ask the worker to stop. Finished: 409.

    Experiment.cancel writes the row and sends the live status message.
    """
    was_queued = experiment.status == Experiment.QUEUED
    if not experiment.cancel():
        raise ApiError(
            f"experiment {experiment.pk} already {experiment.status}; there is nothing to cancel", 409
        )
    task_id = experiment.celery_task_id
    if was_queued and experiment.status == Experiment.CANCELLED and task_id:
        transaction.on_commit(lambda: _revoke(task_id))
    return experiment


def _revoke(task_id: str) -> None:
    try:
        celery_app.control.revoke(task_id)
    except Exception:  # noqa: BLE001 - the worker also skips a job whose row says cancelled
        log.warning("could not revoke task %s", task_id, exc_info=True)


def jsonable(value: Any) -> Any:
    """kd_core answers may hold tuples or numpy scalars; make them plain JSON values."""
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if hasattr(value, "item") and callable(value.item):
        return value.item()
    return value
