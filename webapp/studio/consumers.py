"""The live experiment socket: authenticate, check the owner, join the experiment's group, forward (merged)."""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Any

from channels.db import database_sync_to_async
from channels.generic.websocket import AsyncJsonWebsocketConsumer
from django.conf import settings

from webapp.studio.models import Experiment

# Application close codes (4000-4999): the handshake is accepted first so the client sees them.
CLOSE_UNAUTHENTICATED = 4403
CLOSE_NOT_FOUND = 4404
# The client read too slowly: its unsent backlog passed MAX_BACKLOG_VALUES. It reconnects and refetches
# the history from /metrics/ (the database is the record), so nothing is lost; the others never waited.
CLOSE_TOO_SLOW = 4408
# Unsent metric values one socket may hold (about 100 bytes each) before it is closed as too slow.
MAX_BACKLOG_VALUES = getattr(settings, "KD_WS_MAX_BACKLOG_VALUES", 50_000)
# A socket whose current send has waited this long on a full buffer while more arrives is too slow as well.
SEND_STALL_S = getattr(settings, "KD_WS_SEND_STALL_S", 10)


@database_sync_to_async
def _owns(user, experiment_id: int) -> bool:
    return Experiment.objects.filter(pk=experiment_id, owner=user).exists()


class Outbox:
    """What one socket has not been sent yet, merged: every metric point in order, the latest status.

    A socket that keeps up gets each group message as it came; one that falls behind gets, per send, ONE
    `{"type":"metrics","points":[...]}` with everything since its last send (clients merge by (series,
    step), so repeats are harmless) and only the newest status (a status supersedes the one before).
    """

    def __init__(self, max_values: int = MAX_BACKLOG_VALUES) -> None:
        self.max_values = max_values
        self.points: list[dict[str, Any]] = []
        self.status: dict[str, Any] | None = None
        self.other: list[dict[str, Any]] = []
        self.values = 0
        self.merged = 0  # group messages whose points wait in `points`
        self.overflowed = False

    def add(self, message: dict[str, Any]) -> None:
        kind = message.get("type")
        if kind == "metric":
            new = [{k: message[k] for k in ("step", "values", "time") if k in message}]
        elif kind == "metrics":
            new = list(message.get("points") or [])
        elif kind == "status":
            self.status = message
            return
        else:
            self.other.append(message)
            return
        self.points.extend(new)
        self.values += sum(len(p.get("values") or {}) for p in new)
        self.merged += 1
        # A backlog, not one large batch: a socket is too slow once several messages wait past the bound.
        if self.values > self.max_values and self.merged > 1:
            self.overflowed = True
            self.points, self.values, self.merged = [], 0, 0

    def __bool__(self) -> bool:
        return bool(self.points or self.status or self.other)

    def take(self) -> list[dict[str, Any]]:
        """The messages to send now (points before the status, so a final status comes after the last point)."""
        out: list[dict[str, Any]] = list(self.other)
        if len(self.points) == 1:
            out.append({"type": "metric", **self.points[0]})
        elif self.points:
            out.append({"type": "metrics", "points": self.points})
        if self.status is not None:
            out.append(self.status)
        self.points, self.values, self.merged, self.status, self.other = [], 0, 0, None, []
        return out


class ExperimentConsumer(AsyncJsonWebsocketConsumer):
    """Forwards `experiment.message` events of group `experiment-<id>` to the owner's browser.

    It sends no history: the page reads /metrics/ for that, then merges the live messages by (series, step).
    Group messages go into an `Outbox` and a sender task writes them: the group handler never waits on the
    socket, so a slow socket gets merged batches (never an ever-growing queue in the channel layer) and a
    socket whose backlog passes MAX_BACKLOG_VALUES, or whose send waited SEND_STALL_S on a full buffer while
    more arrived, leaves the group and is closed with CLOSE_TOO_SLOW.
    """

    group: str | None = None

    async def connect(self) -> None:
        self.outbox = Outbox()
        self._ready = asyncio.Event()
        self._sender: asyncio.Task | None = None
        self._send_started: float | None = None
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
        self._sender = asyncio.create_task(self._send_loop())

    async def _refuse(self, code: int) -> None:
        # Closing before the handshake would reach the client as a bare HTTP 403 without the code.
        await self.accept()
        await self.close(code=code)

    async def _leave(self) -> None:
        if self.group:
            group, self.group = self.group, None
            await self.channel_layer.group_discard(group, self.channel_name)

    async def disconnect(self, code: int) -> None:
        if self._sender is not None:
            self._sender.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._sender
            self._sender = None
        await self._leave()

    async def receive_json(self, content, **kwargs) -> None:
        # The socket is one-way; a client "ping" gets a "pong" so it can check the link.
        if isinstance(content, dict) and content.get("type") == "ping":
            self.outbox.other.append({"type": "pong"})
            self._ready.set()

    async def experiment_message(self, event: dict) -> None:
        if self.group is None:
            return
        self.outbox.add(event["message"])
        if self._send_started is not None and time.monotonic() - self._send_started > SEND_STALL_S:
            self.outbox.overflowed = True
        if self.outbox.overflowed:
            # Stop taking messages for a socket that does not read; the sender closes it once it can.
            await self._leave()
        self._ready.set()

    async def _send_loop(self) -> None:
        while True:
            await self._ready.wait()
            self._ready.clear()
            if self.outbox.overflowed:
                await self.close(code=CLOSE_TOO_SLOW, reason="too slow: reconnect and reload /metrics/")
                return
            # Each send waits while the client's buffer is full; meanwhile new messages merge in the outbox.
            for message in self.outbox.take():
                self._send_started = time.monotonic()
                await self.send_json(message)
                self._send_started = None
