"""torchvision and timm image classifiers by name: listed, checked, and built for a dataset's classes and channels.

Neither library is imported until a spec names it, so the engine runs without them; a spec that needs
a missing one is refused with a ConfigError saying what to install. Weights are never downloaded:
models start from random weights, or from a checkpoint the user gives (`init`).
"""

from __future__ import annotations

import difflib
import functools
import importlib
import re
from typing import Any

from torch import nn

from kd_core.errors import ConfigError

LIBRARIES = {"torchvision": "torchvision==0.29.1", "timm": "timm==1.0.31"}
# Keyword arguments a spec may not pass: the class count and channels come from the dataset, and
# anything that fetches or reads weights (a download, a file path) is not the builder's business.
RESERVED_KWARGS = frozenset(
    {
        "num_classes",
        "in_chans",
        "in_channels",
        "weights",
        "weights_backbone",
        "pretrained",
        "pretrained_cfg",
        "pretrained_cfg_overlay",
        "pretrained_strict",
        "checkpoint_path",
        "cache_dir",
        "progress",
        "features_only",
        "model_args",
        "block_fn",
        "norm_layer",
        "act_layer",
    }
)
MAX_KWARGS = 32


def _import(arch: str) -> Any:
    try:
        module = importlib.import_module(arch)
        if arch == "torchvision":
            importlib.import_module("torchvision.models")
        return module
    except Exception as e:  # ImportError, or torchvision's operator mismatch with another torch build
        raise ConfigError(
            f"arch '{arch}' needs the {arch} package, which this installation cannot import "
            f"({type(e).__name__}): install {LIBRARIES[arch]} (with torch==2.14.1) to use it"
        ) from None


def available(arch: str) -> bool:
    """True when `arch` ("torchvision" or "timm") imports here."""
    try:
        _import(arch)
    except ConfigError:
        return False
    return True


@functools.lru_cache(maxsize=2)
def model_names(arch: str) -> tuple[str, ...]:
    """Every image classifier the installed library builds by name, sorted."""
    lib = _import(arch)
    if arch == "torchvision":
        import torchvision.models as tvm

        return tuple(sorted(tvm.list_models(module=tvm)))
    return tuple(sorted(lib.list_models()))


def check_name(arch: str, name: Any, key: str = "model") -> None:
    """Refuse a name the library does not build, naming the closest ones it does."""
    if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9_.\-]{1,100}", name):
        raise ConfigError(
            f"'{key}.name' must be a {arch} model name such as "
            f"{'resnet18' if arch == 'torchvision' else 'mobilenetv3_small_100'}"
        )
    names = model_names(arch)
    if name in names:
        return
    close = difflib.get_close_matches(name, names, n=5, cutoff=0.5)
    if not close:
        close = [n for n in names if n.startswith(name[:4])][:5]
    hint = f"; closest: {', '.join(close)}" if close else ""
    raise ConfigError(f"'{key}.name': {arch} has no image classifier named {name!r}{hint}")


def _json_scalar(value: Any) -> bool:
    return value is None or isinstance(value, bool | int | float | str) and len(str(value)) <= 200


def check_kwargs(kwargs: Any, key: str = "model") -> dict[str, Any]:
    """Keyword arguments for the builder: plain JSON values, none that sets classes, channels or weights."""
    if kwargs is None:
        return {}
    if not isinstance(kwargs, dict) or len(kwargs) > MAX_KWARGS:
        raise ConfigError(f"'{key}.kwargs' must be an object of at most {MAX_KWARGS} builder arguments")
    for k, v in kwargs.items():
        if not isinstance(k, str) or not k.isidentifier():
            raise ConfigError(f"'{key}.kwargs' has a key that is not a Python name: {str(k)[:40]!r}")
        if k in RESERVED_KWARGS:
            raise ConfigError(
                f"'{key}.kwargs.{k}' may not be set: the class count and input channels come from the dataset "
                "and weights from a checkpoint ('init' for a student, an upload for a teacher)"
            )
        ok = _json_scalar(v) or (
            isinstance(v, list)
            and len(v) <= 64
            and all(_json_scalar(i) and not isinstance(i, str) for i in v)
        )
        if not ok:
            raise ConfigError(
                f"'{key}.kwargs.{k}' must be a number, string, boolean, null or list of numbers"
            )
    return dict(kwargs)


def _replace_first_conv(net: nn.Module, channels: int) -> None:
    # torchvision builders take no channel count: swap the first 3-channel conv for one of `channels`.
    for name, module in net.named_modules():
        if isinstance(module, nn.Conv2d) and module.in_channels == 3:
            parent = net.get_submodule(name.rpartition(".")[0]) if "." in name else net
            new = nn.Conv2d(
                channels,
                module.out_channels,
                module.kernel_size,
                module.stride,
                module.padding,
                module.dilation,
                module.groups if module.groups == 1 else channels,
                module.bias is not None,
                module.padding_mode,
            )
            setattr(parent, name.rpartition(".")[2], new)
            return
    raise ConfigError("this model has no 3-channel input convolution to adapt to the dataset's channels")


