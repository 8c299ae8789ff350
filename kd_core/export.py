"""Export a trained KDModel as safetensors, TorchScript, ONNX and a torch.export program, each checked against PyTorch first."""

from __future__ import annotations

import copy
import json
import os
import re
import uuid
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from kd_core import __version__
from kd_core.checkpoints import TS_META_FILE, load_student
from kd_core.errors import KDError
from kd_core.models import KDModel, count_params

FORMATS = ("safetensors", "torchscript", "onnx", "exported_program")
EXTENSIONS = {
    "safetensors": ".safetensors",
    "torchscript": ".ts",
    "onnx": ".onnx",
    "exported_program": ".pt2",
}
# The largest batch the exported program's dynamic batch dimension admits.
MAX_EXPORT_BATCH = 65_536
ONNX_OPSET = 17
# How many sample rows the checks run on: enough to exercise every class, cheap on any model.
CHECK_ROWS = 64
RESERVED = (
    "spec",
    "input_shape",
    "num_classes",
    "class_names",
    "preprocessing",
    "num_params",
    "kd_studio_version",
)


def export_model(
    model: KDModel,
    out_dir: Path,
    *,
    basename: str = "student",
    class_names: list[str] | None = None,
    sample_inputs: torch.Tensor,
    extra_metadata: dict[str, Any] | None = None,
    formats: tuple[str, ...] | list[str] = FORMATS,
) -> dict[str, Path]:
    """Write `<basename>.safetensors/.ts/.onnx` into out_dir; returns {format: path}.

    Each file is written under a temporary name, loaded back and compared with the PyTorch
    outputs on `sample_inputs`, and only then renamed. Any failure raises KDError and removes
    every file this call wrote, so a caller never offers a half-exported set.
    """
    model = _unwrap(model)
    if not isinstance(model, KDModel):
        raise KDError(f"only KD Studio models can be exported, got {type(model).__name__}")
    if not re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,100}", basename):
        raise KDError(f"export basename must be letters, digits, '.', '_' or '-'; got {basename!r}")
    unknown = [f for f in formats if f not in FORMATS]
    if unknown or not formats:
        raise KDError(f"export formats must be among {', '.join(FORMATS)}; got {list(formats)}")
    class_names = list(class_names) if class_names else None  # an unlabelled transfer set has none
    if class_names is not None and (
        len(class_names) != model.num_classes or not all(isinstance(c, str) for c in class_names)
    ):
        raise KDError(f"class_names must be {model.num_classes} strings, got {class_names!r}"[:300])

    cpu_model = copy.deepcopy(model).to("cpu", torch.float32).eval()
    x = _check_inputs(sample_inputs, cpu_model.input_shape)
    with torch.no_grad():
        ref = cpu_model(x)
    meta = _metadata(cpu_model, class_names, extra_metadata)

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    writers = {
        "safetensors": _safetensors,
        "torchscript": _torchscript,
        "onnx": _onnx,
        "exported_program": _exported_program,
    }
    written: dict[str, Path] = {}
    try:
        for fmt in dict.fromkeys(formats):
            final = out_dir / f"{basename}{EXTENSIONS[fmt]}"
            # The temporary name keeps the extension: loaders pick the format from it.
            tmp = out_dir / f".{basename}.{uuid.uuid4().hex[:8]}.tmp{EXTENSIONS[fmt]}"
            try:
                writers[fmt](cpu_model, tmp, meta, x, ref)
                os.replace(tmp, final)
            finally:
                tmp.unlink(missing_ok=True)
            written[fmt] = final
    except Exception as e:
        for path in written.values():
            path.unlink(missing_ok=True)
        if isinstance(e, KDError):
            raise
        raise KDError(f"export failed: {type(e).__name__}: {' '.join(str(e).split())[:300]}") from e
    return written


def _unwrap(model: nn.Module) -> nn.Module:
    # torch.compile (`_orig_mod`) and DataParallel/DDP (`module`) wrap the model itself.
    for _ in range(4):
        if isinstance(model, KDModel):
            break
        inner = getattr(model, "_orig_mod", None)
        if not isinstance(inner, nn.Module):
            inner = getattr(model, "module", None)
        if not isinstance(inner, nn.Module):
            break
        model = inner
    return model


def _check_inputs(sample_inputs: torch.Tensor, input_shape: tuple[int, ...]) -> torch.Tensor:
    if not isinstance(sample_inputs, torch.Tensor) or sample_inputs.dim() != len(input_shape) + 1:
        raise KDError(f"sample_inputs must be a batch of shape (N, {', '.join(map(str, input_shape))})")
    if tuple(sample_inputs.shape[1:]) != tuple(input_shape) or sample_inputs.shape[0] == 0:
        raise KDError(
            f"sample_inputs has shape {tuple(sample_inputs.shape)}; the model takes (N, *{input_shape})"
        )
    x = sample_inputs[:CHECK_ROWS].detach().to("cpu", torch.float32).contiguous()
    if not bool(torch.isfinite(x).all()):
        raise KDError("sample_inputs hold NaN or infinite values")
    return x


