"""What the studio stores: uploaded datasets and checkpoints, experiments, their metrics and artifacts."""

from __future__ import annotations

import datetime
import hashlib
import secrets
import uuid
from pathlib import PurePath

from django.conf import settings
from django.db import models
from django.db.models.functions import Coalesce
from django.utils import timezone

_WHEN = models.DateTimeField()  # the output type of a datetime value computed inside an UPDATE


def _upload_to(prefix: str, instance: models.Model, filename: str) -> str:
    # A fresh folder per upload: names never collide and the user's file name is kept for humans.
    owner_id = getattr(instance, "owner_id", None) or "shared"
    return f"{prefix}/{owner_id}/{uuid.uuid4().hex}/{PurePath(filename).name}"


def dataset_upload_to(instance: Dataset, filename: str) -> str:
    return _upload_to("datasets", instance, filename)


def checkpoint_upload_to(instance: Checkpoint, filename: str) -> str:
    return _upload_to("checkpoints", instance, filename)


def artifact_upload_to(instance: Artifact, filename: str) -> str:
    return f"experiments/{instance.experiment_id}/{uuid.uuid4().hex}/{PurePath(filename).name}"


class Dataset(models.Model):
    """A dataset: an upload or an import ingested into a store (kd_core.data.store), or a built-in by name."""

    FORMATS = [
        ("npz", "NPZ arrays"),
        ("csv", "CSV table"),
        ("zip", "ZIP of class folders"),
        ("folder", "folder of class folders"),
        ("builtin", "built-in"),
    ]
    INGESTING, READY, FAILED = "ingesting", "ready", "failed"
    # Uploads above the sync threshold and every import are "ingesting" until a worker has written the
    # store (workers/ingest.py); "inspecting" rows of older versions became "ingesting" (migration 0004).
    STATUSES = [("ingesting", "ingesting"), ("ready", "ready"), ("failed", "failed")]

    owner = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="datasets")
    name = models.CharField(max_length=200)
    format = models.CharField(max_length=16, choices=FORMATS)
    # The upload while it waits to be ingested; emptied once the store holds it (the store replaces it).
    # Rows ready before the store existed keep their file and are read from it. Empty for built-ins and imports.
    file = models.FileField(upload_to=dataset_upload_to, max_length=500, blank=True)
    # Path relative to KD_IMPORT_ROOT of an imported file or folder (read in place, never modified).
    import_path = models.CharField(max_length=1000, blank=True, default="")
    # Path of the ready store directory in storage (webapp/studio/stores.py), "" until ready.
    store = models.CharField(max_length=500, blank=True, default="")
    size = models.BigIntegerField(default=0, help_text="bytes in storage: the upload, then its store")
    status = models.CharField(max_length=16, choices=STATUSES, default="ready")
    # Fraction ingested (0..1), written by the ingesting task every half second or so.
    progress = models.FloatField(default=1.0)
    # The ingest attempt that holds the row (one writer at a time), its last sign of life, and how many
    # attempts claimed it: a worker killed mid-ingest is restarted by `workers.cleanup`, a few times at most.
    ingest_token = models.CharField(max_length=64, blank=True, default="")
    heartbeat = models.DateTimeField(null=True, blank=True)
    attempts = models.PositiveIntegerField(default=0)
    # kd_core's inspection summary: format, num_samples, num_classes, input_shape,
    # class_names, class_counts, empty_classes, splits, labeled, is_image, preview.
    inspection = models.JSONField(default=dict, blank=True)
    # Why ingestion failed (status "failed"); the upload and any partial store are then deleted.
    error = models.TextField(blank=True, default="")
    # Loader options the user gave with the upload, e.g. {"label_column": "label"} for CSV.
    options = models.JSONField(default=dict, blank=True)
    created = models.DateTimeField(default=timezone.now)

    class Meta:
        ordering = ["-created", "-id"]
        indexes = [models.Index(fields=["owner", "-created"])]

    def __str__(self) -> str:
        return f"{self.name} ({self.format})"

    @property
    def store_folder(self) -> str:
        """The folder in storage holding this dataset's store attempts (removed whole with the dataset)."""
        return f"stores/{self.owner_id}/{self.pk}"

    @property
    def num_samples(self) -> int | None:
        return self.inspection.get("num_samples")

    @property
    def num_classes(self) -> int | None:
        return self.inspection.get("num_classes")

    @property
    def input_shape(self) -> list[int] | None:
        return self.inspection.get("input_shape")

    @property
    def class_names(self) -> list[str]:
        return self.inspection.get("class_names") or []


