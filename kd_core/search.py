"""Distill to a budget, the engine side: budgets, the student space (auto from the zoo), sizes, latency, Pareto front.

Pure PyTorch like the rest of kd_core: the search itself (Optuna, its storage, the trials as jobs) lives in the
web app and the workers; this module answers "does this student fit", "which students fit" and "which results
are not dominated".
"""

from __future__ import annotations

import itertools
import math
import statistics
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from kd_core.config import METHODS, validate_model_spec
from kd_core.errors import ConfigError

DEVICES = ("cpu", "cuda")
# A search may choose among the distillation methods kd_core.config knows (METHODS: hinton, dkd, dist).
# Logit standardisation applies to these only (DIST's correlations ignore the logits' scale already).
STANDARDIZABLE = ("hinton", "dkd")
# At most this many candidates: the sampler's categorical choice stays informative.
MAX_CANDIDATES = 32
MAX_LIST_STUDENTS = 64


@dataclass
class Budget:
    """What a student may cost: any of parameters, bytes of weights, milliseconds per sample on `device`."""

    max_params: int | None = None
    max_size_bytes: int | None = None
    max_latency_ms: float | None = None
    device: str = "cpu"

    @property
    def cost(self) -> str:
        """The figure a search minimises beside accuracy: latency if bounded, else size, else parameters."""
        if self.max_latency_ms is not None:
            return "latency_ms"
        if self.max_size_bytes is not None:
            return "size_bytes"
        return "params"

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v is not None}


@dataclass
class Space:
    """What a search may choose: a student among `students`, T and alpha in their ranges, a method, and
    whether to standardise logits (`standardize`: [False], [True] or [False, True], the last a choice)."""

    students: list[dict[str, Any]]
    temperature: tuple[float, float] = (1.0, 8.0)
    alpha: tuple[float, float] = (0.3, 0.95)
    methods: list[str] = field(default_factory=lambda: ["hinton"])
    standardize: list[bool] = field(default_factory=lambda: [False])
    auto: bool = False

    def to_dict(self) -> dict[str, Any]:
        return {
            "students": self.students,
            "temperature": list(self.temperature),
            "alpha": list(self.alpha),
            "method": self.methods,
            "logit_standardization": self.standardize,
            "auto": self.auto,
        }


def _positive(body: dict[str, Any], key: str, kind: type) -> Any:
    value = body.get(key)
    if value is None:
        return None
    ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value) and value > 0
    if not ok or (kind is int and float(value) != int(value)):
        what = "a positive integer" if kind is int else "a positive number"
        raise ConfigError(f"'budget.{key}' must be {what}, got {value!r}")
    return kind(value)


def parse_budget(body: Any) -> Budget:
    """Untrusted JSON → Budget; at least one limit, each positive; device cpu (default) or cuda."""
    if not isinstance(body, dict):
        raise ConfigError(
            '\'budget\' must be an object such as {"max_params": 5000} or {"max_latency_ms": 1.0}'
        )
    unknown = sorted(set(body) - {"max_params", "max_size_bytes", "max_latency_ms", "device"})
    if unknown:
        raise ConfigError(f"unknown budget field(s): {', '.join(unknown)}")
    budget = Budget(
        max_params=_positive(body, "max_params", int),
        max_size_bytes=_positive(body, "max_size_bytes", int),
        max_latency_ms=_positive(body, "max_latency_ms", float),
        device=body.get("device", "cpu"),
    )
    if budget.device not in DEVICES:
        raise ConfigError(f"'budget.device' must be one of {', '.join(DEVICES)}; got {budget.device!r}")
    if budget.max_params is None and budget.max_size_bytes is None and budget.max_latency_ms is None:
        raise ConfigError("'budget' needs at least one of max_params, max_size_bytes, max_latency_ms")
    return budget


def _range(
    body: dict[str, Any], key: str, default: tuple[float, float], lo: float, hi: float
) -> tuple[float, float]:
    value = body.get(key)
    if value is None:
        return default
    good = (
        isinstance(value, list | tuple)
        and len(value) == 2
        and all(isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v) for v in value)
    )
    if not good or not lo <= value[0] <= value[1] <= hi:
        raise ConfigError(
            f"'space.{key}' must be [low, high] with {lo} <= low <= high <= {hi}; got {value!r}"
        )
    return float(value[0]), float(value[1])


def student_figures(spec: dict[str, Any], input_shape: tuple[int, ...], num_classes: int) -> dict[str, int]:
    """Parameters and bytes of weights + buffers of `spec` built for this data (no training, no latency)."""
    from kd_core.models import build_model, count_params

    model = build_model(spec, tuple(input_shape), int(num_classes))
    size = sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))
    return {"params": count_params(model), "size_bytes": int(size)}


