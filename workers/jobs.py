"""The job handler: load an Experiment, run it with kd_core, store its artifacts, final metrics and status.

State of a job lives in three places, each with one owner:
- the database row (status, progress, attempts, metrics, error): the record everybody reads;
- `KD_STATE_DIR/jobs/<id>/`: the resumable training checkpoint and the run's output folder, so a job
  redelivered after its worker died resumes (attempts > 1) instead of starting over;
- `KD_STATE_DIR/cache/`: teacher logits shared by every job on this machine (or shared volume).
Torch (and with it CUDA) is imported inside `run` only: the Celery parent process never touches a device.
"""

from __future__ import annotations

import datetime
import inspect
import logging
import os
import re
import shutil
import socket
import time
import uuid
from pathlib import Path, PurePath
from typing import Any

from django.conf import settings
from django.db import close_old_connections
from django.db.models import F
from django.utils import timezone

log = logging.getLogger(__name__)

# How often the stop signal may read the cancel flag: a query per training step would be wasteful.
CANCEL_POLL_S = 0.5
# How often a running job saves its resumable checkpoint (a lost worker loses at most this much work).
CHECKPOINT_EVERY_S = float(os.environ.get("KD_CHECKPOINT_EVERY_S", "30"))
EXPORT_KINDS = ("safetensors", "torchscript", "onnx")
_REPLICA_KEY = re.compile(r"^replica(\d+)\.(safetensors|torchscript|onnx)$")


def state_dir() -> Path:
    return Path(getattr(settings, "STATE_DIR", None) or os.environ.get("KD_STATE_DIR") or "var").resolve()


def job_dir(experiment_id: int) -> Path:
    return state_dir() / "jobs" / str(int(experiment_id))


def cache_dir() -> Path:
    return state_dir() / "cache"


class StopSignal:
    """`should_stop` for kd_core: True once the row says cancel_requested (or is gone); reads it at most every 0.5 s."""

    def __init__(self, experiment_id: int, every_s: float = CANCEL_POLL_S) -> None:
        self.experiment_id = experiment_id
        self.every_s = every_s
        self._last = 0.0
        self.requested = False

    def __call__(self) -> bool:
        if self.requested:
            return True
        now = time.monotonic()
        if now - self._last >= self.every_s:
            self._last = now
            from webapp.studio.models import Experiment

            flag = (
                Experiment.objects.filter(pk=self.experiment_id)
                .values_list("cancel_requested", flat=True)
                .first()
            )
            self.requested = flag is None or bool(flag)
        return self.requested


def _local_file(field_file: Any, dest_dir: Path, stem: str) -> Path:
    """The stored file's path on local storage; otherwise a copy at a stable path under the job folder.

    Stable, because kd_core keys the resumable checkpoint on the config, which holds this path.
    """
    storage = field_file.storage
    try:
        return Path(storage.path(field_file.name))
    except NotImplementedError:
        pass
    dest = dest_dir / f"{stem}{PurePath(field_file.name).suffix}"
    if not dest.exists():
        dest_dir.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(f".{dest.name}.{uuid.uuid4().hex}.part")
        with storage.open(field_file.name, "rb") as src, open(tmp, "wb") as out:
            shutil.copyfileobj(src, out, 1024 * 1024)
        os.replace(tmp, dest)
    return dest


def checkpoint_interval() -> tuple[float, bool]:
    """(seconds between resumable checkpoints, whether run_experiment takes it): KD_CHECKPOINT_EVERY_S if
    it can be passed, else the trainer's own default."""
    from kd_core.runner import run_experiment

    if "checkpoint_every_s" in inspect.signature(run_experiment).parameters:
        return CHECKPOINT_EVERY_S, True
    from kd_core.trainer import train_model

    default = inspect.signature(train_model).parameters.get("checkpoint_every_s")
    return (float(default.default) if default is not None else 30.0), False