class Checkpoint(models.Model):
    """A model file: an uploaded teacher, or the model an experiment here trained (`source_experiment`)."""

    FORMATS = [
        ("safetensors", "safetensors"),
        ("state_dict", "PyTorch state dict"),
        ("torchscript", "TorchScript"),
        ("onnx", "ONNX"),
        ("exported_program", "torch.export ExportedProgram (.pt2)"),
        ("soft_labels", "soft labels (a file of predictions)"),
    ]
    ROLES = [("teacher", "teacher"), ("student", "student")]
    INSPECTING, READY, FAILED = "inspecting", "ready", "failed"
    # Large uploads (and every file that must run in the sandbox) are "inspecting" until a worker has read them.
    STATUSES = [("inspecting", "inspecting"), ("ready", "ready"), ("failed", "failed")]

    owner = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="checkpoints")
    name = models.CharField(max_length=200)
    format = models.CharField(max_length=16, choices=FORMATS)
    file = models.FileField(upload_to=checkpoint_upload_to, max_length=500)
    size = models.BigIntegerField(default=0, help_text="bytes")
    # The model spec ({"arch": "mlp", "hidden": [64]}) when known; None for TorchScript/ONNX.
    arch = models.JSONField(null=True, blank=True)
    num_params = models.BigIntegerField(null=True, blank=True)
    input_shape = models.JSONField(null=True, blank=True)
    num_classes = models.IntegerField(null=True, blank=True)
    class_names = models.JSONField(default=list, blank=True)
    role = models.CharField(max_length=16, choices=ROLES, default="teacher")
    source_experiment = models.ForeignKey(
        "Experiment", null=True, blank=True, on_delete=models.SET_NULL, related_name="trained_checkpoints"
    )
    # The dataset whose shape sized a bare state dict at upload, if the user named one.
    dataset = models.ForeignKey(Dataset, null=True, blank=True, on_delete=models.SET_NULL, related_name="+")
    status = models.CharField(max_length=16, choices=STATUSES, default="ready")
    # Why inspection failed (status "failed"); the file is then deleted.
    error = models.TextField(blank=True, default="")
    # {"mean": [..], "std": [..]} per input channel, applied before a model trained with normalisation
    # outside it (torchvision/timm state dicts usually are); None when the model takes raw inputs.
    preprocessing = models.JSONField(null=True, blank=True)
    # Soft-label teachers: the fraction of the dataset's train samples the predictions cover.
    coverage = models.FloatField(null=True, blank=True)
    created = models.DateTimeField(default=timezone.now)

    class Meta:
        ordering = ["-created", "-id"]
        indexes = [models.Index(fields=["owner", "-created"])]

    def __str__(self) -> str:
        return f"{self.name} ({self.format})"


