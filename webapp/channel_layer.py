"""The pub/sub channel layer (KD_CHANNEL_LAYER=pubsub): one decode per group message, and Redis restarts survived.

channels_redis's pub/sub layer with two changes for the live experiment sockets (webapp/studio/consumers.py):
- a group message reaches every member socket of this process as ONE decoded object (the stock layer queues
  the same bytes for each member and each consumer decodes its own copy), so the consumer also encodes it to
  JSON once (`consumers.encode`); consumers must not mutate received messages (ours do not);
- a lost Redis connection (a restart, a failover) is rebuilt here: a fresh connection resubscribes every
  channel and group this process holds, and every channel registered with `watch_resets` then receives
  `{"type": "layer.reset"}`, since whatever was published meanwhile is gone (its socket tells the page to
  reconnect and refetch). The stock receive loop only logs the error and retries, and after a restart it
  could stay subscribed to nothing: sockets open, silent for good.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import OrderedDict
from typing import Any

from channels_redis.pubsub import RedisPubSubChannelLayer, RedisPubSubLoopLayer, RedisSingleShardConnection
from channels_redis.utils import _close_redis, _wrap_close, decode_hosts

log = logging.getLogger(__name__)

RESET = {"type": "layer.reset"}


class _Shard(RedisSingleShardConnection):
    """One Redis host's connection; its receive loop rebuilds the connection when it breaks."""

    async def _do_receiving(self) -> None:
        while True:
            try:
                if self._pubsub and self._pubsub.subscribed:
                    message = await self._pubsub.get_message(ignore_subscribe_messages=True, timeout=0.1)
                    self._receive_message(message)
                else:
                    await asyncio.sleep(0.1)
            except (asyncio.CancelledError, GeneratorExit):
                raise
            except Exception as exc:  # noqa: BLE001 - any broken read means the subscriptions are suspect
                log.warning("channel layer lost Redis (%s); reconnecting", exc)
                await self._reconnect()
                self.channel_layer.connection_reset()

    async def _reconnect(self) -> None:
        """A new client and pub/sub connection subscribed to everything the old one was; retried until done."""
        delay = 0.2
        while True:
            async with self._lock:
                old, self._redis, self._pubsub = self._redis, None, None
                if old is not None:
                    with contextlib.suppress(Exception):
                        await _close_redis(old)
                try:
                    self._ensure_redis()
                    if self._subscribed_to:
                        await self._pubsub.subscribe(*self._subscribed_to)
                    log.warning(
                        "channel layer: Redis is back, %d channels resubscribed", len(self._subscribed_to)
                    )
                    return
                except Exception:  # noqa: BLE001 - still down: try again
                    pass
            await asyncio.sleep(delay)
            delay = min(delay * 2, 2.0)


class _LoopLayer(RedisPubSubLoopLayer):
    def __init__(self, hosts: Any = None, *args: Any, **kwargs: Any) -> None:
        super().__init__(hosts, *args, **kwargs)
        self._shards = [_Shard(host, self) for host in decode_hosts(hosts)]
        self._watching: set[str] = set()

    def watch_resets(self, channel: str) -> None:
        """Deliver `RESET` to `channel` whenever the connection to Redis was rebuilt (messages may be lost)."""
        self._watching.add(channel)

    def connection_reset(self) -> None:
        self._watching &= self.channels.keys()  # channels of consumers that left
        data = self.channel_layer.serialize(RESET)
        for channel in self._watching:
            self.channels[channel].put_nowait(data)


class FanOutPubSubLayer(RedisPubSubChannelLayer):
    """channels_redis's pub/sub layer, decoding each group message once per process and surviving restarts."""

    # Recent (bytes, decoded) pairs by the bytes object's id; holding the bytes keeps the id from being reused.
    CACHE = 256

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._decoded: OrderedDict[int, tuple[bytes, Any]] = OrderedDict()

    def _get_layer(self) -> _LoopLayer:
        loop = asyncio.get_running_loop()
        try:
            return self._layers[loop]
        except KeyError:
            layer = _LoopLayer(*self._args, **self._kwargs, channel_layer=self)
            self._layers[loop] = layer
            _wrap_close(self, loop)
            return layer

    def deserialize(self, message: bytes) -> Any:
        key = id(message)
        hit = self._decoded.get(key)
        if hit is not None and hit[0] is message:
            return hit[1]
        value = super().deserialize(message)
        self._decoded[key] = (message, value)
        if len(self._decoded) > self.CACHE:
            self._decoded.popitem(last=False)
        return value
