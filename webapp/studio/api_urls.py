"""URL patterns of the REST API (included at /api/ by webapp/urls.py)."""

from django.urls import path, re_path

from webapp.studio import api, search_api

urlpatterns = [
    path("datasets/", api.datasets, name="api-datasets"),
    path("datasets/<int:pk>/", api.dataset_detail, name="api-dataset"),
    path("datasets/<int:pk>/index/", api.dataset_index, name="api-dataset-index"),
    path("checkpoints/", api.checkpoints, name="api-checkpoints"),
    path("checkpoints/<int:pk>/", api.checkpoint_detail, name="api-checkpoint"),
    path("experiments/", api.experiments, name="api-experiments"),
    path("experiments/<int:pk>/", api.experiment_detail, name="api-experiment"),
    path("experiments/<int:pk>/metrics/", api.experiment_metrics, name="api-experiment-metrics"),
    path("experiments/<int:pk>/cancel/", api.experiment_cancel, name="api-experiment-cancel"),
    path("experiments/<int:pk>/download/", api.experiment_download, name="api-experiment-download"),
    path("compare/", api.compare, name="api-compare"),
    path("architectures/", api.architectures, name="api-architectures"),
    path("searches/", search_api.search_list, name="api-searches"),
    path("searches/<int:pk>/", search_api.search_detail, name="api-search"),
    path("searches/<int:pk>/cancel/", search_api.search_cancel, name="api-search-cancel"),
    # Unknown API paths answer JSON, not the HTML 404 page.
    re_path(r"^(?P<path>.*)$", api.not_found),
]
