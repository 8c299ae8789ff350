"""The live experiment socket: authenticate, check the owner, join the experiment's group, forward (merged)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections import OrderedDict
from typing import Any

from channels.db import database_sync_to_async
from channels.generic.websocket import AsyncJsonWebsocketConsumer
from channels.sessions import InstanceSessionWrapper
from django.conf import settings

from webapp.studio.models import Experiment

# Application close codes (4000-4999): the handshake is accepted first so the client sees them.
CLOSE_UNAUTHENTICATED = 4403
CLOSE_NOT_FOUND = 4404
# The client read too slowly: its unsent backlog passed MAX_BACKLOG_VALUES. It reconnects and refetches
# the history from /metrics/ (the database is the record), so nothing is lost; the others never waited.
CLOSE_TOO_SLOW = 4408
# Live messages were lost before they reached this process (a Redis restart: the channel layer says so; a
# sink's batch too large to announce: a `seq` skipped). The client reconnects and refetches, as after 4408.
CLOSE_RESYNC = 4409
REASONS = {
    CLOSE_TOO_SLOW: "too slow: reconnect and reload /metrics/",
    CLOSE_RESYNC: "live messages were lost: reconnect and reload /metrics/",
}
# Unsent metric values one socket may hold (about 100 bytes each) before it is closed as too slow.
MAX_BACKLOG_VALUES = getattr(settings, "KD_WS_MAX_BACKLOG_VALUES", 50_000)
# A socket whose current send has waited this long on a full buffer while more arrives is too slow as well.
SEND_STALL_S = getattr(settings, "KD_WS_SEND_STALL_S", 10)

# The text of recent messages, by object: webapp/channel_layer.py hands every socket of this process the same
# message object, so a group message is JSON-encoded once per process, not once per socket.
_ENCODED: OrderedDict[int, tuple[dict[str, Any], str]] = OrderedDict()
_ENCODED_MAX = 512


def encode(message: dict[str, Any]) -> str:
    """Compact JSON of `message`, from the per-process cache when another socket already sent this object."""
    key = id(message)
    hit = _ENCODED.get(key)
    if hit is not None and hit[0] is message:
        return hit[1]
    text = json.dumps(message, separators=(",", ":"))
    _ENCODED[key] = (message, text)  # the reference keeps the id from being reused while cached
    if len(_ENCODED) > _ENCODED_MAX:
        _ENCODED.popitem(last=False)
    return text


@database_sync_to_async
def _owns(user, experiment_id: int) -> bool:
    return Experiment.objects.filter(pk=experiment_id, owner=user).exists()


def _points(message: dict[str, Any]) -> list[dict[str, Any]]:
    if message.get("type") == "metric":
        return [{k: message[k] for k in ("step", "values", "time") if k in message}]
    return list(message.get("points") or [])


class Outbox:
    """What one socket has not been sent yet, merged: every metric point in order, the latest status.

    A socket that keeps up gets each group message as it came (the same object for every socket, encoded
    once); one that falls behind gets, per send, ONE `{"type":"metrics","points":[...]}` with everything since
    its last send (clients merge by (series, step), so repeats are harmless) and only the newest status (a
    status supersedes the one before). `closing` is set to a close code when the socket must be closed: its
    backlog passed the bound (CLOSE_TOO_SLOW) or a sink's `seq` skipped a number (CLOSE_RESYNC); from then
    on nothing more is kept.
    """

    def __init__(self, max_values: int = MAX_BACKLOG_VALUES) -> None:
        self.max_values = max_values
        self.metrics: list[dict[str, Any]] = []  # metric messages as they came
        self.status: dict[str, Any] | None = None
        self.other: list[dict[str, Any]] = []
        self.values = 0
        self.streams: dict[str, int] = {}  # the last `seq` seen of each sink
        self.closing: int | None = None

    @property
    def overflowed(self) -> bool:
        return self.closing == CLOSE_TOO_SLOW

    def close(self, code: int) -> None:
        if self.closing is None:
            self.closing = code
        self.metrics, self.values = [], 0

    def add(self, message: dict[str, Any]) -> None:
        if self.closing is not None:
            return
        kind = message.get("type")
        if kind == "status":
            self.status = message
            return
        if kind not in ("metric", "metrics"):
            self.other.append(message)
            return
        stream, seq = message.get("stream"), message.get("seq")
        if isinstance(stream, str) and isinstance(seq, int):
            last = self.streams.get(stream)
            self.streams[stream] = seq
            if last is not None and seq != last + 1:
                self.close(CLOSE_RESYNC)
                return
        if kind == "metric":
            self.values += len(message.get("values") or {})
        elif message.get("points"):
            self.values += sum(len(p.get("values") or {}) for p in message["points"])
        else:
            return  # a marker without points (its `seq` was all it carried)
        self.metrics.append(message)
        # A backlog, not one large batch: a socket is too slow once several messages wait past the bound.
        if self.values > self.max_values and len(self.metrics) > 1:
            self.close(CLOSE_TOO_SLOW)

    def __bool__(self) -> bool:
        return bool(self.metrics or self.status or self.other)

    def take(self) -> list[dict[str, Any]]:
        """The messages to send now (points before the status, so a final status comes after the last point)."""
        out: list[dict[str, Any]] = list(self.other)
        if len(self.metrics) == 1:
            out.append(self.metrics[0])
        elif self.metrics:
            out.append({"type": "metrics", "points": [p for m in self.metrics for p in _points(m)]})
        if self.status is not None:
            out.append(self.status)
        self.metrics, self.values, self.status, self.other = [], 0, None, []
        return out


class ExperimentConsumer(AsyncJsonWebsocketConsumer):
    """Forwards `experiment.message` events of group `experiment-<id>` to the owner's browser.

    It sends no history: the page reads /metrics/ for that, then merges the live messages by (series, step).
    Group messages go into an `Outbox` and a sender task writes them: the group handler never waits on the
    socket, so a slow socket gets merged batches (never an ever-growing queue in the channel layer) and a
    socket whose backlog passes MAX_BACKLOG_VALUES, or whose send waited SEND_STALL_S on a full buffer while
    more arrived, leaves the group and is closed with CLOSE_TOO_SLOW; one that missed a sink's message (a
    skipped `seq`) is closed with CLOSE_RESYNC. Either way the page reconnects and refetches /metrics/.
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
        # webapp/channel_layer.py tells us when its Redis connection was rebuilt (messages may be lost).
        watch = getattr(self.channel_layer, "watch_resets", None)
        if watch is not None:
            watch(self.channel_name)
        await self.accept()
        # Channels' session middleware wraps `send` to save sessions and set cookies on HTTP responses; for a
        # data frame it only reads the lazy session (a tenth of a busy web process's time, sampled). Frames
        # go to the server's send directly.
        owner = getattr(self.base_send, "__self__", None)
        self._send_frame = owner.real_send if isinstance(owner, InstanceSessionWrapper) else self.base_send
        self._sender = asyncio.create_task(self._send_loop())

    async def dispatch(self, message: dict) -> None:
        # Channels runs close_old_connections in the database thread before EVERY handler: for a group message
        # that is one thread hop per socket per message (a quarter of a busy web process's time, measured by
        # sampling bench/bench_fleet.py at 500 sockets). Only connecting reads the database here.
        if message["type"] in ("experiment.message", "layer.reset"):
            await getattr(self, message["type"].replace(".", "_"))(message)
        else:
            await super().dispatch(message)

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
            self.outbox.close(CLOSE_TOO_SLOW)
        if self.outbox.closing is not None:
            # Stop taking messages for this socket; the sender closes it once it can.
            await self._leave()
        self._ready.set()

    async def layer_reset(self, event: dict) -> None:
        """The channel layer lost Redis and reconnected: messages published meanwhile are gone."""
        if self.group is None:
            return
        self.outbox.close(CLOSE_RESYNC)
        await self._leave()
        self._ready.set()

    async def _send_loop(self) -> None:
        while True:
            await self._ready.wait()
            self._ready.clear()
            if self.outbox.closing is not None:
                code = self.outbox.closing
                await self.close(code=code, reason=REASONS[code])
                return
            # Each send waits while the client's buffer is full; meanwhile new messages merge in the outbox.
            for message in self.outbox.take():
                self._send_started = time.monotonic()
                await self._send_frame({"type": "websocket.send", "text": encode(message)})
                self._send_started = None
