"""Train (hard labels) and distill (Hinton, DKD, DIST): the step and evaluation they plug into the shared loop."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kd_core.cache import CachedLogits
from kd_core.config import ExperimentConfig
from kd_core.data.loader import (
    EVAL_BATCH_BYTES,
    RESIDENT_MAX_BYTES,
    Batches,
    batches_per_epoch,
    eval_batch_size,
    flip_crop,
    iterate,
    make_batches,
)
from kd_core.device import CompiledForward, autocast_dtype, image_model, to_channels_last
from kd_core.errors import ConfigError, DatasetError, TrainingError
from kd_core.loop import Precision, autocast, lr_at, make_optimizer, plan_steps, run_loop, set_lr
from kd_core.losses import distillation_loss, kd_loss
from kd_core.sinks import MetricsSink

__all__ = [
    "TrainOutcome",
    "batches_per_epoch",
    "evaluate",
    "evaluate_split",
    "flip_crop",
    "lr_at",
    "plan_steps",
    "predict_logits",
    "split_tensors",
    "train_model",
]

EVAL_BATCH = 1024
Logits = Tensor | CachedLogits  # a split's teacher logits: on the device, or fp16 memory-mapped


@dataclass
class TrainOutcome:
    """What a training run leaves behind; the model itself already holds the best weights."""

    state_dict: dict[str, Tensor]
    best: dict[str, float]  # val_loss, val_acc and/or val_agreement, epoch, step of the kept weights (keep)
    steps: int
    epochs: float
    stopped: bool
    train_time_s: float
    samples_per_s: float
    resumed_from_step: int | None = None
    history: list[dict[str, float]] = field(default_factory=list)  # one row of val metrics per evaluation
    precision: str = "fp32"  # what the run computed in ("auto" resolved)
    # Peak memory of the training loop (LoopResult.memory); what the run did not do as asked, and why.
    memory: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    compiled: bool | None = (
        None  # config `compile`: whether the compiled forward ran to the end (None: not asked)
    )

    def run_metrics(self) -> dict[str, Any]:
        """The result metrics of the GPU path: precision, peak memory, `compiled` and notes (when there are any)."""
        return {
            "precision": self.precision,
            **self.memory,
            **({"compiled": self.compiled} if self.compiled is not None else {}),
            **({"notes": list(self.notes)} if self.notes else {}),
        }


def split_tensors(dataset: Any, split: str, device: torch.device) -> tuple[Tensor, Tensor | None]:
    """A whole split as model inputs (float32) and labels on `device`: small data only (tests, benchmarks)."""
    xs, ys = [], []
    for x, y, _ in iterate(dataset, split, batch_size=65536, device=device):
        xs.append(x)
        if y is not None:
            ys.append(y)
    if not xs:
        return torch.zeros((0, *tuple(dataset.input_shape)), device=device), None
    return torch.cat(xs), (torch.cat(ys) if ys else None)


# --------------------------------------------------------------------------- evaluation


@torch.no_grad()
def predict_logits(
    model: nn.Module, x: Tensor, *, batch_size: int = EVAL_BATCH, dtype: torch.dtype | None = None
) -> Tensor:
    """Float32 logits of `model` on `x` in batches, in eval mode; the model's mode is restored after.

    Eval mode: dropout off and batch norm on its running statistics, so predictions do not depend
    on the batch. `dtype` runs the forward under autocast (None: full precision).
    """
    per_row = 4 * math.prod(tuple(x.shape[1:]))
    batch_size = max(1, min(batch_size, EVAL_BATCH_BYTES // max(1, per_row)))
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


def take_logits(source: Logits, idx: Tensor, device: torch.device) -> Tensor:
    """Teacher logits of the samples `idx` (float32 on `device`), from a tensor or the disk cache."""
    if isinstance(source, CachedLogits):
        return source.take(idx, device)
    return source[idx.to(source.device)].to(device)


class _Sums:
    """Sample-weighted sums over batches, so a split's metrics equal the whole split's at once.

    Teacher metrics are means over the samples that have a teacher prediction (`n_teacher`): a
    soft-label teacher may cover only part of a split.
    """

    TEACHER_KEYS = ("agreement", "kl_to_teacher", "teacher_acc")

    def __init__(self) -> None:
        self.n = 0
        self.n_teacher = 0
        self.values: dict[str, Tensor] = {}

    def add(self, name: str, value: Tensor, weight: int = 1) -> None:
        value = value.detach().double() * weight
        self.values[name] = self.values[name] + value if name in self.values else value

    def means(self) -> dict[str, float]:
        out = {}
        for k, v in self.values.items():
            n = (
                self.n_teacher
                if k in self.TEACHER_KEYS or (k == "loss" and "acc" not in self.values)
                else self.n
            )
            out[k] = float(v) / max(n, 1)
        if self.n_teacher and self.n_teacher < self.n:
            out["teacher_coverage"] = self.n_teacher / self.n
        return out


def _batch_metrics(
    sums: _Sums, out: Tensor, y: Tensor | None, tb: Tensor | None, temperature: float, partial: bool = False
) -> None:
    sums.n += out.shape[0]
    if y is not None:
        sums.add("loss", F.cross_entropy(out, y, reduction="sum"))
        sums.add("acc", (out.argmax(dim=1) == y).sum())
    if tb is None:
        return
    if partial:  # a soft-label teacher: its rows without a prediction are NaN
        covered = ~torch.isnan(tb).any(dim=1)
        out, tb, y = out[covered], tb[covered], (y[covered] if y is not None else None)
    k = out.shape[0]
    sums.n_teacher += k
    if k == 0:
        return
    if y is not None:
        sums.add("teacher_acc", (tb.argmax(dim=1) == y).sum())
    sums.add("agreement", (out.argmax(dim=1) == tb.argmax(dim=1)).sum())
    # Fidelity (Stanton et al. 2021): KL(teacher || student) at T = 1, per sample, teacher rows as weights.
    log_t, log_s = F.log_softmax(tb.float(), dim=1), F.log_softmax(out, dim=1)
    sums.add("kl_to_teacher", torch.where(log_t.exp() > 0, log_t.exp() * (log_t - log_s), 0.0).sum())
    if y is None:
        _, _, soft = distillation_loss(out, tb, None, temperature=temperature, alpha=1.0)
        sums.add("loss", soft, k)


@torch.no_grad()
def evaluate_split(
    model: nn.Module,
    batches: Batches | Any,
    split: str = "val",
    *,
    device: torch.device | str = "cpu",
    teacher_logits: Logits | None = None,
    temperature: float = 1.0,
    batch_size: int = EVAL_BATCH,
    partial_teacher: bool = False,
    precision: str = "auto",
    channels_last: bool = False,
) -> dict[str, float]:
    """Loss and accuracy on labels, agreement with the teacher (and the soft loss, unlabeled) when given,
    the teacher's own accuracy ("teacher_acc"); over a split in batches, never the whole split at once.

    `batches` is an in-order `Batches` (kept by a loop that evaluates often) or a dataset. `precision` is
    the config's (device.autocast_dtype); `channels_last` feeds 4-D batches in NHWC order.
    """
    device = torch.device(device)
    source = (
        batches.each()
        if isinstance(batches, Batches)
        else iterate(batches, split, batch_size=eval_batch_size(batches, batch_size), device=device)
    )
    was_training = model.training
    model.eval()
    sums = _Sums()
    dtype = autocast_dtype(device, precision)
    try:
        for x, y, idx in source:
            if channels_last:
                x = to_channels_last(x)
            with autocast(device, dtype):
                out = model(x).float()
            tb = take_logits(teacher_logits, idx, device) if teacher_logits is not None else None
            _batch_metrics(sums, out, y, tb, temperature, partial_teacher)
    finally:
        model.train(was_training)
    return sums.means() if sums.n else {}


@torch.no_grad()
def evaluate(
    model: nn.Module,
    x: Tensor,
    y: Tensor | None,
    *,
    teacher_logits: Tensor | None = None,
    temperature: float = 1.0,
    batch_size: int = EVAL_BATCH,
    precision: str = "auto",
) -> dict[str, float]:
    """`evaluate_split` on tensors already in memory."""
    if x.shape[0] == 0:
        return {}
    out = predict_logits(model, x, batch_size=batch_size, dtype=autocast_dtype(x.device, precision))
    sums = _Sums()
    _batch_metrics(sums, out, y, teacher_logits, temperature)
    metrics = sums.means()
    metrics.pop("teacher_acc", None)
    return metrics


def _better(new: dict[str, float], best: dict[str, float] | None) -> bool:
    if best is None:
        return True
    key = "acc" if "acc" in new else "agreement"
    if new.get(key, -1.0) != best.get(key, -1.0):
        return new.get(key, -1.0) > best.get(key, -1.0)
    return new.get("loss", math.inf) < best.get("loss", math.inf)


def teacher_on_split(
    logits_fn: Callable[[Tensor], Tensor], dataset: Any, split: str, device: torch.device
) -> Tensor:
    """A teacher's float32 logits on a whole split, batch by batch (direct calls without the disk cache)."""
    parts = [
        torch.as_tensor(logits_fn(x)).to(device=device, dtype=torch.float32)
        for x, _, _ in iterate(dataset, split, batch_size=eval_batch_size(dataset), device=device)
    ]
    return torch.cat(parts) if parts else torch.zeros((0, 0), device=device)


