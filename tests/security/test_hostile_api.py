"""A hostile user's view of the API and pages: other users' objects, bad input, hostile uploads, errors."""

from __future__ import annotations

import io
import json
import struct
import zipfile
from pathlib import Path

import numpy as np
import pytest
from asgiref.sync import sync_to_async
from channels.testing import WebsocketCommunicator
from django.test import Client

from tests.api.conftest import npz_bytes, upload
from webapp.asgi import application
from webapp.studio import api, services
from webapp.studio.models import ApiToken, Checkpoint, Dataset, Experiment

HUGE = "99999999999999999999999"  # past every database's integer range


def _media_files(settings) -> list[Path]:
    root = Path(settings.MEDIA_ROOT)
    return [p for p in root.rglob("*") if p.is_file()] if root.exists() else []


def _foreign_checkpoint(user, dataset_id=None) -> Checkpoint:
    return Checkpoint.objects.create(
        owner=user, name="theirs", format="safetensors", file="checkpoints/x/y/t.safetensors",
        dataset_id=dataset_id, num_classes=3,
    )  # fmt: skip


# --- other users' objects are 404 everywhere ----------------------------------------------------


@pytest.mark.django_db
def test_every_experiment_endpoint_hides_foreign_experiments(owner, other, other_client, make_experiment):
    mine = make_experiment(owner, name="secret-name")
    urls = [
        f"/api/experiments/{mine.pk}/",
        f"/api/experiments/{mine.pk}/metrics/",
        f"/api/experiments/{mine.pk}/metrics/?format=csv",
        f"/api/experiments/{mine.pk}/download/",
        f"/api/experiments/{mine.pk}/download/?format=onnx&replica=0",
    ]
    for url in urls:
        response = other_client.get(url)
        assert response.status_code == 404, url
        assert response["Content-Type"] == "application/json"
        assert b"secret-name" not in response.content
    assert other_client.post(f"/api/experiments/{mine.pk}/cancel/").status_code == 404
    mine.refresh_from_db()
    assert mine.status == "queued" and not mine.cancel_requested


@pytest.mark.django_db
def test_compare_with_a_foreign_id_reveals_nothing(owner, other, owner_client, make_experiment):
    mine = make_experiment(owner, name="mine")
    theirs = make_experiment(other, name="their-secret")
    response = owner_client.get(f"/api/compare/?ids={mine.pk},{theirs.pk}")
    assert response.status_code == 404
    assert b"their-secret" not in response.content


@pytest.mark.django_db
def test_foreign_datasets_and_checkpoints_are_404(owner, other, other_client, make_dataset):
    dataset = make_dataset(owner)
    checkpoint = _foreign_checkpoint(owner)
    for url in (f"/api/datasets/{dataset['id']}/", f"/api/checkpoints/{checkpoint.pk}/"):
        assert other_client.get(url).status_code == 404
        assert other_client.delete(url).status_code == 404
    assert Dataset.objects.filter(pk=dataset["id"]).exists()
    assert Checkpoint.objects.filter(pk=checkpoint.pk).exists()
    assert other_client.get("/api/datasets/").json() == {"datasets": []}
    assert other_client.get("/api/checkpoints/").json() == {"checkpoints": []}


@pytest.mark.django_db
def test_a_registered_model_belongs_to_its_experiments_owner(
    owner, other, other_client, make_experiment, tmp_path
):
    import torch

    from kd_core.export import export_model
    from kd_core.models import build_model

    experiment = make_experiment(owner, status=Experiment.SUCCEEDED, name="kd", config={"kind": "distill"})
    model = build_model({"arch": "mlp", "hidden": [8]}, (4,), 3)
    paths = export_model(model, tmp_path, sample_inputs=torch.randn(2, 4), formats=["safetensors"])
    checkpoint = services.register_trained_model(experiment, paths["safetensors"])
    assert checkpoint.owner_id == owner.pk
    assert other_client.get("/api/checkpoints/").json() == {"checkpoints": []}
    assert other_client.get(f"/api/checkpoints/{checkpoint.pk}/").status_code == 404
    body = {"kind": "distill", "dataset": "synthetic", "teacher": checkpoint.pk, "model": {"arch": "mlp"}}
    response = other_client.post("/api/experiments/", body, content_type="application/json")
    assert response.status_code == 400 and "not found among your checkpoints" in response.json()["error"]


