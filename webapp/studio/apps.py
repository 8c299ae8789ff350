"""Django app configuration for the studio app."""

from django.apps import AppConfig


class StudioConfig(AppConfig):
    name = "webapp.studio"
    label = "studio"
    verbose_name = "KD Studio"
    default_auto_field = "django.db.models.BigAutoField"
