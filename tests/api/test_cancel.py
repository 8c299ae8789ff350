"""POST /api/experiments/{id}/cancel/: queued jobs stop at once, running ones are asked, finished ones 409."""

import pytest
from asgiref.sync import async_to_sync
from channels.layers import get_channel_layer

from webapp.studio.models import Experiment

pytestmark = pytest.mark.django_db


def listen(experiment_id: int) -> tuple:
    layer = get_channel_layer()
    channel = async_to_sync(layer.new_channel)()
    async_to_sync(layer.group_add)(f"experiment-{experiment_id}", channel)
    return layer, channel


def test_cancel_queued_is_immediate_and_broadcast(
    owner, make_experiment, owner_client, django_capture_on_commit_callbacks
):
    experiment = make_experiment(owner, celery_task_id="1f1f1f1f-0000-4000-8000-000000000001")
    layer, channel = listen(experiment.pk)
    with django_capture_on_commit_callbacks(execute=True):
        response = owner_client.post(f"/api/experiments/{experiment.pk}/cancel/")
    assert response.status_code == 200, response.content
    assert response.json()["status"] == "cancelled"
    experiment.refresh_from_db()
    assert experiment.status == "cancelled" and experiment.finished is not None
    event = async_to_sync(layer.receive)(channel)
    assert event == {
        "type": "experiment.message",
        "message": {"type": "status", "status": "cancelled", "progress": 0.0, "eta_s": None},
    }


def test_cancel_running_sets_the_stop_flag(
    owner, make_experiment, owner_client, django_capture_on_commit_callbacks
):
    experiment = make_experiment(owner, status=Experiment.RUNNING, progress=0.4)
    with django_capture_on_commit_callbacks(execute=True):
        response = owner_client.post(f"/api/experiments/{experiment.pk}/cancel/")
    assert response.status_code == 200
    assert response.json() == {"id": experiment.pk, "status": "running", "cancel_requested": True}
    experiment.refresh_from_db()
    assert experiment.cancel_requested and experiment.status == "running"


@pytest.mark.parametrize("status", ["succeeded", "failed", "cancelled"])
def test_cancel_finished_is_409(owner, make_experiment, owner_client, status):
    experiment = make_experiment(owner, status=status)
    response = owner_client.post(f"/api/experiments/{experiment.pk}/cancel/")
    assert response.status_code == 409
    assert f"already {status}" in response.json()["error"]


def test_cancel_needs_post_and_ownership(other, make_experiment, owner_client):
    experiment = make_experiment(other)
    assert owner_client.post(f"/api/experiments/{experiment.pk}/cancel/").status_code == 404
    assert owner_client.get(f"/api/experiments/{experiment.pk}/cancel/").status_code == 405
    experiment.refresh_from_db()
    assert experiment.status == "queued"
