"""WebSocket routes."""

from django.urls import path

from webapp.studio.consumers import ExperimentConsumer
from webapp.studio.search_api import SearchConsumer

websocket_urlpatterns = [
    path("ws/experiments/<int:experiment_id>/", ExperimentConsumer.as_asgi()),
    path("ws/searches/<int:search_id>/", SearchConsumer.as_asgi()),
]
