"""ASGI entry point (served by uvicorn): HTTP through the body guard to Django, WebSocket through origin check and auth."""

import os

from django.core.asgi import get_asgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "webapp.settings")
# Django must be set up before anything imports models (the consumers and auth middleware do).
django_asgi_app = get_asgi_application()

from channels.routing import ProtocolTypeRouter, URLRouter  # noqa: E402

from webapp.body_guard import BodyGuard  # noqa: E402
from webapp.studio.auth import WebSocketAuthStack, websocket_origin_validator  # noqa: E402
from webapp.studio.routing import websocket_urlpatterns  # noqa: E402

application = ProtocolTypeRouter(
    {
        # Oversized or unauthenticated bodies are refused before the server reads them (webapp/body_guard.py).
        "http": BodyGuard(django_asgi_app),
        "websocket": websocket_origin_validator(WebSocketAuthStack(URLRouter(websocket_urlpatterns))),
    }
)