@pytest.mark.django_db
def test_new_experiment_cannot_use_foreign_dataset_or_teacher(owner, other, other_client, make_dataset):
    their_dataset = make_dataset(other)["id"]
    my_dataset = make_dataset(owner)["id"]
    my_teacher = _foreign_checkpoint(owner, my_dataset).pk
    model = {"arch": "mlp", "hidden": [8]}
    bodies = [
        {"kind": "train", "dataset": my_dataset, "epochs": 1, "model": model},
        {"kind": "distill", "dataset": their_dataset, "teacher": my_teacher, "epochs": 1, "model": model},
        {"kind": "train", "dataset": my_dataset, "epochs": 1, "model": model, "sweep": {"lr": [0.1, 0.2]}},
        {"kind": "train", "dataset": their_dataset, "epochs": 1, "model": model, "sweep": {"dataset": [my_dataset]}},
        {"kind": "distill", "dataset": their_dataset, "teacher": 1, "model": model, "sweep": {"teacher": [my_teacher]}},
    ]  # fmt: skip
    for body in bodies:
        response = other_client.post("/api/experiments/", body, content_type="application/json")
        assert response.status_code == 400, (body, response.content)
    assert not Experiment.objects.filter(owner=other).exists()


@pytest.mark.django_db
def test_checkpoint_upload_naming_a_foreign_dataset_is_refused(
    owner, other, other_client, make_dataset, settings
):
    dataset = make_dataset(owner)["id"]
    before = _media_files(settings)
    for value in (str(dataset), "²", "1e3", "-1", HUGE):
        response = other_client.post(
            "/api/checkpoints/", {"file": upload("t.safetensors", b"junk"), "dataset": value}
        )
        assert response.status_code == 400, (value, response.content)
        assert "error" in response.json()
    assert _media_files(settings) == before


@pytest.mark.django_db
def test_pages_hide_foreign_experiments_and_redirect_anonymous(owner, other, other_client, make_experiment):
    mine = make_experiment(owner)
    assert other_client.get(f"/experiments/{mine.pk}/").status_code == 404
    assert other_client.get(f"/experiments/{HUGE}/").status_code == 404
    assert Client().get(f"/experiments/{mine.pk}/").status_code == 302
    own = Client()
    own.force_login(owner)
    assert own.get(f"/experiments/{mine.pk}/").status_code == 200
    for url in ("/", "/datasets/", "/teachers/", "/experiments/", "/experiments/new/", "/compare/"):
        response = Client().get(url)
        assert response.status_code == 302 and response["Location"].startswith("/login/"), url


# --- the WebSocket ------------------------------------------------------------------------------


@pytest.mark.django_db(transaction=True)
@pytest.mark.asyncio
async def test_websocket_refuses_bad_tokens_query_tokens_and_huge_ids(owner, make_experiment):
    experiment = await sync_to_async(make_experiment)(owner)
    key = (await sync_to_async(ApiToken.issue)(owner))[1]
    origin = (b"origin", b"http://127.0.0.1:8000")
    cases = [
        (f"/ws/experiments/{experiment.pk}/", [origin, (b"authorization", b"Token not-a-key")], 4403),
        (f"/ws/experiments/{experiment.pk}/?token={key}", [origin], 4403),
        (f"/ws/experiments/{HUGE}/", [origin, (b"authorization", f"Token {key}".encode())], 4404),
    ]
    for path, headers, code in cases:
        ws = WebsocketCommunicator(application, path, headers=headers)
        connected, _ = await ws.connect()
        assert connected
        assert await ws.receive_output(timeout=2) == {"type": "websocket.close", "code": code}
        await ws.disconnect()
    # No Origin and no token header: not a browser page of ours, and nothing to authenticate with.
    ws = WebsocketCommunicator(application, f"/ws/experiments/{experiment.pk}/", headers=[])
    connected, _ = await ws.connect()
    assert not connected


# --- input handling -----------------------------------------------------------------------------