def _human_error(exc: BaseException) -> str:
    """A message for the user: kd_core's own messages as they are, anything else summarised."""
    from kd_core.errors import KDError

    if isinstance(exc, KDError):
        return str(exc) or type(exc).__name__
    name = type(exc).__name__
    if name == "OutOfMemoryError" or "out of memory" in str(exc).lower():
        return "the device ran out of memory: try a smaller batch_size or model"
    if isinstance(exc, MemoryError):
        return "the worker ran out of memory: try a smaller batch_size, model or dataset"
    text = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else ""
    return f"internal error in the worker ({name}{': ' + text if text else ''}); the administrators can find the traceback in the worker log"


def _finish(experiment_id: int, **fields: Any) -> None:
    from webapp.studio.models import Experiment
    from webapp.studio.services import broadcast

    fields.setdefault("finished", timezone.now())
    Experiment.objects.filter(pk=experiment_id).update(**fields)
    exp = Experiment.objects.filter(pk=experiment_id).first()
    if exp is not None:
        message = {
            "type": "status", "status": exp.status, "progress": exp.progress, "eta_s": exp.eta_s,
            "metrics": exp.metrics, "error": exp.error, "attempts": exp.attempts,
        }  # fmt: skip
        broadcast(experiment_id, message)


def _save_artifacts(experiment: Any, files: dict[str, Any]) -> None:
    """Copy exported files into storage as Artifacts, replacing those of an earlier attempt."""
    from webapp.studio.models import Artifact, artifact_upload_to
    from webapp.studio.storage import delete_quietly, save_local_file

    for old in Artifact.objects.filter(experiment_id=experiment.pk):
        delete_quietly(old.file.name)
        old.delete()
    for key, path in files.items():
        if key in EXPORT_KINDS:
            kind, replica = key, None
        elif match := _REPLICA_KEY.match(key):
            kind, replica = match.group(2), int(match.group(1))
        else:
            continue
        artifact = Artifact(experiment_id=experiment.pk, kind=kind, replica=replica)
        stored, size, sha = save_local_file(path, artifact_upload_to(artifact, PurePath(str(path)).name))
        artifact.file.name, artifact.size, artifact.sha256 = stored, size, sha
        artifact.save()


def run(experiment_id: int, *, task_id: str = "", hostname: str = "") -> str:
    """Run one experiment to its end and record the outcome; returns the final status (or why it was skipped)."""
    from webapp.studio.models import Experiment

    close_old_connections()
    exp = Experiment.objects.select_related("dataset", "teacher").filter(pk=experiment_id).first()
    if exp is None:
        return "missing"
    if exp.status in Experiment.FINISHED:
        return f"skipped: already {exp.status}"
    if task_id and exp.celery_task_id and task_id != exp.celery_task_id:
        # An old message redelivered after the job was requeued under a new task id.
        return "skipped: stale task"
    if exp.cancel_requested:
        _finish(exp.pk, status=Experiment.CANCELLED)
        return Experiment.CANCELLED

    import torch  # noqa: F401 - first touch of torch/CUDA happens here, in the pool child

    from kd_core.device import pick_device

    device = pick_device("auto")
    now = timezone.now()
    timings = dict(exp.timings or {})
    if exp.started is None:
        timings["queue_wait"] = (now - exp.created).total_seconds()
    # Conditional: a cancel that lands between the read above and this write must win.
    claimed = Experiment.objects.filter(pk=exp.pk, status__in=Experiment.ACTIVE, cancel_requested=False).update(
        status=Experiment.RUNNING, started=exp.started or now, finished=None, attempts=F("attempts") + 1,
        worker=(hostname or socket.gethostname())[:200], device=str(device), error="", timings=timings,
    )  # fmt: skip
    if not claimed:
        return "skipped: cancelled or finished meanwhile"
    exp.refresh_from_db()
    from webapp.studio.services import broadcast

    broadcast(
        exp.pk, {"type": "status", "status": "running", "progress": exp.progress, "attempts": exp.attempts}
    )

    from workers import codistill

    if codistill.spread_enabled(exp):
        return codistill.fan_out(exp, job_dir(exp.pk))

    from workers.sink import DbChannelSink

    folder = job_dir(exp.pk)
    sink = DbChannelSink(exp.pk)
    stop = StopSignal(exp.pk)
    try:
        result = _execute(exp, folder, device, sink, stop, timings)
    except BaseException as exc:
        sink_close_quietly(sink)
        from kd_core.errors import Cancelled

        if isinstance(exc, Cancelled) or (
            stop.requested and not isinstance(exc, KeyboardInterrupt | SystemExit)
        ):
            _finish(exp.pk, status=Experiment.CANCELLED, timings=timings)
            return Experiment.CANCELLED
        if not isinstance(exc, Exception):
            raise  # the worker is shutting down: leave the job to be redelivered and resumed
        log.exception("experiment %s failed", exp.pk)
        _finish(exp.pk, status=Experiment.FAILED, error=_human_error(exc), timings=timings)
        return Experiment.FAILED
    status = Experiment.CANCELLED if result.stopped else Experiment.SUCCEEDED
    done = {"progress": 1.0} if status == Experiment.SUCCEEDED else {}  # a cancelled job keeps how far it got
    _finish(exp.pk, status=status, eta_s=None, metrics=_json_metrics(result.metrics), timings=timings, **done)
    shutil.rmtree(folder, ignore_errors=True)
    close_old_connections()
    return status


