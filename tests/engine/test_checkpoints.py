"""Teacher loading: every format, hostile and broken files, arch mismatches, dataset fit checks."""

import hashlib
import json
import os
import pickle
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from safetensors.torch import save_file

from kd_core.checkpoints import (
    Teacher,
    check_teacher_fits,
    detect_format,
    inspect_checkpoint,
    load_student,
    load_teacher,
)
from kd_core.errors import CheckpointError
from kd_core.export import export_model
from kd_core.models import build_model, count_params

MLP = {"arch": "mlp", "hidden": [16]}
CNN = {"arch": "cnn", "channels": [4], "hidden": [8], "dropout": 0.3}


@dataclass
class Data:
    """The two fields check_teacher_fits reads from kd_core.data.Dataset."""

    input_shape: tuple
    num_classes: int | None


@pytest.fixture
def mlp():
    torch.manual_seed(0)
    return build_model(MLP, (64,), 10, {"mean": [0.5], "std": [2.0]}).eval()


@pytest.fixture
def cnn():
    torch.manual_seed(1)
    return build_model(CNN, (1, 8, 8), 4).eval()


@pytest.fixture
def exported(tmp_path, cnn):
    """The three files our export writes for a tiny CNN, plus the inputs and reference logits."""
    x = torch.rand(16, 1, 8, 8)
    paths = export_model(cnn, tmp_path / "out", sample_inputs=x, class_names=["a", "b", "c", "d"])
    with torch.no_grad():
        return paths, x, cnn(x)


def test_state_dict_round_trip_with_arch(tmp_path, mlp):
    path = tmp_path / "t.pt"
    torch.save(mlp.state_dict(), path)
    teacher = load_teacher(path, arch=MLP, input_shape=(64,), num_classes=10)
    assert teacher.format == "state_dict" and detect_format(path) == "state_dict"
    assert teacher.num_params == count_params(mlp) and teacher.input_shape == (64,)
    assert teacher.fingerprint == hashlib.sha256(path.read_bytes()).hexdigest()
    x = torch.rand(7, 64)
    out = teacher.logits(x)
    assert out.dtype == torch.float32 and not out.requires_grad
    torch.testing.assert_close(out, mlp(x))


@pytest.mark.parametrize("wrap", ["state_dict", "model", "module_prefix"])
def test_common_state_dict_wrappers_are_accepted(tmp_path, mlp, wrap):
    sd = mlp.state_dict()
    obj = {"module." + k: v for k, v in sd.items()} if wrap == "module_prefix" else {wrap: sd, "epoch": 3}
    torch.save(obj, tmp_path / "t.pth")
    # The class count comes from classifier.weight when not given.
    teacher = load_teacher(tmp_path / "t.pth", arch=MLP, input_shape=(64,))
    assert teacher.num_classes == 10
    torch.testing.assert_close(teacher.logits(torch.ones(2, 64)), mlp(torch.ones(2, 64)))


def test_state_dict_without_normalisation_buffers_uses_given_preprocessing(tmp_path, mlp):
    sd = {k: v for k, v in mlp.state_dict().items() if k not in ("mean", "std")}
    torch.save(sd, tmp_path / "t.pt")
    teacher = load_teacher(
        tmp_path / "t.pt", arch=MLP, input_shape=(64,), preprocessing={"mean": [0.5], "std": [2.0]}
    )
    torch.testing.assert_close(teacher.logits(torch.ones(2, 64)), mlp(torch.ones(2, 64)))


def test_state_dict_needs_arch_and_input_shape(tmp_path, mlp):
    torch.save(mlp.state_dict(), tmp_path / "t.pt")
    with pytest.raises(CheckpointError, match="give 'arch'"):
        load_teacher(tmp_path / "t.pt", input_shape=(64,))
    with pytest.raises(CheckpointError, match="input shape is unknown"):
        load_teacher(tmp_path / "t.pt", arch=MLP)