class Experiment(models.Model):
    """One training job: its config, where it stands, and its final figures (the state of record)."""

    KINDS = [("train", "train"), ("distill", "distill"), ("codistill", "codistill")]
    QUEUED, RUNNING, SUCCEEDED, FAILED, CANCELLED = "queued", "running", "succeeded", "failed", "cancelled"
    STATUSES = [(s, s) for s in (QUEUED, RUNNING, SUCCEEDED, FAILED, CANCELLED)]
    ACTIVE = (QUEUED, RUNNING)
    FINISHED = (SUCCEEDED, FAILED, CANCELLED)

    owner = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="experiments")
    name = models.CharField(max_length=200)
    kind = models.CharField(max_length=16, choices=KINDS)
    # The validated config (kd_core.config.ExperimentConfig.to_dict()); dataset/teacher hold row ids.
    config = models.JSONField(default=dict)
    dataset = models.ForeignKey(Dataset, null=True, on_delete=models.SET_NULL, related_name="experiments")
    teacher = models.ForeignKey(
        Checkpoint, null=True, blank=True, on_delete=models.SET_NULL, related_name="taught_experiments"
    )
    status = models.CharField(max_length=16, choices=STATUSES, default=QUEUED, db_index=True)
    progress = models.FloatField(default=0.0, help_text="0..1")
    eta_s = models.FloatField(null=True, blank=True, help_text="estimated seconds left")
    # Human-readable reason when failed (a kd_core error message, never a traceback).
    error = models.TextField(blank=True)
    created = models.DateTimeField(default=timezone.now)
    started = models.DateTimeField(null=True, blank=True)
    finished = models.DateTimeField(null=True, blank=True)
    # Seconds spent per phase, e.g. {"queue_wait": 1.2, "teacher_cache": 0.4, "train": 30.1, "export": 2.0}.
    timings = models.JSONField(default=dict, blank=True)
    # Final/best figures: at least val_acc, test_acc, student_params when succeeded.
    metrics = models.JSONField(default=dict, blank=True)
    celery_task_id = models.CharField(max_length=64, blank=True)
    # How many times a worker picked it up (more than 1 after a lost worker redelivered it).
    attempts = models.IntegerField(default=0)
    # The web side sets it; the worker's stop signal reads it and ends the run as cancelled.
    cancel_requested = models.BooleanField(default=False)
    # Experiments created together by one sweep request share this value.
    sweep_group = models.CharField(max_length=64, blank=True, db_index=True)
    worker = models.CharField(max_length=200, blank=True, help_text="hostname of the worker that ran it")
    device = models.CharField(max_length=64, blank=True, help_text="e.g. cuda:0 or cpu")
    # The lease of the one trainer allowed on this job: a unique token per delivery, renewed by a heartbeat.
    # A second delivery of a running job sees a live lease and exits; an expired lease means the holder died.
    lease_token = models.CharField(max_length=64, blank=True, default="")
    lease_until = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-created", "-id"]
        indexes = [models.Index(fields=["owner", "-created"])]

    def __str__(self) -> str:
        return f"{self.name} [{self.status}]"

    @property
    def is_active(self) -> bool:
        return self.status in self.ACTIVE

    @property
    def group_name(self) -> str:
        """The channel-layer group its live messages go to."""
        from webapp.studio.live import group_name

        return group_name(self.pk)

    # --- state transitions -------------------------------------------------------------------------------
    # The only writers of `status`. Each is one conditional UPDATE, so races resolve in the database (a
    # cancel landing mid-claim wins, a finished job is never reopened, two deliveries cannot both claim),
    # then refreshes this instance and, when the row changed, sends the live status message (webapp/studio/
    # live.py). Lifecycle: queued -> running (claim) -> succeeded | failed | cancelled (finish); running ->
    # queued (requeue, a dead worker's job); queued -> cancelled and running -> cancel_requested (cancel).

    def _move(self, condition: models.Q, **fields: object) -> bool:
        updated = type(self).objects.filter(condition, pk=self.pk).update(**fields)
        try:
            self.refresh_from_db()
        except type(self).DoesNotExist:
            return False
        if updated:
            from webapp.studio.live import send_status

            send_status(self)
        return bool(updated)

    @staticmethod
    def _lease_free(now: datetime.datetime) -> models.Q:
        """No delivery holds a live lease: never taken, released, or expired (its holder stopped renewing)."""
        return models.Q(lease_until__isnull=True) | models.Q(lease_until__lt=now)

    def lease_live(self, now: datetime.datetime | None = None) -> bool:
        return self.lease_until is not None and self.lease_until >= (now or timezone.now())

    def claim(self, *, token: str, lease_s: float, max_attempts: int, **fields: object) -> str:
        """One delivery takes the job: queued, or running under an expired lease (its holder died) -> running.

        Returns "claimed" (attempts + 1, a fresh lease for `token`, `fields` written too), "busy" (another
        delivery holds a live lease), "exhausted" (now failed: `max_attempts` deliveries died running it),
        or "gone" (finished, cancelled now or earlier, or deleted).
        """
        now = timezone.now()
        free = models.Q(status=self.QUEUED) | (models.Q(status=self.RUNNING) & self._lease_free(now))
        claimed = self._move(
            free & models.Q(cancel_requested=False, attempts__lt=max_attempts),
            status=self.RUNNING, started=Coalesce(models.F("started"), models.Value(now, output_field=_WHEN)),
            finished=None, attempts=models.F("attempts") + 1, lease_token=token,
            lease_until=now + datetime.timedelta(seconds=lease_s), error="", **fields,
        )  # fmt: skip
        if claimed:
            return "claimed"
        if self.pk is None or self.status in self.FINISHED:
            return "gone"
        if self.lease_live(now) and self.status == self.RUNNING:
            return "busy"
        if self.cancel_requested:
            self.finish(self.CANCELLED)
            return "gone"
        died = self.attempts
        if died >= max_attempts and self._move(
            models.Q(status__in=self.ACTIVE, attempts=died) & (models.Q(status=self.QUEUED) | self._lease_free(now)),
            status=self.FAILED, error=f"the worker died {died} times running this job", finished=now,
            eta_s=None, lease_token="", lease_until=None,
        ):  # fmt: skip
            return "exhausted"
        return "gone" if self.status in self.FINISHED else "busy"

    def renew_lease(self, token: str, lease_s: float, **fields: object) -> bool:
        """The heartbeat of the delivery holding `token`; False once another delivery took the job over."""
        until = timezone.now() + datetime.timedelta(seconds=lease_s)
        rows = type(self).objects.filter(pk=self.pk, status=self.RUNNING, lease_token=token)
        return bool(rows.update(lease_until=until, **fields))

    def finish(self, status: str, *, token: str | None = None, **fields: object) -> bool:
        """queued/running -> succeeded, failed or cancelled, once; with `token`, only while that lease holds.

        `fields` (metrics, error, timings, progress, eta_s ...) are written in the same UPDATE.
        """
        if status not in self.FINISHED:
            raise ValueError(f"{status!r} is not a final status")
        condition = models.Q(status__in=self.ACTIVE)
        if token is not None:
            condition &= models.Q(lease_token=token)
        fields.setdefault("finished", timezone.now())
        return self._move(condition, status=status, lease_token="", lease_until=None, **fields)

    def requeue(self, *, worker: str | None = None) -> bool:
        """running -> queued (a dead worker's job goes back to the queue); `worker` must still be its holder."""
        condition = models.Q(status=self.RUNNING)
        if worker is not None:
            condition &= models.Q(worker=worker)
        return self._move(condition, status=self.QUEUED, lease_token="", lease_until=None, eta_s=None)

    def cancel(self) -> bool:
        """queued -> cancelled at once; running -> cancel_requested (its trainer's stop signal reads it).

        Returns False when there was nothing to cancel (already finished).
        """
        if self._move(
            models.Q(status=self.QUEUED), status=self.CANCELLED, cancel_requested=True,
            finished=timezone.now(), progress=0.0, lease_token="", lease_until=None,
        ):  # fmt: skip
            return True
        return self._move(models.Q(status=self.RUNNING), cancel_requested=True) or (
            self.status == self.RUNNING and self.cancel_requested
        )

    @classmethod
    def report_progress(cls, pk: int, progress: float, eta_s: float | None, token: str | None = None) -> bool:
        """A running job's progress and ETA (no status change); False when it is no longer running (for `token`)."""
        rows = cls.objects.filter(pk=pk, status=cls.RUNNING)
        if token is not None:
            rows = rows.filter(lease_token=token)
        if not rows.update(progress=progress, eta_s=eta_s):
            return False
        from webapp.studio.live import send_progress

        send_progress(pk, progress, eta_s)
        return True