# --------------------------------------------------------------------------- the train/distill step


def batch_loss(
    config: ExperimentConfig,
    logits: Tensor,
    labels: Tensor | None,
    teacher: Tensor | None,
    *,
    epoch: float,
    partial: bool = False,
) -> tuple[Tensor, dict[str, Tensor]]:
    """One batch's loss (cross entropy, or the config's distillation method against `teacher` logits) and
    the parts to log. With `partial` (a soft-label teacher covering part of the set) rows of NaN logits
    have no prediction: those samples get the hard loss only."""
    if teacher is None:
        loss = F.cross_entropy(logits.float(), labels)
        return loss, {"loss": loss.detach()}
    covered = ~torch.isnan(teacher).any(dim=1) if partial else None
    if covered is not None:
        teacher = torch.nan_to_num(teacher)
    c = config
    loss, hard, soft = kd_loss(
        logits, teacher, labels, method=c.method, options=c.method_options, temperature=c.temperature,
        alpha=c.alpha, soft_loss=c.soft_loss, logit_standardization=c.logit_standardization,
        epoch=epoch, covered=covered,
    )  # fmt: skip
    return loss, {"loss": loss.detach(), "loss_hard": hard.detach(), "loss_soft": soft.detach()}


class TrainTask:
    """One model on the train split: cross entropy, or Hinton KD against a teacher's logits."""

    prefix = ""

    def __init__(
        self,
        model: nn.Module,
        dataset: Any,
        config: ExperimentConfig,
        *,
        device: torch.device,
        precision: Precision,
        teacher_logits_fn: Callable[[Tensor], Tensor] | None,
        teacher_logits: Mapping[str, Logits],
        teacher_per_batch: bool,
        partial_teacher: bool = False,
        forward: Callable[[Tensor], Tensor] | None = None,
        channels_last: bool = False,
    ) -> None:
        self.model, self.config, self.device, self.precision = model, config, device, precision
        # The training forward: the model itself, or its torch.compile'd wrapper (same parameters).
        self.forward = forward or model
        self.channels_last = channels_last
        self.distill = teacher_logits_fn is not None or bool(teacher_logits)
        # Soft-label teachers cover only some samples: NaN rows in their logits mean "no prediction".
        self.partial = partial_teacher
        self.teacher_fn = teacher_logits_fn
        self.batches = make_batches(
            dataset,
            "train",
            batch_size=config.batch_size,
            seed=config.seed,
            device=device,
            augment=config.augment,
        )
        if not self.batches.labeled and not self.distill:
            raise DatasetError("this dataset has no labels; training without a teacher needs labels")
        if self.distill and not self.batches.labeled and config.method == "dkd":
            raise ConfigError(
                "method 'dkd' needs labels (it splits each sample's classes into its label and the rest); "
                "this transfer set has none: use method hinton or dist"
            )
        self.per_batch = self.batches.augment is not None or teacher_per_batch
        if self.distill and self.per_batch and teacher_logits_fn is None:
            raise ConfigError("augmentation needs the teacher itself, not only its cached logits")
        self.val = make_batches(
            dataset, "val", batch_size=eval_batch_size(dataset), seed=0, device=device, shuffle=False
        )
        precomputed = dict(teacher_logits)
        n_val = len(self.val.indices)
        self.teacher_val = None
        if self.distill and n_val:
            self.teacher_val = precomputed.get("val")
            if self.teacher_val is None:
                self.teacher_val = teacher_on_split(teacher_logits_fn, dataset, "val", device)
        self.teacher_train = None
        if self.distill and not self.per_batch:
            found = precomputed.get("train")
            if found is None:
                found = teacher_on_split(teacher_logits_fn, dataset, "train", device)
            if isinstance(found, CachedLogits) and len(found) * found.shape[1] * 4 <= RESIDENT_MAX_BYTES:
                found = found.tensor(device)  # small: on the device, a gather per batch
            if len(found) != len(self.batches.indices):
                raise TrainingError(
                    f"teacher logits cover {len(found)} samples, the train split has {len(self.batches.indices)}"
                )
            self.teacher_train = found
        self.optimizer = make_optimizer(model, config)
        self.steps_per_epoch = plan_steps(config, len(self.batches.indices))[1]
        self.best: dict[str, float] | None = None
        self.best_state: dict[str, Tensor] | None = None
        self.last: dict[str, float] | None = None  # the latest evaluation (what keep "last" reports)
        self.history: list[dict[str, float]] = []
        self._labelled = 0

    def modules(self) -> dict[str, nn.Module]:
        return {"model": self.model}

    def optimizers(self) -> dict[str, torch.optim.Optimizer]:
        return {"model": self.optimizer}

    def train_step(self, step: int, lr: float) -> tuple[dict[str, Tensor], int]:
        x, y, idx = self.batches.get(step)
        set_lr(self.optimizer, lr)
        xs = to_channels_last(x) if self.channels_last else x
        with self.precision.autocast():
            logits = self.forward(xs)
        if self.distill:
            if self.teacher_train is not None:
                tb = take_logits(self.teacher_train, idx, self.device)
            else:
                # Augmented batch: the teacher must see the very view the student sees.
                with torch.no_grad(), self.precision.autocast():
                    tb = torch.as_tensor(self.teacher_fn(x)).to(self.device)
        else:
            tb = None
        loss, parts = batch_loss(
            self.config, logits, y, tb, epoch=step / self.steps_per_epoch, partial=self.partial
        )
        self.optimizer.zero_grad(set_to_none=True)
        self.precision.backward(loss)
        self.precision.step(self.optimizer)
        if y is not None:
            parts["correct"] = (logits.detach().argmax(dim=1) == y).sum()
            self._labelled += y.shape[0]
        return parts, x.shape[0]

    def train_values(self, sums: dict[str, float], steps: int) -> dict[str, float]:
        values = {f"train/{k}": v / steps for k, v in sums.items() if k.startswith("loss")}
        if self._labelled:
            values["train/acc"] = sums.get("correct", 0.0) / self._labelled
        self._labelled = 0
        return values

    def checked(self) -> dict[str, str]:
        return {"loss_hard": "the hard-label loss", "loss_soft": "the soft loss", "loss": "the training loss"}

    def evaluate(self, step: int) -> dict[str, float]:
        metrics = evaluate_split(
            self.model, self.val, device=self.device, teacher_logits=self.teacher_val,
            temperature=self.config.temperature, partial_teacher=self.partial,
            precision=self.config.precision, channels_last=self.channels_last,
        )  # fmt: skip
        metrics.pop("teacher_acc", None)
        if not metrics:
            return {}
        epoch = step / self.steps_per_epoch
        row = {f"val/{k}": v for k, v in metrics.items()}
        self.history.append({"step": float(step), **row})
        self.last = {**metrics, "step": float(step), "epoch": epoch}
        if self.config.keep == "best" and _better(metrics, self.best):
            self.best = {**metrics, "step": float(step), "epoch": epoch}
            self.best_state = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        return {**row, "epoch": epoch}

    def state_dict(self) -> dict[str, Any]:
        return {
            "best": self.best or {}, "best_state": self.best_state or {}, "history": self.history,
            "last": self.last or {},
        }  # fmt: skip

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.best = dict(state.get("best") or {}) or None
        self.best_state = dict(state.get("best_state") or {}) or None
        self.history = list(state.get("history") or [])
        self.last = dict(state.get("last") or {}) or None

    def close(self) -> None:
        self.batches.close()
        self.val.close()