def _metadata(model: KDModel, class_names: list[str] | None, extra: dict[str, Any] | None) -> dict[str, str]:
    meta = {
        "spec": model.spec,
        "input_shape": list(model.input_shape),
        "num_classes": model.num_classes,
        "class_names": class_names,
        "preprocessing": model.preprocessing,
        "num_params": count_params(model),
        "kd_studio_version": __version__,
    }
    for key, value in (extra or {}).items():
        if not isinstance(key, str) or key in RESERVED:
            raise KDError(f"extra metadata key {key!r} is reserved or not a string")
        meta[key] = value
    try:
        return {k: json.dumps(v) for k, v in meta.items()}
    except TypeError as e:
        raise KDError(f"export metadata must be JSON-serialisable: {e}") from None


def _compare(fmt: str, got: torch.Tensor | np.ndarray, ref: torch.Tensor) -> None:
    got = torch.as_tensor(got).float()
    if tuple(got.shape) != tuple(ref.shape):
        raise KDError(f"{fmt} export gives outputs of shape {tuple(got.shape)}, PyTorch {tuple(ref.shape)}")
    tol = 1e-4 * max(1.0, float(ref.abs().max()))
    diff = float((got - ref).abs().max()) if got.numel() else 0.0
    if not diff <= tol:  # also catches NaN
        raise KDError(f"{fmt} export does not match PyTorch: max abs diff {diff:.3g} > tolerance {tol:.3g}")


def _safetensors(model: KDModel, tmp: Path, meta: dict[str, str], x: torch.Tensor, ref: torch.Tensor) -> None:
    from safetensors.torch import save_file

    tensors = {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}
    save_file(tensors, str(tmp), metadata=meta)
    loaded = load_student(tmp)
    with torch.no_grad():
        _compare("safetensors", loaded(x), ref)


def _torchscript(model: KDModel, tmp: Path, meta: dict[str, str], x: torch.Tensor, ref: torch.Tensor) -> None:
    # torch 2.14 deprecates TorchScript (FutureWarning pointing to torch.export): it stays an export format
    # users load without this project; the exported_program format is its successor.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", FutureWarning)
        try:
            scripted = torch.jit.script(model)
        except Exception:
            # Some library models (timm's, torchvision's with Python-only branches) do not script; a trace
            # of the eval-mode model is the same function for every batch size of this fixed-shape input.
            scripted = torch.jit.trace(model, (x[:2],), check_trace=False)
        torch.jit.save(scripted, str(tmp), _extra_files={TS_META_FILE: json.dumps(meta)})
        loaded = torch.jit.load(str(tmp), map_location="cpu")
    loaded.eval()
    with torch.no_grad():
        _compare("torchscript", loaded(x), ref)
        _compare("torchscript", loaded(x[:1]), ref[:1])


def _onnx(model: KDModel, tmp: Path, meta: dict[str, str], x: torch.Tensor, ref: torch.Tensor) -> None:
    import onnx
    import onnxruntime as ort

    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(
            model,
            (x[:2],),
            str(tmp),
            dynamo=False,
            opset_version=ONNX_OPSET,
            input_names=["input"],
            output_names=["logits"],
            dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
        )
    proto = onnx.load(str(tmp))
    for key, value in meta.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.save(proto, str(tmp))
    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(str(tmp), options, providers=["CPUExecutionProvider"])
    _compare("onnx", session.run(["logits"], {"input": x.numpy()})[0], ref)
    _compare("onnx", session.run(["logits"], {"input": x[:1].numpy()})[0], ref[:1])


def _exported_program(
    model: KDModel, tmp: Path, meta: dict[str, str], x: torch.Tensor, ref: torch.Tensor
) -> None:
    # An eval-mode graph with a dynamic batch dimension; the metadata travels as an extra file, like
    # TorchScript's. torch.export.load gives it back without this project installed.
    batch = torch.export.Dim("batch", min=1, max=MAX_EXPORT_BATCH)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        warnings.simplefilter("ignore", UserWarning)
        program = torch.export.export(model, (x[:2],), dynamic_shapes=({0: batch},), strict=False)
        torch.export.save(program, str(tmp), extra_files={TS_META_FILE: json.dumps(meta)})
        loaded = torch.export.load(str(tmp)).module()
    with torch.no_grad():
        _compare("exported_program", loaded(x), ref)
        _compare("exported_program", loaded(x[:1]), ref[:1])