def sink_close_quietly(sink: Any) -> None:
    try:
        sink.close()
    except Exception:  # noqa: BLE001 - the job's own error is the one worth reporting
        log.warning("could not flush the metrics sink", exc_info=True)


def _json_metrics(metrics: dict[str, Any]) -> dict[str, Any]:
    import math

    out: dict[str, Any] = {}
    for key, value in metrics.items():
        if hasattr(value, "item") and callable(value.item):
            value = value.item()
        if isinstance(value, float) and not math.isfinite(value):
            value = None
        if isinstance(value, Path):
            value = str(value)
        out[str(key)] = value
    return out


def resolve_inputs(exp: Any, folder: Path) -> tuple[Any, Any, Any]:
    """The experiment's config with file paths for dataset/teacher, the loaded dataset, and the teacher."""
    from kd_core.checkpoints import load_teacher
    from kd_core.config import parse_config
    from kd_core.errors import CheckpointError, DatasetError
    from kd_core.runner import load_experiment_dataset

    if exp.dataset is None:
        raise DatasetError("the experiment's dataset was deleted")
    config = parse_config(exp.config)
    inputs = folder / "inputs"
    if exp.dataset.file:
        config.dataset = str(_local_file(exp.dataset.file, inputs, "dataset"))
    else:
        config.dataset = exp.dataset.name  # a built-in dataset, by name
    config.data_options = {**(exp.dataset.options or {}), **(config.data_options or {})}
    dataset = load_experiment_dataset(config)
    teacher = None
    if config.kind == "distill":
        if exp.teacher is None:
            raise CheckpointError("the experiment's teacher checkpoint was deleted")
        config.teacher = str(_local_file(exp.teacher.file, inputs, "teacher"))
        teacher = load_teacher(
            config.teacher, arch=config.teacher_arch or exp.teacher.arch, input_shape=tuple(dataset.input_shape),
            num_classes=dataset.num_classes,
        )  # fmt: skip
    return config, dataset, teacher


def _execute(
    exp: Any, folder: Path, device: Any, sink: Any, stop: StopSignal, timings: dict[str, float]
) -> Any:
    """Resolve inputs, run kd_core, then store artifacts and the trained model (all before the final status)."""
    from kd_core.runner import run_experiment
    from webapp.studio.services import register_trained_model

    t0 = time.monotonic()
    config, dataset, teacher = resolve_inputs(exp, folder)
    timings["load"] = time.monotonic() - t0

    t0 = time.monotonic()
    out_dir = folder / "out"
    checkpoint = folder / "train.ckpt"
    if checkpoint.exists():
        log.info("experiment %s: attempt %s resumes from %s", exp.pk, exp.attempts, checkpoint)
    every_s, settable = checkpoint_interval()
    extra: dict[str, Any] = {"checkpoint_every_s": every_s} if settable else {}
    try:
        result = run_experiment(
            config, dataset=dataset, teacher=teacher, out_dir=out_dir, sink=sink, should_stop=stop,
            device=device, cache_dir=cache_dir(), checkpoint_path=checkpoint, **extra,
        )  # fmt: skip
    finally:
        sink.close()
    timings["run"] = time.monotonic() - t0

    t0 = time.monotonic()
    _save_artifacts(exp, result.files)
    if not result.stopped and result.files.get("safetensors"):
        register_trained_model(exp, str(result.files["safetensors"]))
    timings["store"] = time.monotonic() - t0
    return result


