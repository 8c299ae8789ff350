"""Hostile model files through POST /api/checkpoints/: TorchScript programs and ONNX graphs that try to escape.

Every file here is refused with a 400 naming why, leaks nothing, leaves no file behind, and the server
answers the next request. TorchScript and ONNX run only in kd_core's sandbox child (see kd_core/sandbox.py).
"""

import io
import json
import time
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from django.conf import settings
from onnx import TensorProto, helper

from kd_core.sandbox import landlock_abi
from tests.api.conftest import upload
from webapp.studio.models import Checkpoint
from workers import inspection

pytestmark = [
    pytest.mark.django_db,
    pytest.mark.skipif(
        landlock_abi() < 1, reason="this kernel has no Landlock: sandboxed formats are refused"
    ),
]


def stored_files() -> list[Path]:
    """Checkpoint files in storage (datasets the tests upload live elsewhere)."""
    root = Path(settings.MEDIA_ROOT) / "checkpoints"
    return [p for p in root.rglob("*") if p.is_file()] if root.exists() else []


def script_bytes(module: torch.nn.Module) -> bytes:
    buffer = io.BytesIO()
    torch.jit.save(torch.jit.script(module), buffer)
    return buffer.getvalue()


@pytest.fixture
def secret(tmp_path) -> Path:
    path = tmp_path / "server-secrets.env"
    path.write_text("SECRET_KEY=do-not-leak-me-0123456789\n")
    return path


def post(client, name: str, content: bytes, **fields):
    return client.post("/api/checkpoints/", {"file": upload(name, content), **fields})


def refused(response, *needles: str) -> str:
    assert response.status_code == 400, (response.status_code, response.content[:500])
    error = response.json()["error"]
    for needle in needles:
        assert needle in error, error
    assert not Checkpoint.objects.exists() and stored_files() == []
    return error


# ---------------------------------------------------------------- TorchScript


class ReadFile(torch.nn.Module):
    """Reads a file's bytes and returns them through the logits (the attack of issue 10)."""

    def __init__(self, path: str, shared: bool = False) -> None:
        super().__init__()
        self.path = path
        self.shared = shared

    def forward(self, x):
        leaked = torch.from_file(self.path, shared=self.shared, size=16, dtype=torch.uint8)
        return x.sum(dim=1, keepdim=True) + leaked.float().view(1, 16)


class ReadOnLoad(torch.nn.Module):
    """Reads a file while being deserialised (__setstate__ runs inside torch.jit.load)."""

    def __init__(self, path: str) -> None:
        super().__init__()
        self.path = path
        self.w = torch.zeros(4, 3)

    def forward(self, x):
        return x @ self.w

    @torch.jit.export
    def __getstate__(self) -> tuple[str, torch.Tensor]:
        return (self.path, self.w)

    @torch.jit.export
    def __setstate__(self, state: tuple[str, torch.Tensor]) -> None:
        self.path = state[0]
        self.training = False
        self.w = torch.from_file(self.path, shared=False, size=12, dtype=torch.uint8).float().view(4, 3)


class Forever(torch.nn.Module):
    def forward(self, x):
        i = 0
        while i >= 0:
            x = x + 0.0
            i = i * 1
        return x


class Printer(torch.nn.Module):
    def forward(self, x):
        print("hello from the teacher")
        return x


class Flat(torch.nn.Module):
    def forward(self, x):
        return x.sum()


def test_reading_a_secret_through_the_logits_is_refused_naming_the_op(
    owner, make_dataset, owner_client, secret
):
    dataset = make_dataset(owner)
    response = post(owner_client, "evil.ts", script_bytes(ReadFile(str(secret))), dataset=dataset["id"])
    error = refused(response, "evil.ts", "aten::from_file")
    assert "do-not-leak" not in response.content.decode() and "SECRET_KEY" not in error


def test_writing_a_file_with_shared_from_file_is_refused_and_creates_nothing(
    owner, make_dataset, owner_client, tmp_path
):
    target = tmp_path / "planted.bin"
    dataset = make_dataset(owner)
    response = post(
        owner_client, "writer.ts", script_bytes(ReadFile(str(target), shared=True)), dataset=dataset["id"]
    )
    refused(response, "aten::from_file")
    assert not target.exists()


def test_reading_during_load_gets_nothing(owner_client, secret):
    response = post(owner_client, "onload.ts", script_bytes(ReadOnLoad(str(secret))))
    error = refused(response, "onload.ts")
    assert "do-not-leak" not in error


def test_reading_a_readable_file_during_load_is_still_refused_by_the_op_check(owner_client):
    # torch's own files are inside the sandbox's read allowlist, so load succeeds; the op check then refuses.
    response = post(owner_client, "onload.ts", script_bytes(ReadOnLoad(torch.__file__)))
    refused(response, "aten::from_file", "__setstate__")


