"""Pick the torch device for a run and the mixed-precision type that goes with it."""

from __future__ import annotations

import torch

from kd_core.errors import ConfigError


def pick_device(requested: str | torch.device = "auto") -> torch.device:
    """CUDA when asked for or when "auto" finds one, else the CPU.

    Called at run time only: a Celery parent process must never touch CUDA before it forks.
    """
    if isinstance(requested, torch.device):
        requested = str(requested)
    name = str(requested).strip().lower()
    if name == "auto":
        return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    if name == "cpu":
        return torch.device("cpu")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ConfigError("device 'cuda' was requested but this machine has no usable CUDA device")
        try:
            device = torch.device(name)
        except RuntimeError as exc:
            raise ConfigError(f"unknown device {requested!r}") from exc
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ConfigError(
                f"device {requested!r} does not exist ({torch.cuda.device_count()} CUDA device(s))"
            )
        return device
    raise ConfigError(f"device must be 'auto', 'cpu' or 'cuda', got {requested!r}")


def autocast_dtype(device: torch.device) -> torch.dtype | None:
    """bf16 on GPUs that have it (no loss scaling needed), fp16 on older ones, none on the CPU."""
    if device.type != "cuda":
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