class MetricPoint(models.Model):
    """One value of one series at one step; writing the same (experiment, name, step) twice is harmless."""

    experiment = models.ForeignKey(Experiment, on_delete=models.CASCADE, related_name="metric_points")
    name = models.CharField(max_length=64)
    step = models.BigIntegerField()
    value = models.FloatField()
    # Wall-clock time of the measurement, Unix seconds.
    time = models.FloatField()

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["experiment", "name", "step"], name="metricpoint_unique_step")
        ]
        # The unique constraint's index also serves "one experiment's series in step order".

    def __str__(self) -> str:
        return f"{self.name}@{self.step}={self.value}"


class Artifact(models.Model):
    """A file an experiment produced: the trained model in one export format (per replica for codistill)."""

    KINDS = [
        ("safetensors", "safetensors"),
        ("torchscript", "TorchScript"),
        ("onnx", "ONNX"),
        ("exported_program", "torch.export ExportedProgram (.pt2)"),
        ("checkpoint", "checkpoint"),
    ]

    experiment = models.ForeignKey(Experiment, on_delete=models.CASCADE, related_name="artifacts")
    kind = models.CharField(max_length=16, choices=KINDS)
    # None: the experiment's model (for codistill, the best replica); K: codistill replica K.
    replica = models.IntegerField(null=True, blank=True)
    file = models.FileField(upload_to=artifact_upload_to, max_length=500)
    size = models.BigIntegerField(default=0, help_text="bytes")
    sha256 = models.CharField(max_length=64, blank=True)
    created = models.DateTimeField(default=timezone.now)

    class Meta:
        ordering = ["experiment_id", "kind", "replica"]

    def __str__(self) -> str:
        suffix = "" if self.replica is None else f" replica {self.replica}"
        return f"{self.kind}{suffix} of experiment {self.experiment_id}"


