"""`devices: N` for train and distill, rank side: one job as N synchronous ranks of a codistillation group.

Each rank runs the train/distill step of `kd_core.trainer.TrainTask` on its share of every global batch.
The batch's logits, labels and teacher logits are gathered, so every rank computes the very loss one
process computes on the whole batch (DIST's relations across the batch included, `kd_core.losses.kd_loss`
unchanged) and back-propagates through its own share; gradients are all-reduced as a group's are. Rank 0
evaluates, keeps the best weights, writes the job's one checkpoint and the outcome (`launcher` reads it).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from kd_core.cache import CachedLogits
from kd_core.codistill.common import dropout_seed
from kd_core.codistill.group_loop import (
    _broadcast_module,
    _comm_device,
    agree_stop,
    all_reduce_gradients,
    rank_checkpoint,
    release_checkpoint,
)
from kd_core.config import ExperimentConfig
from kd_core.data.loader import make_batches
from kd_core.errors import TrainingError
from kd_core.loop import Precision, plan_steps, run_loop, set_lr
from kd_core.sinks import MetricsSink
from kd_core.trainer import Logits, TrainTask, batch_loss, take_logits

# Files the parent (`launcher.run_data_parallel`) leaves in the job folder for the ranks, and the rank-0 result.
INIT_WEIGHTS = "init.safetensors"
TEACHER = "teacher.json"
TRAINED_WEIGHTS = "trained.safetensors"


def part_sizes(batch: int, world: int) -> list[int]:
    """How many samples of a batch of `batch` each rank gets (the loader's `np.array_split`)."""
    return [len(p) for p in np.array_split(np.arange(batch), world)]


class DataParallelTask(TrainTask):
    """TrainTask on rank `rank` of `world`: its share of each batch, the whole batch's loss, all-reduced gradients."""

    def __init__(
        self, model: nn.Module, dataset: Any, config: ExperimentConfig, *, rank: int, world: int,
        device: torch.device, precision: Precision, teacher_logits_fn: Callable[[Tensor], Tensor] | None,
        teacher_logits: Mapping[str, Logits], partial_teacher: bool,
    ) -> None:  # fmt: skip
        super().__init__(
            model, dataset, config, device=device, precision=precision, teacher_logits_fn=teacher_logits_fn,
            teacher_logits=teacher_logits, teacher_per_batch=False, partial_teacher=partial_teacher,
        )  # fmt: skip
        self.rank, self.world = rank, world
        self.batches.close()  # the same global batches, this rank's share of each
        self.batches = make_batches(
            dataset, "train", batch_size=config.batch_size, seed=config.seed, device=device,
            augment=config.augment, part=(rank, world),
        )  # fmt: skip
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.classes = int(dataset.num_classes)
        self._first = True

    def agree_stop(self, local: bool) -> bool:
        return agree_stop(local, self.device)

    def _same_step_everywhere(self, step: int) -> None:
        """Every rank resumed from the same checkpoint step (else the group would silently diverge)."""
        steps = torch.tensor([step, -step], dtype=torch.float64, device=_comm_device(self.device))
        dist.all_reduce(steps, op=dist.ReduceOp.MAX)
        if int(steps[0]) != step or int(-steps[1]) != step:
            raise TrainingError(
                f"the job's ranks start at different steps ({int(-steps[1])}..{int(steps[0])})"
            )

    def _gather(self, rows: Tensor, sizes: list[int]) -> Tensor:
        """Every rank's rows of the batch in rank order (float32; padded to one size on the wire)."""
        comm = _comm_device(self.device)
        buf = torch.zeros((max(sizes), rows.shape[1]), dtype=torch.float32, device=comm)
        buf[: rows.shape[0]] = rows.detach().to(comm, torch.float32)
        out = [torch.empty_like(buf) for _ in range(self.world)]
        dist.all_gather(out, buf)
        return torch.cat([o[:n] for o, n in zip(out, sizes)]).to(self.device)

    def _teacher_rows(self, x: Tensor, idx: Tensor) -> Tensor:
        if x.shape[0] == 0:
            return torch.zeros((0, self.classes), device=self.device)
        if self.teacher_train is not None:
            return take_logits(self.teacher_train, idx, self.device)
        with torch.no_grad(), self.precision.autocast():  # augmented: the teacher sees this very view
            return torch.as_tensor(self.teacher_fn(x)).to(self.device).float()

    def train_step(self, step: int, lr: float) -> tuple[dict[str, Tensor], int]:
        if self._first:
            self._same_step_everywhere(step)
            self._first = False
        # Dropout from (seed, rank, step): a resumed rank draws what the uninterrupted one drew.
        torch.manual_seed(dropout_seed(self.config.seed, 0, self.rank, step))
        sizes = part_sizes(len(self.batches.batch_indices(step)), self.world)
        x, y, idx = self.batches.get(step)
        set_lr(self.optimizer, lr)
        own = x.shape[0] > 0
        with self.precision.autocast():
            logits = self.model(x).float() if own else torch.zeros((0, self.classes), device=self.device)
        packed = [logits.detach()]
        if y is not None:
            packed.append(y[:, None].float())  # class numbers (< 2^24) are exact in float32
        if self.distill:
            packed.append(self._teacher_rows(x, idx))
        everything = self._gather(torch.cat(packed, dim=1), sizes)
        c = self.classes
        start = sum(sizes[: self.rank])
        # The whole batch's logits with this rank's share live: the loss is one process's, the gradient
        # flows into this rank's share only, and the all-reduce sums the shares.
        z = torch.cat([everything[:start, :c], logits, everything[start + x.shape[0] :, :c]])
        labels = everything[:, c].long() if y is not None else None
        tb = everything[:, c + (1 if y is not None else 0) :] if self.distill else None
        loss, parts = batch_loss(
            self.config, z, labels, tb, epoch=step / self.steps_per_epoch, partial=self.partial
        )
        self.optimizer.zero_grad(set_to_none=False)
        if own:  # a rank left nothing by a short last batch adds zero gradients
            self.precision.backward(loss)
        all_reduce_gradients(self.params, torch.zeros(0, device=self.device), self.device)
        self.precision.step(self.optimizer)
        if labels is not None:
            parts["correct"] = (z.detach().argmax(dim=1) == labels).sum()
            self._labelled += labels.shape[0]
        return parts, sum(sizes)

    def evaluate(self, step: int) -> dict[str, float]:
        # Rank 0 alone evaluates and keeps the best weights: it alone checkpoints and reports.
        return super().evaluate(step) if self.rank == 0 else {}


def _teacher(job: Path, device: torch.device) -> tuple[Any, dict[str, Logits], bool]:
    """(teacher to run per batch or None, cached logits per split, partial) from what the parent left."""
    path = job / TEACHER
    if not path.is_file():
        return None, {}, False
    spec = json.loads(path.read_text())
    cached = {split: CachedLogits.open(p) for split, p in (spec.get("logits") or {}).items()}
    teacher = None
    if spec.get("weights"):
        from kd_core.checkpoints import load_teacher

        teacher = load_teacher(spec["weights"]).to(device).eval()
    return teacher, cached, bool(spec.get("partial"))


def train_data_parallel(
    config: ExperimentConfig,
    dataset: Any,
    job: Path,
    *,
    rank: int,
    world: int,
    sink: MetricsSink,
    should_stop: Callable[[], bool],
    device: torch.device,
    checkpoint_path: str | Path | None = None,
    checkpoint_every_s: float = 30.0,
) -> tuple[dict[str, Any] | None, dict[str, str], bool, nn.Module]:
    """Train the job's student as rank `rank` of `world`; returns (outcome, files, stopped, model).

    Rank 0 returns the outcome (what `TrainOutcome` holds, as JSON) and writes the kept weights to
    `job/trained.safetensors`; the other ranks return None and no files.
    """
    from kd_core.models import build_model

    model = build_model(
        config.model, tuple(dataset.input_shape), int(dataset.num_classes), dataset.preprocessing
    )
    model.load_state_dict(load_file(str(job / INIT_WEIGHTS)))  # the parent's start (its seed, or `init`)
    model.to(device).train()
    teacher, cached, partial = _teacher(job, device)
    precision = Precision(device, config.precision)
    task = DataParallelTask(
        model, dataset, config, rank=rank, world=world, device=device, precision=precision,
        teacher_logits_fn=teacher.logits if teacher is not None else None, teacher_logits=cached,
        partial_teacher=partial,
    )  # fmt: skip
    _broadcast_module(model)  # one start on every rank, whatever each build did
    total, per_epoch = plan_steps(config, len(task.batches.indices))
    own_checkpoint, every_s = rank_checkpoint(checkpoint_path, rank, checkpoint_every_s)
    try:
        result = run_loop(
            task, config, total_steps=total, steps_per_epoch=per_epoch, eval_every=per_epoch,
            precision=precision, sink=sink, should_stop=should_stop, agree_stop=task.agree_stop,
            checkpoint_path=own_checkpoint, checkpoint_every_s=every_s,
        )  # fmt: skip
    finally:
        task.close()
        release_checkpoint(own_checkpoint, rank)
        if teacher is not None:
            teacher.close()
    if config.keep == "best" and task.best_state is not None:
        model.load_state_dict(task.best_state)
    if rank != 0:
        return None, {}, result.stopped, model
    weights = job / TRAINED_WEIGHTS
    save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, str(weights))
    best = (task.best if config.keep == "best" else task.last) or {}
    outcome = {
        "best": {
            (f"val_{k}" if k in ("loss", "acc", "agreement", "kl_to_teacher") else k): v
            for k, v in best.items()
        },
        "steps": result.steps,
        "epochs": result.steps / per_epoch,
        "stopped": result.stopped,
        "train_time_s": result.train_time_s,
        "samples_per_s": result.samples_seen / max(result.train_time_s, 1e-9),
        "resumed_from_step": result.resumed_from_step,
        "history": task.history,
        "precision": precision.name,
        "memory": dict(getattr(result, "memory", {}) or {}),  # rank 0's peak
        "notes": [
            f"{option}: not applied with devices > 1 (the ranks run the eager, contiguous model)"
            for option in ("compile", "channels_last")
            if getattr(config, option, False)
        ],
    }
    return outcome, {"safetensors": str(weights)}, result.stopped, model