def test_a_forward_that_never_returns_is_stopped_and_the_server_answers(
    owner, make_dataset, owner_client, monkeypatch
):
    monkeypatch.setenv("KD_SANDBOX_INSPECT_WALL_S", "3")
    dataset = make_dataset(owner)
    start = time.monotonic()
    response = post(owner_client, "forever.ts", script_bytes(Forever()), dataset=dataset["id"])
    elapsed = time.monotonic() - start
    refused(response, "forever.ts", "longer than 3 s")
    assert elapsed < 15, elapsed
    assert owner_client.get("/api/checkpoints/").status_code == 200


def test_printing_is_refused(owner_client):
    refused(post(owner_client, "print.ts", script_bytes(Printer())), "prim::Print")


def test_output_that_is_not_batch_by_classes_is_refused(owner, make_dataset, owner_client):
    dataset = make_dataset(owner)
    refused(post(owner_client, "flat.ts", script_bytes(Flat()), dataset=dataset["id"]), "(batch, classes)")


def test_class_count_must_match_the_dataset(owner, make_dataset, owner_client):
    dataset = make_dataset(owner)  # 4 features, 3 classes
    module = torch.nn.Linear(4, 5)
    refused(post(owner_client, "five.ts", script_bytes(module), dataset=dataset["id"]), "5 classes", "has 3")
    response = post(owner_client, "three.ts", script_bytes(torch.nn.Linear(4, 3)), dataset=dataset["id"])
    assert response.status_code == 201, response.content
    body = response.json()
    assert (body["format"], body["num_classes"], body["input_shape"], body["status"]) == (
        "torchscript",
        3,
        [4],
        "ready",
    )


# ---------------------------------------------------------------- ONNX


def onnx_model(*, nodes=(), initializers=(), secret_location: str | None = None) -> onnx.ModelProto:
    """x (N, 4) @ W (4, 3) -> logits; extra nodes/initializers are added as given."""
    w = helper.make_tensor("W", TensorProto.FLOAT, [4, 3], np.ones(12, np.float32).tolist())
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["logits"]), *nodes],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 3])],
        [w, *initializers],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def external(tensor: onnx.TensorProto, location: str) -> onnx.TensorProto:
    tensor.ClearField("raw_data")
    tensor.ClearField("float_data")
    tensor.ClearField("int64_data")
    tensor.data_location = TensorProto.EXTERNAL
    entry = tensor.external_data.add()
    entry.key, entry.value = "location", location
    return tensor


def test_a_plain_onnx_model_runs_in_the_sandbox(owner, make_dataset, owner_client):
    dataset = make_dataset(owner)
    response = post(owner_client, "ok.onnx", onnx_model().SerializeToString(), dataset=dataset["id"])
    assert response.status_code == 201, response.content
    assert (response.json()["num_classes"], response.json()["input_shape"]) == (3, [4])


def test_onnx_external_initializer_is_refused(owner_client, secret):
    model = onnx_model()
    external(model.graph.initializer[0], str(secret))
    refused(post(owner_client, "ext.onnx", model.SerializeToString()), "external file")


def test_onnx_sparse_constant_with_external_values_is_refused(owner_client, secret):
    values = external(helper.make_tensor("v", TensorProto.FLOAT, [1], [1.0]), str(secret))
    indices = helper.make_tensor("i", TensorProto.INT64, [1], [0])
    sparse = helper.make_sparse_tensor(values, indices, [4])
    const = helper.make_node("Constant", [], ["c"], sparse_value=sparse)
    refused(post(owner_client, "sparse.onnx", onnx_model(nodes=[const]).SerializeToString()), "external file")


def test_onnx_external_data_in_a_subgraph_is_refused(owner_client, secret):
    hidden = external(helper.make_tensor("h", TensorProto.FLOAT, [3], [0.0, 0.0, 0.0]), str(secret))
    branch = helper.make_graph(
        [helper.make_node("Identity", ["h"], ["out"])],
        "branch",
        [],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, [3])],
        [hidden],
    )
    cond = helper.make_tensor("cond", TensorProto.BOOL, [], [True])
    node = helper.make_node("If", ["cond"], ["unused"], then_branch=branch, else_branch=branch)
    model = onnx_model(nodes=[node], initializers=[cond])
    refused(post(owner_client, "sub.onnx", model.SerializeToString()), "external file")


def test_onnx_external_data_in_training_info_is_refused(owner_client, secret):
    model = onnx_model()
    info = model.training_info.add()
    info.initialization.CopyFrom(
        helper.make_graph(
            [], "init", [], [], [external(helper.make_tensor("t", TensorProto.FLOAT, [1], [0.0]), "x")]
        )
    )
    refused(post(owner_client, "train.onnx", model.SerializeToString()), "external file")


