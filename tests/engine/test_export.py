"""Export: safetensors / TorchScript / ONNX round trips, verification before rename, standalone loading."""

import json
import subprocess
import sys
import textwrap

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from safetensors import safe_open

from kd_core import __version__
from kd_core.checkpoints import load_student, load_teacher
from kd_core.errors import KDError
from kd_core.export import export_model
from kd_core.models import KDModel, build_model, count_params

CASES = {
    "mlp": ({"arch": "mlp", "hidden": [16], "dropout": 0.2}, (10,)),
    "cnn": ({"arch": "cnn", "channels": [4, 8], "hidden": [8]}, (1, 8, 8)),
    "resnet": ({"arch": "resnet", "depth": 8, "width": 1}, (3, 8, 8)),
}


def _trained_like(spec, shape, classes=3):
    """A tiny model whose BatchNorm statistics are not the defaults, as after training."""
    torch.manual_seed(0)
    channels = shape[0]
    model = build_model(spec, shape, classes, {"mean": [0.2] * channels, "std": [0.5] * channels})
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.rand(8, *shape) * 2)
    return model.eval()


@pytest.mark.parametrize("name", list(CASES))
def test_round_trip_of_every_format(tmp_path, name):
    spec, shape = CASES[name]
    model = _trained_like(spec, shape)
    x = torch.rand(12, *shape)
    with torch.no_grad():
        ref = model(x)
    paths = export_model(
        model, tmp_path, class_names=["a", "b", "c"], sample_inputs=x, extra_metadata={"val_acc": 0.75}
    )
    assert {k: p.name for k, p in paths.items()} == {
        "safetensors": "student.safetensors",
        "torchscript": "student.ts",
        "onnx": "student.onnx",
        "exported_program": "student.pt2",
    }
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "student.onnx",
        "student.pt2",
        "student.safetensors",
        "student.ts",
    ]

    with safe_open(str(paths["safetensors"]), framework="pt") as f:
        meta = {k: json.loads(v) for k, v in f.metadata().items()}
    assert meta["spec"] == model.spec and meta["input_shape"] == list(shape) and meta["num_classes"] == 3
    assert meta["class_names"] == ["a", "b", "c"] and meta["val_acc"] == 0.75
    assert meta["kd_studio_version"] == __version__ and meta["preprocessing"]["std"] == [0.5] * shape[0]

    student = load_student(paths["safetensors"])
    with torch.no_grad():
        torch.testing.assert_close(student(x), ref)

    ts = torch.jit.load(str(paths["torchscript"]))
    with torch.no_grad():
        torch.testing.assert_close(ts(x[:5]), ref[:5])  # any batch size

    proto = onnx.load(str(paths["onnx"]))
    assert max(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")) >= 17
    session = ort.InferenceSession(str(paths["onnx"]), providers=["CPUExecutionProvider"])
    (inp,), (out,) = session.get_inputs(), session.get_outputs()
    assert (inp.name, out.name) == ("input", "logits") and isinstance(inp.shape[0], str)
    np.testing.assert_allclose(
        session.run(None, {"input": x[:7].numpy()})[0], ref[:7].numpy(), atol=1e-5, rtol=1e-4
    )

    program = torch.export.load(str(paths["exported_program"])).module()
    with torch.no_grad():
        torch.testing.assert_close(program(x[:3]), ref[:3], atol=1e-5, rtol=1e-4)  # any batch size

    for fmt, path in paths.items():
        teacher = load_teacher(path)
        assert (teacher.format, teacher.input_shape, teacher.num_classes) == (fmt, shape, 3)
        assert teacher.num_params == count_params(model)
        torch.testing.assert_close(teacher.logits(x), ref, atol=1e-5, rtol=1e-4)


def test_exported_files_load_without_this_project(tmp_path):
    spec, shape = CASES["cnn"]
    model = _trained_like(spec, shape)
    x = torch.rand(4, *shape)
    paths = export_model(model, tmp_path, sample_inputs=x, formats=("torchscript", "onnx"))
    with torch.no_grad():
        np.save(tmp_path / "x.npy", x.numpy())
        np.save(tmp_path / "ref.npy", model(x).numpy())
    script = textwrap.dedent(
        f"""
        import sys
        sys.modules["kd_core"] = None  # any import of the project now fails
        import numpy as np, onnxruntime as ort, torch
        x, ref = np.load({str(tmp_path / "x.npy")!r}), np.load({str(tmp_path / "ref.npy")!r})
        ts = torch.jit.load({str(paths["torchscript"])!r})
        np.testing.assert_allclose(ts(torch.from_numpy(x)).detach().numpy(), ref, atol=1e-5)
        s = ort.InferenceSession({str(paths["onnx"])!r}, providers=["CPUExecutionProvider"])
        np.testing.assert_allclose(s.run(["logits"], {{"input": x}})[0], ref, atol=1e-5)
        print("standalone ok")
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120, cwd=tmp_path
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "standalone ok" in done.stdout


class _ScriptDiffers(KDModel):
    """Behaves differently once scripted: the TorchScript check must catch it."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.classifier(self.features((x - self.mean) / self.std))  # TorchScript has no super()
        if torch.jit.is_scripting():
            out = out + 0.5
        return out


class _OnnxDiffers(KDModel):
    """Behaves differently while exported to ONNX: the ONNX check must catch it."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = super().forward(x)
        if torch.onnx.is_in_onnx_export():
            out = out * 2.0
        return out


def _rewrap(cls, model):
    return cls(
        model.spec,
        model.input_shape,
        model.num_classes,
        model.features,
        model.classifier,
        model.mean,
        model.std,
    )


@pytest.mark.parametrize(
    "cls, formats, match", [(_ScriptDiffers, None, "torchscript"), (_OnnxDiffers, ("onnx",), "onnx")]
)
def test_a_failed_check_raises_and_leaves_no_file(tmp_path, cls, formats, match):
    base = build_model({"arch": "mlp", "hidden": [8]}, (6,), 3)
    model = _rewrap(cls, base).eval()
    kwargs = {"formats": formats} if formats else {}
    with pytest.raises(KDError, match=f"{match} export does not match PyTorch"):
        export_model(model, tmp_path, sample_inputs=torch.rand(5, 6), **kwargs)
    # Not even the safetensors file that passed its own check before TorchScript failed.
    assert list(tmp_path.iterdir()) == []


def test_export_copies_the_model_and_leaves_it_as_it_was(tmp_path):
    model = build_model({"arch": "cnn", "channels": [4]}, (1, 4, 4), 2).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    wrapped = torch.nn.DataParallel(model)  # wrappers are looked through
    paths = export_model(
        wrapped,
        tmp_path,
        basename="run-1_best",
        sample_inputs=torch.rand(3, 1, 4, 4),
        formats=["onnx"],
        class_names=[],
    )
    props = {p.key: p.value for p in onnx.load(str(paths["onnx"])).metadata_props}
    assert props["class_names"] == "null"  # no names rather than wrong ones
    assert list(paths) == ["onnx"] and paths["onnx"].name == "run-1_best.onnx"
    assert model.training
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"sample_inputs": torch.rand(3, 5)}, "sample_inputs has shape"),
        ({"sample_inputs": torch.rand(0, 6)}, "sample_inputs has shape"),
        ({"sample_inputs": torch.full((2, 6), float("nan"))}, "NaN"),
        ({"basename": "../evil"}, "basename"),
        ({"formats": ("pickle",)}, "formats must be among"),
        ({"class_names": ["only-one"]}, "class_names must be 3 strings"),
        ({"extra_metadata": {"spec": "x"}}, "reserved"),
        ({"extra_metadata": {"obj": object()}}, "JSON-serialisable"),
    ],
)
def test_bad_export_requests_are_refused(tmp_path, kwargs, match):
    model = build_model({"arch": "mlp", "hidden": [4]}, (6,), 3)
    args = {"sample_inputs": torch.rand(2, 6), **kwargs}
    with pytest.raises(KDError, match=match):
        export_model(model, tmp_path / "out", **args)
    assert not (tmp_path / "out").exists() or list((tmp_path / "out").iterdir()) == []


def test_only_kd_models_are_exported(tmp_path):
    with pytest.raises(KDError, match="only KD Studio models"):
        export_model(torch.nn.Linear(3, 2), tmp_path, sample_inputs=torch.rand(2, 3))
