"""Loading untrusted model files (safetensors, state dicts, TorchScript, ONNX): the only place that does.

Weights (safetensors, `.pt` state dicts read with weights_only after kd_core.file_guards.check_torch_zip)
are read in this process. TorchScript and ONNX are programs: they are loaded, checked and run only in a
sandboxed child process (kd_core/sandbox.py); a `Teacher` for them is a proxy to that child.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from kd_core.errors import CheckpointError, ConfigError
from kd_core.file_guards import check_torch_zip, refuse_onnx_external_data
from kd_core.models import KDModel, LibraryModel, build_model, count_params, full_spec, is_library
from kd_core.sandbox import SandboxedModel, SandboxLimits

FORMATS = ("safetensors", "state_dict", "torchscript", "onnx", "exported_program")
# The metadata keys our exports write (JSON-encoded strings); everything else is ignored.
META_KEYS = ("spec", "input_shape", "num_classes", "class_names", "preprocessing", "num_params")
# TorchScript archives carry the same metadata as one extra file.
TS_META_FILE = "kd_studio.json"
# Bounds the memory of one teacher forward pass however large the input.
EVAL_BATCH = 4096
_ONNX_DTYPES = {"tensor(float)": np.float32, "tensor(double)": np.float64, "tensor(float16)": np.float16}
# ONNX operator domains onnxruntime implements itself; a custom domain would need a native library.
_ONNX_DOMAINS = ("", "ai.onnx", "ai.onnx.ml", "com.microsoft")


class Teacher:
    """One interface over every teacher format: `logits(x)` under no_grad, dropout off.

    A TorchScript or ONNX teacher runs in its sandbox child (`sandbox`, on CPU there; outputs follow x's
    device). Close it with close() or a `with` block; a dropped teacher's child is ended at garbage
    collection or exit anyway.
    """

    def __init__(
        self,
        *,
        format: str,
        fingerprint: str,
        module: nn.Module | None = None,
        sandbox: SandboxedModel | None = None,
        input_shape: tuple[int, ...] | None = None,
        num_classes: int | None = None,
        num_params: int | None = None,
        spec: dict | None = None,
        class_names: list[str] | None = None,
    ) -> None:
        self.format = format
        self.fingerprint = fingerprint
        self.input_shape = input_shape
        self.num_classes = num_classes
        self.num_params = num_params
        self.spec = spec
        self.class_names = class_names
        self._module = module
        self._sandbox = sandbox
        self._device = torch.device("cpu")
        self._batch = EVAL_BATCH
        self._onnx_fixed_batch: int | None = None
        if module is not None:
            module.eval()
            for p in module.parameters():
                p.requires_grad_(False)
        if sandbox is not None and format == "onnx":
            first = sandbox.info["inputs"][0]["shape"]
            self._onnx_fixed_batch = (
                first[0] if first and isinstance(first[0], int) and first[0] > 0 else None
            )
            if self._onnx_fixed_batch:
                self._batch = self._onnx_fixed_batch

    @property
    def sandboxed(self) -> bool:
        """True when this teacher runs in a sandbox child (TorchScript, ONNX)."""
        return self._sandbox is not None

    def close(self) -> None:
        """End the sandbox child, if any; the teacher cannot run afterwards. Idempotent."""
        if self._sandbox is not None:
            self._sandbox.close()

    def __enter__(self) -> Teacher:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    @property
    def module(self) -> nn.Module | None:
        """The torch module of a weights teacher (None for TorchScript/ONNX, which run in the sandbox)."""
        return self._module

    @property
    def device(self) -> torch.device:
        return self._device

    def to(self, device: torch.device | str) -> Teacher:
        """Move a torch teacher to `device`; a sandboxed or ONNX teacher stays on CPU (outputs still follow x)."""
        if self._module is not None:
            self._device = torch.device(device)
            self._module.to(self._device)
        return self

    def eval(self) -> Teacher:
        if self._module is not None:
            self._module.eval()
        return self

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """Float32 logits for a batch of raw inputs, on x's device, computed without gradients."""
        if self.input_shape is not None and tuple(x.shape[1:]) != tuple(self.input_shape):
            raise CheckpointError(
                f"teacher expects input {tuple(self.input_shape)} per sample; got a batch of shape {tuple(x.shape)}"
            )
        return self._forward(x)

    __call__ = logits

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        parts = []
        with torch.no_grad():
            for part in x.split(self._batch) if x.shape[0] else [x]:
                if self._sandbox is not None:
                    parts.append(self._run_sandbox(part))
                else:
                    parts.append(self._run_module(part))
        out = torch.cat(parts) if len(parts) > 1 else parts[0]
        return out.to(x.device)

    def _run_module(self, part: torch.Tensor) -> torch.Tensor:
        try:
            out = self._module(part.to(self._device, torch.float32))
        except RuntimeError as e:
            raise CheckpointError(
                f"the teacher failed on a batch of shape {tuple(part.shape)}: {_short(e)}"
            ) from None
        if isinstance(out, list | tuple) and out:
            out = out[0]
        elif isinstance(out, dict) and "logits" in out:
            out = out["logits"]
        return _check_logits(out, part.shape[0]).float()

    def _run_sandbox(self, part: torch.Tensor) -> torch.Tensor:
        arr = part.detach().to("cpu", torch.float32).numpy()
        rows = arr.shape[0]
        if self._onnx_fixed_batch and rows != self._onnx_fixed_batch:
            pad = np.zeros((self._onnx_fixed_batch - rows, *arr.shape[1:]), dtype=arr.dtype)
            arr = np.concatenate([arr, pad])
        try:
            out = self._sandbox.forward(arr)
        except CheckpointError as e:
            raise CheckpointError(
                f"the teacher failed on a batch of shape {tuple(part.shape)}: {e}"
            ) from None
        if out.ndim != 2 or out.shape[0] != arr.shape[0] or out.shape[1] < 1:
            raise CheckpointError(
                f"the teacher must return logits of shape (batch, classes); it returned {tuple(out.shape)}"
            )
        return _check_logits(torch.from_numpy(out[:rows]), rows)

    def probe(self, input_shape: tuple[int, ...]) -> None:
        """Run two zero samples of `input_shape` to learn the input shape and class count."""
        shape = tuple(int(d) for d in input_shape)
        out = self._forward(torch.zeros((2, *shape)))
        self.input_shape = shape
        self.num_classes = int(out.shape[1])

    def describe(self) -> dict[str, Any]:
        """JSON-ready summary for the upload view."""
        return {
            "format": self.format,
            "num_params": self.num_params,
            "input_shape": list(self.input_shape) if self.input_shape is not None else None,
            "num_classes": self.num_classes,
            "spec": self.spec,
            "class_names": self.class_names,
        }

    def __repr__(self) -> str:
        return (
            f"Teacher(format={self.format!r}, input_shape={self.input_shape}, num_classes={self.num_classes}, "
            f"num_params={self.num_params})"
        )


