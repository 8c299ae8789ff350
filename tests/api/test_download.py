"""GET /api/experiments/{id}/download/: the stored artifact as an attachment named after the experiment."""

import hashlib

import pytest
from django.core.files.base import ContentFile

from webapp.studio.models import Artifact, Experiment

pytestmark = pytest.mark.django_db


def add_artifact(experiment, kind, content: bytes, replica=None, filename="student.bin"):
    artifact = Artifact(experiment=experiment, kind=kind, replica=replica, size=len(content))
    artifact.sha256 = hashlib.sha256(content).hexdigest()
    artifact.file.save(filename, ContentFile(content))
    return artifact


def body(response) -> bytes:
    return b"".join(response.streaming_content)


def test_download_each_format(owner, make_experiment, owner_client):
    experiment = make_experiment(owner, status=Experiment.SUCCEEDED, name="My student")
    add_artifact(experiment, "safetensors", b"weights")
    add_artifact(experiment, "onnx", b"onnx-bytes")
    response = owner_client.get(f"/api/experiments/{experiment.pk}/download/")
    assert response.status_code == 200
    assert body(response) == b"weights"
    assert f'filename="My-student-{experiment.pk}.safetensors"' in response["Content-Disposition"]
    response = owner_client.get(f"/api/experiments/{experiment.pk}/download/?format=onnx")
    assert body(response) == b"onnx-bytes"
    assert response["Content-Disposition"].endswith(f'-{experiment.pk}.onnx"')
    shown = owner_client.get(f"/api/experiments/{experiment.pk}/").json()
    assert {a["kind"] for a in shown["artifacts"]} == {"safetensors", "onnx"}


def test_codistill_replicas(owner, make_experiment, owner_client):
    experiment = make_experiment(
        owner, status=Experiment.SUCCEEDED, config={"kind": "codistill"}, metrics={"best_replica": 1}
    )
    add_artifact(experiment, "torchscript", b"r0", replica=0)
    add_artifact(experiment, "torchscript", b"r1", replica=1)
    url = f"/api/experiments/{experiment.pk}/download/?format=torchscript"
    assert body(owner_client.get(url)) == b"r1"  # the best replica by default
    response = owner_client.get(url + "&replica=0")
    assert body(response) == b"r0"
    assert f"-{experiment.pk}-replica0.ts" in response["Content-Disposition"]
    missing = owner_client.get(url + "&replica=5")
    assert missing.status_code == 404 and "replica 5" in missing.json()["error"]


def test_missing_artifact_bad_format_and_other_user(
    owner, other, make_experiment, owner_client, other_client
):
    experiment = make_experiment(owner, status=Experiment.RUNNING)
    response = owner_client.get(f"/api/experiments/{experiment.pk}/download/?format=onnx")
    assert response.status_code == 404 and "running" in response.json()["error"]
    assert owner_client.get(f"/api/experiments/{experiment.pk}/download/?format=pickle").status_code == 400
    add_artifact(experiment, "safetensors", b"secret")
    assert other_client.get(f"/api/experiments/{experiment.pk}/download/").status_code == 404