def hash_token(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


class ApiToken(models.Model):
    """An API key for scripts (`Authorization: Token <key>`); only its SHA-256 is stored."""

    user = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="api_tokens")
    key_hash = models.CharField(max_length=64, unique=True)
    # The first characters of the key, so a user can tell tokens apart without the secret.
    prefix = models.CharField(max_length=8)
    name = models.CharField(max_length=100, blank=True)
    created = models.DateTimeField(default=timezone.now)
    last_used = models.DateTimeField(null=True, blank=True)

    def __str__(self) -> str:
        return f"{self.prefix}… ({self.user})"

    @classmethod
    def issue(cls, user, name: str = "") -> tuple[ApiToken, str]:
        """Create a token; the plain key is returned once and never stored."""
        key = secrets.token_hex(20)
        token = cls.objects.create(user=user, key_hash=hash_token(key), prefix=key[:8], name=name)
        return token, key

    @classmethod
    def user_for_key(cls, key: str):
        """The active user a key belongs to, or None."""
        if not key or len(key) > 128:
            return None
        token = cls.objects.select_related("user").filter(key_hash=hash_token(key)).first()
        if token is None or not token.user.is_active:
            return None
        # Record use at most once a minute: a script polling every second should not write every time.
        now = timezone.now()
        if token.last_used is None or (now - token.last_used).total_seconds() > 60:
            cls.objects.filter(pk=token.pk).update(last_used=now)
        return token.user


# Searches (distill to a budget) keep their models in their own module; importing them registers them here.
from webapp.studio.search_models import Search, SearchTrial, StudentLatency  # noqa: E402, F401
