"""What a job's worker records, shared by workers/jobs.py and workers/codistill.py: folders, inputs, outcome.

- where a job keeps its files (`state_dir`, `job_dir`, `cache_dir`) and its inputs (`resolve_inputs`);
- the delivery's lease on the experiment row (`Lease`: a heartbeat thread; `LeaseLost` once another
  delivery took the job over) and the stop signal the trainer polls (`StopSignal`: cancel, lease, time limit);
- the outcome: `save_artifacts`, `json_metrics`, `human_error`, `finish` (through Experiment.finish).
Status is written only by the Experiment transition methods (webapp/studio/models.py).
"""

from __future__ import annotations

import logging
import math
import os
import re
import shutil
import threading
import time
import uuid
from pathlib import Path, PurePath
from typing import Any

from django.conf import settings
from django.db import close_old_connections, connection

log = logging.getLogger(__name__)

# How often the stop signal may read the cancel flag: a query per training step would be wasteful.
CANCEL_POLL_S = 0.5
EXPORT_KINDS = ("safetensors", "torchscript", "onnx", "exported_program")
_REPLICA_KEY = re.compile(r"^replica(\d+)\.(safetensors|torchscript|onnx|exported_program)$")


# --- folders and inputs -------------------------------------------------------------------------------------


def state_dir() -> Path:
    return Path(getattr(settings, "STATE_DIR", None) or os.environ.get("KD_STATE_DIR") or "var").resolve()


def job_dir(experiment_id: int) -> Path:
    return state_dir() / "jobs" / str(int(experiment_id))


def cache_dir() -> Path:
    return state_dir() / "cache"


def local_file(field_file: Any, dest_dir: Path, stem: str) -> Path:
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
    if exp.dataset.status != "ready":
        raise DatasetError(f"dataset {exp.dataset.pk} is {exp.dataset.status}, not ready")
    if exp.dataset.store:
        from webapp.studio.stores import local_store

        # The store directory itself on local storage; on remote storage a copy cached per store, shared
        # by every job on this machine (a finished store never changes).
        config.dataset = str(local_store(exp.dataset.store, state_dir() / "stores"))
    elif exp.dataset.file:  # a dataset ready before the store existed: read from its upload
        config.dataset = str(local_file(exp.dataset.file, inputs, "dataset"))
    else:
        config.dataset = exp.dataset.name  # a built-in dataset, by name
    config.data_options = {**(exp.dataset.options or {}), **(config.data_options or {})}
    dataset = load_experiment_dataset(config)
    teacher = None
    if config.kind == "distill":
        if exp.teacher is None:
            raise CheckpointError("the experiment's teacher checkpoint was deleted")
        config.teacher = str(local_file(exp.teacher.file, inputs, "teacher"))
        teacher = load_teacher(
            config.teacher, arch=config.teacher_arch or exp.teacher.arch, input_shape=tuple(dataset.input_shape),
            num_classes=dataset.num_classes,
            preprocessing=config.teacher_preprocessing or exp.teacher.preprocessing,
        )  # fmt: skip
    if config.init is not None:
        from webapp.studio.models import Checkpoint

        # The id was checked against the owner when the experiment was created; check again (it may be gone).
        row = Checkpoint.objects.filter(pk=config.init, owner_id=exp.owner_id).first()
        if row is None:
            raise CheckpointError(f"the init checkpoint {config.init} was deleted")
        config.init_preprocessing = config.init_preprocessing or row.preprocessing
        config.init = str(local_file(row.file, inputs, "init"))
    return config, dataset, teacher


# --- the lease and the stop signal --------------------------------------------------------------------------


class LeaseLost(Exception):  # noqa: N818 - a condition, not a failure of this code
    """Another delivery took this job over (our lease expired): stop now and write nothing more."""


def lease_seconds() -> float:
    return float(getattr(settings, "KD_LEASE_SECONDS", 60))


def max_attempts() -> int:
    return int(getattr(settings, "KD_MAX_ATTEMPTS", 3))


