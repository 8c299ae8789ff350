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


# Per model, the whole latency measurement (warm-up, single-sample runs, batched runs) stays near this bound.
LATENCY_BUDGET_S = 0.5
# A single-sample figure whose fixed per-call share (see `cpu_latency`) is above this is "overhead-dominated".
OVERHEAD_DOMINATED = 0.5


def quantile(sorted_values: list[float], q: float) -> float:
    """Linear-interpolated quantile of already sorted values (q in [0, 1])."""
    pos = q * (len(sorted_values) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


def cpu_latency(
    call: Any,
    x: torch.Tensor,
    *,
    budget_s: float = LATENCY_BUDGET_S,
    max_repeats: int = 10_000,
    batch_size: int = 32,
    threads: int | None = 1,
) -> dict[str, Any]:
    """Per-sample CPU latency of `call` on the single sample `x` (shape (1, ...)), time-bounded.

    With `threads` (default 1; None: leave the process's setting), PyTorch runs on that many CPU threads for
    the measurement and the setting is restored after. One thread is the reproducible figure: with more
    threads than idle cores (other jobs on the worker), intra-op threads wait on each other and a 30 µs
    model can time at 10 ms.

    Warm-up (at least 3 calls, up to a tenth of the budget), then single-sample calls until about 60% of the
    budget is spent (at least 3, at most `max_repeats`): median, p10 and p90 in ms. Then, if the budget left
    allows, the same sample repeated `batch_size` times in one call: its per-sample time against the
    single-sample median gives `overhead`, the share of the single-sample time that is fixed per-call cost
    (Python, framework dispatch, allocation) rather than arithmetic that grows with the input. Above
    OVERHEAD_DOMINATED the figure says little about the model's arithmetic. `overhead` is None when the model is
    too slow for the batched calls to fit the budget (its arithmetic dominates then anyway).
    """
    previous = torch.get_num_threads()
    if threads is not None and threads != previous:
        torch.set_num_threads(int(threads))
    try:
        return _cpu_latency(call, x, max(float(budget_s), 0.0), max_repeats, batch_size)
    finally:
        if torch.get_num_threads() != previous:
            torch.set_num_threads(previous)


def _cpu_latency(
    call: Any, x: torch.Tensor, budget_s: float, max_repeats: int, batch_size: int
) -> dict[str, Any]:
    began = time.perf_counter()
    warm = 0
    while warm < 3 or (time.perf_counter() - began < 0.1 * budget_s and warm < 200):
        call(x)
        warm += 1
    times: list[float] = []
    timed_from = time.perf_counter()
    while len(times) < 3 or (
        len(times) < max(1, max_repeats) and time.perf_counter() - timed_from < 0.6 * budget_s
    ):
        start = time.perf_counter()
        call(x)
        times.append((time.perf_counter() - start) * 1000.0)
    times.sort()
    median = statistics.median(times)
    out: dict[str, Any] = {
        "median_ms": median,
        "p10_ms": quantile(times, 0.10),
        "p90_ms": quantile(times, 0.90),
        "repeats": len(times),
        "batch_size": 1,
        "threads": torch.get_num_threads(),
        "overhead": None,
    }
    left_s = budget_s - (time.perf_counter() - began)
    # At least 3 batched calls in the budget left, each estimated at batch_size single-sample medians.
    if batch_size > 1 and 3 * batch_size * median / 1000.0 <= left_s:
        xb = x.expand(batch_size, *x.shape[1:]).contiguous()
        batched: list[float] = []
        try:
            call(xb)
            first = time.perf_counter()
            while len(batched) < 3 or (len(batched) < 1000 and time.perf_counter() - first < 0.8 * left_s):
                start = time.perf_counter()
                call(xb)
                batched.append((time.perf_counter() - start) * 1000.0)
        # e.g. an ONNX teacher exported for batch size 1: no overhead figure, the latency stands
        except Exception:
            batched = []
        if batched and median > 0:
            per_sample = statistics.median(batched) / batch_size
            out["batched_per_sample_ms"] = per_sample
            out["overhead"] = min(1.0, max(0.0, 1.0 - per_sample / median))
    return out


def model_stats(
    model: nn.Module,
    input_shape: tuple[int, ...] | None = None,
    *,
    repeats: int = 10_000,
    budget_s: float = LATENCY_BUDGET_S,
    threads: int | None = 1,
) -> dict:
    """Parameter count, bytes of weights + buffers, and CPU latency of one sample (ms) on a float32 eval copy.

    `cpu_latency_ms` is the median of single-sample calls (batch size 1) after a warm-up, repeated until
    `budget_s` is mostly spent (at most `repeats` times), on `threads` CPU threads (see `cpu_latency`); `cpu_latency_p10_ms`/`cpu_latency_p90_ms` give the
    spread, `latency_repeats`, `latency_batch_size` and `latency_threads` how it was measured, and
    `latency_overhead` the fixed per-call share of that time (see `cpu_latency`).
    """
    shape = tuple(input_shape if input_shape is not None else model.input_shape)
    size = sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))
    cpu = copy.deepcopy(model).eval()
    tensors = (*cpu.parameters(), *cpu.buffers())
    if any(t.device.type != "cpu" or (t.is_floating_point() and t.dtype != torch.float32) for t in tensors):
        cpu = cpu.to("cpu", torch.float32)
    with torch.no_grad():
        lat = cpu_latency(
            cpu, torch.zeros((1, *shape)), budget_s=budget_s, max_repeats=repeats, threads=threads
        )
    return {
        "params": count_params(model),
        "size_bytes": int(size),
        **latency_fields(lat),
    }


def latency_fields(lat: dict[str, Any]) -> dict[str, Any]:
    """`cpu_latency`'s figures under model_stats' key names."""
    return {
        "cpu_latency_ms": lat["median_ms"],
        "cpu_latency_p10_ms": lat["p10_ms"],
        "cpu_latency_p90_ms": lat["p90_ms"],
        "latency_repeats": lat["repeats"],
        "latency_batch_size": lat["batch_size"],
        "latency_threads": lat["threads"],
        "latency_overhead": lat["overhead"],
    }