def static_excess(figures: dict[str, Any], budget: Budget) -> str | None:
    """Why `figures` break the budget's parameter or size limit, in words; None when they fit."""
    if budget.max_params is not None and figures["params"] > budget.max_params:
        return f"{figures['params']:,} parameters > {budget.max_params:,}"
    if budget.max_size_bytes is not None and figures["size_bytes"] > budget.max_size_bytes:
        return f"{figures['size_bytes']:,} bytes > {budget.max_size_bytes:,}"
    return None


def latency_excess(latency_ms: float, budget: Budget) -> str | None:
    if budget.max_latency_ms is not None and latency_ms > budget.max_latency_ms:
        return f"{latency_ms:.3f} ms per sample on {budget.device} > {budget.max_latency_ms:g} ms"
    return None


def zoo_candidates(input_shape: tuple[int, ...]) -> list[dict[str, Any]]:
    """Every student `auto` considers for this input: MLPs, and for images CNNs and CIFAR ResNets."""
    widths = (8, 16, 24, 32, 48, 64, 96, 128, 256, 512)
    specs: list[dict[str, Any]] = [{"arch": "mlp", "hidden": [w]} for w in widths]
    specs += [{"arch": "mlp", "hidden": [w, w]} for w in widths]
    specs += [{"arch": "mlp", "hidden": [w, w // 2]} for w in widths if w >= 32]
    if len(input_shape) == 3:
        for c in (4, 6, 8, 12, 16, 24, 32, 48, 64):
            specs += [{"arch": "cnn", "channels": [c]}, {"arch": "cnn", "channels": [c, c]}]
            specs += [{"arch": "cnn", "channels": [c, 2 * c]}, {"arch": "cnn", "channels": [c, 2 * c, 4 * c]}]
        specs += [
            {"arch": "resnet", "depth": d, "width": w}
            for d, w in itertools.product((8, 14, 20, 32), (1, 2, 4))
        ]
    return specs


def derive_students(input_shape: tuple[int, ...], num_classes: int, budget: Budget) -> list[dict[str, Any]]:
    """`"auto"`: the zoo's students whose parameters and size fit the budget, spread over sizes (at most
    MAX_CANDIDATES, the largest of each family kept, since more capacity is what a budget buys).

    Latency is not checked here: it is measured on a worker (the budget's device), once per architecture.
    """
    fitting: list[tuple[int, dict[str, Any]]] = []
    smallest: tuple[int, dict[str, Any]] | None = None
    for spec in zoo_candidates(tuple(input_shape)):
        try:
            figures = student_figures(spec, input_shape, num_classes)
        except ConfigError:
            continue
        if smallest is None or figures["params"] < smallest[0]:
            smallest = (figures["params"], spec)
        if static_excess(figures, budget) is None:
            fitting.append((figures["params"], spec))
    if not fitting:
        hint = f" (the smallest, {smallest[1]}, has {smallest[0]:,} parameters)" if smallest else ""
        raise ConfigError(f"no student of the zoo fits this budget{hint}; raise the budget or list students")
    fitting.sort(key=lambda item: item[0])
    if len(fitting) > MAX_CANDIDATES:
        # Evenly spaced by size rank, always keeping the largest.
        step = (len(fitting) - 1) / (MAX_CANDIDATES - 1)
        fitting = [fitting[round(i * step)] for i in range(MAX_CANDIDATES)]
    return [spec for _, spec in fitting]


def parse_space(body: Any, input_shape: tuple[int, ...], num_classes: int, budget: Budget) -> Space:
    """Untrusted JSON → Space; `students` "auto" (default) or a list of model specs (each validated and
    buildable for this data; those over the budget stay in, to be recorded as over_budget)."""
    if body is None:
        body = {}
    if not isinstance(body, dict):
        raise ConfigError('\'space\' must be an object such as {"students": "auto", "temperature": [1, 8]}')
    unknown = sorted(set(body) - {"students", "temperature", "alpha", "method", "logit_standardization"})
    if unknown:
        raise ConfigError(f"unknown space field(s): {', '.join(unknown)}")
    students = body.get("students", "auto")
    if students == "auto":
        specs, auto = derive_students(input_shape, num_classes, budget), True
    elif isinstance(students, list) and 0 < len(students) <= MAX_LIST_STUDENTS:
        specs, auto = [], False
        for i, spec in enumerate(students):
            key = f"space.students[{i}]"
            spec = validate_model_spec(spec, key)
            try:
                student_figures(spec, input_shape, num_classes)
            except ConfigError as exc:
                raise ConfigError(f"'{key}': {exc}") from None
            if spec not in specs:
                specs.append(spec)
    else:
        raise ConfigError(
            f"'space.students' must be \"auto\" or a list of 1 to {MAX_LIST_STUDENTS} model specs; got {students!r}"
        )
    methods = _methods(body.get("method", ["hinton"]))
    return Space(
        students=specs,
        temperature=_range(body, "temperature", (1.0, 8.0), 0.05, 100.0),
        alpha=_range(body, "alpha", (0.3, 0.95), 0.0, 1.0),
        methods=methods,
        standardize=_standardize(body.get("logit_standardization", False), methods),
        auto=auto,
    )


def _methods(value: Any) -> list[str]:
    """`space.method`: one method name or a non-empty list of them (duplicates dropped, order kept)."""
    if isinstance(value, str):
        value = [value]
    good = isinstance(value, list) and value and all(isinstance(m, str) and m in METHODS for m in value)
    if not good:
        raise ConfigError(
            f'\'space.method\' must list methods among {", ".join(METHODS)} (for example ["hinton", "dkd"]); '
            f"got {value!r}"
        )
    return sorted(set(value), key=value.index)


def _standardize(value: Any, methods: list[str]) -> list[bool]:
    """`space.logit_standardization`: false (default), true, or [false, true] to let the search choose."""
    if isinstance(value, bool):
        value = [value]
    good = isinstance(value, list) and value and all(isinstance(v, bool) for v in value)
    if not good:
        raise ConfigError(
            f"'space.logit_standardization' must be true, false or [false, true] (the search chooses); got {value!r}"
        )
    choices = sorted(set(value))
    if choices == [True] and not any(m in STANDARDIZABLE for m in methods):
        raise ConfigError(
            "'space.logit_standardization' true applies to methods hinton and dkd, not dist (DIST's correlations "
            "ignore logit scale already): add hinton or dkd to 'space.method', or leave it false"
        )
    return choices


def trial_choice(method: str, standardize: bool) -> bool:
    """The logit_standardization a trial of `method` runs with: as chosen, except never for dist."""
    return bool(standardize) and method in STANDARDIZABLE


def measure_latency(
    spec: dict[str, Any],
    input_shape: tuple[int, ...],
    num_classes: int,
    device: str = "cpu",
    *,
    repeats: int = 30,
) -> float:
    """Median milliseconds for one sample at `input_shape` through `spec` (random init: cost does not
    depend on the weights) on `device`, after a warm-up. On CPU it is the model card's measurement
    (`kd_core.models.wrap.cpu_latency`: one thread, time-bounded), so a budget and a card agree."""
    import torch

    from kd_core.models import build_model
    from kd_core.models.wrap import cpu_latency

    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("the budget names device cuda, but the worker measuring latency has no CUDA device")
    model = build_model(spec, tuple(input_shape), int(num_classes)).to(dev).eval()
    x = torch.zeros((1, *input_shape), device=dev)
    if dev.type != "cuda":
        with torch.no_grad():
            return float(cpu_latency(model, x)["median_ms"])
    times = []
    with torch.no_grad():
        for _ in range(5):
            model(x)
        for _ in range(max(1, repeats)):
            torch.cuda.synchronize(dev)
            start = time.perf_counter()
            model(x)
            torch.cuda.synchronize(dev)
            times.append((time.perf_counter() - start) * 1000.0)
    return float(statistics.median(times))


def latency_key(spec: dict[str, Any], input_shape: tuple[int, ...], num_classes: int, device: str) -> str:
    """The cache key of a latency figure: architecture (full spec), input shape, classes, device type."""
    import json

    from kd_core.models import full_spec

    shape = "x".join(str(int(d)) for d in input_shape)
    return f"{device}|{shape}|{int(num_classes)}|{json.dumps(full_spec(spec), sort_keys=True)}"


def dominates(a: tuple[float, float], b: tuple[float, float]) -> bool:
    """(accuracy, cost) `a` is at least as good as `b` on both and better on one."""
    return a[0] >= b[0] and a[1] <= b[1] and (a[0] > b[0] or a[1] < b[1])


def pareto_front(points: list[tuple[Any, float, float]]) -> list[Any]:
    """Keys of the (key, accuracy, cost) points no other point dominates, most accurate first.

    Of identical points the first is kept, so the front never lists the same figure twice.
    """
    front: list[tuple[Any, float, float]] = []
    for i, (key, acc, cost) in enumerate(points):
        if any(dominates((a, c), (acc, cost)) for j, (_, a, c) in enumerate(points) if j != i):
            continue
        if any(a == acc and c == cost for _, a, c in front):
            continue
        front.append((key, acc, cost))
    front.sort(key=lambda p: (-p[1], p[2]))
    return [key for key, _, _ in front]