def _check_logits(out: Any, rows: int) -> torch.Tensor:
    if not isinstance(out, torch.Tensor) or out.dim() != 2 or out.shape[0] != rows:
        got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise CheckpointError(f"the teacher must return logits of shape (batch, classes); it returned {got}")
    return out


def _short(e: BaseException, limit: int = 300) -> str:
    text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return text if len(text) <= limit else text[:limit] + "..."


def fingerprint_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def detect_format(path: Path) -> str:
    """Format from the extension; a .pt/.pth zip with TorchScript code inside is TorchScript."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint file {path.name} does not exist")
    ext = path.suffix.lower()
    if ext == ".safetensors":
        return "safetensors"
    if ext == ".ts":
        return "torchscript"
    if ext == ".onnx":
        return "onnx"
    if ext == ".pt2":
        return "exported_program"
    if ext in (".pt", ".pth"):
        return "torchscript" if _is_torchscript_zip(path) else "state_dict"
    raise CheckpointError(
        f"unsupported checkpoint type '{ext or path.name}': use .safetensors, .pt/.pth (state dict), "
        ".ts (TorchScript), .pt2 (torch.export) or .onnx"
    )


def _is_torchscript_zip(path: Path) -> bool:
    try:
        with zipfile.ZipFile(path) as z:
            names = z.namelist()
    except (zipfile.BadZipFile, OSError):
        return False
    return any("/code/" in n or n.endswith("/constants.pkl") for n in names)


# ---------------------------------------------------------------- metadata


def _parse_meta(raw: dict[str, Any] | None, source: str) -> dict[str, Any]:
    """Decode and check our metadata keys (JSON strings); missing keys come back as None."""
    raw = raw or {}
    meta: dict[str, Any] = dict.fromkeys(META_KEYS)
    for key in META_KEYS:
        if key not in raw:
            continue
        try:
            value = json.loads(raw[key]) if isinstance(raw[key], str) else raw[key]
        except json.JSONDecodeError:
            raise CheckpointError(f"{source}: metadata field '{key}' is not valid JSON") from None
        if value is not None:
            meta[key] = _check_meta_value(key, value, source)
    return meta


def _check_meta_value(key: str, value: Any, source: str) -> Any:
    bad = CheckpointError(f"{source}: metadata field '{key}' is malformed ({str(value)[:80]!r})")
    if key == "spec":
        try:
            return full_spec(value)
        except ConfigError as e:
            raise CheckpointError(f"{source}: the model spec in its metadata is invalid: {e}") from None
    if key == "input_shape":
        if not isinstance(value, list) or not 1 <= len(value) <= 4 or not all(_pos_int(d) for d in value):
            raise bad
        return tuple(value)
    if key in ("num_classes", "num_params"):
        if not _pos_int(value):
            raise bad
        return value
    if key == "class_names":
        from kd_core.limits import MAX_CLASSES, name_problem  # the bounds datasets have too

        if not isinstance(value, list) or not all(isinstance(c, str) for c in value):
            raise bad
        if len(value) > MAX_CLASSES:
            raise CheckpointError(
                f"{source}: its metadata lists {len(value)} class names; at most {MAX_CLASSES} are allowed"
            )
        for i, name in enumerate(value):
            problem = name_problem(name, f"class name {i} in its metadata")
            if problem:
                raise CheckpointError(f"{source}: {problem}")
        return value
    if key == "preprocessing":
        if not isinstance(value, dict):
            raise bad
        return value
    return value


def _pos_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 1


# ---------------------------------------------------------------- weights


def _read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            raw_meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors raises SafetensorError and others on a bad file
        raise CheckpointError(f"{path.name} is not a readable safetensors file: {_short(e)}") from None
    if not tensors:
        raise CheckpointError(f"{path.name} holds no tensors")
    return tensors, _parse_meta(raw_meta, path.name)


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    # Compressed members (a deflate bomb) or a huge inflated size are refused before torch.load reads any.
    check_torch_zip(path, path.name)
    try:
        # weights_only=True is the whole point: a pickled object is refused before anything in it runs.
        obj = torch.load(path, weights_only=True, map_location="cpu")
    except Exception as e:
        found = re.search(r"GLOBAL ([\w.]+)", str(e))
        if found:
            raise CheckpointError(
                f"{path.name} holds a pickled Python object ({found.group(1)}), not a plain state dict; "
                "it was not loaded. Save model.state_dict() or use safetensors/TorchScript/ONNX"
            ) from None
        raise CheckpointError(f"{path.name} is not a readable PyTorch state dict: {_short(e)}") from None
    return _flatten_state_dict(obj, path.name)


def _flatten_state_dict(obj: Any, source: str) -> dict[str, torch.Tensor]:
    if isinstance(obj, dict) and not all(isinstance(v, torch.Tensor) for v in obj.values()):
        for key in ("state_dict", "model", "model_state_dict"):
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not obj:
        raise CheckpointError(f"{source} must hold a dict of parameter name -> tensor (model.state_dict())")
    for k, v in obj.items():
        if not isinstance(k, str) or not isinstance(v, torch.Tensor):
            raise CheckpointError(
                f"{source} must hold a flat dict of name -> tensor; entry {str(k)[:60]!r} is {type(v).__name__}"
            )
    # DataParallel and torch.compile wrap the names; the weights are the same.
    for prefix in ("module.", "_orig_mod."):
        if all(k.startswith(prefix) for k in obj):
            obj = {k[len(prefix) :]: v for k, v in obj.items()}
    return dict(obj)


def _few(names: list[str], n: int = 5) -> str:
    return ", ".join(names[:n]) + (f" (+{len(names) - n} more)" if len(names) > n else "")


def _infer_classes(tensors: dict[str, torch.Tensor]) -> int | None:
    w = tensors.get("classifier.weight")
    return int(w.shape[0]) if w is not None and w.dim() == 2 else None


def _infer_library_classes(
    tensors: dict[str, torch.Tensor], spec: dict, shape: tuple[int, ...]
) -> int | None:
    """A library model's class count read off its head's weight in the file (the head found on a meta build)."""
    try:
        # Only the head's name is needed: built on the meta device, nothing is allocated or initialised.
        with torch.device("meta"):
            probe = build_model(spec, shape, 1000)
    except ConfigError:
        return None
    for prefix in probe.head_prefixes:
        for key in (f"{prefix}weight", f"{prefix[len('net.') :]}weight"):
            w = tensors.get(key)
            if w is not None and w.dim() in (2, 4):
                return int(w.shape[0])
    return None


def _library_keys(model: KDModel, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A plain torchvision/timm state dict (no `net.` prefix) in LibraryModel's layout."""
    if not isinstance(model, LibraryModel) or any(k.startswith("net.") for k in tensors):
        return tensors
    return {k if k in ("mean", "std") else f"net.{k}": v for k, v in tensors.items()}