def test_key_and_shape_mismatches_are_listed(tmp_path, mlp):
    torch.save(mlp.state_dict(), tmp_path / "t.pt")
    with pytest.raises(CheckpointError, match=r"missing features\.3\.weight, features\.3\.bias"):
        load_teacher(tmp_path / "t.pt", arch={"arch": "mlp", "hidden": [16, 8]}, input_shape=(64,))
    with pytest.raises(CheckpointError, match=r"unexpected features\.1\.weight, features\.1\.bias"):
        load_teacher(tmp_path / "t.pt", arch={"arch": "mlp", "hidden": []}, input_shape=(64,))
    with pytest.raises(
        CheckpointError, match=r"shapes do not match.*features\.1\.weight: file \(16, 64\), arch \(32, 64\)"
    ):
        load_teacher(tmp_path / "t.pt", arch={"arch": "mlp", "hidden": [32]}, input_shape=(64,))
    with pytest.raises(CheckpointError, match="needs image input"):
        load_teacher(tmp_path / "t.pt", arch={"arch": "cnn"}, input_shape=(64,))


def test_non_finite_and_non_tensor_state_dicts_are_refused(tmp_path, mlp):
    sd = mlp.state_dict()
    sd["classifier.bias"] = sd["classifier.bias"].clone().fill_(float("nan"))
    torch.save(sd, tmp_path / "nan.pt")
    with pytest.raises(CheckpointError, match="NaN"):
        load_teacher(tmp_path / "nan.pt", arch=MLP, input_shape=(64,))
    for name, obj in {"ints.pt": {"a": 1}, "list.pt": [torch.zeros(1)], "empty.pt": {}}.items():
        torch.save(obj, tmp_path / name)
        with pytest.raises(CheckpointError, match="name -> tensor"):
            load_teacher(tmp_path / name, arch=MLP, input_shape=(64,))


