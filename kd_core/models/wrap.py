"""KDModel: any classifier behind the dataset's normalisation (a buffer), so exports take raw inputs; size and latency."""

from __future__ import annotations

import copy
import math
import statistics
import time
from typing import Any

import torch
from torch import nn

from kd_core.errors import ConfigError


class KDModel(nn.Module):
    """A classifier that takes the dataset's RAW inputs: normalisation is a buffer applied first.

    State-dict layout (what a `.pt` teacher for a given zoo spec must hold): `mean`, `std`
    (shape (1, C, 1, ...), per channel of a (C, H, W) input or per feature of a vector),
    `features.*` (everything up to the pooled feature vector) and `classifier.weight`/`.bias`.
    Library architectures use `LibraryModel` (same buffers, the network under `net.*`).
    """

    # TorchScript compiles only forward's needs; the Python-side description stays Python.
    __jit_ignored_attributes__ = ["spec", "input_shape", "num_classes", "head_prefixes"]
    __jit_unused_properties__ = ["preprocessing"]

    def __init__(
        self,
        spec: dict[str, Any],
        input_shape: tuple[int, ...],
        num_classes: int,
        features: nn.Module,
        classifier: nn.Module,
        mean: torch.Tensor,
        std: torch.Tensor,
    ) -> None:
        super().__init__()
        self.spec = spec
        self.input_shape = input_shape
        self.num_classes = num_classes
        # State-dict prefixes of the classifier head: what a pretrained start may re-initialise.
        self.head_prefixes: tuple[str, ...] = ("classifier.",)
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


class LibraryModel(KDModel):
    """A torchvision/timm classifier (`net`, built for the dataset's classes and channels) behind the buffers.

    State-dict layout: `mean`, `std`, `net.*` where `net.*` is exactly what the library model's own
    `state_dict()` holds, so a plain library state dict loads by adding the prefix.
    """

    def __init__(
        self,
        spec: dict[str, Any],
        input_shape: tuple[int, ...],
        num_classes: int,
        net: nn.Module,
        head: str,
        mean: torch.Tensor,
        std: torch.Tensor,
    ) -> None:
        nn.Module.__init__(self)
        self.spec = spec
        self.input_shape = input_shape
        self.num_classes = num_classes
        self.head_prefixes = (f"net.{head}.",)
        self.register_buffer("mean", mean)
        self.register_buffer("std", std)
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net((x - self.mean) / self.std)


def norm_buffers(
    preprocessing: dict | None, input_shape: tuple[int, ...]
) -> tuple[torch.Tensor, torch.Tensor]:
    """`mean`/`std` buffers of shape (1, C, 1, ...) from {"mean": [..], "std": [..]} (None: identity)."""
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