@pytest.mark.django_db
def test_out_of_range_and_malformed_ids_are_client_errors(owner_client, make_experiment, owner):
    experiment = make_experiment(owner)
    cases = {
        f"/api/experiments/{HUGE}/": 404,
        f"/api/datasets/{HUGE}/": 404,
        f"/api/checkpoints/{HUGE}/": 404,
        f"/api/experiments/{HUGE}/metrics/": 404,
        f"/api/compare/?ids={experiment.pk},{HUGE}": 404,
        f"/api/compare/?ids={experiment.pk},abc": 400,
        f"/api/compare/?ids={','.join(str(i) for i in range(1, 30))}": 400,
        f"/api/compare/?ids={experiment.pk}&max_points=-1": 400,
        f"/api/compare/?ids={experiment.pk}&max_points={10**9}": 400,
        f"/api/experiments/{experiment.pk}/metrics/?max_points=-1": 400,
        f"/api/experiments/{experiment.pk}/metrics/?max_points={10**9}": 400,
        f"/api/experiments/{experiment.pk}/metrics/?since=x": 400,
        f"/api/experiments/{experiment.pk}/metrics/?format=xml": 400,
        f"/api/experiments/{experiment.pk}/download/?replica=-1": 400,
        f"/api/experiments/{experiment.pk}/download/?replica=x": 400,
        f"/api/experiments/{experiment.pk}/download/?format=../../etc/passwd": 400,
        f"/api/experiments/?limit={10**9}": 400,
        f"/api/experiments/?dataset={HUGE}": 400,
        "/api/experiments/?status=<script>": 400,
    }
    for url, status in cases.items():
        response = owner_client.get(url)
        assert response.status_code == status, (url, response.content)
        assert "error" in response.json(), url


@pytest.mark.django_db
def test_bad_json_bodies_are_json_errors(owner_client, settings, make_dataset, owner):
    def post(body, content_type="application/json"):
        return owner_client.post("/api/experiments/", body, content_type=content_type)

    dataset = make_dataset(owner)["id"]
    model = {"arch": "mlp", "hidden": [8]}
    too_big = json.dumps({"name": "x" * (settings.DATA_UPLOAD_MAX_MEMORY_SIZE + 10)})
    cases = [
        (post(too_big), 413),
        (post("{not json"), 400),
        (post(b"\xff\xfe\x00"), 400),
        (post("[1, 2]"), 400),
        (post('"string"'), 400),
        (post("null"), 400),
        (post({"a": 1}, content_type="multipart/form-data; boundary=x"), 400),
        (post({"kind": "train", "dataset": dataset, "model": model, "sweep": {"lr": list(range(10_000))}}), 400),
        (post({"kind": "train", "dataset": dataset, "model": model, "sweep": {"lr": [0.1] * 9, "seed": [1] * 9}}), 400),
        (post({"kind": "train", "dataset": dataset, "model": model, "sweep": []}), 400),
        (post({"kind": "train", "dataset": dataset, "model": model, "epochs": 10**12}), 400),
        (post({"kind": "train", "dataset": dataset, "model": model, "batch_size": 0}), 400),
        (post({"kind": "train", "dataset": dataset, "model": model, "lr": float("inf")}), 400),
        (post({"kind": "train", "dataset": dataset, "model": model, "name": "n" * 5000}), 400),
        (post({"kind": "train", "dataset": int(HUGE), "model": model}), 400),
    ]  # fmt: skip
    for response, status in cases:
        assert response.status_code == status, response.content[:300]
        assert response["Content-Type"] == "application/json"
        assert "error" in response.json()
    assert not Experiment.objects.filter(owner=owner).exists()


@pytest.mark.django_db
def test_upload_form_fields_are_checked(owner_client, settings):
    for field, value in (("image_size", "²"), ("image_size", "-3"), ("image_size", "1e3")):
        response = owner_client.post("/api/datasets/", {"file": upload("d.npz", npz_bytes()), field: value})
        assert response.status_code == 400, (field, value, response.content)
    response = owner_client.post("/api/datasets/", {"file": "x"}, content_type="application/json")
    assert response.status_code == 400
    response = owner_client.post("/api/checkpoints/", {"file": upload("t.safetensors", b"x"), "arch": "{bad"})
    assert response.status_code == 400
    assert _media_files(settings) == []


