"""The experiment-config schema: the one definition shared by the CLI, the REST API and the workers."""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from kd_core.errors import ConfigError
from kd_core.limits import name_problem

KINDS = ("train", "distill", "codistill")
OPTIMIZERS = ("adam", "sgd")
SCHEDULES = ("cosine", "step", "none")
SOFT_LOSSES = ("kl", "ce")
CODISTILL_LOSSES = ("ce", "kl", "mse")
EXCHANGES = ("checkpoints", "predictions")
DATA_MODES = ("same", "disjoint")
PLACEMENTS = ("process", "workers")
AUGMENTS = ("none", "flip_crop", "noise")
ARCHS = ("mlp", "cnn", "resnet")
# Library architectures, built by name (kd_core/models/library.py); the library is imported only then.
LIBRARY_ARCHS = ("torchvision", "timm")
KEEPS = ("best", "last")
# Training arithmetic (kd_core/device.py resolves it for the device; kd_core/loop.py's Precision applies it).
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
METHODS = ("hinton", "dkd", "dist")
# Each distillation method's options and their defaults: the papers' (DKD: Zhao et al. 2022, CIFAR-100
# settings; DIST: Huang et al. 2022). `ce_weight` weighs the hard-label term in both papers' totals.
METHOD_OPTIONS: dict[str, dict[str, float]] = {
    "hinton": {},
    "dkd": {"alpha": 1.0, "beta": 8.0, "warmup_epochs": 20.0, "ce_weight": 1.0},
    "dist": {"beta": 1.0, "gamma": 1.0, "ce_weight": 1.0},
}


@dataclass
class CodistillConfig:
    """Anil et al. 2018: N groups train together; after burn-in each also learns from the others.

    `replicas` groups of `group_size` synchronous data-parallel workers each. For the first
    `burn_in_steps` every group trains on the labels only; then it adds `weight` x `loss` towards
    the average prediction of the OTHER groups, computed from their parameter copies refreshed
    every `exchange_every` steps ("checkpoints"), or from their logits on the same batch every
    step ("predictions", lockstep, data "same" only). `placement` "process": this run starts
    every group itself (one loop when group_size is 1, worker subprocesses otherwise);
    "workers": each group is its own task (Celery), swapping copies through a shared exchange.

    Weight decay: codistillation itself regularises (Sodhani et al. 2020, "A closer look at
    codistillation"), so the `weight_decay` tuned for plain training can over-regularise the
    replicas; lower it (often to 0) when codistilled replicas underfit.
    """

    replicas: int = 2
    burn_in_steps: int = 200
    exchange_every: int = 50
    loss: str = "ce"
    weight: float = 1.0
    exchange: str = "checkpoints"
    data: str = "same"
    group_size: int = 1
    placement: str = "process"


