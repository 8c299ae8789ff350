"""URL patterns of the REST API (included at /api/ by webapp/urls.py)."""

from django.urls import path, re_path

from webapp.studio import api

urlpatterns = [
    path("datasets/", api.datasets, name="api-datasets"),
    path("datasets/<int:pk>/", api.dataset_detail, name="api-dataset"),
    path("checkpoints/", api.checkpoints, name="api-checkpoints"),
    path("checkpoints/<int:pk>/", api.checkpoint_detail, name="api-checkpoint"),
    path("experiments/", api.experiments, name="api-experiments"),
    path("experiments/<int:pk>/", api.experiment_detail, name="api-experiment"),
    path("experiments/<int:pk>/metrics/", api.experiment_metrics, name="api-experiment-metrics"),
    path("experiments/<int:pk>/cancel/", api.experiment_cancel, name="api-experiment-cancel"),
    path("experiments/<int:pk>/download/", api.experiment_download, name="api-experiment-download"),
    path("compare/", api.compare, name="api-compare"),
    # Unknown API paths answer JSON, not the HTML 404 page.
    re_path(r"^(?P<path>.*)$", api.not_found),
]