@pytest.mark.django_db
def test_hostile_file_names_stay_inside_media_root(owner_client, settings):
    for name in ("../../../escape.npz", "..\\..\\escape.npz", "/etc/escape.npz", "a/../../escape.npz"):
        response = owner_client.post("/api/datasets/", {"file": upload(name, npz_bytes())})
        assert response.status_code == 201, response.content
        # The upload was ingested into a store (and then deleted): both stay inside MEDIA_ROOT.
        stored = Path(settings.MEDIA_ROOT) / Dataset.objects.get(pk=response.json()["id"]).store
        root = Path(settings.MEDIA_ROOT).resolve()
        assert stored.resolve().is_relative_to(root) and (stored / "meta.json").is_file(), stored
    assert not (Path(settings.MEDIA_ROOT).parent / "escape.npz").exists()
    assert not list(Path(settings.MEDIA_ROOT).parent.rglob("escape.npz"))
    # Stored files are never served by URL: only the owner-checked views hand them out.
    stored_name = Dataset.objects.first().store + "/x.npy"
    assert owner_client.get(f"/media/{stored_name}").status_code == 404


@pytest.mark.django_db
def test_names_are_data_not_markup_or_headers(owner_client, owner, make_experiment):
    hostile = 'a"; filename="evil.sh\r\nX-Injected: 1<script>alert(1)</script>'
    experiment = make_experiment(owner, name=hostile)
    response = owner_client.get(f"/api/experiments/{experiment.pk}/metrics/?format=csv")
    assert response.status_code == 200
    disposition = response["Content-Disposition"]
    assert "\r" not in disposition and "\n" not in disposition and disposition.count('"') == 2
    assert "X-Injected" not in response.headers
    assert response.headers["Content-Disposition"].endswith(f'-{experiment.pk}-metrics.csv"')
    assert api._slug(hostile) == "a-filename-evil.sh-X-Injected-1-script-alert-1-script"
    # JSON answers carry the name as data; the page shell never renders it.
    assert owner_client.get(f"/api/experiments/{experiment.pk}/").json()["name"] == hostile
    page = owner_client.get(f"/experiments/{experiment.pk}/")
    assert b"<script>alert(1)" not in page.content


def test_page_scripts_never_write_html():
    static = Path(__file__).resolve().parents[2] / "webapp" / "static" / "kd"
    for script in static.rglob("*.js"):
        text = script.read_text()
        for sink in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write"):
            assert sink not in text, f"{script.name} uses {sink}"
    templates = Path(__file__).resolve().parents[2] / "templates"
    for template in templates.glob("*.html"):
        text = template.read_text()
        assert "|safe" not in text and "autoescape off" not in text, template.name


# --- hostile uploads ----------------------------------------------------------------------------


def _zip(members: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return buffer.getvalue()


def _npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=True)
    return buffer.getvalue()


@pytest.mark.django_db
def test_hostile_dataset_files_are_refused_and_leave_nothing(owner_client, owner, settings):
    x = _npy(np.zeros((10, 2), np.float32))
    y = _npy(np.arange(10) % 2)
    files = {
        "pickled.npz": _zip({"x.npy": _npy(np.array([{"a": 1}] * 10, dtype=object)), "y.npy": y}),
        "notzip.npz": b"PK\x03\x04 this is not really a zip",
        "empty.npz": b"",
        "textfile.npz": b"x,y\n1,2\n",
        "climbing.zip": _zip({"../../escape/a.png": b"\x89PNG", "cls/../../b.png": b"\x89PNG"}),
        "labels-only.npz": _zip({"y.npy": y}),
        "mismatch.npz": _zip({"x.npy": x, "y.npy": _npy(np.arange(3))}),
    }
    for name, data in files.items():
        response = owner_client.post("/api/datasets/", {"file": upload(name, data)})
        assert response.status_code == 400, (name, response.content)
        assert response.json()["error"].startswith(name)
    assert not Dataset.objects.filter(owner=owner).exists()
    assert _media_files(settings) == []


class _Boom:
    def __reduce__(self):
        return (Path("/tmp/kd-security-pwned").touch, ())