def _count_tensor_params(tensors: dict[str, torch.Tensor]) -> int:
    # Without the module, buffers are recognised by name: BN statistics and our normalisation.
    skip = ("running_mean", "running_var", "num_batches_tracked")
    return sum(
        t.numel()
        for k, t in tensors.items()
        if not k.endswith(skip) and k not in ("mean", "std") and t.is_floating_point()
    )


def _model_from_weights(
    tensors: dict[str, torch.Tensor],
    spec: dict | None,
    input_shape: tuple[int, ...] | None,
    num_classes: int | None,
    preprocessing: dict | None,
    source: str,
) -> KDModel:
    if spec is None:
        raise CheckpointError(
            f'{source} does not say which architecture it holds: give \'arch\', e.g. {{"arch": "mlp", "hidden": [64]}}'
        )
    if input_shape is None:
        raise CheckpointError(f"{source}: the input shape is unknown (it comes from the dataset)")
    num_classes = num_classes or _infer_classes(tensors)
    if num_classes is None and is_library(full_spec(spec)):
        num_classes = _infer_library_classes(tensors, spec, tuple(input_shape))
    if num_classes is None:
        raise CheckpointError(f"{source}: the class count is unknown (no classifier.weight, no dataset)")
    # Building initialises weights; keep the caller's RNG stream as if nothing was built.
    with torch.random.fork_rng(devices=[]):
        try:
            model = build_model(spec, tuple(input_shape), int(num_classes), preprocessing)
        except ConfigError as e:
            raise CheckpointError(f"{source}: the architecture does not fit: {e}") from None
    _load_weights(model, tensors, source)
    return model


