"""The model zoo (mlp, cnn, CIFAR-style resnet) built from specs and sized from the dataset; size and latency."""

from __future__ import annotations

import copy
import math
import operator
import statistics
import time
from typing import Any

import torch
from torch import nn

from kd_core.config import validate_model_spec
from kd_core.errors import ConfigError

# Refuse specs that would not fit a worker's memory before allocating anything.
MAX_PARAMS = 100_000_000

DEFAULTS: dict[str, dict[str, Any]] = {
    "mlp": {"hidden": [64], "dropout": 0.0},
    "cnn": {"channels": [32, 64], "hidden": [], "dropout": 0.0},
    "resnet": {"depth": 8, "width": 1},
}


class KDModel(nn.Module):
    """A classifier that takes the dataset's RAW inputs: normalisation is a buffer applied first.

    State-dict layout (what a `.pt` teacher for a given spec must hold): `mean`, `std`
    (shape (1, C, 1, ...), per channel of a (C, H, W) input or per feature of a vector),
    `features.*` (everything up to the pooled feature vector) and `classifier.weight`/`.bias`.
    """

    # TorchScript compiles only forward's needs; the Python-side description stays Python.
    __jit_ignored_attributes__ = ["spec", "input_shape", "num_classes"]
    __jit_unused_properties__ = ["preprocessing"]

    def __init__(
        self,
        spec: dict[str, Any],
        input_shape: tuple[int, ...],
        num_classes: int,
        features: nn.Module,
        classifier: nn.Linear,
        mean: torch.Tensor,
        std: torch.Tensor,
    ) -> None:
        super().__init__()
        self.spec = spec
        self.input_shape = input_shape
        self.num_classes = num_classes
        self.register_buffer("mean", mean)
        self.register_buffer("std", std)
        self.features = features
        self.classifier = classifier

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = (x - self.mean) / self.std
        return self.classifier(self.features(x))

    @property
    def preprocessing(self) -> dict[str, list[float]]:
        """The normalisation as JSON-ready lists, one value per channel (or feature)."""
        return {"mean": self.mean.flatten().tolist(), "std": self.std.flatten().tolist()}


def _norm_buffers(
    preprocessing: dict | None, input_shape: tuple[int, ...]
) -> tuple[torch.Tensor, torch.Tensor]:
    channels = input_shape[0]
    view = (1, channels) + (1,) * (len(input_shape) - 1)
    if preprocessing is None:
        return torch.zeros(view), torch.ones(view)
    if not isinstance(preprocessing, dict) or set(preprocessing) - {"mean", "std"}:
        raise ConfigError("'preprocessing' must be an object with 'mean' and 'std' lists")
    out = []
    for key, default in (("mean", 0.0), ("std", 1.0)):
        values = preprocessing.get(key, [default])
        if hasattr(values, "tolist"):  # numpy arrays and tensors from the data loader
            values = values.tolist()
        if isinstance(values, tuple):
            values = list(values)
        if isinstance(values, int | float) and not isinstance(values, bool):
            values = [values]
        if not isinstance(values, list) or len(values) not in (1, channels):
            raise ConfigError(
                f"preprocessing '{key}' must be a list of 1 or {channels} numbers "
                f"(one per {'channel' if len(input_shape) > 1 else 'feature'})"
            )
        for v in values:
            if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
                raise ConfigError(f"preprocessing '{key}' must hold finite numbers, got {v!r}")
            if key == "std" and v <= 0:
                raise ConfigError(f"preprocessing 'std' must be positive, got {v!r}")
        out.append(torch.tensor(values, dtype=torch.float32).expand(channels).reshape(view).clone())
    return out[0], out[1]


def _dense_stack(in_features: int, hidden: list[int], dropout: float) -> tuple[list[nn.Module], int]:
    layers: list[nn.Module] = []
    for width in hidden:
        layers += [nn.Linear(in_features, width), nn.ReLU(inplace=True)]
        if dropout > 0:
            layers.append(nn.Dropout(dropout))
        in_features = width
    return layers, in_features


def _mlp(spec: dict, input_shape: tuple[int, ...]) -> tuple[nn.Module, int]:
    layers, out = _dense_stack(math.prod(input_shape), spec["hidden"], spec["dropout"])
    return nn.Sequential(nn.Flatten(1), *layers), out


def _cnn(spec: dict, input_shape: tuple[int, ...]) -> tuple[nn.Module, int]:
    in_ch, h, w = input_shape
    layers: list[nn.Module] = []
    for ch in spec["channels"]:
        # No conv bias: BatchNorm's shift makes it redundant.
        layers += [nn.Conv2d(in_ch, ch, 3, padding=1, bias=False), nn.BatchNorm2d(ch), nn.ReLU(inplace=True)]
        if min(h, w) > 2:
            layers.append(nn.MaxPool2d(2))
            h, w = h // 2, w // 2
        in_ch = ch
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(1)]
    if spec["dropout"] > 0 and not spec["hidden"]:
        layers.append(nn.Dropout(spec["dropout"]))
    dense, out = _dense_stack(in_ch, spec["hidden"], spec["dropout"])
    return nn.Sequential(*layers, *dense), out


class BasicBlock(nn.Module):
    """He et al. 2016 basic block; a 1x1 conv + BN shortcut where the shape changes."""

    def __init__(self, in_ch: int, out_ch: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_ch)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_ch)
        self.relu = nn.ReLU(inplace=True)
        if stride != 1 or in_ch != out_ch:
            self.shortcut: nn.Module = nn.Sequential(
                nn.Conv2d(in_ch, out_ch, 1, stride=stride, bias=False), nn.BatchNorm2d(out_ch)
            )
        else:
            self.shortcut = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


