"""ASGI entry point: HTTP to Django (static files by WhiteNoise), WebSocket through origin check and auth."""

import os

from django.core.asgi import get_asgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "webapp.settings")
# Django must be set up before anything imports models (the consumers and auth middleware do).
django_asgi_app = get_asgi_application()

from channels.routing import ProtocolTypeRouter, URLRouter  # noqa: E402

from webapp.daphne_tweaks import stop_twisted_form_parsing  # noqa: E402
from webapp.studio.auth import WebSocketAuthStack, websocket_origin_validator  # noqa: E402
from webapp.studio.routing import websocket_urlpatterns  # noqa: E402

stop_twisted_form_parsing()  # else daphne's Twisted parses every multipart upload in memory first

application = ProtocolTypeRouter(
    {
        "http": django_asgi_app,
        "websocket": websocket_origin_validator(WebSocketAuthStack(URLRouter(websocket_urlpatterns))),
    }
)