def _load_weights(model: KDModel, tensors: dict[str, torch.Tensor], source: str) -> None:
    tensors = _library_keys(model, tensors)
    expected = model.state_dict()
    # A state dict saved from a plain (unnormalised) model may lack our normalisation buffers.
    missing = [k for k in expected if k not in tensors and k not in ("mean", "std")]
    unexpected = [k for k in tensors if k not in expected]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing {_few(missing)}")
        if unexpected:
            parts.append(f"unexpected {_few(unexpected)}")
        raise CheckpointError(
            f"{source}: weights do not match arch {model.spec}: {'; '.join(parts)} "
            f"(expected keys look like {_few(list(expected), 3)})"
        )
    wrong = [
        f"{k}: file {tuple(tensors[k].shape)}, arch {tuple(v.shape)}"
        for k, v in expected.items()
        if k in tensors and tensors[k].shape != v.shape
    ]
    if wrong:
        raise CheckpointError(f"{source}: weight shapes do not match arch {model.spec}: {_few(wrong, 3)}")
    for k, t in tensors.items():
        if t.is_complex() or (expected[k].is_floating_point() and not t.is_floating_point()):
            raise CheckpointError(f"{source}: tensor {k} has dtype {t.dtype}, expected a float tensor")
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise CheckpointError(f"{source}: tensor {k} holds NaN or infinite values")
    model.load_state_dict(tensors, strict=False)