def test_onnx_custom_domain_op_is_refused(owner_client):
    node = helper.make_node("ReadFile", ["x"], ["y"], domain="evil.ops")
    model = onnx_model(nodes=[node])
    model.opset_import.append(helper.make_opsetid("evil.ops", 1))
    refused(post(owner_client, "custom.onnx", model.SerializeToString()), "evil.ops")


# ---------------------------------------------------------------- large uploads: a worker inspects


def test_large_upload_is_inspected_by_a_worker_and_unusable_until_ready(
    owner, make_dataset, owner_client, settings, django_capture_on_commit_callbacks, secret
):
    dataset = make_dataset(owner)
    settings.KD_SYNC_INSPECT_MAX_BYTES = 0  # every file counts as large from here on
    good = post(owner_client, "good.ts", script_bytes(torch.nn.Linear(4, 3)), dataset=dataset["id"])
    bad = post(owner_client, "bad.ts", script_bytes(ReadFile(str(secret))), dataset=dataset["id"])
    assert (good.status_code, bad.status_code) == (202, 202)
    assert good.json()["status"] == bad.json()["status"] == "inspecting"
    experiment = {"kind": "distill", "dataset": dataset["id"], "model": {"arch": "mlp", "hidden": [8]}}
    with django_capture_on_commit_callbacks(execute=True):
        response = owner_client.post(
            "/api/experiments/", {**experiment, "teacher": good.json()["id"]}, content_type="application/json"
        )
    assert response.status_code == 400 and "still being inspected" in response.json()["error"]
    # What the worker's task does (workers.inspect_checkpoint -> workers.inspection.inspect_checkpoint).
    assert inspection.inspect_checkpoint(good.json()["id"]) == "ready"
    assert inspection.inspect_checkpoint(bad.json()["id"]) == "failed"
    settled = owner_client.get(f"/api/checkpoints/{good.json()['id']}/").json()
    assert (settled["status"], settled["num_classes"], settled["input_shape"]) == ("ready", 3, [4])
    failed = owner_client.get(f"/api/checkpoints/{bad.json()['id']}/").json()
    assert failed["status"] == "failed" and "aten::from_file" in failed["error"]
    assert "do-not-leak" not in json.dumps(failed)
    assert not Path(Checkpoint.objects.get(pk=bad.json()["id"]).file.path).exists()
    with django_capture_on_commit_callbacks(execute=True):
        response = owner_client.post(
            "/api/experiments/", {**experiment, "teacher": bad.json()["id"]}, content_type="application/json"
        )
    assert response.status_code == 400 and "failed inspection" in response.json()["error"]


def test_stale_inspections_fail_in_cleanup(owner, owner_client, settings):
    settings.KD_SYNC_INSPECT_MAX_BYTES = 0
    response = post(owner_client, "slow.ts", script_bytes(torch.nn.Linear(4, 3)))
    assert response.status_code == 202
    assert inspection.fail_stale_inspections(max_age_s=0) == 1
    row = Checkpoint.objects.get(pk=response.json()["id"])
    assert row.status == "failed" and "did not finish" in row.error and stored_files() == []


# ---------------------------------------------------------------- torch.export programs (.pt2)


def exported_bytes(module: torch.nn.Module, example: torch.Tensor, inject_print: bool = False) -> bytes:
    """A .pt2 archive of `module`; `inject_print` adds an aten::_print node (output to the server) to its graph."""
    program = torch.export.export(module.eval(), (example,))
    if inject_print:
        graph = program.graph_module.graph
        first = next(n for n in graph.nodes if n.op == "placeholder")
        with graph.inserting_after(first):
            node = graph.call_function(torch.ops.aten._print.default, ("do-not-leak",))
            node.meta["val"] = None
        program.graph_module.recompile()
    buffer = io.BytesIO()
    torch.export.save(program, buffer)
    return buffer.getvalue()


def test_a_plain_exported_program_is_accepted(owner, make_dataset, owner_client):
    dataset = make_dataset(owner)
    module = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
    response = post(owner_client, "net.pt2", exported_bytes(module, torch.rand(2, 4)), dataset=dataset["id"])
    assert response.status_code == 201, response.content[:500]
    body = response.json()
    assert (body["format"], body["num_classes"], body["input_shape"]) == ("exported_program", 3, [4])


def test_an_exported_program_with_a_refused_op_is_refused_naming_it(owner, make_dataset, owner_client):
    dataset = make_dataset(owner)
    content = exported_bytes(torch.nn.Linear(4, 3), torch.rand(2, 4), inject_print=True)
    error = refused(post(owner_client, "print.pt2", content, dataset=dataset["id"]), "aten::_print")
    assert "do-not-leak" not in error


def test_a_damaged_exported_program_is_refused(owner_client):
    content = exported_bytes(torch.nn.Linear(4, 3), torch.rand(2, 4))
    refused(post(owner_client, "cut.pt2", content[: len(content) // 2]), "torch.export")
