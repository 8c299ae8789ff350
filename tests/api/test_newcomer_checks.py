"""What a newcomer's bad launch gets back: every bad field at once, mismatches in names, a useless codistillation refused."""

import pytest

from webapp.studio.models import Checkpoint, Experiment

pytestmark = pytest.mark.django_db


def post(client, body, capture):
    with capture(execute=True):
        return client.post("/api/experiments/", body, content_type="application/json")


def base(dataset_id: int, **extra) -> dict:
    return {
        "kind": "train",
        "dataset": dataset_id,
        "model": {"arch": "mlp", "hidden": [8]},
        "epochs": 2,
        **extra,
    }


def teacher_for(owner, name: str = "wide teacher", **fields) -> Checkpoint:
    return Checkpoint.objects.create(
        owner=owner, name=name, format="safetensors", file="t.safetensors", num_params=100,
        status=Checkpoint.READY, **fields,
    )  # fmt: skip


def test_every_bad_field_is_named_at_once(
    owner, make_dataset, owner_client, django_capture_on_commit_callbacks
):
    dataset = make_dataset(owner)
    teacher = teacher_for(owner, num_classes=3, input_shape=[4])
    body = base(dataset["id"], kind="distill", teacher=teacher.pk, epochs=0, lr=-1, temperature=0, alpha=2)
    response = post(owner_client, body, django_capture_on_commit_callbacks)
    assert response.status_code == 400
    answer = response.json()
    assert set(answer["fields"]) == {"epochs", "lr", "temperature", "alpha"}
    assert answer["error"].startswith("4 problems:")
    for key in ("'epochs'", "'lr'", "'temperature'", "'alpha'"):
        assert key in answer["error"]
    assert "got 0" in answer["fields"]["epochs"] and "-1" in answer["fields"]["lr"]
    assert not Experiment.objects.exists()


def test_nested_fields_are_keyed_by_their_path(
    owner, make_dataset, owner_client, django_capture_on_commit_callbacks
):
    dataset = make_dataset(owner)
    body = base(dataset["id"], kind="codistill", model={"arch": "mlp", "hidden": [0]}, batch_size=0,
                codistill={"replicas": 0, "weight": -1})  # fmt: skip
    answer = post(owner_client, body, django_capture_on_commit_callbacks).json()
    assert set(answer["fields"]) == {"model.hidden", "batch_size", "codistill.replicas", "codistill.weight"}


def test_one_bad_field_keeps_the_plain_error(
    owner, make_dataset, owner_client, django_capture_on_commit_callbacks
):
    dataset = make_dataset(owner)
    answer = post(owner_client, base(dataset["id"], lr=-1), django_capture_on_commit_callbacks).json()
    assert answer["error"] == "'lr' must be >= 1e-12, got -1" and list(answer["fields"]) == ["lr"]


def test_teacher_mismatches_are_refused_in_names(
    owner, make_dataset, owner_client, django_capture_on_commit_callbacks
):
    dataset = make_dataset(owner, name="three blobs")  # 4 features, 3 classes
    five = teacher_for(owner, "five-class teacher", num_classes=5, input_shape=[4])
    response = post(
        owner_client, base(dataset["id"], kind="distill", teacher=five.pk), django_capture_on_commit_callbacks
    )
    assert response.status_code == 400
    error = response.json()["error"]
    assert "“five-class teacher”" in error and "“three blobs”" in error
    assert "5 classes" in error and "has 3" in error and f"teacher {five.pk}" not in error
    assert "teacher" in response.json()["fields"]

    wide = teacher_for(owner, "eight-input teacher", num_classes=3, input_shape=[8])
    response = post(
        owner_client, base(dataset["id"], kind="distill", teacher=wide.pk), django_capture_on_commit_callbacks
    )
    assert response.status_code == 400
    assert "shape 8 but the dataset's are 4" in response.json()["error"]

    # An ONNX teacher with an open batch-like dimension fits any size there.
    open_dim = teacher_for(owner, "open teacher", num_classes=3, input_shape=["features"])
    response = post(
        owner_client,
        base(dataset["id"], kind="distill", teacher=open_dim.pk),
        django_capture_on_commit_callbacks,
    )
    assert response.status_code == 201, response.content


def test_codistillation_whose_burn_in_outlasts_the_run_is_refused(
    owner, make_dataset, owner_client, django_capture_on_commit_callbacks
):
    dataset = make_dataset(owner)  # 60 samples: 42 for training, one batch of 64 per epoch
    body = base(
        dataset["id"], kind="codistill", epochs=3, codistill={"replicas": 2}
    )  # burn-in 200 by default
    response = post(owner_client, body, django_capture_on_commit_callbacks)
    assert response.status_code == 400
    answer = response.json()
    assert "burn-in is 200 steps" in answer["error"] and "about 3 steps" in answer["error"]
    assert "Set burn-in below 3" in answer["error"]
    assert "codistill.burn_in_steps" in answer["fields"]
    assert not Experiment.objects.exists()

    body["codistill"]["burn_in_steps"] = 1
    assert post(owner_client, body, django_capture_on_commit_callbacks).status_code == 201


def test_a_corrupt_onnx_file_gets_a_plain_message(owner_client):
    from django.core.files.uploadedfile import SimpleUploadedFile

    junk = SimpleUploadedFile("teacher.onnx", bytes(range(256)) * 8, content_type="application/octet-stream")
    response = owner_client.post("/api/checkpoints/", {"name": "broken", "file": junk})
    assert response.status_code == 400
    error = response.json()["error"]
    assert error.startswith("teacher.onnx: ") and "damaged" in error and "torch.onnx.export" in error
    assert "ModelProto" not in error and "Wire format" not in error
    assert not Checkpoint.objects.exists()
