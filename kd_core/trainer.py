"""The training loop shared by `train` (hard labels) and `distill` (Hinton KD), read top to bottom."""

from __future__ import annotations

import contextlib
import json
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kd_core.atomic import atomic_write
from kd_core.cache import teacher_logits_in_batches
from kd_core.config import ExperimentConfig
from kd_core.device import autocast_dtype
from kd_core.errors import ConfigError, DatasetError, TrainingError
from kd_core.losses import distillation_loss
from kd_core.sinks import MetricsSink, flush_sink

CHECKPOINT_FORMAT = 1
EVAL_BATCH = 1024
NOISE_SCALE = 0.1  # "noise" augmentation: gaussian noise at this fraction of each feature's std


@dataclass
class TrainOutcome:
    """What a training run leaves behind; the model itself already holds the best weights."""

    state_dict: dict[str, Tensor]
    best: dict[str, float]  # val_loss, val_acc and/or val_agreement, epoch, step of the kept weights
    steps: int
    epochs: float
    stopped: bool
    train_time_s: float
    samples_per_s: float
    resumed_from_step: int | None = None
    history: list[dict[str, float]] = field(default_factory=list)  # one row of val metrics per evaluation


# --------------------------------------------------------------------------- data on the device


def split_tensors(dataset: Any, split: str, device: torch.device) -> tuple[Tensor, Tensor | None]:
    """The raw inputs (float32) and labels (int64, or None for an unlabeled set) of one split, on device."""
    x = getattr(dataset, f"x_{split}", None)
    y = getattr(dataset, f"y_{split}", None)
    if x is None:
        return torch.zeros((0, *tuple(dataset.input_shape)), device=device), None
    xt = torch.as_tensor(np.asarray(x), dtype=torch.float32).to(device)
    yt = torch.as_tensor(np.asarray(y), dtype=torch.long).to(device) if y is not None else None
    return xt, yt


def batches_per_epoch(n: int, batch_size: int) -> int:
    """Batches in one pass over `n` examples; a last batch of a single example is dropped."""
    # Batch norm cannot train on one sample, and one sample adds nothing.
    full, rest = divmod(n, batch_size)
    return full + (1 if rest > 1 or (rest == 1 and full == 0) else 0)


def plan_steps(config: ExperimentConfig, n_examples: int) -> tuple[int, int]:
    """(total steps, steps per epoch) for `n_examples` training examples: epochs, capped by max_steps."""
    if n_examples < 1:
        raise DatasetError("the training split is empty")
    per_epoch = batches_per_epoch(n_examples, config.batch_size)
    total = config.epochs * per_epoch
    if config.max_steps is not None:
        total = min(total, config.max_steps)
    return total, per_epoch


# --------------------------------------------------------------------------- augmentation (tensor ops)


