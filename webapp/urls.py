"""HTTP routes: the REST API under /api/, /healthz, the Django admin, and the browser pages."""

from django.contrib import admin
from django.urls import include, path

from webapp.studio import api

urlpatterns = [
    path("healthz", api.healthz, name="healthz"),
    path("api/", include("webapp.studio.api_urls")),
    path("admin/", admin.site.urls),
    path("", include("webapp.studio.page_urls")),
]
