"""Datasets ingested into a store: store path, progress, the ingest attempt's claim; "inspecting" becomes "ingesting".

Rows that were "inspecting" (a worker was reading a large upload) become "ingesting" with progress 0 and no
claim: a queued `workers.inspect_upload` message (an alias of the ingest task) or `workers.cleanup`'s
sweep ingests them. Ready rows keep their uploaded file and are read from it until deleted.
"""

from django.db import migrations, models


def inspecting_to_ingesting(apps, schema_editor):
    Dataset = apps.get_model("studio", "Dataset")
    Dataset.objects.filter(status="inspecting").update(status="ingesting", progress=0.0)


def ingesting_to_inspecting(apps, schema_editor):
    Dataset = apps.get_model("studio", "Dataset")
    # A row ingested from an import has no file the old code could inspect: it cannot go back usefully.
    Dataset.objects.filter(status="ingesting", import_path="").update(status="inspecting")
    Dataset.objects.filter(status="ingesting").exclude(import_path="").update(
        status="failed", error="imports need a newer version of KD Studio"
    )


class Migration(migrations.Migration):
    dependencies = [
        ("studio", "0003_checkpoint_status_experiment_lease"),
    ]

    operations = [
        migrations.AddField(
            model_name="dataset",
            name="attempts",
            field=models.PositiveIntegerField(default=0),
        ),
        migrations.AddField(
            model_name="dataset",
            name="heartbeat",
            field=models.DateTimeField(blank=True, null=True),
        ),
        migrations.AddField(
            model_name="dataset",
            name="import_path",
            field=models.CharField(blank=True, default="", max_length=1000),
        ),
        migrations.AddField(
            model_name="dataset",
            name="ingest_token",
            field=models.CharField(blank=True, default="", max_length=64),
        ),
        migrations.AddField(
            model_name="dataset",
            name="progress",
            field=models.FloatField(default=1.0),
        ),
        migrations.AddField(
            model_name="dataset",
            name="store",
            field=models.CharField(blank=True, default="", max_length=500),
        ),
        migrations.AlterField(
            model_name="dataset",
            name="format",
            field=models.CharField(
                choices=[
                    ("npz", "NPZ arrays"),
                    ("csv", "CSV table"),
                    ("zip", "ZIP of class folders"),
                    ("folder", "folder of class folders"),
                    ("builtin", "built-in"),
                ],
                max_length=16,
            ),
        ),
        migrations.AlterField(
            model_name="dataset",
            name="size",
            field=models.BigIntegerField(default=0, help_text="bytes in storage: the upload, then its store"),
        ),
        migrations.AlterField(
            model_name="dataset",
            name="status",
            field=models.CharField(
                choices=[("ingesting", "ingesting"), ("ready", "ready"), ("failed", "failed")],
                default="ready",
                max_length=16,
            ),
        ),
        migrations.RunPython(inspecting_to_ingesting, ingesting_to_inspecting),
    ]
