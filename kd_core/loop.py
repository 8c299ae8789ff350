"""The one training loop: train, distill, codistillation replicas and data-parallel groups plug in their step.

The loop owns what every mode shares: the stop signal, the learning-rate schedule, the logging and
evaluation rhythm, progress and ETA, NaN checks, one checkpoint format (weights, optimizers, loss
scalers, RNG states, the loop's and the mode's own state; written atomically) and one mixed-precision
policy (`Precision`). A mode is a `Task`: its step over a batch, its evaluation, its log names.
"""

from __future__ import annotations

import contextlib
import json
import math
import random
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from torch import Tensor, nn

from kd_core.atomic import atomic_write
from kd_core.config import ExperimentConfig
from kd_core.data.loader import batches_per_epoch
from kd_core.device import autocast_dtype, is_out_of_memory, peak_memory, precision_name, reset_peak_memory
from kd_core.errors import ConfigError, DatasetError, OutOfMemory, TrainingError
from kd_core.sinks import MetricsSink, flush_sink

CHECKPOINT_FORMAT = 2  # 1: train/distill only, without numpy/python RNG; codistill had its own


# --------------------------------------------------------------------------- schedule and optimiser


def plan_steps(config: ExperimentConfig, n_examples: int) -> tuple[int, int]:
    """(total steps, steps per epoch) for `n_examples` training examples: epochs, capped by max_steps."""
    if n_examples < 1:
        raise DatasetError("the training split is empty")
    per_epoch = batches_per_epoch(n_examples, config.batch_size)
    total = config.epochs * per_epoch
    if config.max_steps is not None:
        total = min(total, config.max_steps)
    return total, per_epoch


def make_optimizer(model: nn.Module, config: ExperimentConfig) -> torch.optim.Optimizer:
    """Adam or SGD with momentum over the trainable parameters, with the config's lr and weight decay."""
    params = [p for p in model.parameters() if p.requires_grad]
    if config.optimizer == "adam":
        return torch.optim.Adam(params, lr=config.lr, weight_decay=config.weight_decay)
    if config.optimizer == "sgd":
        return torch.optim.SGD(
            params, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay, nesterov=False
        )
    raise ConfigError(f"unknown optimizer {config.optimizer!r}")


