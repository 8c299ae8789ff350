"""Issue 9 through the API: GET /api/architectures/, `preprocessing` on upload, `init` by checkpoint id, .pt2 downloads."""

import io
import json

import pytest
import torch

from kd_core.models.library import available
from tests.api.conftest import upload
from tests.api.test_download import add_artifact, body
from webapp.studio.models import Experiment

pytestmark = pytest.mark.django_db


def state_dict_bytes(module: torch.nn.Module) -> bytes:
    buffer = io.BytesIO()
    torch.save(module.state_dict(), buffer)
    return buffer.getvalue()


def mlp_weights(owner_client, dataset_id: int | None, classes: int = 3, **fields):
    """Upload an MLP state dict; sized against `dataset_id` when given (its class count must match then)."""
    from kd_core.models import build_model

    model = build_model({"arch": "mlp", "hidden": [8]}, (4,), classes)
    form = {
        "file": upload("w.pt", state_dict_bytes(model)),
        "arch": json.dumps({"arch": "mlp", "hidden": [8]}),
    }
    if dataset_id is not None:
        form["dataset"] = dataset_id
    return owner_client.post("/api/checkpoints/", {**form, **fields})


def test_architectures_lists_the_zoo_with_params_for_the_dataset(
    owner, other, make_dataset, owner_client, other_client
):
    dataset = make_dataset(owner)
    response = owner_client.get(f"/api/architectures/?dataset={dataset['id']}&latency=1")
    assert response.status_code == 200, response.content
    got = response.json()
    assert got["input_shape"] == [4] and got["num_classes"] == 3
    (mlp,) = got["architectures"]  # vector data: only the MLP fits (library models need images)
    assert (
        mlp["spec"]["arch"] == "mlp" and mlp["params"] == 4 * 64 + 64 + 64 * 3 + 3 and mlp["latency_ms"] > 0
    )
    if not available("torchvision"):
        assert "install torchvision" in got["unavailable"]["torchvision"]
    assert other_client.get(f"/api/architectures/?dataset={dataset['id']}").status_code == 404
    assert owner_client.get("/api/architectures/").status_code == 400


@pytest.mark.skipif(not available("torchvision"), reason="torchvision does not import here (torch 2.13)")
def test_architectures_searches_library_models_at_the_image_size(owner, client_for):
    import numpy as np

    from tests.api.conftest import upload as up

    buffer = io.BytesIO()
    np.savez(
        buffer, x=np.random.default_rng(0).random((30, 3, 32, 32), dtype=np.float32), y=np.arange(30) % 3
    )
    made = client_for(owner).post("/api/datasets/", {"name": "img", "file": up("img.npz", buffer.getvalue())})
    assert made.status_code == 201, made.content
    got = client_for(owner).get(
        f"/api/architectures/?dataset={made.json()['id']}&q=resnet18&library=torchvision"
    )
    rows = {r["spec"]["name"]: r for r in got.json()["architectures"]}
    assert rows["resnet18"]["params"] == 11_178_051  # torchvision's resnet18 with a 3-class head


def test_preprocessing_is_stored_with_an_uploaded_state_dict(owner, make_dataset, owner_client):
    dataset = make_dataset(owner)
    pre = {"mean": [0.5, 0.5, 0.5, 0.5], "std": [0.2, 0.2, 0.2, 0.2]}
    response = mlp_weights(owner_client, dataset["id"], preprocessing=json.dumps(pre))
    assert response.status_code == 201, response.content
    assert response.json()["preprocessing"] == pre
    bad = mlp_weights(owner_client, dataset["id"], preprocessing=json.dumps({"mean": [0.5]}))
    assert bad.status_code == 400 and "'mean' and 'std'" in bad.json()["error"]
    wrong = mlp_weights(
        owner_client, dataset["id"], preprocessing=json.dumps({"mean": [0.5] * 3, "std": [1] * 3})
    )
    assert wrong.status_code == 400 and "1 or 4 numbers" in wrong.json()["error"]


def test_init_takes_only_the_owners_ready_weights(owner, other, make_dataset, owner_client, other_client):
    dataset = make_dataset(owner)
    # Another class count than the dataset's: uploaded without sizing, its head is re-initialised at the start.
    mine = mlp_weights(owner_client, None, classes=5).json()
    config = {"kind": "train", "dataset": dataset["id"], "model": {"arch": "mlp", "hidden": [8]}, "epochs": 1}
    created = owner_client.post(
        "/api/experiments/", {**config, "init": mine["id"]}, content_type="application/json"
    )
    assert created.status_code == 201, created.content
    stored = Experiment.objects.get(pk=created.json()["id"]).config
    assert stored["init"] == mine["id"]

    theirs_dataset = make_dataset(other)
    other_config = {**config, "dataset": theirs_dataset["id"], "init": mine["id"]}
    refused = other_client.post("/api/experiments/", other_config, content_type="application/json")
    assert refused.status_code == 400 and "not found among your checkpoints" in refused.json()["error"]
    refused = owner_client.post(
        "/api/experiments/", {**config, "init": "x.pt"}, content_type="application/json"
    )
    assert refused.status_code == 400 and "'init'" in refused.json()["error"]


def test_a_job_with_init_starts_from_the_checkpoint(owner, make_dataset, owner_client, settings, tmp_path):
    from workers.records import resolve_inputs

    dataset = make_dataset(owner)
    mine = mlp_weights(owner_client, None, classes=5).json()
    config = {
        "kind": "train",
        "dataset": dataset["id"],
        "model": {"arch": "mlp", "hidden": [8]},
        "init": mine["id"],
    }
    created = owner_client.post("/api/experiments/", config, content_type="application/json")
    experiment = Experiment.objects.select_related("dataset", "teacher").get(pk=created.json()["id"])
    resolved, _dataset, _teacher = resolve_inputs(experiment, tmp_path)
    assert resolved.init.endswith(".pt")  # the worker hands kd_core a path
    from kd_core.checkpoints import load_init_weights
    from kd_core.models import build_model

    report = load_init_weights(build_model(resolved.model, (4,), 3), resolved.init)
    assert report["init_head_reinitialised"] is True


def test_download_the_exported_program(owner, make_experiment, owner_client):
    experiment = make_experiment(owner, status=Experiment.SUCCEEDED, name="S")
    add_artifact(experiment, "exported_program", b"pt2-bytes", filename="student.pt2")
    response = owner_client.get(f"/api/experiments/{experiment.pk}/download/?format=exported_program")
    assert response.status_code == 200 and body(response) == b"pt2-bytes"
    assert response["Content-Disposition"].endswith(f'S-{experiment.pk}.pt2"')