def _resnet(spec: dict, input_shape: tuple[int, ...]) -> tuple[nn.Module, int]:
    # CIFAR ResNet (He et al. 2016, sec. 4.2): stem 16k channels, three stages of n basic
    # blocks at 16k, 32k, 64k channels (strides 1, 2, 2), depth = 6n + 2, k = width.
    # resnet8x4 / resnet32x4 of CRD/torchdistill are close: depth 8 / 32, width 4.
    n = (spec["depth"] - 2) // 6
    k = spec["width"]
    stem = 16 * k
    layers: list[nn.Module] = [
        nn.Conv2d(input_shape[0], stem, 3, padding=1, bias=False),
        nn.BatchNorm2d(stem),
        nn.ReLU(inplace=True),
    ]
    in_ch = stem
    for stage, ch in enumerate((16 * k, 32 * k, 64 * k)):
        for i in range(n):
            stride = 2 if stage > 0 and i == 0 else 1
            layers.append(BasicBlock(in_ch, ch, stride))
            in_ch = ch
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(1)]
    return nn.Sequential(*layers), in_ch


_BUILDERS = {"mlp": _mlp, "cnn": _cnn, "resnet": _resnet}


def full_spec(spec: dict[str, Any]) -> dict[str, Any]:
    """The validated spec with every default filled in, so a stored spec rebuilds the same model."""
    spec = validate_model_spec(spec)
    out = {"arch": spec["arch"], **copy.deepcopy(DEFAULTS[spec["arch"]])}
    out.update(copy.deepcopy(spec))
    if "dropout" in out:
        out["dropout"] = float(out["dropout"])
    return out


def _as_int(value: Any) -> int | None:
    # numpy integers are fine (datasets report shapes from arrays); bools and floats are not.
    if isinstance(value, bool):
        return None
    try:
        return operator.index(value)
    except TypeError:
        return None


def _check_shape(input_shape: Any, num_classes: Any) -> tuple[tuple[int, ...], int]:
    try:
        dims = [_as_int(d) for d in input_shape]
    except TypeError:
        raise ConfigError(f"input shape must be a list of positive integers, got {input_shape!r}") from None
    if not dims or len(dims) > 4 or any(d is None or d < 1 for d in dims):
        raise ConfigError(f"input shape must be 1 to 4 positive integers, got {input_shape!r}")
    classes = _as_int(num_classes)
    if classes is None or not 1 <= classes <= 1_000_000:
        raise ConfigError(f"class count must be a positive integer, got {num_classes!r}")
    return tuple(dims), classes


def build_model(
    spec: dict[str, Any],
    input_shape: tuple[int, ...],
    num_classes: int,
    preprocessing: dict | None = None,
) -> KDModel:
    """Build a KDModel for `spec` sized for the dataset; init follows torch's global RNG."""
    spec = full_spec(spec)
    shape, num_classes = _check_shape(input_shape, num_classes)
    arch = spec["arch"]
    if arch == "cnn" and not spec["channels"]:
        raise ConfigError("'model.channels' must list at least one convolution width for arch 'cnn'")
    if arch in ("cnn", "resnet") and len(shape) != 3:
        raise ConfigError(
            f"arch '{arch}' needs image input (C, H, W); this data has input shape {shape}: use arch 'mlp'"
        )
    mean, std = _norm_buffers(preprocessing, shape)
    # Count on the meta device first: a huge spec fails fast instead of filling memory.
    with torch.device("meta"):
        meta_features, meta_out = _BUILDERS[arch](spec, shape)
        total = count_params(meta_features) + meta_out * num_classes + num_classes
    if total > MAX_PARAMS:
        raise ConfigError(f"model {spec} would have {total:,} parameters; the limit is {MAX_PARAMS:,}")
    features, out = _BUILDERS[arch](spec, shape)
    for m in features.modules():
        if isinstance(m, nn.Conv2d):
            # He init for ReLU convs (as torchvision's and the CIFAR ResNets' code): BN-friendly start.
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
    return KDModel(spec, shape, num_classes, features, nn.Linear(out, num_classes), mean, std)


def count_params(model: nn.Module) -> int:
    """Trainable and frozen parameters (buffers such as BN statistics excluded)."""
    return sum(p.numel() for p in model.parameters())


def model_stats(model: nn.Module, input_shape: tuple[int, ...] | None = None, *, repeats: int = 20) -> dict:
    """Parameter count, bytes of weights + buffers, and median CPU latency of one sample (ms)."""
    shape = tuple(input_shape if input_shape is not None else model.input_shape)
    size = sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))
    cpu = copy.deepcopy(model).eval()
    tensors = (*cpu.parameters(), *cpu.buffers())
    if any(t.device.type != "cpu" or (t.is_floating_point() and t.dtype != torch.float32) for t in tensors):
        cpu = cpu.to("cpu", torch.float32)
    x = torch.zeros((1, *shape))
    times = []
    with torch.no_grad():
        for _ in range(3):
            cpu(x)
        for _ in range(max(1, repeats)):
            start = time.perf_counter()
            cpu(x)
            times.append((time.perf_counter() - start) * 1000.0)
    return {
        "params": count_params(model),
        "size_bytes": int(size),
        "cpu_latency_ms": statistics.median(times),
    }
