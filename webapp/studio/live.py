"""Live messages to an experiment's channel group: the one place that builds status messages and sends them.

The web side (cancel), the Experiment state transitions and the workers' metrics sink all send through
`send`; the browser's socket (consumers.ExperimentConsumer) forwards whatever arrives. Best effort: the
database is the record, and a page that missed a message refills from the REST API.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

log = logging.getLogger(__name__)


def group_name(experiment_id: int) -> str:
    """The channel-layer group of experiment `experiment_id` (its WebSocket consumers join it)."""
    return f"experiment-{int(experiment_id)}"


def send(experiment_id: int, messages: Iterable[dict[str, Any]]) -> None:
    """Send `messages` to the experiment's group in one event-loop round trip; failures only lose live view."""
    batch = list(messages)
    if not batch:
        return
    from asgiref.sync import async_to_sync
    from channels.layers import get_channel_layer

    layer = get_channel_layer()
    if layer is None:
        return
    group = group_name(experiment_id)

    async def send_all() -> None:
        for message in batch:
            await layer.group_send(group, {"type": "experiment.message", "message": message})

    try:
        async_to_sync(send_all)()
    except Exception:  # noqa: BLE001 - a down channel layer must fail neither a request nor a job
        log.warning("could not send %d message(s) to %s", len(batch), group, exc_info=True)


def status_message(experiment: Any) -> dict[str, Any]:
    """`{"type": "status", "status", "progress", "eta_s"}` plus what the new state adds.

    running: `attempts` (and `cancel_requested` once asked); failed: `error`; succeeded: `metrics`.
    """
    message: dict[str, Any] = {
        "type": "status",
        "status": experiment.status,
        "progress": experiment.progress,
        "eta_s": experiment.eta_s,
    }
    if experiment.status == "running":
        message["attempts"] = experiment.attempts
        if experiment.cancel_requested:
            message["cancel_requested"] = True
    elif experiment.status == "failed":
        message["error"] = experiment.error
    elif experiment.status == "succeeded":
        message["metrics"] = experiment.metrics
    return message


def send_status(experiment: Any) -> None:
    """Send the experiment's current status once the surrounding transaction (if any) commits."""
    from django.db import transaction

    experiment_id, message = experiment.pk, status_message(experiment)
    transaction.on_commit(lambda: send(experiment_id, [message]))


def send_progress(experiment_id: int, progress: float, eta_s: float | None) -> None:
    """A running job's progress (the metrics sink calls this about once a second)."""
    send(experiment_id, [{"type": "status", "status": "running", "progress": progress, "eta_s": eta_s}])