# ---------------------------------------------------------------- formats


def _load_weights_teacher(
    path: Path, fmt: str, arch: dict | None, input_shape: Any, num_classes: Any, preprocessing: dict | None
) -> Teacher:
    if fmt == "safetensors":
        tensors, meta = _read_safetensors(path)
    else:
        tensors, meta = _read_state_dict(path), dict.fromkeys(META_KEYS)
    spec = meta["spec"] or _arch(arch)
    model = _model_from_weights(
        tensors,
        spec,
        meta["input_shape"] or _shape_arg(input_shape),
        meta["num_classes"] or _infer_classes(tensors) or num_classes,
        meta["preprocessing"] or preprocessing,
        path.name,
    )
    return Teacher(
        format=fmt,
        fingerprint=fingerprint_file(path),
        module=model,
        input_shape=model.input_shape,
        num_classes=model.num_classes,
        num_params=count_params(model),
        spec=model.spec,
        class_names=meta["class_names"],
    )


def _parse_ts_meta(text: str, source: str) -> dict[str, Any]:
    raw: dict[str, Any] = {}
    if text:
        try:
            raw = json.loads(text)
        except json.JSONDecodeError:
            raise CheckpointError(f"{source}: its {TS_META_FILE} is not valid JSON") from None
        if not isinstance(raw, dict):
            raise CheckpointError(f"{source}: its {TS_META_FILE} must be a JSON object")
    return _parse_meta(raw, source)


def _load_torchscript(path: Path, limits: SandboxLimits | None, kind: str = "torchscript") -> Teacher:
    # Read, op-checked and run only in the sandbox child; this process never parses the archive's code.
    # A torch.export program (.pt2) is served the same way, its metadata in the same extra file.
    sandbox = SandboxedModel(path.read_bytes(), kind, source=path.name, limits=limits)
    try:
        meta = _parse_ts_meta(str(sandbox.info.get("meta") or ""), path.name)
        num_params = sandbox.info.get("num_params")
        return Teacher(
            format=kind,
            fingerprint=fingerprint_file(path),
            sandbox=sandbox,
            input_shape=meta["input_shape"],
            num_classes=meta["num_classes"],
            num_params=meta["num_params"] or (int(num_params) if _pos_int(num_params) else None),
            spec=meta["spec"],
            class_names=meta["class_names"],
        )
    except BaseException:
        sandbox.close()
        raise


def _refuse_foreign_onnx_ops(proto: Any, source: str) -> None:
    """Every node of every graph and function must be an operator onnxruntime implements itself."""
    local = {(f.domain, f.name) for f in proto.functions}
    graphs = [proto.graph, *(f for f in proto.functions)]
    while graphs:
        graph = graphs.pop()
        for node in graph.node:
            if node.domain not in _ONNX_DOMAINS and (node.domain, node.op_type) not in local:
                raise CheckpointError(
                    f"{source} uses operator {node.op_type!r} of domain {node.domain[:80]!r}; only standard "
                    "ONNX and onnxruntime operators are run"
                )
            for attr in node.attribute:
                if attr.HasField("g"):
                    graphs.append(attr.g)
                graphs.extend(attr.graphs)