def lr_at(config: ExperimentConfig, step: int, total_steps: int, steps_per_epoch: int) -> float:
    """The learning rate for a step: a pure function of the step, so a resumed run needs no scheduler state."""
    if config.schedule == "cosine":
        return config.lr * 0.5 * (1.0 + math.cos(math.pi * min(step, total_steps) / max(1, total_steps)))
    if config.schedule == "step":
        return config.lr * config.lr_gamma ** (step // (config.lr_step_epochs * steps_per_epoch))
    return config.lr


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Set every parameter group's learning rate (the schedule is `lr_at`, not a torch scheduler)."""
    for group in optimizer.param_groups:
        group["lr"] = lr


# --------------------------------------------------------------------------- mixed precision


def autocast(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    """Mixed precision at `dtype` on `device` (see device.autocast_dtype); a no-op for None."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


class Precision:
    """The one mixed-precision policy, driven by config `precision` (resolved by device.autocast_dtype):
    "auto" is bf16 autocast on GPUs that have it, fp16 autocast with one loss scaler per optimizer on older
    GPUs, full precision on the CPU; "fp32", "bf16" (CUDA or CPU autocast) and "fp16" (CUDA only) are explicit.
    A precision the device cannot run raises ConfigError here, before any training."""

    def __init__(self, device: torch.device, mode: str = "auto") -> None:
        self.device = device
        self.mode = mode
        self.dtype = autocast_dtype(device, mode)
        self.scalers: dict[str, torch.amp.GradScaler] = {}

    @property
    def name(self) -> str:
        """What the run computes in: "fp32", "bf16" or "fp16" ("auto" resolved)."""
        return precision_name(self.dtype)

    def autocast(self) -> contextlib.AbstractContextManager:
        return autocast(self.device, self.dtype)

    def _scaler(self, name: str) -> torch.amp.GradScaler | None:
        if self.dtype != torch.float16:
            return None
        if name not in self.scalers:
            self.scalers[name] = torch.amp.GradScaler(self.device.type)
        return self.scalers[name]

    def backward(self, loss: Tensor, name: str = "model") -> None:
        scaler = self._scaler(name)
        (scaler.scale(loss) if scaler is not None else loss).backward()

    def step(self, optimizer: torch.optim.Optimizer, name: str = "model") -> None:
        """Apply the (possibly scaled) gradients; an fp16 step with inf/NaN gradients is skipped."""
        scaler = self._scaler(name)
        if scaler is None:
            optimizer.step()
        else:
            scaler.step(optimizer)
            scaler.update()

    def state_dict(self) -> dict[str, Any]:
        return {name: scaler.state_dict() for name, scaler in self.scalers.items()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        for name, value in state.items():
            scaler = self._scaler(name)
            if scaler is not None and value:
                scaler.load_state_dict(value)


# --------------------------------------------------------------------------- what a mode supplies


class Task(Protocol):
    """One mode's part of the loop."""

    prefix: str  # before "lr" and "samples_per_s" in the logs ("" or "replica{g}/")

    def modules(self) -> dict[str, nn.Module]: ...  # what the checkpoint saves, by name

    def optimizers(self) -> dict[str, torch.optim.Optimizer]: ...

    def train_step(self, step: int, lr: float) -> tuple[dict[str, Tensor], int]:
        """One optimisation step: (detached scalar sums to add up over a logging interval, samples)."""
        ...

    def train_values(self, sums: dict[str, float], steps: int) -> dict[str, float]:
        """The logged train series from the interval's sums over `steps` steps."""
        ...

    def checked(self) -> dict[str, str]:
        """The sums the NaN check reads, in order (parts before totals), each with its name in words."""
        ...

    def evaluate(self, step: int) -> dict[str, float]:
        """Evaluate (and keep the best weights); the logged values."""
        ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: Mapping[str, Any]) -> None: ...


@dataclass
class LoopResult:
    steps: int
    stopped: bool
    resumed_from_step: int | None
    train_time_s: float
    samples_seen: int
    # Peak memory of the run, named for what it is (device.peak_memory): GPU allocator peaks on CUDA,
    # the process's peak RSS on the CPU.
    memory: dict[str, float] = field(default_factory=dict)


# --------------------------------------------------------------------------- checkpoints


def config_key(config: ExperimentConfig) -> str:
    """The config as canonical JSON: a checkpoint resumes only the run of this very config."""
    return json.dumps(config.to_dict(), sort_keys=True, default=str)


def rng_state(device: torch.device) -> dict[str, Any]:
    """torch, CUDA, numpy and python global RNG states, as tensors and ints (loadable with weights_only)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    version, internal, gauss_py = random.getstate()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos), "has_gauss": int(has_gauss),
                  "gauss": float(gauss)},
        "python": {"version": int(version), "internal": list(internal), "gauss": gauss_py},
    }  # fmt: skip
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: Mapping[str, Any], device: torch.device) -> None:
    torch.set_rng_state(state["torch"].cpu())
    if "numpy" in state:
        n = state["numpy"]
        keys = n["keys"].cpu().numpy().astype(np.uint32)
        np.random.set_state(("MT19937", keys, n["pos"], n["has_gauss"], n["gauss"]))
    if "python" in state:
        p = state["python"]
        random.setstate((p["version"], tuple(p["internal"]), p["gauss"]))
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"].cpu(), device)


def load_checkpoint(
    path: Path | None, config: ExperimentConfig, device: torch.device
) -> dict[str, Any] | None:
    """The checkpoint at `path` if it is one of this config's (any mode), else None (start over)."""
    if path is None or not Path(path).is_file():
        return None
    try:
        payload = torch.load(path, map_location=device, weights_only=True)
    except Exception:  # a torn or foreign file: start over rather than fail the job
        return None
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        return None
    if payload.get("config") != config_key(config):
        return None  # a checkpoint of another config must not leak into this run
    return payload


# --------------------------------------------------------------------------- the loop


def _eta(elapsed: float, steps_done: int, steps_left: int) -> float | None:
    return elapsed / steps_done * steps_left if steps_done > 0 else None


def run_loop(
    task: Task,
    config: ExperimentConfig,
    *,
    total_steps: int,
    steps_per_epoch: int,
    eval_every: int,
    precision: Precision,
    sink: MetricsSink,
    should_stop: Callable[[], bool] = lambda: False,
    agree_stop: Callable[[bool], bool] | None = None,
    checkpoint_path: str | Path | None = None,
    checkpoint_every_s: float = 30.0,
    checkpoint_at_end: bool = True,
) -> LoopResult:
    """Step `task` from its checkpointed step (or 0) to `total_steps`; returns where it ended and why.

    Evaluates every `eval_every` steps, at the end and when stopped; logs every `config.log_every`
    steps. `agree_stop(local) -> bool` makes the ranks of a data-parallel group stop at the same step.
    """
    device = precision.device
    path = Path(checkpoint_path) if checkpoint_path is not None else None
    step, elapsed_before, samples_seen, last_eval_step = 0, 0.0, 0, -1
    resumed = load_checkpoint(path, config, device)
    if resumed is not None:
        for name, module in task.modules().items():
            module.load_state_dict(resumed["modules"][name])
        for name, optimizer in task.optimizers().items():
            optimizer.load_state_dict(resumed["optimizers"][name])
        precision.load_state_dict(resumed.get("precision") or {})
        task.load_state_dict(resumed.get("task") or {})
        state = resumed["loop"]
        step, elapsed_before = int(resumed["step"]), float(state["elapsed_s"])
        samples_seen, last_eval_step = int(state["samples_seen"]), int(state["last_eval_step"])
        set_rng_state(resumed["rng"], device)
    resumed_from = step if resumed is not None else None
    reset_peak_memory(device)
    cuda = device.type == "cuda"
    started = time.monotonic()

    def checkpoint() -> None:
        payload = {
            "format": CHECKPOINT_FORMAT,
            "config": config_key(config),
            "step": step,
            "modules": {name: m.state_dict() for name, m in task.modules().items()},
            "optimizers": {name: o.state_dict() for name, o in task.optimizers().items()},
            "precision": precision.state_dict(),
            "rng": rng_state(device),
            "loop": {
                "elapsed_s": elapsed_before + (time.monotonic() - started),
                "samples_seen": samples_seen,
                "last_eval_step": last_eval_step,
            },
            "task": task.state_dict(),
        }
        flush_sink(sink)  # the stored series are never behind the checkpoint
        # Atomic: a crash mid-write leaves the previous checkpoint intact.
        atomic_write(path, lambda tmp: torch.save(payload, tmp))

    def status() -> None:
        eta = _eta(time.monotonic() - started, step - (resumed_from or 0), total_steps - step)
        sink.status(step / max(total_steps, 1), eta)

    checked = task.checked()
    sums: dict[str, Tensor] = {}
    interval_steps, interval_samples, last_checked = 0, 0, step
    check_every = 1 if device.type == "cpu" else config.log_every  # a NaN check costs a GPU sync
    interval_started = last_checkpoint = started
    stopped = False
    lr = lr_at(config, step, total_steps, steps_per_epoch)

    while step < total_steps:
        stop = bool(should_stop())
        if agree_stop is not None:
            stop = agree_stop(stop)
        if stop:
            stopped = True
            break
        lr = lr_at(config, step, total_steps, steps_per_epoch)
        memory_error = None
        try:
            parts, samples = task.train_step(step, lr)
        except (torch.OutOfMemoryError, RuntimeError) as exc:
            if not is_out_of_memory(exc):
                raise
            memory_error = out_of_memory(exc, config, precision, f"training step {step + 1}")
        if memory_error is not None:
            # Raised outside the except block and unchained: the failed step's activations (held by the
            # original's traceback) are freed already; cleared in `finally` so no reference cycle runs
            # through this frame. The process gets the run's memory back as soon as its caller drops the
            # error (a worker then takes its next job), without waiting for the garbage collector.
            try:
                raise memory_error
            finally:
                memory_error = None
        for name, value in parts.items():
            sums[name] = sums[name] + value if name in sums else value.clone()
        step += 1
        interval_steps += 1
        interval_samples += samples
        samples_seen += samples

        if step % check_every == 0 or step == total_steps:
            _check_finite(sums, checked, last_checked, step)
            last_checked = step
        values: dict[str, float] = {}
        if step % config.log_every == 0 or step == total_steps:
            now = time.monotonic()
            values = task.train_values({k: float(v) for k, v in sums.items()}, interval_steps)
            values[task.prefix + "lr"] = lr
            values[task.prefix + "samples_per_s"] = interval_samples / max(now - interval_started, 1e-9)
            if cuda:  # the GPU's peaks so far, beside the losses (on the CPU the result has the peak RSS)
                values |= {task.prefix + "gpu/" + k[4:]: v for k, v in peak_memory(device).items()}
            sums.clear()
            interval_steps, interval_samples, interval_started = 0, 0, now
        evaluated = step % eval_every == 0 or step == total_steps
        if evaluated:
            values |= _evaluate(task, step, config, precision)
            last_eval_step = step
        if values:
            sink.log(step, values)
            status()
        if path is not None and time.monotonic() - last_checkpoint >= checkpoint_every_s:
            checkpoint()
            last_checkpoint = time.monotonic()

    if last_eval_step != step:
        # A run cut short still reports (and keeps) its last weights.
        values = _evaluate(task, step, config, precision)
        last_eval_step = step
        if values:
            sink.log(step, values)
    if path is not None and (stopped or checkpoint_at_end):
        checkpoint()
    if not stopped:
        sink.status(1.0, 0.0)
    return LoopResult(
        steps=step,
        stopped=stopped,
        resumed_from_step=resumed_from,
        train_time_s=elapsed_before + (time.monotonic() - started),
        samples_seen=samples_seen,
        memory=peak_memory(device),
    )


# --------------------------------------------------------------------------- out of memory


def out_of_memory(
    exc: BaseException, config: ExperimentConfig, precision: Precision, where: str, *, training: bool = True
) -> OutOfMemory:
    """The user's way out of an out-of-memory error: the batch size they ran with, a smaller one, precision.

    `training` False: it ran out while evaluating, whose batches do not follow batch_size.
    """
    device = precision.device
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        total = torch.cuda.get_device_properties(index).total_memory / 2**30
        peak = torch.cuda.max_memory_allocated(index) / 2**30
        what = f"the GPU ({device}, {total:.1f} GiB; {peak:.1f} GiB held by tensors at the peak)"
    else:
        what = "the CPU's memory"
    batch = config.batch_size
    advice = []
    if batch > 1 and training:
        advice.append(f"batch_size {max(1, batch // 2)} or smaller")
    if precision.dtype is None and device.type == "cuda":
        advice.append("precision 'auto' (bf16 or fp16: about half the activation memory of fp32)")
    elif precision.dtype is None and config.precision == "fp32":
        advice.append("precision 'bf16'")
    advice.append("a smaller model")
    with_batch = f" with batch_size {batch}" if training else ""
    # PyTorch's own first sentences say how much it tried to allocate (the rest is allocator tuning advice).
    said = ". ".join(str(exc).strip().splitlines()[0].split(". ")[:2])[:240] if str(exc).strip() else ""
    said = f' (PyTorch: "{said.rstrip(".")}.")' if said else ""
    return OutOfMemory(f"{what} ran out at {where}{with_batch}{said}: try " + ", or ".join(advice))


def _evaluate(task: Task, step: int, config: ExperimentConfig, precision: Precision) -> dict[str, float]:
    memory_error = None
    try:
        return task.evaluate(step)
    except (torch.OutOfMemoryError, RuntimeError) as exc:
        if not is_out_of_memory(exc):
            raise
        where = f"the evaluation after step {step}"
        memory_error = out_of_memory(exc, config, precision, where, training=False)
    try:  # as in run_loop: no chained cause, no cycle through this frame
        raise memory_error
    finally:
        memory_error = None


def _check_finite(
    sums: Mapping[str, Tensor], checked: Mapping[str, str], last_checked: int, step: int
) -> None:
    # The parts before the total: a NaN soft loss also makes the total NaN, and the part says why.
    for name, label in checked.items():
        if name not in sums:
            continue
        value = float(sums[name])
        if not math.isfinite(value):
            where = f"step {step}" if step - last_checked <= 1 else f"one of steps {last_checked + 1}-{step}"
            raise TrainingError(
                f"{label} became {value} at {where}; "
                "try a lower learning rate, a lower temperature or codistill weight, "
                "or check the data for NaN/inf values"
            )
