"""POST/GET/DELETE /api/checkpoints/: uploaded teachers, inspected without unpickling; trained models listed."""

import datetime
import io
import json
from pathlib import Path

import pytest
import torch
from django.conf import settings

from kd_core.export import export_model
from kd_core.models import build_model
from tests.api.conftest import upload
from webapp.studio.models import Checkpoint, Experiment
from webapp.studio.services import register_trained_model

pytestmark = pytest.mark.django_db

ARCH = {"arch": "mlp", "hidden": [8]}
PARAMS = 4 * 8 + 8 + 8 * 3 + 3  # the MLP above on 4 features and 3 classes


def state_dict_bytes() -> bytes:
    torch.manual_seed(0)
    buffer = io.BytesIO()
    torch.save(build_model(ARCH, (4,), 3).state_dict(), buffer)
    return buffer.getvalue()


def stored_files() -> list[Path]:
    root = Path(settings.MEDIA_ROOT)
    return [p for p in root.rglob("*") if p.is_file()] if root.exists() else []


def test_state_dict_with_arch_and_dataset(owner, make_dataset, owner_client):
    dataset = make_dataset(owner)
    response = owner_client.post(
        "/api/checkpoints/",
        {
            "name": "teacher",
            "file": upload("t.pt", state_dict_bytes()),
            "arch": json.dumps(ARCH),
            "dataset": dataset["id"],
        },
    )
    assert response.status_code == 201, response.content
    body = response.json()
    assert body["name"] == "teacher"
    assert body["format"] == "state_dict"
    assert body["num_params"] == PARAMS
    assert body["input_shape"] == [4]
    assert body["num_classes"] == 3
    assert body["arch"]["arch"] == "mlp" and body["arch"]["hidden"] == [8]
    assert body["role"] == "teacher" and body["source_experiment"] is None
    assert owner_client.get(f"/api/checkpoints/{body['id']}/").json()["num_params"] == PARAMS


def test_bad_extension(owner_client):
    response = owner_client.post("/api/checkpoints/", {"file": upload("model.pkl", b"\x80\x04")})
    assert response.status_code == 400
    assert ".safetensors" in response.json()["error"]


def test_garbage_file_gives_reason_and_leaves_nothing(owner_client):
    response = owner_client.post("/api/checkpoints/", {"file": upload("model.safetensors", b"\x00" * 64)})
    assert response.status_code == 400
    assert response.json()["error"].startswith("model.safetensors: ")
    assert not Checkpoint.objects.exists()
    assert stored_files() == []


def test_a_refusal_names_the_file_once(owner_client):
    buffer = io.BytesIO()
    torch.save({"w": torch.zeros(1), "when": datetime.date(2020, 1, 1)}, buffer)
    response = owner_client.post("/api/checkpoints/", {"file": upload("evil.pt", buffer.getvalue())})
    assert response.status_code == 400
    error = response.json()["error"]
    assert (
        error.startswith("evil.pt: the file holds a pickled Python object") and error.count("evil.pt") == 1
    ), error
    assert stored_files() == []


def test_arch_must_be_json_and_a_valid_spec(owner_client):
    response = owner_client.post(
        "/api/checkpoints/", {"file": upload("t.pt", state_dict_bytes()), "arch": "{mlp"}
    )
    assert response.status_code == 400 and "'arch' is not valid JSON" in response.json()["error"]
    response = owner_client.post(
        "/api/checkpoints/",
        {"file": upload("t.pt", state_dict_bytes()), "arch": json.dumps({"arch": "transformer"})},
    )
    assert response.status_code == 400 and "arch" in response.json()["error"]
    assert stored_files() == []


def test_other_users_dataset_cannot_size_a_checkpoint(other, make_dataset, owner_client):
    theirs = make_dataset(other)
    response = owner_client.post(
        "/api/checkpoints/",
        {"file": upload("t.pt", state_dict_bytes()), "arch": json.dumps(ARCH), "dataset": theirs["id"]},
    )
    assert response.status_code == 400
    assert "not found among your datasets" in response.json()["error"]


def test_list_show_delete_only_own(
    owner, other, owner_client, other_client, django_capture_on_commit_callbacks
):
    created = other_client.post(
        "/api/checkpoints/", {"file": upload("t.pt", state_dict_bytes()), "arch": json.dumps(ARCH)}
    )
    assert created.status_code == 201, created.content
    theirs = created.json()["id"]
    assert owner_client.get("/api/checkpoints/").json()["checkpoints"] == []
    assert owner_client.get(f"/api/checkpoints/{theirs}/").status_code == 404
    assert owner_client.delete(f"/api/checkpoints/{theirs}/").status_code == 404
    path = Path(Checkpoint.objects.get(pk=theirs).file.path)
    with django_capture_on_commit_callbacks(execute=True):
        assert other_client.delete(f"/api/checkpoints/{theirs}/").status_code == 204
    assert not path.exists() and not Checkpoint.objects.exists()


def test_delete_refused_while_a_queued_distillation_uses_it(owner, owner_client, make_experiment):
    created = owner_client.post(
        "/api/checkpoints/", {"file": upload("t.pt", state_dict_bytes()), "arch": json.dumps(ARCH)}
    )
    teacher = Checkpoint.objects.get(pk=created.json()["id"])
    make_experiment(owner, status=Experiment.QUEUED, teacher=teacher)
    response = owner_client.delete(f"/api/checkpoints/{teacher.pk}/")
    assert response.status_code == 409


def test_trained_model_is_listed_with_its_experiment(owner, make_experiment, owner_client, tmp_path):
    experiment = make_experiment(owner, status=Experiment.SUCCEEDED, name="digits teacher")
    torch.manual_seed(0)
    model = build_model(ARCH, (4,), 3)
    paths = export_model(model, tmp_path, sample_inputs=torch.randn(2, 4), formats=["safetensors"])
    checkpoint = register_trained_model(experiment, paths["safetensors"])
    assert register_trained_model(experiment, paths["safetensors"]).pk == checkpoint.pk  # idempotent
    listed = owner_client.get("/api/checkpoints/").json()["checkpoints"]
    assert len(listed) == 1
    row = listed[0]
    assert row["source_experiment"] == experiment.pk
    assert row["role"] == "teacher" and row["format"] == "safetensors"  # trained on labels: a teacher
    assert row["num_params"] == PARAMS and row["num_classes"] == 3 and row["input_shape"] == [4]
    assert Path(checkpoint.file.path).read_bytes() == Path(paths["safetensors"]).read_bytes()


def test_a_distilled_model_is_listed_as_a_student(owner, make_experiment, owner_client, tmp_path):
    experiment = make_experiment(owner, status=Experiment.SUCCEEDED, name="kd", config={"kind": "distill"})
    model = build_model(ARCH, (4,), 3)
    paths = export_model(model, tmp_path, sample_inputs=torch.randn(2, 4), formats=["safetensors"])
    register_trained_model(experiment, paths["safetensors"])
    (row,) = owner_client.get("/api/checkpoints/").json()["checkpoints"]
    assert row["role"] == "student" and row["source_experiment"] == experiment.pk