def train_model(
    model: nn.Module,
    dataset: Any,
    config: ExperimentConfig,
    *,
    teacher_logits_fn: Callable[[Tensor], Tensor] | None = None,
    teacher_logits: Mapping[str, Logits] | None = None,
    sink: MetricsSink,
    should_stop: Callable[[], bool] = lambda: False,
    device: torch.device | str = "cpu",
    checkpoint_path: str | Path | None = None,
    checkpoint_every_s: float = 30.0,
    teacher_per_batch: bool = False,
    partial_teacher: bool = False,
) -> TrainOutcome:
    """Train `model` on the dataset's train split, keeping the best weights on the validation split
    (or the last ones: `config.keep`).

    Distillation is on when a teacher is given: `teacher_logits_fn` runs the teacher on a batch of
    inputs; `teacher_logits` holds precomputed logits per split ("train", "val") for the unaugmented
    inputs (tensors, or the disk cache's `CachedLogits`), read by each batch's sample indices whenever
    the batch is not augmented. `teacher_per_batch` runs the teacher on every batch anyway.
    `partial_teacher`: the logits are a soft-label teacher's, NaN rows where it has no prediction
    (those samples train on their label only; see `kd_loss`).
    """
    device = torch.device(device)
    precision = Precision(device, config.precision)  # refuses a precision the device cannot run, first
    notes: list[str] = []
    model.to(device)
    model.train()
    channels_last = config.channels_last and image_model(tuple(dataset.input_shape))
    if channels_last:
        model.to(memory_format=torch.channels_last)
    elif config.channels_last:
        notes.append(
            "channels_last: ignored, the inputs are not images (it applies to 4-D N, C, H, W batches only)"
        )
    forward = CompiledForward(model) if config.compile else None
    torch.manual_seed(config.seed)  # dropout; the data order and augmentation follow (seed, step)
    task = TrainTask(
        model, dataset, config, device=device, precision=precision, teacher_logits_fn=teacher_logits_fn,
        teacher_logits=teacher_logits or {}, teacher_per_batch=teacher_per_batch,
        partial_teacher=partial_teacher, forward=forward, channels_last=channels_last,
    )  # fmt: skip
    total_steps, steps_per_epoch = plan_steps(config, len(task.batches.indices))
    try:
        result = run_loop(
            task, config, total_steps=total_steps, steps_per_epoch=steps_per_epoch, eval_every=steps_per_epoch,
            precision=precision, sink=sink, should_stop=should_stop, checkpoint_path=checkpoint_path,
            checkpoint_every_s=checkpoint_every_s,
        )  # fmt: skip
    finally:
        task.close()
        if channels_last:  # exports (safetensors) and callers expect ordinary contiguous weights
            model.to(memory_format=torch.contiguous_format)
    if forward is not None and forward.note:
        notes.append(forward.note)
    # keep "best": the best weights on validation; "last": the model as trained, reported as last evaluated.
    if config.keep == "best" and task.best_state is not None:
        model.load_state_dict(task.best_state)
    best = (task.best if config.keep == "best" else task.last) or {}
    return TrainOutcome(
        state_dict={k: v.detach().clone() for k, v in model.state_dict().items()},
        best={
            (f"val_{k}" if k in ("loss", "acc", "agreement", "kl_to_teacher") else k): v
            for k, v in best.items()
        },
        steps=result.steps,
        epochs=result.steps / steps_per_epoch,
        stopped=result.stopped,
        train_time_s=result.train_time_s,
        samples_per_s=result.samples_seen / max(result.train_time_s, 1e-9),
        resumed_from_step=result.resumed_from_step,
        history=task.history,
        precision=precision.name,
        memory=result.memory,
        notes=notes,
        compiled=forward.compiled if forward is not None else None,
    )
