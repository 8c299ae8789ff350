"""WS /ws/experiments/{id}/ through the real ASGI application: auth, ownership, origin, forwarding."""

import pytest
from asgiref.sync import sync_to_async
from channels.layers import get_channel_layer
from channels.testing import WebsocketCommunicator

from webapp.asgi import application
from webapp.studio.models import ApiToken

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.asyncio]

ORIGIN = (b"origin", b"http://127.0.0.1:8000")


def communicator(experiment_id: int, *headers: tuple[bytes, bytes]) -> WebsocketCommunicator:
    return WebsocketCommunicator(application, f"/ws/experiments/{experiment_id}/", headers=list(headers))


async def token_for(user) -> str:
    return (await sync_to_async(ApiToken.issue)(user))[1]


async def test_owner_receives_group_messages(owner, make_experiment):
    experiment = await sync_to_async(make_experiment)(owner)
    key = await token_for(owner)
    ws = communicator(experiment.pk, ORIGIN, (b"authorization", f"Token {key}".encode()))
    connected, _ = await ws.connect()
    assert connected
    message = {"type": "metric", "step": 10, "values": {"train_loss": 0.5}}
    await get_channel_layer().group_send(
        f"experiment-{experiment.pk}", {"type": "experiment.message", "message": message}
    )
    assert await ws.receive_json_from(timeout=2) == message
    await ws.send_json_to({"type": "ping"})
    assert await ws.receive_json_from(timeout=2) == {"type": "pong"}
    await ws.disconnect()


async def test_token_client_without_origin_is_allowed(owner, make_experiment):
    experiment = await sync_to_async(make_experiment)(owner)
    key = await token_for(owner)
    ws = communicator(experiment.pk, (b"authorization", f"Token {key}".encode()))
    connected, _ = await ws.connect()
    assert connected
    await ws.disconnect()


async def test_other_user_is_closed_with_4404(owner, other, make_experiment):
    experiment = await sync_to_async(make_experiment)(owner)
    key = await token_for(other)
    ws = communicator(experiment.pk, ORIGIN, (b"authorization", f"Token {key}".encode()))
    connected, _ = await ws.connect()
    assert connected
    assert await ws.receive_output(timeout=2) == {"type": "websocket.close", "code": 4404}
    await get_channel_layer().group_send(
        f"experiment-{experiment.pk}", {"type": "experiment.message", "message": {}}
    )


async def test_anonymous_is_closed_with_4403(owner, make_experiment):
    experiment = await sync_to_async(make_experiment)(owner)
    ws = communicator(experiment.pk, ORIGIN)
    connected, _ = await ws.connect()
    assert connected
    assert await ws.receive_output(timeout=2) == {"type": "websocket.close", "code": 4403}


async def test_foreign_origin_is_refused(owner, make_experiment):
    experiment = await sync_to_async(make_experiment)(owner)
    key = await token_for(owner)
    ws = communicator(
        experiment.pk, (b"origin", b"http://evil.example"), (b"authorization", f"Token {key}".encode())
    )
    connected, _ = await ws.connect()
    assert not connected


async def test_session_cookie_authenticates(owner, make_experiment):
    from django.test import Client

    experiment = await sync_to_async(make_experiment)(owner)
    client = Client()
    await sync_to_async(client.force_login)(owner)
    cookie = f"sessionid={client.cookies['sessionid'].value}".encode()
    ws = communicator(experiment.pk, ORIGIN, (b"cookie", cookie))
    connected, _ = await ws.connect()
    assert connected
    await get_channel_layer().group_send(
        f"experiment-{experiment.pk}",
        {"type": "experiment.message", "message": {"type": "status", "status": "running", "progress": 0.5}},
    )
    assert (await ws.receive_json_from(timeout=2))["progress"] == 0.5
    await ws.disconnect()


async def test_outbox_merges_a_backlog_and_bounds_it() -> None:
    """What a socket that fell behind gets: one merged "metrics" message and the newest status; past the
    bound (several messages waiting), nothing more is kept and the socket is marked for CLOSE_TOO_SLOW."""
    from webapp.studio.consumers import Outbox

    box = Outbox(max_values=10)
    box.add({"type": "metric", "step": 1, "values": {"a": 1.0}, "time": 1.0})
    box.add({"type": "status", "status": "running", "progress": 0.1})
    box.add(
        {"type": "metrics", "points": [{"step": 2, "values": {"a": 2.0}}, {"step": 3, "values": {"a": 3.0}}]}
    )
    box.add({"type": "status", "status": "running", "progress": 0.2})
    assert box.take() == [
        {"type": "metrics", "points": [{"step": 1, "values": {"a": 1.0}, "time": 1.0},
                                       {"step": 2, "values": {"a": 2.0}}, {"step": 3, "values": {"a": 3.0}}]},
        {"type": "status", "status": "running", "progress": 0.2},
    ]  # fmt: skip
    assert not box
    # One large batch alone is not a backlog ...
    box.add({"type": "metrics", "points": [{"step": s, "values": {"a": 0.0, "b": 0.0}} for s in range(8)]})
    assert not box.overflowed
    # ... a second one waiting behind it is.
    box.add({"type": "metric", "step": 9, "values": {"a": 0.0}})
    assert box.overflowed and not box.metrics


async def test_outbox_passes_a_message_through_and_closes_on_a_skipped_seq() -> None:
    """A socket that keeps up gets the sink's message itself (encoded once per process); a sink's `seq` that
    skips a number means live messages were lost upstream: the socket is marked for CLOSE_RESYNC."""
    from webapp.studio.consumers import CLOSE_RESYNC, Outbox, encode

    box = Outbox(max_values=1000)
    first = {"type": "metrics", "points": [{"step": 1, "values": {"a": 1.0}}], "stream": "s1", "seq": 0}
    box.add(first)
    [sent] = box.take()
    assert sent is first and encode(sent) is encode(first)
    box.add({"type": "metric", "step": 2, "values": {"a": 2.0}, "stream": "s1", "seq": 1})
    box.add({"type": "metric", "step": 9, "values": {"a": 2.0}, "stream": "s2", "seq": 5})  # another sink
    assert box.closing is None and len(box.take()) == 1
    box.add({"type": "metric", "step": 4, "values": {"a": 4.0}, "stream": "s1", "seq": 3})
    assert box.closing == CLOSE_RESYNC and not box


async def test_a_skipped_seq_closes_the_socket_with_4409(owner, make_experiment):
    experiment = await sync_to_async(make_experiment)(owner)
    key = await token_for(owner)
    ws = communicator(experiment.pk, ORIGIN, (b"authorization", f"Token {key}".encode()))
    connected, _ = await ws.connect()
    assert connected
    group = f"experiment-{experiment.pk}"
    for seq in (0, 2):
        message = {"type": "metric", "step": seq, "values": {"a": 1.0}, "stream": "x", "seq": seq}
        await get_channel_layer().group_send(group, {"type": "experiment.message", "message": message})
    assert (await ws.receive_json_from(timeout=2))["seq"] == 0
    closed = await ws.receive_output(timeout=2)
    assert closed["type"] == "websocket.close" and closed["code"] == 4409
    await ws.disconnect()
