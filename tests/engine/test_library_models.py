"""Library architectures (torchvision, timm), plain library state dicts as teachers, `init`, and .pt2 teachers.

Library tests skip where torchvision/timm do not import (the torch 2.13 CPU venv); the zoo `init` and the
`.pt2` tests run everywhere (the `.pt2` teacher needs the sandbox, hence Landlock).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from kd_core.checkpoints import inspect_checkpoint, load_init_weights, load_teacher
from kd_core.config import parse_config, validate_model_spec
from kd_core.errors import CheckpointError, ConfigError
from kd_core.export import export_model
from kd_core.models import build_model, count_params
from kd_core.models.library import available
from kd_core.sandbox import landlock_abi
from kd_core.sinks import ListSink

HAS_TORCHVISION = available("torchvision")
HAS_TIMM = available("timm")
needs_torchvision = pytest.mark.skipif(
    not HAS_TORCHVISION, reason="torchvision does not import here (torch 2.13)"
)
needs_timm = pytest.mark.skipif(not HAS_TIMM, reason="timm/torchvision do not import here (torch 2.13)")
needs_landlock = pytest.mark.skipif(landlock_abi() < 1, reason="no Landlock: sandboxed formats are refused")

IMAGENET = {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}
SHAPE = (3, 32, 32)


@pytest.fixture
def images_npz(tmp_path: Path) -> Path:
    """x (30, 3, 32, 32) in [0, 1], 3 classes told apart by which channel is bright."""
    rng = np.random.default_rng(0)
    y = np.arange(30) % 3
    x = rng.uniform(0, 0.4, size=(30, *SHAPE)).astype(np.float32)
    x[np.arange(30), y] += 0.6
    path = tmp_path / "images.npz"
    np.savez(path, x=x, y=y)
    return path


# ---------------------------------------------------------------- library architectures


@pytest.mark.parametrize(
    "spec",
    [
        pytest.param({"arch": "torchvision", "name": "resnet18"}, marks=needs_torchvision),
        pytest.param({"arch": "torchvision", "name": "mobilenet_v3_small"}, marks=needs_torchvision),
        pytest.param({"arch": "timm", "name": "mobilenetv3_small_100"}, marks=needs_timm),
    ],
    ids=["resnet18", "mobilenet_v3_small", "timm-mobilenetv3_small_100"],
)
def test_library_model_forward_and_every_export(tmp_path, spec):
    torch.manual_seed(0)
    model = build_model(spec, SHAPE, 5, {"mean": [0.5], "std": [0.25]}).eval()
    x = torch.rand(4, *SHAPE)
    with torch.no_grad():
        ref = model(x)
    assert ref.shape == (4, 5)
    assert model.spec == {**spec, "kwargs": {}}
    paths = export_model(model, tmp_path, sample_inputs=x)  # each file is checked against PyTorch here
    assert set(paths) == {"safetensors", "torchscript", "onnx", "exported_program"}
    program = torch.export.load(str(paths["exported_program"])).module()
    with torch.no_grad():
        torch.testing.assert_close(program(x[:1]), ref[:1], atol=1e-4, rtol=1e-4)
    teacher = load_teacher(paths["safetensors"])
    assert teacher.num_classes == 5 and teacher.num_params == count_params(model)
    torch.testing.assert_close(teacher.logits(x), ref, atol=1e-5, rtol=1e-4)


@needs_torchvision
def test_input_channels_and_classes_come_from_the_dataset():
    model = build_model({"arch": "torchvision", "name": "resnet18"}, (1, 16, 16), 7)
    assert model.net.conv1.in_channels == 1 and model.net.fc.out_features == 7
    assert model(torch.rand(2, 1, 16, 16)).shape == (2, 7)
    assert model.head_prefixes == ("net.fc.",)


@needs_timm
def test_timm_kwargs_reach_the_builder():
    model = build_model({"arch": "timm", "name": "resnet18", "kwargs": {"drop_rate": 0.25}}, SHAPE, 3)
    assert model.net.drop_rate == 0.25 and model.head_prefixes == ("net.fc.",)


@needs_torchvision
def test_unknown_names_and_reserved_kwargs_are_refused_in_words():
    with pytest.raises(ConfigError, match="closest: resnet18"):
        validate_model_spec({"arch": "torchvision", "name": "resnet81"})
    with pytest.raises(ConfigError, match="kwargs.weights' may not be set"):
        validate_model_spec(
            {"arch": "torchvision", "name": "resnet18", "kwargs": {"weights": "IMAGENET1K_V1"}}
        )
    with pytest.raises(ConfigError, match="unknown field"):
        validate_model_spec({"arch": "torchvision", "name": "resnet18", "depth": 3})
    with pytest.raises(ConfigError, match="does not run on input"):
        build_model({"arch": "torchvision", "name": "vit_b_16"}, SHAPE, 3)  # wants 224 px


@pytest.mark.skipif(HAS_TORCHVISION, reason="this environment has torchvision")
def test_without_torchvision_a_library_spec_says_what_to_install():
    with pytest.raises(ConfigError, match="install torchvision"):
        parse_config({"dataset": "digits", "model": {"arch": "torchvision", "name": "resnet18"}})


# ---------------------------------------------------------------- plain library state dicts as teachers


@needs_torchvision
def test_a_plain_torchvision_state_dict_is_a_teacher_given_arch_and_preprocessing(tmp_path):
    import torchvision

    torch.manual_seed(0)
    plain = torchvision.models.resnet18(num_classes=3).eval()
    path = tmp_path / "resnet18.pt"
    torch.save(plain.state_dict(), path)
    arch = {"arch": "torchvision", "name": "resnet18"}

    info = inspect_checkpoint(path, arch=arch, input_shape=SHAPE, preprocessing=IMAGENET)
    assert (info["format"], info["num_classes"], info["num_params"]) == ("state_dict", 3, count_params(plain))
    info = inspect_checkpoint(path, arch=arch, input_shape=SHAPE)  # no dataset classes: read off the head
    assert info["num_classes"] == 3

    teacher = load_teacher(path, arch=arch, input_shape=SHAPE, num_classes=3, preprocessing=IMAGENET)
    x = torch.rand(4, *SHAPE)
    mean, std = (torch.tensor(IMAGENET[k]).view(1, 3, 1, 1) for k in ("mean", "std"))
    with torch.no_grad():
        torch.testing.assert_close(teacher.logits(x), plain((x - mean) / std), atol=1e-5, rtol=1e-4)


@needs_torchvision
def test_a_state_dict_with_wrong_keys_or_shapes_is_refused_naming_them(tmp_path):
    import torchvision

    state = torchvision.models.resnet18(num_classes=3).state_dict()
    arch = {"arch": "torchvision", "name": "resnet18"}
    renamed = {k.replace("layer1.", "stage1."): v for k, v in state.items()}
    torch.save(renamed, tmp_path / "renamed.pt")
    with pytest.raises(
        CheckpointError, match=r"missing net\.layer1\.0\.conv1\.weight.*unexpected net\.stage1"
    ):
        load_teacher(tmp_path / "renamed.pt", arch=arch, input_shape=SHAPE, num_classes=3)
    torch.save(torchvision.models.resnet34(num_classes=3).state_dict(), tmp_path / "r34.pt")
    with pytest.raises(CheckpointError, match="unexpected net.layer1.2"):
        load_teacher(tmp_path / "r34.pt", arch=arch, input_shape=SHAPE, num_classes=3)
    wide = torchvision.models.resnet18(num_classes=10).state_dict()
    torch.save(wide, tmp_path / "wide.pt")
    with pytest.raises(CheckpointError, match=r"net\.fc\.weight: file \(10, 512\), arch \(3, 512\)"):
        load_teacher(tmp_path / "wide.pt", arch=arch, input_shape=SHAPE, num_classes=3)


# ---------------------------------------------------------------- init (a pretrained start)


def test_init_loads_a_zoo_export_and_reinitialises_a_head_of_another_size(tmp_path):
    spec = {"arch": "cnn", "channels": [4, 8]}
    torch.manual_seed(1)
    source = build_model(spec, (3, 8, 8), 10, {"mean": [0.3], "std": [0.2]}).eval()
    path = export_model(source, tmp_path, sample_inputs=torch.rand(2, 3, 8, 8), formats=["safetensors"])
    student = build_model(spec, (3, 8, 8), 4)
    fresh_head = student.classifier.weight.clone()
    report = load_init_weights(student, path["safetensors"])
    assert report["init_head_reinitialised"] is True and report["init_preprocessing"] == "checkpoint"
    torch.testing.assert_close(student.features[0].weight, source.features[0].weight)
    torch.testing.assert_close(student.classifier.weight, fresh_head)
    torch.testing.assert_close(student.mean, source.mean)

    same = build_model(spec, (3, 8, 8), 10)
    assert load_init_weights(same, path["safetensors"])["init_head_reinitialised"] is False
    torch.testing.assert_close(same.classifier.weight, source.classifier.weight)

    other = build_model({"arch": "cnn", "channels": [4, 16]}, (3, 8, 8), 4)
    with pytest.raises(CheckpointError, match=r"shapes differ: features\.4\.weight"):
        load_init_weights(other, path["safetensors"])


def test_init_through_a_run_says_the_head_was_reinitialised(tmp_path, tiny_image_npz):
    from kd_core.runner import load_experiment_dataset, run_experiment

    spec = {"arch": "cnn", "channels": [4]}
    source = build_model(spec, (3, 8, 8), 6)
    path = export_model(
        source, tmp_path / "src", sample_inputs=torch.rand(2, 3, 8, 8), formats=["safetensors"]
    )
    config = parse_config(
        {"dataset": str(tiny_image_npz), "model": spec, "epochs": 1, "init": str(path["safetensors"])}
    )
    result = run_experiment(
        config,
        dataset=load_experiment_dataset(config),
        out_dir=tmp_path / "run",
        sink=ListSink(),
        export=False,
    )
    assert result.metrics["init_head_reinitialised"] is True
    assert result.metrics["init_from"] == "student.safetensors"
    assert json.loads((tmp_path / "run" / "result.json").read_text())["metrics"]["init_head_reinitialised"]


@needs_torchvision
def test_init_from_a_plain_imagenet_style_state_dict_with_its_preprocessing(tmp_path, images_npz):
    import torchvision

    from kd_core.runner import load_experiment_dataset, run_experiment

    torch.manual_seed(0)
    torch.save(torchvision.models.mobilenet_v3_small(num_classes=1000).state_dict(), tmp_path / "mnv3.pt")
    config = parse_config(
        {
            "dataset": str(images_npz),
            "model": {"arch": "torchvision", "name": "mobilenet_v3_small"},
            "epochs": 1,
            "batch_size": 8,
            "init": str(tmp_path / "mnv3.pt"),
            "init_preprocessing": IMAGENET,
        }
    )
    result = run_experiment(
        config,
        dataset=load_experiment_dataset(config),
        out_dir=tmp_path / "run",
        sink=ListSink(),
        export=False,
    )
    m = result.metrics
    assert m["init_head_reinitialised"] is True and m["init_preprocessing"] == "checkpoint"
    assert result.model.preprocessing["mean"] == pytest.approx(IMAGENET["mean"])
    assert result.model.net.classifier[3].out_features == 3


@needs_torchvision
@needs_timm
@needs_landlock
def test_distill_a_timm_student_from_a_plain_torchvision_teacher(tmp_path, images_npz):
    import torchvision

    from kd_core.runner import load_experiment_dataset, run_experiment

    torch.manual_seed(0)
    torch.save(torchvision.models.resnet18(num_classes=3).state_dict(), tmp_path / "teacher.pt")
    config = parse_config(
        {
            "kind": "distill",
            "dataset": str(images_npz),
            "teacher": str(tmp_path / "teacher.pt"),
            "teacher_arch": {"arch": "torchvision", "name": "resnet18"},
            "teacher_preprocessing": IMAGENET,
            "model": {"arch": "timm", "name": "mobilenetv3_small_100"},
            "epochs": 1,
            "batch_size": 8,
        }
    )
    dataset = load_experiment_dataset(config)
    teacher = load_teacher(
        config.teacher,
        arch=config.teacher_arch,
        input_shape=tuple(dataset.input_shape),
        num_classes=dataset.num_classes,
        preprocessing=config.teacher_preprocessing,
    )
    result = run_experiment(
        config, dataset=dataset, teacher=teacher, out_dir=tmp_path / "run", sink=ListSink()
    )
    assert set(result.files) >= {"safetensors", "torchscript", "onnx", "exported_program"}
    assert result.metrics["teacher_params"] == count_params(teacher.module)
    # The exported student is itself a teacher in every format, .pt2 included (run in the sandbox).
    with load_teacher(result.files["exported_program"]) as again:
        assert again.format == "exported_program" and again.num_classes == 3


# ---------------------------------------------------------------- .pt2 teachers


@needs_landlock
def test_an_exported_program_teacher_runs_in_the_sandbox_and_matches(tmp_path):
    torch.manual_seed(0)
    model = build_model({"arch": "cnn", "channels": [4]}, (3, 8, 8), 3).eval()
    x = torch.rand(5, 3, 8, 8)
    paths = export_model(model, tmp_path, sample_inputs=x, formats=["exported_program"])
    with load_teacher(paths["exported_program"]) as teacher:
        assert teacher.sandboxed and teacher.format == "exported_program"
        assert (teacher.input_shape, teacher.num_classes, teacher.num_params) == (
            (3, 8, 8),
            3,
            count_params(model),
        )
        with torch.no_grad():
            torch.testing.assert_close(teacher.logits(x), model(x), atol=1e-5, rtol=1e-4)
    info = inspect_checkpoint(paths["exported_program"])
    assert info["format"] == "exported_program" and info["spec"]["arch"] == "cnn"


@needs_landlock
def test_an_exported_program_with_a_refused_op_never_runs(tmp_path):
    class Plus(torch.nn.Module):
        def forward(self, x):
            return x + 1

    program = torch.export.export(Plus(), (torch.rand(2, 4),))
    graph = program.graph_module.graph
    first = next(n for n in graph.nodes if n.op == "placeholder")
    with graph.inserting_after(first):
        node = graph.call_function(torch.ops.aten._print.default, ("from the graph",))
        node.meta["val"] = None
    program.graph_module.recompile()
    torch.export.save(program, str(tmp_path / "print.pt2"))
    with pytest.raises(CheckpointError, match="aten::_print"):
        load_teacher(tmp_path / "print.pt2", input_shape=(4,))


def test_cli_init_is_a_path_relative_to_the_config(tmp_path, tiny_image_npz):
    from kd_core.cli import main

    spec = {"arch": "cnn", "channels": [4]}
    source = build_model(spec, (3, 8, 8), 6)
    export_model(source, tmp_path, sample_inputs=torch.rand(2, 3, 8, 8), formats=["safetensors"])
    config = {"dataset": str(tiny_image_npz), "model": spec, "epochs": 1, "init": "student.safetensors"}
    (tmp_path / "run.json").write_text(json.dumps(config))
    assert main(["run", str(tmp_path / "run.json"), "--out", str(tmp_path / "out")]) == 0
    metrics = json.loads((tmp_path / "out" / "result.json").read_text())["metrics"]
    assert metrics["init_head_reinitialised"] is True and metrics["init_preprocessing"] == "checkpoint"