def _load_onnx(path: Path, limits: SandboxLimits | None) -> Teacher:
    import onnx

    data = path.read_bytes()
    try:
        # Parsing the protobuf is data only; the graph itself runs in the sandbox child.
        proto = onnx.ModelProto.FromString(data)
    except Exception:
        # The protobuf parser's own words ("Wire format was corrupt") tell a user nothing they can act on.
        raise CheckpointError(
            f"{path.name} is not a readable ONNX model: the file is damaged, cut short, or not ONNX. "
            "Export the model again (for example with torch.onnx.export) and upload the .onnx file itself"
        ) from None
    # External data names files on the machine that loads the model: refused wherever it appears.
    refuse_onnx_external_data(proto, path.name)
    _refuse_foreign_onnx_ops(proto, path.name)
    meta = _parse_meta({p.key: p.value for p in proto.metadata_props}, path.name)
    float_types = (
        onnx.TensorProto.FLOAT,
        onnx.TensorProto.FLOAT16,
        onnx.TensorProto.DOUBLE,
        onnx.TensorProto.BFLOAT16,
    )
    num_params = sum(math.prod(t.dims) for t in proto.graph.initializer if t.data_type in float_types)
    del proto
    sandbox = SandboxedModel(data, "onnx", source=path.name, limits=limits)
    try:
        inputs = sandbox.info["inputs"]
        if len(inputs) != 1:
            raise CheckpointError(
                f"{path.name} must take exactly one input (a batch); it takes {len(inputs)}"
            )
        if inputs[0]["type"] not in _ONNX_DTYPES:
            raise CheckpointError(
                f"{path.name} takes {str(inputs[0]['type'])[:40]}; a teacher must take float input"
            )
        rest = list(inputs[0]["shape"])[1:]
        input_shape = tuple(rest) if rest and all(_pos_int(d) for d in rest) else None
        out_shape = sandbox.info["output"]["shape"]
        num_classes = out_shape[1] if len(out_shape) == 2 and _pos_int(out_shape[1]) else None
        return Teacher(
            format="onnx",
            fingerprint=fingerprint_file(path),
            sandbox=sandbox,
            input_shape=input_shape or meta["input_shape"],
            num_classes=num_classes or meta["num_classes"],
            num_params=meta["num_params"] or num_params,
            spec=meta["spec"],
            class_names=meta["class_names"],
        )
    except BaseException:
        sandbox.close()
        raise


def _arch(arch: dict | None) -> dict | None:
    if arch is None:
        return None
    try:
        return full_spec(arch)
    except ConfigError as e:
        raise CheckpointError(f"'arch' is invalid: {e}") from None


def _shape_arg(input_shape: Any) -> tuple[int, ...] | None:
    return tuple(int(d) for d in input_shape) if input_shape is not None else None


# ---------------------------------------------------------------- public


def load_teacher(
    path: str | Path,
    *,
    arch: dict | None = None,
    input_shape: tuple[int, ...] | None = None,
    num_classes: int | None = None,
    preprocessing: dict | None = None,
    sandbox_limits: SandboxLimits | None = None,
) -> Teacher:
    """Load any supported teacher file; what the file says wins over the arguments (dataset hints).

    TorchScript and ONNX teachers run in a sandbox child under `sandbox_limits` (default: SandboxLimits(),
    from KD_SANDBOX_* variables); close the teacher when done with it.
    """
    path = Path(path)
    if path.suffix.lower() == ".npz":  # soft labels: a file of predictions, never code
        from kd_core.soft_labels import load_soft_label_teacher

        return load_soft_label_teacher(path, num_classes=num_classes)  # type: ignore[return-value]
    fmt = detect_format(path)
    if fmt in ("safetensors", "state_dict"):
        return _load_weights_teacher(path, fmt, arch, input_shape, num_classes, preprocessing)
    if fmt == "onnx":
        teacher = _load_onnx(path, sandbox_limits)
    else:
        teacher = _load_torchscript(path, sandbox_limits, fmt)
    try:
        hint = _shape_arg(input_shape)
        if teacher.input_shape is None and hint is not None:
            _probe(teacher, hint)
        elif teacher.num_classes is None and teacher.input_shape is not None:
            _probe(teacher, teacher.input_shape)
    except BaseException:
        teacher.close()
        raise
    return teacher


