"""Django admin for every studio model (read-mostly: the API and workers write these rows)."""

from django.contrib import admin

from webapp.studio.models import ApiToken, Artifact, Checkpoint, Dataset, Experiment, MetricPoint


@admin.register(Dataset)
class DatasetAdmin(admin.ModelAdmin):
    list_display = ("id", "name", "owner", "format", "status", "size", "created")
    list_filter = ("format", "status")
    search_fields = ("name", "owner__username")


@admin.register(Checkpoint)
class CheckpointAdmin(admin.ModelAdmin):
    list_display = ("id", "name", "owner", "format", "role", "num_params", "source_experiment", "created")
    list_filter = ("format", "role")
    search_fields = ("name", "owner__username")
    raw_id_fields = ("source_experiment", "dataset")


class ArtifactInline(admin.TabularInline):
    model = Artifact
    extra = 0
    readonly_fields = ("kind", "replica", "file", "size", "sha256", "created")


@admin.register(Experiment)
class ExperimentAdmin(admin.ModelAdmin):
    list_display = ("id", "name", "owner", "kind", "status", "progress", "attempts", "worker", "created")
    list_filter = ("kind", "status")
    search_fields = ("name", "owner__username", "sweep_group", "celery_task_id")
    raw_id_fields = ("dataset", "teacher")
    inlines = [ArtifactInline]


@admin.register(MetricPoint)
class MetricPointAdmin(admin.ModelAdmin):
    list_display = ("experiment", "name", "step", "value")
    list_filter = ("name",)
    raw_id_fields = ("experiment",)


@admin.register(ApiToken)
class ApiTokenAdmin(admin.ModelAdmin):
    list_display = ("prefix", "user", "name", "created", "last_used")
    readonly_fields = ("key_hash", "prefix", "created", "last_used")
    search_fields = ("user__username", "prefix")