@dataclass
class ExperimentConfig:
    """One experiment. `dataset`/`teacher` are database ids in the web app, names or paths in the CLI."""

    kind: str = "train"
    dataset: int | str = "digits"
    name: str = ""
    teacher: int | str | None = None
    # Needed only for a teacher file that does not carry its own spec (a bare state dict).
    teacher_arch: dict[str, Any] | None = None
    # The normalisation a teacher file was trained with outside the model ({"mean": [..], "std": [..]} per
    # channel; torchvision/timm state dicts usually are); the web app stores it with the checkpoint.
    teacher_preprocessing: dict[str, Any] | None = None
    # Weights that start the student (a checkpoint id in the web app, a path in the CLI); a classifier head
    # of another size is re-initialised. `init_preprocessing`: what those weights were trained with.
    init: int | str | None = None
    init_preprocessing: dict[str, Any] | None = None
    # Data-parallel processes for one `train` or `distill` job (the codistillation group machinery with one
    # group: the global batch split across ranks, gradients all-reduced over gloo/NCCL, rank 0 reports).
    devices: int = 1
    model: dict[str, Any] = field(default_factory=lambda: {"arch": "mlp", "hidden": [64]})
    epochs: int = 30
    # Caps the optimisation steps regardless of epochs (codistillation compares runs at equal steps).
    max_steps: int | None = None
    batch_size: int = 64
    lr: float = 0.001
    optimizer: str = "adam"
    momentum: float = 0.9
    weight_decay: float = 0.0
    schedule: str = "cosine"
    lr_step_epochs: int = 10
    lr_gamma: float = 0.1
    seed: int = 0
    temperature: float = 4.0
    alpha: float = 0.9
    soft_loss: str = "kl"
    # The distillation loss (see kd_core/losses.py) and its options (missing ones: the paper's defaults).
    method: str = "hinton"
    method_options: dict[str, float] = field(default_factory=dict)
    logit_standardization: bool = False
    # Which weights a run exports and reports: the best on the validation split, or the last.
    keep: str = "best"
    augment: str = "none"
    val_fraction: float = 0.1
    test_fraction: float = 0.2
    log_every: int = 10
    # The GPU path (kd_core/device.py): "auto" = bf16 autocast on CUDA where supported, else fp16 with a loss
    # scaler; fp32 on the CPU. `channels_last`: NHWC memory format for image models. `compile`: torch.compile
    # the training forward, falling back to eager with a note in the result's metrics if it fails.
    precision: str = "auto"
    channels_last: bool = False
    compile: bool = False
    # Seconds of running time after which the job stops and keeps what it trained (None: no limit of
    # its own; the web app also applies its site ceiling, KD_MAX_JOB_SECONDS).
    time_limit_s: float | None = None
    # Options of the dataset loader: label_column (CSV), image_size (ZIP),
    # n_samples / n_features / n_classes / label_noise (built-in synthetic).
    data_options: dict[str, Any] = field(default_factory=dict)
    codistill: CodistillConfig = field(default_factory=CodistillConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _check_type(key: str, value: Any, types: tuple[type, ...], what: str) -> None:
    # bool is an int in Python; a config that says "epochs": true is a mistake.
    if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
        raise ConfigError(f"'{key}' must be {what}, got {value!r}")


def _range(key: str, value: float, lo: float | None, hi: float | None) -> None:
    if lo is not None and value < lo:
        raise ConfigError(f"'{key}' must be >= {lo}, got {value!r}")
    if hi is not None and value > hi:
        raise ConfigError(f"'{key}' must be <= {hi}, got {value!r}")


def _choice(key: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"'{key}' must be one of {', '.join(choices)}; got {value!r}")


def _check_known(data: dict[str, Any], schema: type, what: str) -> None:
    unknown = sorted(set(data) - {f.name for f in dataclasses.fields(schema)})
    if unknown:
        raise ConfigError(f"unknown {what} field(s): {', '.join(unknown)}")


def _check_numbers(values: dict[str, Any], table: dict[str, tuple], prefix: str = "") -> None:
    """Check each number of `table` present in `values`; real-valued ones become floats, in place."""
    for key, (types, what, lo, hi) in table.items():
        if key in values:
            _check_type(prefix + key, values[key], types, what)
            _range(prefix + key, values[key], lo, hi)
            if float in types:
                values[key] = float(values[key])


# key -> (types, description, low, high); None bounds are open.
_NUMBERS: dict[str, tuple[tuple[type, ...], str, float | None, float | None]] = {
    "epochs": ((int,), "an integer", 1, 100_000),
    "batch_size": ((int,), "an integer", 1, 65_536),
    "lr": ((int, float), "a number", 1e-12, 10.0),
    "momentum": ((int, float), "a number", 0.0, 1.0),
    "weight_decay": ((int, float), "a number", 0.0, 1.0),
    "lr_step_epochs": ((int,), "an integer", 1, 100_000),
    "lr_gamma": ((int, float), "a number", 1e-6, 1.0),
    "seed": ((int,), "an integer", 0, 2**31 - 1),
    "temperature": ((int, float), "a number", 0.05, 100.0),
    "alpha": ((int, float), "a number", 0.0, 1.0),
    "val_fraction": ((int, float), "a number", 0.0, 0.5),
    "test_fraction": ((int, float), "a number", 0.0, 0.5),
    "log_every": ((int,), "an integer", 1, 1_000_000),
}
_CODISTILL_NUMBERS: dict[str, tuple[tuple[type, ...], str, float | None, float | None]] = {
    "replicas": ((int,), "an integer", 1, 64),
    "burn_in_steps": ((int,), "an integer", 0, 10_000_000),
    "exchange_every": ((int,), "an integer", 1, 10_000_000),
    "weight": ((int, float), "a number", 0.0, 100.0),
    "group_size": ((int,), "an integer", 1, 64),
}


def validate_model_spec(spec: Any, key: str = "model") -> dict[str, Any]:
    """Check a model spec's shape (not its size against data: the model builder does that)."""
    if not isinstance(spec, dict):
        raise ConfigError(f'\'{key}\' must be an object such as {{"arch": "mlp", "hidden": [64]}}')
    arch = spec.get("arch")
    _choice(f"{key}.arch", arch, ARCHS + LIBRARY_ARCHS)
    if arch in LIBRARY_ARCHS:
        return _validate_library_spec(spec, key)
    allowed = {
        "mlp": {"arch", "hidden", "dropout"},
        "cnn": {"arch", "channels", "hidden", "dropout"},
        "resnet": {"arch", "depth", "width"},
    }[arch]
    unknown = sorted(set(spec) - allowed)
    if unknown:
        raise ConfigError(f"'{key}' has unknown field(s) for arch {arch}: {', '.join(unknown)}")
    for list_key in ("hidden", "channels"):
        if list_key in spec:
            values = spec[list_key]
            if not isinstance(values, list) or len(values) > 32:
                raise ConfigError(f"'{key}.{list_key}' must be a list of at most 32 positive integers")
            for v in values:
                _check_type(f"{key}.{list_key}", v, (int,), "a list of positive integers")
                _range(f"{key}.{list_key}", v, 1, 16_384)
    if "dropout" in spec:
        _check_type(f"{key}.dropout", spec["dropout"], (int, float), "a number")
        _range(f"{key}.dropout", spec["dropout"], 0.0, 0.95)
    if arch == "resnet":
        depth = spec.get("depth", 8)
        _check_type(f"{key}.depth", depth, (int,), "an integer")
        if depth < 8 or (depth - 2) % 6 != 0 or depth > 110:
            raise ConfigError(
                f"'{key}.depth' must be 6n+2 between 8 and 110 (8, 14, 20, 32, ...); got {depth}"
            )
        width = spec.get("width", 1)
        _check_type(f"{key}.width", width, (int,), "an integer")
        _range(f"{key}.width", width, 1, 16)
    return dict(spec)


def _validate_library_spec(spec: dict[str, Any], key: str) -> dict[str, Any]:
    # Imported here: kd_core.models imports this module.
    from kd_core.models.library import check_kwargs, check_name

    unknown = sorted(set(spec) - {"arch", "name", "kwargs"})
    if unknown:
        raise ConfigError(f"'{key}' has unknown field(s) for arch {spec['arch']}: {', '.join(unknown)}")
    kwargs = check_kwargs(spec.get("kwargs"), key)
    check_name(spec["arch"], spec.get("name"), key)
    return {"arch": spec["arch"], "name": spec["name"], "kwargs": kwargs}


def validate_preprocessing(value: Any, key: str = "preprocessing") -> dict[str, Any]:
    """A checked {"mean": [..], "std": [..]} (floats); ConfigError in words otherwise."""
    return _check_preprocessing(value, key)


def _check_preprocessing(value: Any, key: str) -> dict[str, Any]:
    """{"mean": [..], "std": [..]}: finite numbers, std positive (the channel count is checked against data later)."""
    if not isinstance(value, dict) or set(value) != {"mean", "std"}:
        raise ConfigError(
            f"'{key}' must be an object with 'mean' and 'std' lists, one number per input channel"
        )
    for part in ("mean", "std"):
        numbers = value[part]
        if not isinstance(numbers, list) or not 1 <= len(numbers) <= 4096:
            raise ConfigError(f"'{key}.{part}' must be a list of numbers, one per input channel")
        for v in numbers:
            _check_type(f"{key}.{part}", v, (int, float), "a list of numbers")
            if v != v or v in (float("inf"), float("-inf")) or (part == "std" and v <= 0):
                positive = ", all positive" if part == "std" else ""
                raise ConfigError(f"'{key}.{part}' must hold finite numbers{positive}")
    return {"mean": [float(v) for v in value["mean"]], "std": [float(v) for v in value["std"]]}


class _Problems:
    """Collects every bad field of a config, so one answer names them all (not one per attempt)."""

    def __init__(self) -> None:
        self.fields: dict[str, str] = {}

    @contextmanager
    def check(self, key: str) -> Iterator[None]:
        # The message's own quoted key ('model.hidden') is more precise than the one checked here.
        try:
            yield
        except ConfigError as exc:
            named = re.match(r"'([\w.]+)'", str(exc))
            self.fields.setdefault(named.group(1) if named else key, str(exc))

    def raise_if_any(self) -> None:
        if not self.fields:
            return
        messages = list(self.fields.values())
        if len(messages) == 1:
            raise ConfigError(messages[0], self.fields)
        raise ConfigError(f"{len(messages)} problems: " + "; ".join(messages), self.fields)


def parse_config(data: Any) -> ExperimentConfig:
    """Turn untrusted JSON into an ExperimentConfig, or raise ConfigError naming every bad field.

    The error's `fields` maps each bad key to its message (see `ConfigError`).
    """
    if not isinstance(data, dict):
        raise ConfigError("the experiment config must be a JSON object")
    _check_known(data, ExperimentConfig, "config")
    values = dict(data)
    bad = _Problems()

    with bad.check("kind"):
        _choice("kind", values.get("kind", "train"), KINDS)
    if "name" in values:
        with bad.check("name"):
            _check_type("name", values["name"], (str,), "a string")
            problem = name_problem(values["name"], "'name'")
            if problem:
                raise ConfigError(problem)
    with bad.check("dataset"):
        if "dataset" not in values:
            raise ConfigError("'dataset' is required")
        _check_type("dataset", values["dataset"], (int, str), "a dataset id or name")
    with bad.check("teacher"):
        if values.get("kind") == "distill" and values.get("teacher") is None:
            raise ConfigError("'teacher' is required for kind 'distill'")
        if values.get("teacher") is not None:
            _check_type("teacher", values["teacher"], (int, str), "a checkpoint id or path")
    for key in ("teacher_preprocessing", "init_preprocessing"):
        if values.get(key) is not None:
            with bad.check(key):
                values[key] = _check_preprocessing(values[key], key)
    if values.get("init") is not None:
        with bad.check("init"):
            _check_type("init", values["init"], (int, str), "a checkpoint id or path")
            if values.get("kind") == "codistill":
                raise ConfigError(
                    "'init' starts a train or distill student; codistill replicas start from scratch"
                )
    if "devices" in values:
        with bad.check("devices"):
            _check_type("devices", values["devices"], (int,), "an integer")
            _range("devices", values["devices"], 1, 64)
            if values["devices"] > 1 and values.get("kind", "train") not in ("train", "distill"):
                raise ConfigError(
                    "'devices' > 1 runs one train or distill job as data-parallel processes; for codistill "
                    "set codistill.group_size (each group's data-parallel processes)"
                )
            batch = values.get("batch_size", 64)
            if values["devices"] > 1 and isinstance(batch, int) and 0 < batch < 2 * values["devices"]:
                raise ConfigError(
                    f"'devices' {values['devices']} splits each batch of batch_size {batch} over that many "
                    f"processes: batch_size must be at least {2 * values['devices']}"
                )
    if values.get("teacher_arch") is not None:
        with bad.check("teacher_arch"):
            values["teacher_arch"] = validate_model_spec(values["teacher_arch"], "teacher_arch")
    if "model" in values:
        with bad.check("model"):
            values["model"] = validate_model_spec(values["model"])
    for key, limits in _NUMBERS.items():
        with bad.check(key):
            _check_numbers(values, {key: limits})
    if values.get("max_steps") is not None:
        with bad.check("max_steps"):
            _check_type("max_steps", values["max_steps"], (int,), "an integer")
            _range("max_steps", values["max_steps"], 1, 100_000_000)
    if values.get("time_limit_s") is not None:
        with bad.check("time_limit_s"):
            _check_type("time_limit_s", values["time_limit_s"], (int, float), "a number of seconds")
            _range("time_limit_s", values["time_limit_s"], 1, 10 * 365 * 86400)
            values["time_limit_s"] = float(values["time_limit_s"])
    if not {"val_fraction", "test_fraction"} & set(bad.fields):
        with bad.check("test_fraction"):
            if values.get("val_fraction", 0.1) + values.get("test_fraction", 0.2) >= 0.9:
                raise ConfigError("'val_fraction' + 'test_fraction' must leave room for training data")
    for key, choices, default in (
        ("optimizer", OPTIMIZERS, "adam"),
        ("schedule", SCHEDULES, "cosine"),
        ("soft_loss", SOFT_LOSSES, "kl"),
        ("augment", AUGMENTS, "none"),
        ("keep", KEEPS, "best"),
        ("precision", PRECISIONS, "auto"),
    ):
        with bad.check(key):
            _choice(key, values.get(key, default), choices)
    for key in ("channels_last", "compile"):
        with bad.check(key):
            _check_type(key, values.get(key, False), (bool,), "true or false")
    _parse_method(values, bad)
    if "data_options" in values:
        with bad.check("data_options"):
            _check_type("data_options", values["data_options"], (dict,), "an object")
    with bad.check("codistill"):
        values["codistill"] = _parse_codistill(values.get("codistill", {}), bad)
    bad.raise_if_any()
    return ExperimentConfig(**values)


def _parse_method(values: dict[str, Any], bad: _Problems) -> None:
    """Check method, method_options (known keys, non-negative numbers) and logit_standardization, in place."""
    method = values.get("method", "hinton")
    with bad.check("method"):
        _choice("method", method, METHODS)
    if "method" in bad.fields:
        return
    with bad.check("method_options"):
        options = values.get("method_options", {})
        _check_type("method_options", options, (dict,), "an object")
        known = METHOD_OPTIONS[method]
        unknown = sorted(set(options) - set(known))
        if unknown:
            allowed = ", ".join(known) or "none"
            raise ConfigError(
                f"'method_options' has unknown option(s) for method {method}: {', '.join(unknown)} (allowed: {allowed})"
            )
        limits = {
            k: ((int, float), "a number", 0.0, 100_000.0 if k == "warmup_epochs" else 1000.0) for k in known
        }
        options = dict(options)
        _check_numbers(options, limits, "method_options.")
        values["method_options"] = options
    with bad.check("logit_standardization"):
        flag = values.get("logit_standardization", False)
        _check_type("logit_standardization", flag, (bool,), "true or false")
        if flag and method == "dist":
            raise ConfigError(
                "'logit_standardization' applies to methods hinton and dkd, not dist (DIST's correlations ignore logit scale already)"
            )
    if method == "dist" and "batch_size" not in bad.fields:
        with bad.check("batch_size"):
            if values.get("batch_size", 64) < 2:
                raise ConfigError(
                    "'batch_size' must be at least 2 for method dist (its intra-class term correlates samples of a batch)"
                )


def _parse_codistill(data: Any, bad: _Problems | None = None) -> CodistillConfig:
    if isinstance(data, CodistillConfig):
        return data
    if not isinstance(data, dict):
        raise ConfigError("'codistill' must be an object")
    _check_known(data, CodistillConfig, "codistill")
    own = bad is None
    bad = bad or _Problems()
    values = dict(data)
    for key, limits in _CODISTILL_NUMBERS.items():
        with bad.check(f"codistill.{key}"):
            _check_numbers(values, {key: limits}, "codistill.")
    for key, choices, default in (
        ("loss", CODISTILL_LOSSES, "ce"),
        ("exchange", EXCHANGES, "checkpoints"),
        ("data", DATA_MODES, "same"),
        ("placement", PLACEMENTS, "process"),
    ):
        with bad.check(f"codistill.{key}"):
            _choice(f"codistill.{key}", data.get(key, default), choices)
    spread = "codistill.group_size" not in bad.fields and (
        data.get("group_size", 1) > 1 or data.get("placement") == "workers"
    )
    with bad.check("codistill.exchange"):
        if data.get("exchange") == "predictions" and spread:
            raise ConfigError(
                "codistill exchange 'predictions' swaps logits every step inside one process: "
                "it needs group_size 1 and placement 'process'; use exchange 'checkpoints' otherwise"
            )
        if data.get("exchange") == "predictions" and data.get("data") == "disjoint":
            raise ConfigError(
                "codistill exchange 'predictions' walks the same batches in lockstep: it needs data 'same'"
            )
    if own:
        bad.raise_if_any()
    if any(key.startswith("codistill.") for key in bad.fields):
        return CodistillConfig()  # never used: the caller raises with every problem
    return CodistillConfig(**values)