def _probe(teacher: Teacher, shape: tuple[int, ...]) -> None:
    try:
        teacher.probe(shape)
    except CheckpointError as e:
        raise CheckpointError(f"the teacher does not run on input {shape}: {e}") from None


def inspect_checkpoint(
    path: str | Path,
    *,
    arch: dict | None = None,
    input_shape: tuple[int, ...] | None = None,
    num_classes: int | None = None,
    sandbox_limits: SandboxLimits | None = None,
    preprocessing: dict | None = None,
) -> dict[str, Any]:
    """What an uploaded file holds, without a dataset: format, sizes and spec; unknowns are None.

    `preprocessing` ({"mean", "std"} per channel) is the normalisation a plain state dict was trained
    with outside the model; it is checked here and baked in wherever the weights are rebuilt.

    TorchScript and ONNX files are read (and probed on `input_shape`) only in a sandbox child, which is
    closed before this returns. A known class count that differs from `num_classes` is refused.
    """
    path = Path(path)
    fmt = detect_format(path)
    if fmt in ("torchscript", "onnx", "exported_program"):
        with load_teacher(
            path, input_shape=input_shape, num_classes=num_classes, sandbox_limits=sandbox_limits
        ) as teacher:
            info = teacher.describe()
        return _refuse_other_classes(info, num_classes, path.name)
    if fmt == "safetensors":
        tensors, meta = _read_safetensors(path)
    else:
        tensors, meta = _read_state_dict(path), dict.fromkeys(META_KEYS)
    spec = meta["spec"] or _arch(arch)
    shape = meta["input_shape"] or _shape_arg(input_shape)
    classes = meta["num_classes"] or _infer_classes(tensors) or num_classes
    num_params = _count_tensor_params(tensors)
    if spec is not None and shape is not None:
        # Enough to rebuild: check the weights against the arch now, not when a job starts.
        model = _model_from_weights(
            tensors, spec, shape, classes, meta["preprocessing"] or preprocessing, path.name
        )
        num_params, classes = count_params(model), model.num_classes
    info = {
        "format": fmt,
        "num_params": num_params,
        "input_shape": list(shape) if shape is not None else None,
        "num_classes": classes,
        "spec": spec,
        "class_names": meta["class_names"],
    }
    return _refuse_other_classes(info, num_classes, path.name)


def _refuse_other_classes(info: dict[str, Any], num_classes: int | None, source: str) -> dict[str, Any]:
    """A file sized against a dataset (`num_classes` given) must have that many classes when it says."""
    if num_classes is not None and info["num_classes"] is not None and info["num_classes"] != num_classes:
        raise CheckpointError(f"{source} has {info['num_classes']} classes; the dataset has {num_classes}")
    return info


def check_teacher_fits(teacher: Teacher, dataset: Any) -> None:
    """Refuse a teacher whose input shape or class count differs from the dataset's.

    Fills in what the file left unknown (by one forward pass on the dataset's shape). A
    dataset without labels (num_classes None, a transfer set) accepts the teacher's classes.
    """
    ds_shape = tuple(int(d) for d in dataset.input_shape)
    ds_classes = dataset.num_classes
    if teacher.input_shape is None or teacher.num_classes is None:
        _probe(teacher, teacher.input_shape or ds_shape)
    t_shape = tuple(teacher.input_shape)
    if t_shape != ds_shape or (ds_classes is not None and teacher.num_classes != ds_classes):
        has = f"{ds_classes} classes" if ds_classes is not None else "no labels"
        raise CheckpointError(
            f"teacher expects input {t_shape} and {teacher.num_classes} classes; dataset has input {ds_shape} and {has}"
        )