def time_budget_s(config: dict[str, Any], running_before_s: float) -> float:
    """Seconds this delivery may still run: the job's `time_limit_s` capped by the site's KD_MAX_JOB_SECONDS,
    less what earlier deliveries already ran."""
    ceiling = float(getattr(settings, "KD_MAX_JOB_SECONDS", 86400))
    own = config.get("time_limit_s")
    limit = min(ceiling, float(own)) if isinstance(own, int | float) and math.isfinite(own) else ceiling
    return limit - max(running_before_s, 0.0)


class Lease:
    """This delivery's lease on its experiment row, renewed by a heartbeat thread every third of its length.

    A renewal that finds another token (the job was taken over after our lease lapsed, or finished by
    someone else) sets `lost`; `check()` then raises LeaseLost. The renewal also records how long this
    job has run over all its deliveries (`timings["running_s"]`), which the time limit counts.
    """

    def __init__(self, experiment: Any, token: str, *, timings: dict[str, Any] | None = None) -> None:
        self.experiment, self.token = experiment, token
        self.seconds = lease_seconds()
        self.timings = timings if timings is not None else {}
        self.running_before_s = float(self.timings.get("running_s") or 0.0)
        self.started = time.monotonic()
        self.lost = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"lease-{experiment.pk}", daemon=True)

    def running_s(self) -> float:
        return self.running_before_s + (time.monotonic() - self.started)

    def start(self) -> Lease:
        self._thread.start()
        return self

    def renew(self) -> bool:
        self.timings["running_s"] = round(self.running_s(), 3)
        if not self.experiment.renew_lease(self.token, self.seconds, timings=dict(self.timings)):
            if not self.lost:
                log.warning(
                    "experiment %s: lease %s lost; this delivery stops", self.experiment.pk, self.token
                )
            self.lost = True
        return not self.lost

    def _run(self) -> None:
        try:
            while not self._stop.wait(self.seconds / 3) and not self.lost:
                try:
                    self.renew()
                except Exception:  # noqa: BLE001 - a database blip: try again next beat, the lease has slack
                    log.warning("experiment %s: lease not renewed", self.experiment.pk, exc_info=True)
        finally:
            connection.close()  # this thread's own database connection

    def check(self) -> None:
        if self.lost:
            raise LeaseLost(f"experiment {self.experiment.pk}: another delivery holds the job now")

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=10)


class StopSignal:
    """`should_stop` for kd_core: True once the row says cancel_requested (or is gone), or the time budget
    is spent (`time_limited`); raises LeaseLost once the lease is lost. Reads the row at most every 0.5 s."""

    def __init__(
        self,
        experiment_id: int,
        every_s: float = CANCEL_POLL_S,
        *,
        lease: Lease | None = None,
        budget_s: float | None = None,
    ) -> None:
        self.experiment_id = experiment_id
        self.every_s = every_s
        self.lease = lease
        self.deadline = None if budget_s is None else time.monotonic() + budget_s
        self._last = 0.0
        self.requested = False
        self.time_limited = False

    def __call__(self) -> bool:
        if self.lease is not None:
            self.lease.check()
        if self.requested or self.time_limited:
            return True
        now = time.monotonic()
        if self.deadline is not None and now >= self.deadline:
            self.time_limited = True
            return True
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


# --- the outcome ----------------------------------------------------------------------------------------------


def human_error(exc: BaseException) -> str:
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


def json_metrics(metrics: dict[str, Any]) -> dict[str, Any]:
    """kd_core's metrics as plain JSON values (tensors/numpy scalars unwrapped, NaN/inf as null)."""
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


def save_artifacts(experiment: Any, files: dict[str, Any]) -> None:
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


def finish(experiment: Any, status: str, *, token: str | None = None, **fields: Any) -> bool:
    """Record a job's final status (Experiment.finish: once, and only under `token`'s lease when given)."""
    close_old_connections()
    return bool(experiment.finish(status, token=token, **fields))


def close_quietly(sink: Any) -> None:
    """Flush a metrics sink whose job already failed; its own error is the one worth reporting."""
    try:
        sink.close()
    except Exception:  # noqa: BLE001
        log.warning("could not flush the metrics sink", exc_info=True)