def flip_crop(x: Tensor, generator: torch.Generator) -> Tensor:
    """Random crop after zero padding (4 px at 32 px, scaled to the image size) and a random h-flip."""
    b, c, h, w = x.shape
    pad = max(1, min(4, h // 8, w // 8))
    padded = F.pad(x, (pad, pad, pad, pad))
    dev = x.device
    oy = torch.randint(0, 2 * pad + 1, (b, 1), generator=generator, device=dev)
    ox = torch.randint(0, 2 * pad + 1, (b, 1), generator=generator, device=dev)
    flip = torch.rand((b, 1), generator=generator, device=dev) < 0.5
    cols = torch.arange(w, device=dev).unsqueeze(0)
    cols = ox + torch.where(flip, (w - 1) - cols, cols)
    rows = oy + torch.arange(h, device=dev).unsqueeze(0)
    # One gather per batch: index [B, C, H, W] from per-sample row and column offsets.
    return padded[
        torch.arange(b, device=dev)[:, None, None, None],
        torch.arange(c, device=dev)[None, :, None, None],
        rows[:, None, :, None],
        cols[:, None, None, :],
    ]


def make_augment(
    config: ExperimentConfig, dataset: Any, x_train: Tensor
) -> Callable[[Tensor, torch.Generator], Tensor] | None:
    """The config's augmentation as `f(batch, generator) -> batch`, or None for "none"."""
    if config.augment == "none":
        return None
    if config.augment == "flip_crop":
        if not getattr(dataset, "is_image", True) or x_train.dim() != 4:
            raise ConfigError("augment 'flip_crop' needs an image dataset; use 'noise' for feature vectors")
        return flip_crop
    if config.augment == "noise":
        scale = NOISE_SCALE * x_train.std(dim=0, keepdim=True).clamp_min(1e-8)

        def noise(x: Tensor, generator: torch.Generator) -> Tensor:
            return x + scale * torch.randn(x.shape, generator=generator, device=x.device)

        return noise
    raise ConfigError(f"unknown augment {config.augment!r}")


# --------------------------------------------------------------------------- optimiser and schedule


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


def autocast(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    """Mixed precision at `dtype` on `device` (see device.autocast_dtype); a no-op for None."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


# --------------------------------------------------------------------------- evaluation


@torch.no_grad()
def predict_logits(
    model: nn.Module, x: Tensor, *, batch_size: int = EVAL_BATCH, dtype: torch.dtype | None = None
) -> Tensor:
    """Float32 logits of `model` on `x` in batches, in eval mode; the model's mode is restored after.

    Eval mode: dropout off and batch norm on its running statistics, so predictions do not depend
    on the batch. `dtype` runs the forward under autocast (None: full precision).
    """
    was_training = model.training
    model.eval()
    try:
        parts = []
        for start in range(0, x.shape[0], batch_size):
            with autocast(x.device, dtype):
                parts.append(model(x[start : start + batch_size]).float())
    finally:
        model.train(was_training)
    return torch.cat(parts) if parts else torch.zeros((0, 0), device=x.device)


@torch.no_grad()
def evaluate(
    model: nn.Module,
    x: Tensor,
    y: Tensor | None,
    *,
    teacher_logits: Tensor | None = None,
    temperature: float = 1.0,
    batch_size: int = EVAL_BATCH,
) -> dict[str, float]:
    """Loss and accuracy on labels; agreement with the teacher (and the soft loss, unlabeled) when given."""
    if x.shape[0] == 0:
        return {}
    out = predict_logits(model, x, batch_size=batch_size, dtype=autocast_dtype(x.device))
    metrics: dict[str, Tensor] = {}
    if y is not None:
        metrics["loss"] = F.cross_entropy(out, y)
        metrics["acc"] = (out.argmax(dim=1) == y).float().mean()
    if teacher_logits is not None:
        metrics["agreement"] = (out.argmax(dim=1) == teacher_logits.argmax(dim=1)).float().mean()
        if y is None:
            _, _, soft = distillation_loss(out, teacher_logits, None, temperature=temperature, alpha=1.0)
            metrics["loss"] = soft
    return {k: float(v) for k, v in metrics.items()}


def _better(new: dict[str, float], best: dict[str, float] | None) -> bool:
    if best is None:
        return True
    key = "acc" if "acc" in new else "agreement"
    if new.get(key, -1.0) != best.get(key, -1.0):
        return new.get(key, -1.0) > best.get(key, -1.0)
    return new.get("loss", math.inf) < best.get("loss", math.inf)


# --------------------------------------------------------------------------- checkpoints


def config_key(config: ExperimentConfig) -> str:
    """The config as canonical JSON: a checkpoint resumes only the run of this very config."""
    return json.dumps(config.to_dict(), sort_keys=True, default=str)


def _load_checkpoint(
    path: Path | None, config: ExperimentConfig, device: torch.device
) -> dict[str, Any] | None:
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


def _rng_state(
    order_gen: torch.Generator, aug_gen: torch.Generator, device: torch.device
) -> dict[str, Tensor]:
    state = {"order": order_gen.get_state(), "aug": aug_gen.get_state(), "torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(
    state: Mapping[str, Tensor], order_gen: torch.Generator, aug_gen: torch.Generator, device: torch.device
) -> None:
    order_gen.set_state(state["order"].cpu())
    aug_gen.set_state(state["aug"].cpu())
    torch.set_rng_state(state["torch"].cpu())
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"].cpu(), device)


# --------------------------------------------------------------------------- the loop


def train_model(
    model: nn.Module,
    dataset: Any,
    config: ExperimentConfig,
    *,
    teacher_logits_fn: Callable[[Tensor], Tensor] | None = None,
    teacher_logits: Mapping[str, Tensor] | None = None,
    sink: MetricsSink,
    should_stop: Callable[[], bool] = lambda: False,
    device: torch.device | str = "cpu",
    checkpoint_path: str | Path | None = None,
    checkpoint_every_s: float = 30.0,
    teacher_per_batch: bool = False,
) -> TrainOutcome:
    """Train `model` on the dataset's train split, keeping the best weights on the validation split.

    Distillation is on when a teacher is given: `teacher_logits_fn` runs the teacher on a batch of raw
    inputs; `teacher_logits` holds precomputed logits per split ("train", "val") for the unaugmented
    inputs (the cache), used instead of calling the teacher whenever the batch is not augmented.
    `teacher_per_batch` runs the teacher on every batch anyway (a train split too large to cache, or
    a benchmark of what the cache saves).
    """
    device = torch.device(device)
    distill = teacher_logits_fn is not None or teacher_logits is not None
    precomputed = dict(teacher_logits or {})
    checkpoint_path = Path(checkpoint_path) if checkpoint_path is not None else None

    # The whole dataset lives on the device; batches are index slices of it.
    x_train, y_train = split_tensors(dataset, "train", device)
    x_val, y_val = split_tensors(dataset, "val", device)
    n = x_train.shape[0]
    if n == 0:
        raise DatasetError("the training split is empty")
    if y_train is None and not distill:
        raise DatasetError("this dataset has no labels; training without a teacher needs labels")
    augment = make_augment(config, dataset, x_train)
    if distill and (augment is not None or teacher_per_batch) and teacher_logits_fn is None:
        raise ConfigError("augmentation needs the teacher itself, not only its cached logits")

    def teacher_on(split: str, x: Tensor) -> Tensor:
        if split not in precomputed:
            precomputed[split] = teacher_logits_in_batches(teacher_logits_fn, x)
        return precomputed[split]

    teacher_val = teacher_on("val", x_val) if distill and x_val.shape[0] else None
    per_batch = augment is not None or teacher_per_batch
    teacher_train = teacher_on("train", x_train) if distill and not per_batch else None
    if teacher_train is not None and teacher_train.shape[0] != n:
        raise TrainingError(f"teacher logits cover {teacher_train.shape[0]} samples, the train split has {n}")

    model.to(device)
    model.train()
    optimizer = make_optimizer(model, config)
    amp = autocast_dtype(device)
    scaler = torch.amp.GradScaler("cuda") if amp == torch.float16 else None

    total_steps, steps_per_epoch = plan_steps(config, n)

    # Three random streams: data order (CPU, so the order is the same on any device), augmentation
    # (on the device, no host round trip) and torch's global one (model dropout).
    order_gen = torch.Generator().manual_seed(config.seed)
    aug_gen = torch.Generator(device=device).manual_seed(config.seed + 1)
    torch.manual_seed(config.seed)

    step, epoch, batch_in_epoch = 0, 0, 0
    perm: Tensor | None = None
    best: dict[str, float] | None = None
    best_state: dict[str, Tensor] | None = None
    history: list[dict[str, float]] = []
    elapsed_before = 0.0
    samples_seen = 0
    last_eval_step = -1

    resumed = _load_checkpoint(checkpoint_path, config, device)
    if resumed is not None:
        model.load_state_dict(resumed["model"])
        optimizer.load_state_dict(resumed["optimizer"])
        if scaler is not None and resumed.get("scaler"):
            scaler.load_state_dict(resumed["scaler"])
        step, epoch, batch_in_epoch = resumed["step"], resumed["epoch"], resumed["batch_in_epoch"]
        perm = resumed["perm"].to(device) if resumed.get("perm") is not None else None
        best, best_state = resumed.get("best") or None, resumed.get("best_state") or None
        history = list(resumed.get("history") or [])
        elapsed_before, samples_seen = resumed["elapsed_s"], resumed["samples_seen"]
        last_eval_step = resumed["last_eval_step"]
        _set_rng_state(resumed["rng"], order_gen, aug_gen, device)

    def checkpoint() -> None:
        if checkpoint_path is None:
            return
        payload = {
            "format": CHECKPOINT_FORMAT,
            "config": config_key(config),
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scaler": scaler.state_dict() if scaler is not None else {},
            "step": step,
            "epoch": epoch,
            "batch_in_epoch": batch_in_epoch,
            "perm": perm.cpu() if perm is not None else None,
            "best": best or {},
            "best_state": best_state or {},
            "history": history,
            "elapsed_s": elapsed_before + (time.monotonic() - started),
            "samples_seen": samples_seen,
            "last_eval_step": last_eval_step,
            "rng": _rng_state(order_gen, aug_gen, device),
        }
        flush_sink(sink)
        # Atomic: a crash mid-write leaves the previous checkpoint intact.
        atomic_write(checkpoint_path, lambda tmp: torch.save(payload, tmp))

    def validate() -> None:
        nonlocal best, best_state, last_eval_step
        metrics = evaluate(model, x_val, y_val, teacher_logits=teacher_val, temperature=config.temperature)
        last_eval_step = step
        if not metrics:
            return
        row = {f"val/{k}": v for k, v in metrics.items()}
        sink.log(step, {**row, "epoch": epoch + batch_in_epoch / steps_per_epoch})
        history.append({"step": float(step), **row})
        if _better(metrics, best):
            best = {**metrics, "step": float(step), "epoch": epoch + batch_in_epoch / steps_per_epoch}
            best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}

    # Running sums stay on the device; they are read (one sync) once per logging interval.
    sums = {"loss": torch.zeros((), device=device)}
    if distill:
        sums |= {"loss_hard": torch.zeros((), device=device), "loss_soft": torch.zeros((), device=device)}
    correct = torch.zeros((), device=device)
    labelled = 0
    interval_steps, interval_samples = 0, 0
    check_every = 1 if device.type == "cpu" else config.log_every  # a NaN check costs a GPU sync
    started = time.monotonic()
    interval_started = started
    last_checkpoint = started
    stopped = False
    resumed_from = step if resumed is not None else None
    last_checked = step

    while step < total_steps:
        if should_stop():
            stopped = True
            break
        if batch_in_epoch == 0 or perm is None:
            perm = torch.randperm(n, generator=order_gen).to(device)
        idx = perm[batch_in_epoch * config.batch_size : (batch_in_epoch + 1) * config.batch_size]
        xb = x_train[idx]
        yb = y_train[idx] if y_train is not None else None
        if augment is not None:
            xb = augment(xb, aug_gen)

        lr = lr_at(config, step, total_steps, steps_per_epoch)
        set_lr(optimizer, lr)

        with autocast(device, amp):
            logits = model(xb)
        if distill:
            if teacher_train is not None:
                tb = teacher_train[idx]
            else:
                # Augmented batch: the teacher must see the very view the student sees.
                with torch.no_grad(), autocast(device, amp):
                    tb = torch.as_tensor(teacher_logits_fn(xb)).to(device)
            loss, hard, soft = distillation_loss(
                logits, tb, yb, temperature=config.temperature, alpha=config.alpha, soft_loss=config.soft_loss
            )
            parts = {"loss": loss, "loss_hard": hard, "loss_soft": soft}
        else:
            loss = F.cross_entropy(logits.float(), yb)
            parts = {"loss": loss}

        optimizer.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            optimizer.step()

        for name, value in parts.items():
            sums[name] += value.detach()
        if yb is not None:
            correct += (logits.detach().argmax(dim=1) == yb).sum()
            labelled += yb.shape[0]
        step += 1
        batch_in_epoch += 1
        interval_steps += 1
        interval_samples += xb.shape[0]
        samples_seen += xb.shape[0]

        if step % check_every == 0 or step == total_steps:
            _check_finite(sums, last_checked, step)
            last_checked = step
        if step % config.log_every == 0 or step == total_steps:
            now = time.monotonic()
            values = {f"train/{k}": float(v) / interval_steps for k, v in sums.items()}
            if labelled:
                values["train/acc"] = float(correct) / labelled
            values["lr"] = lr
            values["samples_per_s"] = interval_samples / max(now - interval_started, 1e-9)
            sink.log(step, values)
            for v in sums.values():
                v.zero_()
            correct.zero_()
            labelled = 0
            interval_steps, interval_samples, interval_started = 0, 0, now
            sink.status(
                step / total_steps, _eta(now - started, step - (resumed_from or 0), total_steps - step)
            )
        if batch_in_epoch == steps_per_epoch:
            validate()
            epoch += 1
            batch_in_epoch = 0
            now = time.monotonic()
            sink.status(
                step / total_steps, _eta(now - started, step - (resumed_from or 0), total_steps - step)
            )
        if checkpoint_path is not None and time.monotonic() - last_checkpoint >= checkpoint_every_s:
            checkpoint()
            last_checkpoint = time.monotonic()

    if last_eval_step != step:
        validate()  # a run cut short by max_steps or a stop still reports (and keeps) its last weights
    if checkpoint_path is not None:
        checkpoint()
    train_time = elapsed_before + (time.monotonic() - started)
    if best_state is not None:
        model.load_state_dict(best_state)
    final_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    if not stopped:
        sink.status(1.0, 0.0)
    return TrainOutcome(
        state_dict=final_state,
        best={(f"val_{k}" if k in ("loss", "acc", "agreement") else k): v for k, v in (best or {}).items()},
        steps=step,
        epochs=epoch + batch_in_epoch / steps_per_epoch,
        stopped=stopped,
        train_time_s=train_time,
        samples_per_s=samples_seen / max(train_time, 1e-9),
        resumed_from_step=resumed_from,
        history=history,
    )


def _check_finite(sums: Mapping[str, Tensor], last_checked: int, step: int) -> None:
    # The parts before the total: a NaN soft loss also makes the total NaN, and the part says why.
    for name in sorted(sums, key=lambda k: k == "loss"):
        value = sums[name]
        if not math.isfinite(float(value)):
            where = f"step {step}" if step - last_checked <= 1 else f"one of steps {last_checked + 1}-{step}"
            label = {
                "loss": "the training loss",
                "loss_hard": "the hard-label loss",
                "loss_soft": "the soft loss",
            }
            raise TrainingError(
                f"{label[name]} became {float(value)} at {where}; "
                "try a lower learning rate, a lower temperature, or check the data for NaN/inf values"
            )


def _eta(elapsed: float, steps_done: int, steps_left: int) -> float | None:
    if steps_done <= 0:
        return None
    return elapsed / steps_done * steps_left