def load_student(path: str | Path) -> KDModel:
    """Rebuild a KDModel (eval mode) from a .safetensors file written by kd_core.export."""
    path = Path(path)
    if path.suffix.lower() != ".safetensors" or not path.is_file():
        raise CheckpointError(f"{path.name}: a student is loaded from an exported .safetensors file")
    tensors, meta = _read_safetensors(path)
    for key in ("spec", "input_shape", "num_classes"):
        if meta[key] is None:
            raise CheckpointError(
                f"{path.name} lacks '{key}' in its metadata: it was not written by KD Studio"
            )
    model = _model_from_weights(
        tensors, meta["spec"], meta["input_shape"], meta["num_classes"], meta["preprocessing"], path.name
    )
    return model.eval()


def load_init_weights(
    model: KDModel, path: str | Path, *, preprocessing: dict | None = None
) -> dict[str, Any]:
    """Start `model` from the weights in `path` (safetensors or a `.pt` state dict); what happened, for metrics.

    Names and shapes must match the model's, except its classifier head: a head of another size (another
    class count) keeps the model's fresh initialisation and `init_head_reinitialised` says so. The
    normalisation the weights were trained with (the file's own `mean`/`std`, else `preprocessing`) replaces
    the dataset's, since pretrained features expect their inputs scaled as in pretraining.
    """
    path = Path(path)
    fmt = detect_format(path)
    if fmt not in ("safetensors", "state_dict"):
        raise CheckpointError(
            f"{path.name}: 'init' takes weights (.safetensors or a .pt state dict), not a {fmt} program"
        )
    if fmt == "safetensors":
        tensors, meta = _read_safetensors(path)
        preprocessing = meta["preprocessing"] or preprocessing
    else:
        tensors = _read_state_dict(path)
    tensors = _library_keys(model, tensors)
    own_norm = "mean" in tensors and "std" in tensors
    expected = model.state_dict()
    head = tuple(model.head_prefixes)
    in_head = lambda key: key.startswith(head)  # noqa: E731 - a one-line predicate
    missing = [k for k in expected if k not in tensors and k not in ("mean", "std") and not in_head(k)]
    unexpected = [k for k in tensors if k not in expected]
    wrong = [
        f"{k}: file {tuple(tensors[k].shape)}, model {tuple(v.shape)}"
        for k, v in expected.items()
        if k in tensors and tensors[k].shape != v.shape and not in_head(k)
    ]
    if missing or unexpected or wrong:
        parts = [f"missing {_few(missing)}"] if missing else []
        parts += [f"unexpected {_few(unexpected)}"] if unexpected else []
        parts += [f"shapes differ: {_few(wrong, 3)}"] if wrong else []
        raise CheckpointError(
            f"{path.name} does not fit the student {model.spec}: {'; '.join(parts)} "
            f"(the student's keys look like {_few(list(expected), 3)})"
        )
    skipped = [
        k for k in expected if in_head(k) and (k not in tensors or tensors[k].shape != expected[k].shape)
    ]
    load = {k: t for k, t in tensors.items() if k not in skipped and k not in ("mean", "std")}
    for k, t in load.items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise CheckpointError(f"{path.name}: tensor {k} holds NaN or infinite values")
    with torch.no_grad():
        model.load_state_dict(load, strict=False)
        if own_norm and tensors["mean"].shape == model.mean.shape and tensors["std"].shape == model.std.shape:
            model.mean.copy_(tensors["mean"])
            model.std.copy_(tensors["std"])
            norm = "checkpoint"
        elif preprocessing:
            from kd_core.models.wrap import norm_buffers

            try:
                mean, std = norm_buffers(preprocessing, tuple(model.input_shape))
            except ConfigError as e:
                raise CheckpointError(f"{path.name}: its preprocessing is invalid: {e}") from None
            model.mean.copy_(mean)
            model.std.copy_(std)
            norm = "checkpoint"
        else:
            norm = "dataset"
    return {
        "init_from": path.name,
        "init_loaded_tensors": len(load),
        "init_head_reinitialised": bool(skipped),
        "init_preprocessing": norm,
    }
