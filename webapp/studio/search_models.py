"""What a search stores: the Search (budget, space, where it stands), its trials, and measured student latencies.

The Optuna study of a search lives in the same database (Optuna's own tables, webapp/studio/search_study.py);
these rows are the record the API, the page and the workers read. Imported by webapp/studio/models.py so that
Django registers them with the studio app.
"""

from __future__ import annotations

from django.conf import settings
from django.db import models
from django.utils import timezone


class Search(models.Model):
    """Distill to a budget: `trials` distillations of students under `budget`, `parallel` at a time."""

    QUEUED, RUNNING, SUCCEEDED, FAILED, CANCELLED = "queued", "running", "succeeded", "failed", "cancelled"
    STATUSES = [(s, s) for s in (QUEUED, RUNNING, SUCCEEDED, FAILED, CANCELLED)]
    ACTIVE = (QUEUED, RUNNING)
    FINISHED = (SUCCEEDED, FAILED, CANCELLED)

    owner = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="searches")
    name = models.CharField(max_length=200)
    dataset = models.ForeignKey(
        "studio.Dataset", null=True, on_delete=models.SET_NULL, related_name="searches"
    )
    teacher = models.ForeignKey(
        "studio.Checkpoint", null=True, on_delete=models.SET_NULL, related_name="searches"
    )
    # kd_core.search.Budget.to_dict(); the space with `students` resolved to specs (kd_core.search.Space).
    budget = models.JSONField(default=dict)
    space = models.JSONField(default=dict)
    trials = models.PositiveIntegerField(default=16)
    parallel = models.PositiveIntegerField(default=2)
    epochs = models.PositiveIntegerField(default=10)
    objective = models.CharField(max_length=32, default="val_acc")
    # Fields every trial's experiment config shares (batch_size, lr, seed, ...), validated by parse_config.
    base_config = models.JSONField(default=dict, blank=True)
    seed = models.IntegerField(default=0)
    pruning = models.BooleanField(default=True)
    status = models.CharField(max_length=16, choices=STATUSES, default=QUEUED, db_index=True)
    progress = models.FloatField(default=0.0)
    error = models.TextField(blank=True, default="")
    cancel_requested = models.BooleanField(default=False)
    # One advance at a time (a conditional UPDATE claims it until then): Optuna writes through its own
    # connection, so a database transaction cannot be held around it on SQLite.
    advance_until = models.DateTimeField(null=True, blank=True)
    created = models.DateTimeField(default=timezone.now)
    started = models.DateTimeField(null=True, blank=True)
    finished = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-created", "-id"]
        indexes = [models.Index(fields=["owner", "-created"])]

    def __str__(self) -> str:
        return f"search {self.name} [{self.status}]"

    @property
    def study_name(self) -> str:
        """The Optuna study (multi-objective) of this search; `<name>-prune` is its pruning study."""
        return f"kd-search-{self.pk}"


class SearchTrial(models.Model):
    """One trial of a search: an Optuna trial and, unless its student broke the budget, a distill Experiment."""

    QUEUED, RUNNING, PRUNED, COMPLETE, FAILED, OVER_BUDGET, CANCELLED = (
        "queued", "running", "pruned", "complete", "failed", "over_budget", "cancelled",
    )  # fmt: skip
    STATES = [(s, s) for s in (QUEUED, RUNNING, PRUNED, COMPLETE, FAILED, OVER_BUDGET, CANCELLED)]
    ACTIVE = (QUEUED, RUNNING)

    search = models.ForeignKey(Search, on_delete=models.CASCADE, related_name="trial_rows")
    number = models.IntegerField(help_text="the Optuna trial number in the search's study")
    prune_number = models.IntegerField(null=True, blank=True, help_text="its trial in the pruning study")
    experiment = models.OneToOneField(
        "studio.Experiment", null=True, blank=True, on_delete=models.SET_NULL, related_name="search_trial"
    )
    # {"student": spec, "temperature", "alpha", "method", "logit_standardization"} (the last two absent in
    # trials of searches made before the space had them: hinton, no standardisation)
    params = models.JSONField(default=dict)
    state = models.CharField(max_length=16, choices=STATES, default=QUEUED, db_index=True)
    # {"params", "size_bytes", "latency_ms"} of the student (latency measured on the budget's device).
    figures = models.JSONField(default=dict, blank=True)
    # val_acc, test_acc, epochs (trained), the last reported val_acc and its epoch while running.
    metrics = models.JSONField(default=dict, blank=True)
    reason = models.TextField(blank=True, default="", help_text="why over budget or failed, in words")
    created = models.DateTimeField(default=timezone.now)
    finished = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["search_id", "number"]
        constraints = [models.UniqueConstraint(fields=["search", "number"], name="searchtrial_unique_number")]

    def __str__(self) -> str:
        return f"trial {self.number} of search {self.search_id} [{self.state}]"


class StudentLatency(models.Model):
    """A measured latency, once per (architecture, input shape, classes, device type): kd_core.search.latency_key."""

    key_hash = models.CharField(max_length=64, unique=True)
    key = models.TextField()
    latency_ms = models.FloatField()
    worker = models.CharField(max_length=200, blank=True, default="")
    created = models.DateTimeField(default=timezone.now)

    def __str__(self) -> str:
        return f"{self.latency_ms:.3f} ms: {self.key[:80]}"
