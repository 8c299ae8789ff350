"""POST/GET /api/experiments/: configs validated by kd_core, jobs enqueued by name, sweeps, filters."""

import base64
import json

import pytest

from webapp.studio.models import Checkpoint, Experiment

pytestmark = pytest.mark.django_db


def config(dataset_id: int, **extra) -> dict:
    return {
        "kind": "train",
        "dataset": dataset_id,
        "model": {"arch": "mlp", "hidden": [8]},
        "epochs": 2,
        **extra,
    }


def post(client, body, capture):
    with capture(execute=True):
        return client.post("/api/experiments/", body, content_type="application/json")


def queued_messages(broker_redis) -> list[dict]:
    return [json.loads(raw) for raw in broker_redis.lrange("gpu", 0, -1)]


def test_create_saves_queued_and_enqueues_by_name(
    owner, make_dataset, owner_client, broker_redis, django_capture_on_commit_callbacks
):
    dataset = make_dataset(owner)
    response = post(owner_client, config(dataset["id"], name="first"), django_capture_on_commit_callbacks)
    assert response.status_code == 201, response.content
    body = response.json()
    assert body["status"] == "queued"
    experiment = Experiment.objects.get(pk=body["id"])
    assert (
        experiment.name == "first" and experiment.kind == "train" and experiment.dataset_id == dataset["id"]
    )
    assert experiment.config["epochs"] == 2 and experiment.config["lr"] == 0.001  # defaults filled in
    assert experiment.celery_task_id
    if broker_redis is not None:
        messages = [
            m for m in queued_messages(broker_redis) if m["headers"]["id"] == experiment.celery_task_id
        ]
        assert len(messages) == 1
        assert messages[0]["headers"]["task"] == "workers.run_experiment"
        args = json.loads(base64.b64decode(messages[0]["body"]))[0]
        assert args == [experiment.pk]


def test_bad_config_field_names_the_field(
    owner, make_dataset, owner_client, django_capture_on_commit_callbacks
):
    dataset = make_dataset(owner)
    response = post(owner_client, config(dataset["id"], lr=-1), django_capture_on_commit_callbacks)
    assert response.status_code == 400
    assert "'lr'" in response.json()["error"]
    response = post(owner_client, config(dataset["id"], epochz=3), django_capture_on_commit_callbacks)
    assert response.status_code == 400 and "epochz" in response.json()["error"]
    assert not Experiment.objects.exists()


def test_body_must_be_a_json_object(owner_client):
    response = owner_client.post("/api/experiments/", "{not json", content_type="application/json")
    assert response.status_code == 400 and "not valid JSON" in response.json()["error"]
    response = owner_client.post("/api/experiments/", "[1, 2]", content_type="application/json")
    assert response.status_code == 400 and "JSON object" in response.json()["error"]


def test_distill_needs_a_teacher(owner, make_dataset, owner_client, django_capture_on_commit_callbacks):
    dataset = make_dataset(owner)
    response = post(owner_client, config(dataset["id"], kind="distill"), django_capture_on_commit_callbacks)
    assert response.status_code == 400
    assert "'teacher' is required" in response.json()["error"]


def test_other_users_dataset_and_teacher_are_refused(
    owner, other, make_dataset, owner_client, django_capture_on_commit_callbacks
):
    mine = make_dataset(owner)
    theirs = make_dataset(other)
    response = post(owner_client, config(theirs["id"]), django_capture_on_commit_callbacks)
    assert response.status_code == 400
    assert response.json()["error"] == f"dataset {theirs['id']} not found among your datasets"
    teacher = Checkpoint.objects.create(owner=other, name="t", format="onnx", file="x.onnx", num_classes=3)
    response = post(
        owner_client,
        config(mine["id"], kind="distill", teacher=teacher.pk),
        django_capture_on_commit_callbacks,
    )
    assert response.status_code == 400
    assert response.json()["error"] == f"teacher {teacher.pk} not found among your checkpoints"
    assert not Experiment.objects.exists()


def test_distill_with_own_teacher_checks_class_count(
    owner, make_dataset, owner_client, django_capture_on_commit_callbacks
):
    dataset = make_dataset(owner)  # 3 classes
    wrong = Checkpoint.objects.create(owner=owner, name="t10", format="onnx", file="a.onnx", num_classes=10)
    response = post(
        owner_client,
        config(dataset["id"], kind="distill", teacher=wrong.pk),
        django_capture_on_commit_callbacks,
    )
    assert response.status_code == 400 and "10 classes" in response.json()["error"]
    right = Checkpoint.objects.create(owner=owner, name="t3", format="onnx", file="b.onnx", num_classes=3)
    response = post(
        owner_client,
        config(dataset["id"], kind="distill", teacher=right.pk),
        django_capture_on_commit_callbacks,
    )
    assert response.status_code == 201
    experiment = Experiment.objects.get(pk=response.json()["id"])
    assert experiment.teacher_id == right.pk and experiment.config["teacher"] == right.pk


