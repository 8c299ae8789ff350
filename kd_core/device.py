"""Pick the torch device for a run and how a model runs on it: precision, memory format, compile, memory figures."""

from __future__ import annotations

import os
import resource
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

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


# --------------------------------------------------------------------------- precision


def autocast_dtype(device: torch.device, precision: str = "auto") -> torch.dtype | None:
    """The autocast type of config `precision` on `device` (None: full fp32); ConfigError if it cannot run there.

    "auto": bf16 on GPUs that have it (no loss scaling needed), fp16 on older ones, fp32 on the CPU.
    "bf16" on the CPU is CPU autocast (fast on CPUs with AVX-512 BF16/AMX, slower elsewhere).
    """
    cuda = device.type == "cuda"
    if precision == "fp32":
        return None
    if precision == "auto":
        if not cuda:
            return None
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if precision == "bf16":
        if cuda and not torch.cuda.is_bf16_supported():
            raise ConfigError(
                "precision 'bf16' needs a GPU with bfloat16 (NVIDIA Ampere or newer); this one has none: "
                "use 'auto' (fp16 with loss scaling here) or 'fp32'"
            )
        return torch.bfloat16
    if precision == "fp16":
        if not cuda:
            raise ConfigError(
                "precision 'fp16' runs on a CUDA GPU only: on the CPU fp16 is emulated (slower than fp32) "
                "and needs loss scaling; use 'auto' or 'fp32' on the CPU, or 'bf16' (CPU autocast)"
            )
        return torch.float16
    raise ConfigError(f"'precision' must be one of auto, fp32, bf16, fp16; got {precision!r}")


def precision_name(dtype: torch.dtype | None) -> str:
    """What a resolved autocast type is called in configs and metrics."""
    return {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, "fp32")


# --------------------------------------------------------------------------- memory format and compile


def image_model(input_shape: tuple[int, ...]) -> bool:
    """Whether a model with this per-sample input shape takes 4-D (N, C, H, W) batches."""
    return len(tuple(input_shape)) == 3


def to_channels_last(x: Tensor) -> Tensor:
    """A 4-D batch in NHWC memory order (the order tensor cores want); other tensors as they are."""
    return x.contiguous(memory_format=torch.channels_last) if x.dim() == 4 else x


class CompiledForward:
    """`torch.compile` of a module's forward with a fallback: if compiling fails (when asked, or at any call:
    compilation is lazy), the module runs eagerly from then on and `note` says why.

    The compiled wrapper shares the module's parameters; the module itself (state dict, evaluation, export)
    is untouched, so a failure costs nothing but speed.
    """

    def __init__(self, module: nn.Module, *, backend: str | None = None) -> None:
        self.module = module
        self.note: str | None = None
        self._forward: Callable[..., Any] = module
        try:
            self._forward = torch.compile(
                module, backend=backend or os.environ.get("KD_COMPILE_BACKEND", "inductor")
            )
        except Exception as exc:  # noqa: BLE001 - any failure to compile means: run eagerly
            self._fall_back(exc)

    @property
    def compiled(self) -> bool:
        return self._forward is not self.module

    def _fall_back(self, exc: BaseException) -> None:
        # Dynamo's messages start "backend='inductor' raised:" and name the cause on the next line.
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
        why = " ".join(lines[:2])[:300]
        self.note = (
            f"compile: torch.compile failed ({type(exc).__name__}{': ' + why if why else ''}); "
            "the run continued without it (eager)"
        )
        self._forward = self.module

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if not self.compiled:
            return self.module(*args, **kwargs)
        try:
            return self._forward(*args, **kwargs)
        except Exception as exc:  # noqa: BLE001 - a compiler error, or the model's own (raised again eagerly)
            if is_out_of_memory(exc):
                raise  # memory, not compilation: the loop turns it into advice
            self._fall_back(exc)
        return self.module(*args, **kwargs)


# --------------------------------------------------------------------------- memory


def is_out_of_memory(exc: BaseException) -> bool:
    """A CUDA (or CPU allocator) out-of-memory error: the job fails with advice, the worker lives on."""
    if isinstance(exc, torch.OutOfMemoryError):
        return True
    # The CPU allocator raises a plain RuntimeError when malloc fails (a memory limit, no overcommit).
    return isinstance(exc, RuntimeError) and "DefaultCPUAllocator" in str(exc) and "memory" in str(exc)


def reset_peak_memory(device: torch.device) -> None:
    """Start a run's peak-memory figures afresh (GPU allocator peaks; the process's peak RSS where Linux allows)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:  # Linux >= 4.0: "5" resets the process's peak RSS (VmHWM) to its current RSS
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def peak_memory(device: torch.device) -> dict[str, float]:
    """The run's peak memory in MiB, named for what it is.

    CUDA: `gpu_peak_allocated_mb` (tensors) and `gpu_peak_reserved_mb` (what the caching allocator held) since
    `reset_peak_memory`. CPU: `process_peak_rss_mb`, the peak resident memory of the whole process (model,
    data, Python, the loader's buffers), since the reset where Linux allows it, else since the process started.
    """
    if device.type == "cuda":
        return {
            "gpu_peak_allocated_mb": torch.cuda.max_memory_allocated(device) / 2**20,
            "gpu_peak_reserved_mb": torch.cuda.max_memory_reserved(device) / 2**20,
        }
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return {"process_peak_rss_mb": int(line.split()[1]) / 1024}
    except OSError:
        pass
    return {"process_peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
