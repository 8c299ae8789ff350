"""Codistillation with every replica in this process: one step over N replicas, plugged into the shared loop."""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from kd_core.codistill.common import (
    EvalSplit,
    KeepBest,
    best_index,
    copy_step_at,
    eval_period,
    eval_splits,
    export_replica,
    final_metrics,
    make_model,
    measure_replicas,
    peer_logits_for,
    replica_batches,
    replica_loss,
    replica_train_indices,
    student_files,
    val_values,
)
from kd_core.config import ExperimentConfig
from kd_core.data.loader import split_size
from kd_core.loop import Precision, make_optimizer, plan_steps, run_loop, set_lr
from kd_core.models import count_params
from kd_core.result import RunResult
from kd_core.sinks import MetricsSink

CHECKPOINT_EVERY_S = 30.0


class InProcessTask:
    """N replicas stepping together; stale copies (checkpoints exchange) or live logits (predictions)."""

    prefix = ""

    def __init__(
        self, config: ExperimentConfig, dataset: Any, device: torch.device, precision: Precision
    ) -> None:
        cd = config.codistill
        self.config, self.device, self.precision = config, device, precision
        self.n = cd.replicas
        self.lockstep = cd.exchange == "predictions"
        # Lockstep replicas read one shared order (and augmentation): one loader serves them all.
        self.batches = [
            replica_batches(config, dataset, k, device) for k in range(1 if self.lockstep else self.n)
        ]
        self.models = [make_model(config, dataset, k, device).train() for k in range(self.n)]
        self.opts = [make_optimizer(m, config) for m in self.models]
        n_train = split_size(dataset, "train")
        self.sizes = [len(replica_train_indices(config, n_train, k)) for k in range(self.n)]
        # The stale copies every replica distils from, refreshed only at copy_step_at boundaries.
        # One set serves everyone: replica k reads all but copies[k].
        self.copies: list[nn.Module] = []
        if not self.lockstep and self.n > 1:
            self.copies = [copy.deepcopy(m).eval().requires_grad_(False) for m in self.models]
        self.copy_step = -1
        self.keeps = [KeepBest(config.keep) for _ in self.models]
        self.best = 0
        self.eval = EvalSplit(dataset, eval_splits(dataset)[0], device)

    def modules(self) -> dict[str, nn.Module]:
        return {
            **{f"replica{k}": m for k, m in enumerate(self.models)},
            **{f"copy{k}": c for k, c in enumerate(self.copies)},
        }

    def optimizers(self) -> dict[str, torch.optim.Optimizer]:
        return {f"replica{k}": o for k, o in enumerate(self.opts)}

    def train_step(self, step: int, lr: float) -> tuple[dict[str, Tensor], int]:
        cd = self.config.codistill
        distilling = self.n > 1 and step >= cd.burn_in_steps
        if self.copies and distilling:
            want = copy_step_at(step, cd.burn_in_steps, cd.exchange_every)
            if want != self.copy_step:
                for c, m in zip(self.copies, self.models):
                    c.load_state_dict(m.state_dict())
                self.copy_step = want
        batches = [b.get(step)[:2] for b in self.batches]
        logits: list[Tensor] = []
        if self.lockstep:
            with self.precision.autocast():
                logits = [m(batches[0][0]) for m in self.models]
        parts: dict[str, Tensor] = {}
        samples = 0
        for k, (model, opt) in enumerate(zip(self.models, self.opts)):
            xb, yb = batches[0 if self.lockstep else k]
            with self.precision.autocast():
                if self.lockstep:
                    z = logits[k]
                    peers = [p.detach() for p in peer_logits_for(k, logits)] if distilling else []
                else:
                    z = model(xb)
                    peers = []
                    if distilling:
                        # The paper's implementation: run the others' stale copies on MY batch.
                        with torch.no_grad():
                            peers = [self.copies[j](xb) for j in range(self.n) if j != k]
            loss, hard, term = replica_loss(z, yb, peers, distill=distilling, loss=cd.loss, weight=cd.weight)
            set_lr(opt, lr)
            opt.zero_grad(set_to_none=True)
            self.precision.backward(loss, f"replica{k}")
            self.precision.step(opt, f"replica{k}")
            parts[f"replica{k}/loss"] = loss.detach()
            parts[f"replica{k}/loss_hard"] = hard.detach()
            parts[f"replica{k}/loss_distill"] = term.detach()
            samples += len(yb)
        return parts, samples

    def train_values(self, sums: dict[str, float], steps: int) -> dict[str, float]:
        values = {}
        for k in range(self.n):
            for part in ("loss", "loss_hard", "loss_distill"):
                values[f"replica{k}/train/{part}"] = sums[f"replica{k}/{part}"] / steps
        values["train/loss"] = values[f"replica{self.best}/train/loss"]
        if self.copies:
            values["exchange/copy_step"] = float(self.copy_step)
        return values

    def checked(self) -> dict[str, str]:
        out = {}
        for k in range(self.n):
            out[f"replica{k}/loss_hard"] = f"replica {k}'s hard-label loss"
            out[f"replica{k}/loss_distill"] = f"replica {k}'s codistillation term"
            out[f"replica{k}/loss"] = f"replica {k}'s loss"
        return out

    def evaluate(self, step: int) -> dict[str, float]:
        val = self.eval.metrics(self.models)
        self.best = best_index(val["acc"], val["loss"])
        for k, model in enumerate(self.models):
            self.keeps[k].offer(step, val["acc"][k], val["loss"][k], model)
        return val_values(val, self.best)

    def state_dict(self) -> dict[str, Any]:
        return {
            "copy_step": self.copy_step,
            "best": self.best,
            "kept": [keep.to_dict() for keep in self.keeps],
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.copy_step = int(state.get("copy_step", -1))
        self.best = int(state.get("best", 0))
        for k, kept in enumerate(state.get("kept") or []):
            if k < len(self.keeps):
                self.keeps[k] = KeepBest.from_dict(kept, self.keeps[k].mode)

    def close(self) -> None:
        for b in self.batches:
            b.close()
        self.eval.close()


def run_in_process(
    config: ExperimentConfig,
    dataset: Any,
    out_dir: Path,
    sink: MetricsSink,
    should_stop: Callable[[], bool],
    device: torch.device,
    checkpoint_path: str | Path | None,
    export: bool = True,
    checkpoint_every_s: float = CHECKPOINT_EVERY_S,
) -> RunResult:
    """Every replica in this process on one device; files replica{k}.* and the best one as student.*."""
    out_dir.mkdir(parents=True, exist_ok=True)
    precision = Precision(device, config.precision)
    task = InProcessTask(config, dataset, device, precision)
    total, per_epoch = plan_steps(config, min(task.sizes))
    torch.manual_seed(config.seed)  # dropout
    t0 = time.perf_counter()
    try:
        result = run_loop(
            task, config, total_steps=total, steps_per_epoch=per_epoch,
            eval_every=eval_period(config.log_every, per_epoch), precision=precision, sink=sink,
            should_stop=should_stop, checkpoint_path=checkpoint_path, checkpoint_every_s=checkpoint_every_s,
            checkpoint_at_end=False,
        )  # fmt: skip
    finally:
        task.close()
    for keep, model in zip(task.keeps, task.models):
        keep.restore(model)
    models = task.models
    val, test, best = measure_replicas(models, dataset, device)
    files: dict[str, str] = {}
    if export:
        per_files = [export_replica(m, dataset, out_dir, f"replica{k}", config) for k, m in enumerate(models)]
        files = student_files(per_files, best, out_dir)
    metrics = final_metrics(val, test, best, count_params(models[best]), result.steps)
    for k, keep in enumerate(task.keeps):
        metrics[f"replica{k}_kept_step"] = float(keep.step if keep.state is not None else result.steps)
    metrics["train_time_s"] = time.perf_counter() - t0
    metrics["samples_per_s"] = result.samples_seen / max(result.train_time_s, 1e-9)
    metrics |= {"precision": precision.name, **result.memory}  # what it computed in; peak memory of the loop
    if checkpoint_path is not None and not result.stopped:
        Path(checkpoint_path).unlink(missing_ok=True)
    return RunResult(metrics=metrics, files=files, stopped=result.stopped, model=models[best])
