"""Models from specs: the project's zoo (mlp, cnn, resnet) and torchvision/timm classifiers, each a KDModel.

`build_model(spec, input_shape, num_classes, preprocessing=)` sizes any spec from the dataset and bakes the
normalisation in; `full_spec` fills defaults; `model_stats`/`count_params` measure a model.
"""

from __future__ import annotations

import copy
import operator
import warnings
from typing import Any

import torch
from torch import nn

from kd_core.config import validate_model_spec
from kd_core.errors import ConfigError
from kd_core.models.library import LIBRARIES, build_net, head_name
from kd_core.models.wrap import KDModel, LibraryModel, count_params, model_stats, norm_buffers
from kd_core.models.zoo import BUILDERS, DEFAULTS, BasicBlock

__all__ = [
    "MAX_PARAMS",
    "BasicBlock",
    "DEFAULTS",
    "KDModel",
    "LibraryModel",
    "build_model",
    "count_params",
    "full_spec",
    "is_library",
    "model_stats",
]

# Refuse specs that would not fit a worker's memory before allocating anything.
MAX_PARAMS = 100_000_000


def is_library(spec: dict[str, Any]) -> bool:
    """True for a torchvision/timm spec (a library's model), False for the zoo."""
    return spec.get("arch") in LIBRARIES


def full_spec(spec: dict[str, Any]) -> dict[str, Any]:
    """The validated spec with every default filled in, so a stored spec rebuilds the same model."""
    spec = validate_model_spec(spec)
    if is_library(spec):
        return {"arch": spec["arch"], "name": spec["name"], "kwargs": copy.deepcopy(spec.get("kwargs") or {})}
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


def _refuse_too_large(total: int, spec: dict) -> None:
    if total > MAX_PARAMS:
        raise ConfigError(f"model {spec} would have {total:,} parameters; the limit is {MAX_PARAMS:,}")


def _library_model(
    spec: dict, shape: tuple[int, ...], num_classes: int, mean: torch.Tensor, std: torch.Tensor
) -> LibraryModel:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # builders warn about defaults a spec cannot change
        # Count and try the forward on the meta device first: a huge model or an input too small for
        # its downsampling fails fast, in words, before any memory is filled.
        with torch.device("meta"):
            meta = build_net(spec, shape, num_classes)
            _refuse_too_large(count_params(meta), spec)
            try:
                meta.eval()(torch.empty((1, *shape)))
            except (NotImplementedError, TypeError):
                pass  # an op without a meta kernel: the real forward will tell
            except (RuntimeError, AssertionError, ValueError) as e:
                raise ConfigError(
                    f"{spec['arch']} model {spec['name']!r} does not run on input {shape}: {str(e)[:200]}"
                ) from None
        del meta
        net = build_net(spec, shape, num_classes)
    return LibraryModel(spec, shape, num_classes, net, head_name(net, spec["arch"], num_classes), mean, std)


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
    mean, std = norm_buffers(preprocessing, shape)
    if is_library(spec):
        return _library_model(spec, shape, num_classes, mean, std)
    if arch == "cnn" and not spec["channels"]:
        raise ConfigError("'model.channels' must list at least one convolution width for arch 'cnn'")
    if arch in ("cnn", "resnet") and len(shape) != 3:
        raise ConfigError(
            f"arch '{arch}' needs image input (C, H, W); this data has input shape {shape}: use arch 'mlp'"
        )
    # Count on the meta device first: a huge spec fails fast instead of filling memory.
    with torch.device("meta"):
        meta_features, meta_out = BUILDERS[arch](spec, shape)
        total = count_params(meta_features) + meta_out * num_classes + num_classes
    _refuse_too_large(total, spec)
    features, out = BUILDERS[arch](spec, shape)
    for m in features.modules():
        if isinstance(m, nn.Conv2d):
            # He init for ReLU convs (as torchvision's and the CIFAR ResNets' code): BN-friendly start.
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
    return KDModel(spec, shape, num_classes, features, nn.Linear(out, num_classes), mean, std)
