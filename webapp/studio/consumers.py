"""The live experiment socket: authenticate, check the owner, join the experiment's group, forward."""

from __future__ import annotations

from channels.db import database_sync_to_async
from channels.generic.websocket import AsyncJsonWebsocketConsumer

from webapp.studio.models import Experiment

# Application close codes (4000-4999): the handshake is accepted first so the client sees them.
CLOSE_UNAUTHENTICATED = 4403
CLOSE_NOT_FOUND = 4404


@database_sync_to_async
def _owns(user, experiment_id: int) -> bool:
    return Experiment.objects.filter(pk=experiment_id, owner=user).exists()


class ExperimentConsumer(AsyncJsonWebsocketConsumer):
    """Forwards `experiment.message` events of group `experiment-<id>` to the owner's browser.

    It holds no state and sends no history: the page reads /metrics/ for that, then merges
    the live messages by (series, step).
    """

    group: str | None = None

    async def connect(self) -> None:
        user = self.scope.get("user")
        experiment_id = int(self.scope["url_route"]["kwargs"]["experiment_id"])
        if user is None or not user.is_authenticated:
            await self._refuse(CLOSE_UNAUTHENTICATED)
            return
        # Another user's experiment and a missing one look the same.
        if not await _owns(user, experiment_id):
            await self._refuse(CLOSE_NOT_FOUND)
            return
        # Join before accepting: once the client sees the socket open, no message can slip past it.
        self.group = f"experiment-{experiment_id}"
        await self.channel_layer.group_add(self.group, self.channel_name)
        await self.accept()

    async def _refuse(self, code: int) -> None:
        # Closing before the handshake would reach the client as a bare HTTP 403 without the code.
        await self.accept()
        await self.close(code=code)

    async def disconnect(self, code: int) -> None:
        if self.group:
            await self.channel_layer.group_discard(self.group, self.channel_name)

    async def receive_json(self, content, **kwargs) -> None:
        # The socket is one-way; a client "ping" gets a "pong" so it can check the link.
        if isinstance(content, dict) and content.get("type") == "ping":
            await self.send_json({"type": "pong"})

    async def experiment_message(self, event: dict) -> None:
        await self.send_json(event["message"])