def test_builtin_dataset_by_name(owner, owner_client, django_capture_on_commit_callbacks):
    response = post(owner_client, config("digits"), django_capture_on_commit_callbacks)
    assert response.status_code == 201, response.content
    experiment = Experiment.objects.get(pk=response.json()["id"])
    assert experiment.dataset.format == "builtin" and experiment.dataset.name == "digits"
    assert experiment.dataset.num_classes == 10
    assert experiment.config["dataset"] == experiment.dataset_id
    response = post(owner_client, config("imagenet"), django_capture_on_commit_callbacks)
    assert response.status_code == 400 and "built-in" in response.json()["error"]


def test_sweep_creates_one_experiment_per_combination(
    owner, make_dataset, owner_client, django_capture_on_commit_callbacks
):
    dataset = make_dataset(owner)
    body = config(dataset["id"], name="sw", sweep={"temperature": [2, 4, 8], "alpha": [0.5, 0.9]})
    response = post(owner_client, body, django_capture_on_commit_callbacks)
    assert response.status_code == 201, response.content
    result = response.json()
    assert len(result["ids"]) == 6 and result["sweep_group"]
    rows = Experiment.objects.filter(sweep_group=result["sweep_group"])
    combos = {(e.config["temperature"], e.config["alpha"]) for e in rows}
    assert combos == {(t, a) for t in (2.0, 4.0, 8.0) for a in (0.5, 0.9)}
    assert all(e.celery_task_id for e in rows)
    assert "sw [temperature=2, alpha=0.5]" in {e.name for e in rows}
    listed = owner_client.get(f"/api/experiments/?sweep_group={result['sweep_group']}").json()["experiments"]
    assert len(listed) == 6


def test_sweep_errors(owner, make_dataset, owner_client, django_capture_on_commit_callbacks):
    dataset = make_dataset(owner)
    for sweep, fragment in [
        ({"dataset": [1, 2]}, "cannot vary 'dataset'"),
        ({"alpha": []}, "non-empty list"),
        ({"alpha": [0.5, 2.0]}, "alpha=2.0: 'alpha' must be <= 1.0"),
        ({"seed": list(range(10)), "lr": [0.1] * 10}, "at most 64"),
    ]:
        response = post(owner_client, config(dataset["id"], sweep=sweep), django_capture_on_commit_callbacks)
        assert response.status_code == 400, sweep
        assert fragment in response.json()["error"]
    assert not Experiment.objects.exists()


def test_list_newest_first_with_filters(owner, other, make_dataset, make_experiment, owner_client):
    dataset = make_dataset(owner)["id"]
    older = make_experiment(
        owner,
        status=Experiment.SUCCEEDED,
        dataset=dataset,
        metrics={"val_acc": 0.9, "test_acc": 0.8, "student_params": 67, "loss_curve": [1, 2]},
    )
    newer = make_experiment(owner, status=Experiment.RUNNING, dataset=dataset, config={"kind": "codistill"})
    make_experiment(other)
    listed = owner_client.get("/api/experiments/").json()["experiments"]
    assert [e["id"] for e in listed] == [newer.pk, older.pk]
    assert listed[1]["metrics"] == {"val_acc": 0.9, "test_acc": 0.8, "student_params": 67}
    assert listed[0]["status"] == "running" and "progress" in listed[0]
    assert [
        e["id"] for e in owner_client.get("/api/experiments/?status=succeeded").json()["experiments"]
    ] == [older.pk]
    assert [e["id"] for e in owner_client.get("/api/experiments/?kind=codistill").json()["experiments"]] == [
        newer.pk
    ]
    assert len(owner_client.get(f"/api/experiments/?dataset={dataset}").json()["experiments"]) == 2
    assert owner_client.get("/api/experiments/?status=done").status_code == 400


def test_show_and_other_users_404(owner, other, make_experiment, owner_client, other_client):
    experiment = make_experiment(
        owner, status=Experiment.FAILED, error="loss became NaN at step 40", attempts=1
    )
    body = owner_client.get(f"/api/experiments/{experiment.pk}/").json()
    for key in (
        "id",
        "name",
        "kind",
        "status",
        "progress",
        "config",
        "metrics",
        "error",
        "created",
        "started",
        "finished",
    ):
        assert key in body
    assert body["error"] == "loss became NaN at step 40" and body["attempts"] == 1
    assert body["dataset"]["id"] == experiment.dataset_id and body["artifacts"] == []
    assert other_client.get(f"/api/experiments/{experiment.pk}/").status_code == 404
    assert other_client.get("/api/experiments/999999/").status_code == 404
