"""Hostile model files stopped before any parser runs: ONNX external data anywhere, inflating .pt archives."""

from __future__ import annotations

import io
import zipfile

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from kd_core.errors import CheckpointError
from kd_core.file_guards import check_torch_zip, refuse_onnx_external_data


def _external(tensor: TensorProto, location: str = "../../secret.bin") -> TensorProto:
    tensor.ClearField("raw_data")
    tensor.data_location = TensorProto.EXTERNAL
    entry = tensor.external_data.add()
    entry.key, entry.value = "location", location
    return tensor


def _model(nodes, initializers=(), sparse=(), **kwargs) -> onnx.ModelProto:
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 4])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 4])],
        initializer=list(initializers),
        sparse_initializer=list(sparse),
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], **kwargs)


def _weights(name: str = "w") -> TensorProto:
    return numpy_helper.from_array(np.ones((4,), np.float32), name)


def _sparse(name: str, external: bool) -> onnx.SparseTensorProto:
    values = numpy_helper.from_array(np.ones((2,), np.float32), f"{name}_values")
    indices = numpy_helper.from_array(np.array([0, 3], np.int64), f"{name}_indices")
    if external:
        _external(values)
    return helper.make_sparse_tensor(values, indices, [4])


def test_a_clean_model_passes():
    model = _model([helper.make_node("Add", ["input", "w"], ["logits"])], [_weights()])
    refuse_onnx_external_data(model, "ok.onnx")


@pytest.mark.parametrize(
    "where",
    ["initializer", "sparse_initializer", "constant_value", "constant_sparse_value", "subgraph", "function"],
)
def test_external_data_anywhere_in_the_graph_is_refused(where):
    add = helper.make_node("Add", ["input", "w"], ["logits"])
    inits, sparse, nodes, extra = [_weights()], [], [add], {}
    if where == "initializer":
        inits = [_external(_weights())]
    elif where == "sparse_initializer":
        sparse = [_sparse("s", external=True)]
    elif where == "constant_value":
        nodes = [helper.make_node("Constant", [], ["w"], value=_external(_weights("c"))), add]
        inits = []
    elif where == "constant_sparse_value":
        nodes = [helper.make_node("Constant", [], ["w"], sparse_value=_sparse("c", external=True)), add]
        inits = []
    elif where == "subgraph":
        branch = helper.make_graph(
            [helper.make_node("Constant", [], ["b"], value=_external(_weights("deep")))],
            "branch",
            [],
            [helper.make_tensor_value_info("b", TensorProto.FLOAT, [4])],
        )
        cond = helper.make_node("Constant", [], ["c"], value=numpy_helper.from_array(np.array(True), "cond"))
        nodes = [cond, helper.make_node("If", ["c"], ["w"], then_branch=branch, else_branch=branch), add]
        inits = []
    elif where == "function":
        body = helper.make_node("Constant", [], ["y"], value=_external(_weights("f")))
        fn = helper.make_function("custom", "leak", [], ["y"], [body], [helper.make_opsetid("", 17)])
        extra = {"functions": [fn]}
    model = _model(nodes, inits, sparse, **extra)
    with pytest.raises(CheckpointError, match="external file"):
        refuse_onnx_external_data(model, "bad.onnx")


def test_external_data_in_training_info_is_refused():
    model = _model([helper.make_node("Add", ["input", "w"], ["logits"])], [_weights()])
    info = model.training_info.add()
    info.initialization.CopyFrom(
        helper.make_graph(
            [helper.make_node("Constant", [], ["w"], value=_external(_weights("init")))],
            "init",
            [],
            [helper.make_tensor_value_info("w", TensorProto.FLOAT, [4])],
        )
    )
    with pytest.raises(CheckpointError, match="external file"):
        refuse_onnx_external_data(model, "train.onnx")


def test_external_data_survives_a_round_trip_through_bytes():
    model = _model([helper.make_node("Constant", [], ["w"], sparse_value=_sparse("c", True))])
    parsed = onnx.ModelProto.FromString(model.SerializeToString())
    with pytest.raises(CheckpointError, match="c_values"):
        refuse_onnx_external_data(parsed, "bytes.onnx")


def _deflated_bomb(path, inflated: int) -> None:
    """A torch.save archive rewritten with deflated members: tiny on disk, `inflated` bytes once read."""
    buf = io.BytesIO()
    torch.save({"w": torch.zeros(inflated // 4)}, buf)
    with zipfile.ZipFile(io.BytesIO(buf.getvalue())) as src, zipfile.ZipFile(path, "w") as out:
        for info in src.infolist():
            out.writestr(info.filename, src.read(info), compress_type=zipfile.ZIP_DEFLATED)


def test_a_state_dict_that_inflates_is_refused_before_torch_load(tmp_path):
    path = tmp_path / "bomb.pt"
    _deflated_bomb(path, 256 * 1024**2)
    assert path.stat().st_size < 1024**2  # about 1,000x smaller than what it holds
    with pytest.raises(CheckpointError, match="compressed"):
        check_torch_zip(path, "bomb.pt")


def test_the_inflated_size_cap_counts_every_member(tmp_path):
    path = tmp_path / "big.pt"
    torch.save({"a": torch.zeros(1000), "b": torch.zeros(1000)}, path)
    check_torch_zip(path, "big.pt")
    with pytest.raises(CheckpointError, match="MiB once read"):
        check_torch_zip(path, "big.pt", max_inflated=6000)


def test_an_old_format_or_non_zip_file_is_refused(tmp_path):
    legacy = tmp_path / "legacy.pt"
    torch.save({"w": torch.zeros(3)}, legacy, _use_new_zipfile_serialization=False)
    with pytest.raises(CheckpointError, match="PyTorch 1.6"):
        check_torch_zip(legacy, "legacy.pt")
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"\x80\x04not a zip")
    with pytest.raises(CheckpointError, match="not a zip"):
        check_torch_zip(junk, "junk.pt")