# --- housekeeping ---------------------------------------------------------------------------------------


def requeue_orphans(hostname: str) -> list[int]:
    """Jobs marked running on worker `hostname`, found when a worker of that very name starts: it died.

    Each goes back to the queue under a new task id (the old message, redelivered later, is then stale).
    """
    from webapp.studio.models import Experiment
    from webapp.studio.services import enqueue_experiment

    close_old_connections()
    requeued = []
    for exp in Experiment.objects.filter(status=Experiment.RUNNING, worker=hostname):
        if Experiment.objects.filter(pk=exp.pk, status=Experiment.RUNNING).update(status=Experiment.QUEUED):
            enqueue_experiment(exp)  # outside a transaction: sent at once
            requeued.append(exp.pk)
    return requeued


def inspect_upload(dataset_id: int) -> str:
    """Inspect an "inspecting" dataset row's file with kd_core and record the answer or the reason."""
    from kd_core.data import inspect_dataset
    from kd_core.errors import DatasetError
    from webapp.studio import services
    from webapp.studio.models import Dataset
    from webapp.studio.storage import local_path

    dataset = Dataset.objects.filter(pk=dataset_id, status=Dataset.INSPECTING).first()
    if dataset is None:
        return "gone"  # deleted meanwhile, or already settled
    file_name = dataset.file.name
    shown = PurePath(file_name).name
    try:
        with local_path(dataset.file) as path:
            inspection = inspect_dataset(str(path), options=dataset.options or {})
    except DatasetError as exc:
        services.fail_inspection(dataset_id, file_name, services.refusal_message(shown, shown, exc))
        return "failed"
    except Exception as exc:  # noqa: BLE001 - the row must settle whatever went wrong
        log.exception("inspecting dataset %s failed", dataset_id)
        services.fail_inspection(dataset_id, file_name, f"{shown}: inspection failed ({type(exc).__name__})")
        return "failed"
    return "ready" if services.finish_inspection(dataset_id, inspection) else "gone"


# A row still "inspecting" after this long lost its worker (the task is acknowledged on receipt).
STALE_INSPECTION_S = 3600.0


def fail_stale_inspections(max_age_s: float = STALE_INSPECTION_S) -> int:
    """Fail dataset rows left inspecting longer than `max_age_s` and delete their files."""
    from webapp.studio import services
    from webapp.studio.models import Dataset

    cutoff = timezone.now() - datetime.timedelta(seconds=max_age_s)
    stale = Dataset.objects.filter(status=Dataset.INSPECTING, created__lt=cutoff).values_list("pk", "file")
    reason = "inspection did not finish (the worker stopped); upload the file again"
    return sum(services.fail_inspection(pk, name, reason) for pk, name in stale)


def cleanup(max_age_s: float = 24 * 3600) -> int:
    """Remove job folders of finished or deleted experiments left longer than `max_age_s`; returns the count.

    Also fails dataset rows left inspecting (their worker died) and counts them.
    """
    from webapp.studio.models import Experiment

    removed = fail_stale_inspections()
    root = state_dir() / "jobs"
    if not root.is_dir():
        return removed
    cutoff = time.time() - max_age_s
    for folder in root.iterdir():
        if not folder.is_dir() or not folder.name.isdigit() or folder.stat().st_mtime > cutoff:
            continue
        status = Experiment.objects.filter(pk=int(folder.name)).values_list("status", flat=True).first()
        if status is None or status in Experiment.FINISHED:
            shutil.rmtree(folder, ignore_errors=True)
            removed += 1
    return removed