@pytest.mark.django_db
def test_hostile_checkpoint_files_are_refused_and_run_nothing(owner_client, owner, settings):
    import pickle

    import torch

    pickled = io.BytesIO()
    torch.save({"w": _Boom()}, pickled)
    giant_header = struct.pack("<Q", 2**62) + b"{}"
    files = {
        "evil.pt": pickled.getvalue(),
        "raw-pickle.pth": pickle.dumps(_Boom(), protocol=2),
        "giant.safetensors": giant_header,
        "short.safetensors": struct.pack("<Q", 10_000) + b"{",
        "notonnx.onnx": b"\x08\x07garbage",
        "notts.ts": _zip({"archive/data.pkl": pickle.dumps(_Boom(), protocol=2)}),
        "evil.exe": b"MZ",
    }
    Path("/tmp/kd-security-pwned").unlink(missing_ok=True)
    for name, data in files.items():
        response = owner_client.post("/api/checkpoints/", {"file": upload(name, data)})
        assert response.status_code == 400, (name, response.content)
    assert not Path("/tmp/kd-security-pwned").exists()
    assert not Checkpoint.objects.filter(owner=owner).exists()
    assert _media_files(settings) == []


@pytest.mark.django_db
def test_checkpoint_over_the_upload_limit_is_413_and_leaves_nothing(owner_client, settings, tmp_path):
    settings.KD_MAX_UPLOAD_BYTES = 1024
    (tmp_path / "upload-tmp").mkdir()
    settings.FILE_UPLOAD_TEMP_DIR = str(
        tmp_path / "upload-tmp"
    )  # a half-received upload must not linger there either
    response = owner_client.post("/api/checkpoints/", {"file": upload("big.safetensors", b"\0" * 200_000)})
    assert response.status_code == 413 and "limit" in response.json()["error"]
    assert not Checkpoint.objects.exists()
    assert _media_files(settings) == [] and list((tmp_path / "upload-tmp").iterdir()) == []


# --- CSRF ----------------------------------------------------------------------------------------


@pytest.mark.django_db
def test_every_session_write_needs_the_csrf_token(owner, make_dataset, make_experiment, owner_token):
    dataset = make_dataset(owner)["id"]
    checkpoint = _foreign_checkpoint(owner)
    experiment = make_experiment(owner)
    client = Client(enforce_csrf_checks=True)
    client.force_login(owner)
    writes = [
        ("post", "/api/datasets/", {"file": upload("d.npz", npz_bytes())}),
        ("delete", f"/api/datasets/{dataset}/", None),
        ("post", "/api/checkpoints/", {"file": upload("t.safetensors", b"x")}),
        ("delete", f"/api/checkpoints/{checkpoint.pk}/", None),
        ("post", "/api/experiments/", None),
        ("post", f"/api/experiments/{experiment.pk}/cancel/", None),
    ]
    for method, url, data in writes:
        response = getattr(client, method)(url, data) if data else getattr(client, method)(url)
        assert response.status_code == 403, (method, url)
        assert "CSRF" in response.json()["error"]
    assert (
        Dataset.objects.filter(pk=dataset).exists() and Checkpoint.objects.filter(pk=checkpoint.pk).exists()
    )
    # A token client needs no CSRF token: no browser adds the Authorization header by itself.
    token = Client(enforce_csrf_checks=True, HTTP_AUTHORIZATION=f"Token {owner_token}")
    assert token.delete(f"/api/datasets/{dataset}/").status_code == 204


# --- errors never leak internals ----------------------------------------------------------------


@pytest.mark.django_db
def test_unexpected_errors_are_a_plain_json_500(owner, owner_client, make_experiment, monkeypatch):
    experiment = make_experiment(owner)

    def broken(_experiment):
        raise RuntimeError("secret internal detail /srv/app/settings.py")

    monkeypatch.setattr(services, "cancel_experiment", broken)
    client = Client(raise_request_exception=False)
    client.force_login(owner)
    response = client.post(f"/api/experiments/{experiment.pk}/cancel/")
    assert response.status_code == 500
    assert response["Content-Type"] == "application/json"
    assert response.json() == {"error": "internal server error; the failure was logged"}
    assert b"secret" not in response.content and b"Traceback" not in response.content


@pytest.mark.django_db
def test_healthz_names_no_hosts_outside_debug(settings, anon_client):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    settings.DEBUG = False
    settings.REDIS_URL = f"redis://kd-user:hunter2@127.0.0.1:{port}/0"
    settings.KD_HEALTHZ_MIN_WORKERS = 0
    response = anon_client.get("/healthz")
    assert response.status_code == 503
    assert response.json()["redis"] == "error: ConnectionError"
    assert str(port).encode() not in response.content and b"hunter2" not in response.content