def head_name(net: nn.Module, arch: str, num_classes: int) -> str:
    """The module name of the classifier head (what a pretrained start of another class count re-initialises)."""
    if arch == "timm" and hasattr(net, "get_classifier"):
        head = net.get_classifier()
        for name, module in net.named_modules():
            if module is head and name and any(True for _ in module.parameters()):
                return name
    last = ""
    for name, module in net.named_modules():
        if isinstance(module, nn.Linear) and module.out_features == num_classes:
            last = name
        elif (
            isinstance(module, nn.Conv2d)
            and module.out_channels == num_classes
            and module.kernel_size == (1, 1)
        ):
            last = name
    if not last:
        raise ConfigError(
            "could not find this model's classifier head (a Linear layer with one output per class)"
        )
    return last


def build_net(spec: dict[str, Any], input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """The library model for `spec`, with `num_classes` outputs and the dataset's input channels."""
    arch, name, kwargs = spec["arch"], spec["name"], dict(spec.get("kwargs") or {})
    if len(input_shape) != 3:
        raise ConfigError(
            f"arch '{arch}' needs image input (C, H, W); this data has input shape {input_shape}: use arch 'mlp'"
        )
    channels = input_shape[0]
    lib = _import(arch)
    try:
        if arch == "torchvision":
            import torchvision.models as tvm

            net = tvm.get_model(name, weights=None, num_classes=num_classes, **kwargs)
            if channels != 3:
                _replace_first_conv(net, channels)
        else:
            net = lib.create_model(
                name, pretrained=False, num_classes=num_classes, in_chans=channels, **kwargs
            )
    except ConfigError:
        raise
    except Exception as e:
        raise ConfigError(
            f"{arch} could not build {name!r} with kwargs {kwargs}: {type(e).__name__}: {e}"[:400]
        ) from None
    return net


def list_architectures(query: str = "", arch: str | None = None, limit: int = 50) -> list[dict[str, str]]:
    """Library models (arch, name) whose name contains `query`, torchvision's first; at most `limit`."""
    out: list[dict[str, str]] = []
    for lib in (arch,) if arch else tuple(LIBRARIES):
        if not available(lib):
            continue
        for name in model_names(lib):
            if query.lower() in name.lower():
                out.append({"arch": lib, "name": name})
                if len(out) >= limit:
                    return out
    return out


def describe_architectures(
    input_shape: tuple[int, ...],
    num_classes: int,
    *,
    query: str = "",
    arch: str | None = None,
    limit: int = 20,
    latency: bool = False,
) -> dict[str, Any]:
    """Buildable architectures for a dataset: the zoo's defaults and library models matching `query`, each with
    its parameter count at the dataset's input size and class count (built on the meta device: no memory)
    and, with `latency`, its median CPU latency for one sample (ms, measured on a real build).

    Models that do not run at this input size (e.g. a ViT wanting 224 px) come back with `error` in words.
    """
    import torch

    from kd_core.models import build_model, count_params, model_stats

    specs: list[dict[str, Any]] = []
    if arch in (None, "zoo"):
        zoo = [{"arch": "mlp", "hidden": [64]}]
        if len(input_shape) == 3:
            zoo += [{"arch": "cnn", "channels": [32, 64]}, {"arch": "resnet", "depth": 8, "width": 1}]
        specs += [s for s in zoo if query.lower() in s["arch"]]
    if len(input_shape) == 3 and arch != "zoo":
        specs += [{**s, "kwargs": {}} for s in list_architectures(query, arch, limit)]
    rows = []
    for spec in specs[:limit]:
        row: dict[str, Any] = {"spec": spec}
        try:
            if latency:
                with torch.random.fork_rng(devices=[]):
                    stats = model_stats(build_model(spec, input_shape, num_classes), repeats=5, budget_s=0.1)
                row["params"], row["latency_ms"] = stats["params"], round(stats["cpu_latency_ms"], 3)
            else:
                with torch.device("meta"):
                    row["params"] = count_params(build_model(spec, input_shape, num_classes))
        except ConfigError as e:
            row["error"] = str(e)
        rows.append(row)
    missing = [lib for lib in LIBRARIES if not available(lib)]
    out: dict[str, Any] = {
        "input_shape": list(input_shape),
        "num_classes": num_classes,
        "architectures": rows,
    }
    if missing:
        out["unavailable"] = {lib: f"install {LIBRARIES[lib]} (with torch==2.14.1)" for lib in missing}
    return out
