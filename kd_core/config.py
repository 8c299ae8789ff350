"""The experiment-config schema: the one definition shared by the CLI, the REST API and the workers."""

from __future__ import annotations

import dataclasses
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
    augment: str = "none"
    val_fraction: float = 0.1
    test_fraction: float = 0.2
    log_every: int = 10
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
    _choice(f"{key}.arch", arch, ARCHS)
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


def parse_config(data: Any) -> ExperimentConfig:
    """Turn untrusted JSON into an ExperimentConfig, or raise ConfigError naming the bad field."""
    if not isinstance(data, dict):
        raise ConfigError("the experiment config must be a JSON object")
    _check_known(data, ExperimentConfig, "config")
    values = dict(data)

    _choice("kind", values.get("kind", "train"), KINDS)
    if "name" in values:
        _check_type("name", values["name"], (str,), "a string")
        problem = name_problem(values["name"], "'name'")
        if problem:
            raise ConfigError(problem)
    if "dataset" not in values:
        raise ConfigError("'dataset' is required")
    _check_type("dataset", values["dataset"], (int, str), "a dataset id or name")
    if values.get("kind") == "distill" and values.get("teacher") is None:
        raise ConfigError("'teacher' is required for kind 'distill'")
    if values.get("teacher") is not None:
        _check_type("teacher", values["teacher"], (int, str), "a checkpoint id or path")
    if values.get("teacher_arch") is not None:
        values["teacher_arch"] = validate_model_spec(values["teacher_arch"], "teacher_arch")
    if "model" in values:
        values["model"] = validate_model_spec(values["model"])
    _check_numbers(values, _NUMBERS)
    if values.get("max_steps") is not None:
        _check_type("max_steps", values["max_steps"], (int,), "an integer")
        _range("max_steps", values["max_steps"], 1, 100_000_000)
    if values.get("time_limit_s") is not None:
        _check_type("time_limit_s", values["time_limit_s"], (int, float), "a number of seconds")
        _range("time_limit_s", values["time_limit_s"], 1, 10 * 365 * 86400)
        values["time_limit_s"] = float(values["time_limit_s"])
    if values.get("val_fraction", 0.1) + values.get("test_fraction", 0.2) >= 0.9:
        raise ConfigError("'val_fraction' + 'test_fraction' must leave room for training data")
    _choice("optimizer", values.get("optimizer", "adam"), OPTIMIZERS)
    _choice("schedule", values.get("schedule", "cosine"), SCHEDULES)
    _choice("soft_loss", values.get("soft_loss", "kl"), SOFT_LOSSES)
    _choice("augment", values.get("augment", "none"), AUGMENTS)
    if "data_options" in values:
        _check_type("data_options", values["data_options"], (dict,), "an object")
    values["codistill"] = _parse_codistill(values.get("codistill", {}))
    return ExperimentConfig(**values)


def _parse_codistill(data: Any) -> CodistillConfig:
    if isinstance(data, CodistillConfig):
        return data
    if not isinstance(data, dict):
        raise ConfigError("'codistill' must be an object")
    _check_known(data, CodistillConfig, "codistill")
    values = dict(data)
    _check_numbers(values, _CODISTILL_NUMBERS, "codistill.")
    _choice("codistill.loss", data.get("loss", "ce"), CODISTILL_LOSSES)
    _choice("codistill.exchange", data.get("exchange", "checkpoints"), EXCHANGES)
    _choice("codistill.data", data.get("data", "same"), DATA_MODES)
    _choice("codistill.placement", data.get("placement", "process"), PLACEMENTS)
    spread = data.get("group_size", 1) > 1 or data.get("placement") == "workers"
    if data.get("exchange") == "predictions" and spread:
        raise ConfigError(
            "codistill exchange 'predictions' swaps logits every step inside one process: "
            "it needs group_size 1 and placement 'process'; use exchange 'checkpoints' otherwise"
        )
    if data.get("exchange") == "predictions" and data.get("data") == "disjoint":
        raise ConfigError(
            "codistill exchange 'predictions' walks the same batches in lockstep: it needs data 'same'"
        )
    return CodistillConfig(**values)