class _Payload:
    """Unpickling this would run a shell command that creates a file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
@pytest.mark.parametrize("how", ["torch_zip", "raw_pickle", "wrapped"])
def test_a_pickled_payload_is_refused_and_never_runs(tmp_path, how):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    if how == "torch_zip":
        torch.save({"weight": _Payload(marker)}, path)
    elif how == "wrapped":
        torch.save({"state_dict": {"w": torch.zeros(1)}, "extra": _Payload(marker)}, path)
    else:
        path.write_bytes(pickle.dumps(_Payload(marker)))
    for call in (
        lambda: load_teacher(path, arch=MLP, input_shape=(64,)),
        lambda: inspect_checkpoint(path, arch=MLP),
    ):
        # A bare pickle is not even a torch.save zip: kd_core.file_guards refuses it before torch.load.
        with pytest.raises(CheckpointError, match=r"holds a pickled Python object|not a readable|not a zip"):
            call()
    assert not marker.exists()


def _garbage(path: Path) -> Path:
    path.write_bytes(np.random.default_rng(0).bytes(2000))
    return path


@pytest.mark.parametrize("name", ["student.safetensors", "student.ts", "student.onnx", "weights.pt"])
def test_truncated_and_garbage_files_are_refused(tmp_path, exported, mlp, name):
    paths, _, _ = exported
    if name == "weights.pt":
        source = tmp_path / "full.pt"
        torch.save(mlp.state_dict(), source)
    else:
        source = paths[
            {"safetensors": "safetensors", "ts": "torchscript", "onnx": "onnx"}[name.split(".")[1]]
        ]
    data = source.read_bytes()
    truncated = tmp_path / f"cut_{name}"
    truncated.write_bytes(data[: len(data) // 2])
    for path in (truncated, _garbage(tmp_path / f"junk_{name}")):
        with pytest.raises(CheckpointError):
            load_teacher(path, arch=MLP, input_shape=(64,))
        with pytest.raises(CheckpointError):
            inspect_checkpoint(path, arch=MLP)


def test_unknown_extension_and_missing_file_are_refused(tmp_path):
    (tmp_path / "model.pkl").write_bytes(b"x")
    with pytest.raises(CheckpointError, match="unsupported checkpoint type"):
        load_teacher(tmp_path / "model.pkl")
    with pytest.raises(CheckpointError, match="does not exist"):
        load_teacher(tmp_path / "nope.onnx")


def test_every_exported_format_loads_as_a_teacher(exported):
    paths, x, ref = exported
    for fmt, path in paths.items():
        teacher = load_teacher(path)
        assert isinstance(teacher, Teacher)
        assert teacher.format == fmt
        assert (teacher.input_shape, teacher.num_classes) == ((1, 8, 8), 4)
        assert teacher.class_names == ["a", "b", "c", "d"]
        assert teacher.spec["arch"] == "cnn"
        torch.testing.assert_close(teacher.logits(x), ref, atol=1e-5, rtol=1e-4)
        info = inspect_checkpoint(path)
        assert json.loads(json.dumps(info)) == info
        assert info["format"] == fmt and info["num_params"] == count_params(build_model(CNN, (1, 8, 8), 4))


def test_logits_follow_input_dtype_device_and_batch_in_chunks(exported):
    paths, x, ref = exported
    for fmt in ("safetensors", "onnx"):
        teacher = load_teacher(paths[fmt]).to("cpu")
        teacher._batch = 3  # forces several chunks on 16 rows
        out = teacher.logits(x.double().requires_grad_())
        assert out.dtype == torch.float32 and not out.requires_grad
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-4)
        assert teacher.logits(x[:0]).shape[0] == 0
        with pytest.raises(CheckpointError, match=r"expects input \(1, 8, 8\)"):
            teacher.logits(torch.rand(2, 64))


def test_dropout_is_off_in_a_teacher(tmp_path, cnn):
    torch.save(cnn.train().state_dict(), tmp_path / "t.pt")
    teacher = load_teacher(tmp_path / "t.pt", arch=CNN, input_shape=(1, 8, 8))
    x = torch.rand(4, 1, 8, 8)
    torch.testing.assert_close(teacher.logits(x), teacher.logits(x))


def test_loading_a_teacher_leaves_the_global_rng_alone(tmp_path, mlp):
    torch.save(mlp.state_dict(), tmp_path / "t.pt")
    torch.manual_seed(5)
    expected = torch.rand(3)
    torch.manual_seed(5)
    load_teacher(tmp_path / "t.pt", arch=MLP, input_shape=(64,))
    torch.testing.assert_close(torch.rand(3), expected)


def test_safetensors_without_metadata_needs_arch(tmp_path, mlp):
    path = tmp_path / "bare.safetensors"
    save_file({k: v.contiguous() for k, v in mlp.state_dict().items()}, str(path))
    with pytest.raises(CheckpointError, match="give 'arch'"):
        load_teacher(path, input_shape=(64,))
    teacher = load_teacher(path, arch=MLP, input_shape=(64,), num_classes=10)
    torch.testing.assert_close(teacher.logits(torch.ones(1, 64)), mlp(torch.ones(1, 64)))
    info = inspect_checkpoint(path)
    assert info == {
        "format": "safetensors",
        "num_params": count_params(mlp),
        "input_shape": None,
        "num_classes": 10,
        "spec": None,
        "class_names": None,
    }


@pytest.mark.parametrize(
    "meta, match",
    [
        ({"spec": "{not json"}, "not valid JSON"),
        ({"spec": json.dumps({"arch": "vit"})}, "spec in its metadata is invalid"),
        ({"input_shape": json.dumps([0, 3])}, "'input_shape' is malformed"),
        ({"class_names": json.dumps([1, 2])}, "'class_names' is malformed"),
    ],
)
def test_malformed_metadata_is_refused(tmp_path, mlp, meta, match):
    path = tmp_path / "m.safetensors"
    save_file({k: v.contiguous() for k, v in mlp.state_dict().items()}, str(path), metadata=meta)
    with pytest.raises(CheckpointError, match=match):
        load_teacher(path, arch=MLP, input_shape=(64,))


def test_torchscript_without_metadata_learns_its_shape_from_the_dataset(tmp_path, cnn):
    path = tmp_path / "scripted.pt"  # a TorchScript archive under .pt is recognised by its contents
    torch.jit.save(torch.jit.script(cnn), str(path))
    assert detect_format(path) == "torchscript"
    info = inspect_checkpoint(path)
    assert (info["format"], info["input_shape"], info["num_classes"]) == ("torchscript", None, None)
    teacher = load_teacher(path)
    check_teacher_fits(teacher, Data((1, 8, 8), 4))
    assert (teacher.input_shape, teacher.num_classes) == ((1, 8, 8), 4)
    assert load_teacher(path, input_shape=(1, 8, 8)).num_classes == 4
    with pytest.raises(CheckpointError, match=r"does not run on input \(64,\)"):
        load_teacher(path, input_shape=(64,))


@pytest.mark.filterwarnings("ignore:You are using the legacy TorchScript-based ONNX export")
def test_onnx_with_a_fixed_batch_and_no_metadata(tmp_path, mlp):
    path = tmp_path / "fixed.onnx"
    torch.onnx.export(mlp, (torch.rand(4, 64),), str(path), dynamo=False, opset_version=17)
    teacher = load_teacher(path)
    assert (teacher.input_shape, teacher.num_classes, teacher.spec) == ((64,), 10, None)
    x = torch.rand(10, 64)  # 10 rows through a graph that takes exactly 4: padded chunks
    torch.testing.assert_close(teacher.logits(x), mlp(x), atol=1e-5, rtol=1e-4)


def test_onnx_external_data_is_refused(tmp_path, exported):
    paths, _, _ = exported
    proto = onnx.load(str(paths["onnx"]))
    tensor = proto.graph.initializer[0]
    tensor.ClearField("raw_data")
    tensor.data_location = onnx.TensorProto.EXTERNAL
    entry = tensor.external_data.add()
    entry.key, entry.value = "location", "../../../../etc/passwd"
    onnx.save(proto, str(tmp_path / "ext.onnx"))
    with pytest.raises(CheckpointError, match="tensor data in an external file"):
        load_teacher(tmp_path / "ext.onnx")


def test_check_teacher_fits_names_both_sides(tmp_path, mlp, exported):
    torch.save(mlp.state_dict(), tmp_path / "t.pt")
    # The file's class count wins over the dataset's hint, so the mismatch is reported plainly.
    assert load_teacher(tmp_path / "t.pt", arch=MLP, input_shape=(64,), num_classes=3).num_classes == 10
    teacher = load_teacher(tmp_path / "t.pt", arch=MLP, input_shape=(64,))
    check_teacher_fits(teacher, Data((64,), 10))
    check_teacher_fits(teacher, Data((64,), None))  # a transfer set takes the teacher's classes
    with pytest.raises(CheckpointError) as err:
        check_teacher_fits(teacher, Data((1, 8, 8), 10))
    assert (
        str(err.value)
        == "teacher expects input (64,) and 10 classes; dataset has input (1, 8, 8) and 10 classes"
    )
    with pytest.raises(CheckpointError, match="and 10 classes; dataset has input \\(64,\\) and 3 classes"):
        check_teacher_fits(teacher, Data((64,), 3))
    onnx_teacher = load_teacher(exported[0]["onnx"])
    with pytest.raises(CheckpointError, match=r"teacher expects input \(1, 8, 8\) and 4 classes"):
        check_teacher_fits(onnx_teacher, Data((1, 8, 8), 10))


def test_load_student_rebuilds_our_exports_only(tmp_path, exported, mlp):
    paths, x, ref = exported
    student = load_student(paths["safetensors"])
    assert student.spec["arch"] == "cnn" and not student.training
    with torch.no_grad():
        torch.testing.assert_close(student(x), ref)
    bare = tmp_path / "bare.safetensors"
    save_file({k: v.contiguous() for k, v in mlp.state_dict().items()}, str(bare))
    with pytest.raises(CheckpointError, match="lacks 'spec'"):
        load_student(bare)
    with pytest.raises(CheckpointError, match="exported .safetensors"):
        load_student(paths["onnx"])
