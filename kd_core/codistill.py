"""Codistillation (Anil et al. 2018): N replicas train together, each also learning from the others' predictions.

Three placements share the pieces in this file:
- `run_codistill` with `group_size == 1`: every replica in this process, one loop, one device;
- `run_codistill` with `group_size > 1`: each replica is a group of data-parallel subprocesses
  (`kd_core.codistill_group`), groups swapping stale copies through a `FileExchange`;
- `kd_core.codistill_group.run_codistill_group`: one group per Celery task, anywhere, and
  `combine_group_results` to make the experiment's result from every group's exported replica.
"""

from __future__ import annotations

import copy
import hashlib
import math
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from itertools import combinations
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kd_core.atomic import atomic_write
from kd_core.config import ExperimentConfig
from kd_core.device import autocast_dtype
from kd_core.errors import ConfigError, TrainingError
from kd_core.losses import codistillation_loss
from kd_core.models import build_model, count_params
from kd_core.runner import RunResult
from kd_core.sinks import MetricsSink, flush_sink
from kd_core.trainer import (
    autocast,
    batches_per_epoch,
    config_key,
    lr_at,
    make_augment,
    make_optimizer,
    plan_steps,
    predict_logits,
    set_lr,
    split_tensors,
)

FORMATS = ("safetensors", "torchscript", "onnx")
CHECKPOINT_EVERY_S = 30.0
_EXT = {"safetensors": ".safetensors", "torchscript": ".ts", "onnx": ".onnx"}


# ---------------------------------------------------------------- data, steps, seeds


def replica_seed(seed: int, replica: int, purpose: str) -> int:
    """A seed of its own for each replica and purpose ("init", "data", "shard"), stable across placements."""
    tag = {"init": 1, "data": 2, "shard": 3}[purpose]
    return int(np.random.SeedSequence([int(seed), int(replica), tag]).generate_state(1)[0])


def shard_indices(n: int, replicas: int, seed: int) -> list[np.ndarray]:
    """Split range(n) at random into `replicas` disjoint shards that cover it (sizes differ by at most 1)."""
    if replicas > n:
        raise ConfigError(
            f"codistill data 'disjoint' needs at least one training example per replica ({n} < {replicas})"
        )
    perm = np.random.default_rng(replica_seed(seed, 0, "shard")).permutation(n)
    return [np.sort(part) for part in np.array_split(perm, replicas)]


def replica_train_indices(config: ExperimentConfig, n_train: int, replica: int) -> np.ndarray:
    """The training examples replica `replica` sees: all of them, or its own shard."""
    if config.codistill.data == "disjoint":
        return shard_indices(n_train, config.codistill.replicas, config.seed)[replica]
    return np.arange(n_train)


class BatchOrder:
    """Batches of a fixed index set, reshuffled each epoch; batch s depends only on (seed, s).

    Being a pure function of the step makes resuming a checkpoint and splitting one batch over
    the ranks of a data-parallel group trivially consistent.
    """

    def __init__(self, indices: np.ndarray, batch_size: int, seed: int) -> None:
        self.indices = np.asarray(indices)
        self.batch_size = batch_size
        self.seed = seed
        self.per_epoch = batches_per_epoch(len(self.indices), batch_size)
        self._epoch = -1
        self._perm = self.indices

    def batch(self, step: int) -> np.ndarray:
        epoch, pos = divmod(step, self.per_epoch)
        if epoch != self._epoch:
            rng = np.random.default_rng([self.seed, epoch])
            self._perm = self.indices[rng.permutation(len(self.indices))]
            self._epoch = epoch
        return self._perm[pos * self.batch_size : (pos + 1) * self.batch_size]


def replica_orders(config: ExperimentConfig, n_train: int) -> list[BatchOrder]:
    """Each replica's batch order: its own shuffle (of its shard), or one shared order in lockstep."""
    cd = config.codistill
    lockstep = cd.exchange == "predictions"
    return [
        BatchOrder(
            replica_train_indices(config, n_train, k),
            config.batch_size,
            replica_seed(config.seed, 0 if lockstep else k, "data"),
        )
        for k in range(cd.replicas)
    ]


def eval_period(log_every: int, per_epoch: int) -> int:
    """Validate about once an epoch, on a logging step (so every evaluation is logged), at most every 10 logs."""
    return log_every * max(1, min(10, round(per_epoch / log_every)))


def copy_step_at(step: int, burn_in: int, every: int) -> int:
    """The step at which the stale copies used at `step` were taken (-1: before burn-in, none used).

    Copies are first taken when distillation starts (so nobody distils towards a random init),
    then every `every` steps: burn_in, burn_in + every, ...
    """
    if step < burn_in:
        return -1
    return burn_in + ((step - burn_in) // every) * every


# ---------------------------------------------------------------- losses


def peer_logits_for(replica: int, logits: Sequence[Tensor]) -> list[Tensor]:
    """The other replicas' logits: a replica's own prediction is never part of its target."""
    return [z for j, z in enumerate(logits) if j != replica]


def replica_loss(
    logits: Tensor,
    labels: Tensor,
    peer_logits: Sequence[Tensor],
    *,
    distill: bool,
    loss: str = "ce",
    weight: float = 1.0,
) -> tuple[Tensor, Tensor, Tensor]:
    """(total, hard, distill term): plain cross entropy, plus `weight` x codistillation once `distill` is on.

    Before burn-in (distill False), or with no peer copy available yet, the total IS the label
    loss: no zero-weighted term is added, so gradients equal plain training exactly.
    """
    hard = F.cross_entropy(logits.float(), labels)
    if not distill or not peer_logits:
        return hard, hard, hard.new_zeros(())
    term = codistillation_loss(logits, list(peer_logits), loss=loss)
    return hard + weight * term, hard, term


# ---------------------------------------------------------------- evaluation


def churn(predictions: Sequence[Tensor]) -> float:
    """Fraction of examples on which two replicas' top-1 predictions disagree, averaged over pairs."""
    pairs = list(combinations(range(len(predictions)), 2))
    if not pairs or len(predictions[0]) == 0:
        return 0.0
    return float(np.mean([(predictions[i] != predictions[j]).float().mean().item() for i, j in pairs]))


def split_metrics(logits: Sequence[Tensor], y: Tensor) -> dict[str, Any]:
    """Per-replica loss/acc, the ensemble's (mean of the replicas' softmax) and churn on one split."""
    out: dict[str, Any] = {"loss": [], "acc": []}
    if len(y) == 0:
        nan = float("nan")
        return {
            "loss": [nan] * len(logits),
            "acc": [nan] * len(logits),
            "ens_loss": nan,
            "ens_acc": nan,
            "churn": nan,
        }
    for z in logits:
        out["loss"].append(F.cross_entropy(z, y).item())
        out["acc"].append((z.argmax(1) == y).float().mean().item())
    probs = torch.stack([F.softmax(z, dim=1) for z in logits]).mean(0)
    out["ens_loss"] = F.nll_loss(torch.log(probs.clamp_min(1e-12)), y).item()
    out["ens_acc"] = (probs.argmax(1) == y).float().mean().item()
    out["churn"] = churn([z.argmax(1) for z in logits])
    return out


def eval_splits(
    dataset: Any, x_train: Tensor, y_train: Tensor
) -> tuple[tuple[Tensor, Tensor], tuple[Tensor, Tensor]]:
    """((x, y) to rank replicas on, (x, y) to test them on), on the training tensors' device.

    Without a labelled validation split replicas are ranked on the training data; without test
    labels the test split is empty (its metrics are NaN).
    """
    x_val, y_val = split_tensors(dataset, "val", x_train.device)
    x_test, y_test = split_tensors(dataset, "test", x_train.device)
    if len(x_val) == 0 or y_val is None:
        x_val, y_val = x_train, y_train
    if y_test is None:
        x_test, y_test = x_test[:0], y_train[:0]
    return (x_val, y_val), (x_test, y_test)


def measure_replicas(
    models: Sequence[nn.Module], val: tuple[Tensor, Tensor], test: tuple[Tensor, Tensor]
) -> tuple[dict[str, Any], dict[str, Any], int]:
    """(validation metrics, test metrics, index of the best model on validation) of trained replicas."""
    val_metrics = split_metrics([predict_logits(m, val[0]) for m in models], val[1])
    test_metrics = split_metrics([predict_logits(m, test[0]) for m in models], test[1])
    return val_metrics, test_metrics, best_index(val_metrics["acc"], val_metrics["loss"])


def best_index(accs: Sequence[float], losses: Sequence[float]) -> int:
    """Highest accuracy, ties to the lower loss; NaNs rank last."""

    def key(k: int) -> tuple[float, float]:
        a, loss = accs[k], losses[k]
        return (a if a == a else -1.0, -(loss if loss == loss else math.inf))

    return max(range(len(accs)), key=key)


# ---------------------------------------------------------------- export and results


def export_replica(
    model: nn.Module, dataset: Any, out_dir: Path, basename: str, config: ExperimentConfig | None = None
) -> dict[str, str]:
    """safetensors / TorchScript / ONNX of one replica, each verified by kd_core.export."""
    from kd_core.export import export_model

    x = dataset.x_val if len(dataset.x_val) else dataset.x_train
    sample = torch.as_tensor(np.asarray(x[:16]), dtype=torch.float32)
    extra = None
    if config is not None:
        extra = {
            "experiment": {"kind": config.kind, "name": config.name, "seed": config.seed, "replica": basename}
        }
    paths = export_model(
        model, out_dir, basename=basename, class_names=list(dataset.class_names), sample_inputs=sample,
        extra_metadata=extra,
    )  # fmt: skip
    return {fmt: str(paths[fmt]) for fmt in FORMATS if fmt in paths}


def student_files(replica_files: Sequence[dict[str, str] | None], best: int, out_dir: Path) -> dict[str, str]:
    """Copy the best replica's files to student.* and list every file for the download endpoint.

    Keys: "safetensors" / "torchscript" / "onnx" (the best replica, the default download) and
    "replica{k}.safetensors" / "replica{k}.torchscript" / "replica{k}.onnx" for `?replica=K`.
    """
    files: dict[str, str] = {}
    best_files = replica_files[best] or {}
    for fmt, src in best_files.items():
        dst = out_dir / f"student{_EXT[fmt]}"
        if Path(src).resolve() != dst.resolve():
            shutil.copyfile(src, dst)
        files[fmt] = str(dst)
    for k, per in enumerate(replica_files):
        for fmt, path in (per or {}).items():
            files[f"replica{k}.{fmt}"] = str(path)
    return files


def final_metrics(
    val: dict[str, Any],
    test: dict[str, Any],
    best: int,
    params: int,
    steps: int,
    alive: Sequence[int] | None = None,
) -> dict[str, float]:
    """The experiment's headline figures: the best replica's, the ensemble's, churn, and each replica's."""
    names = list(alive) if alive is not None else list(range(len(val["acc"])))
    metrics: dict[str, float] = {
        "val_acc": val["acc"][best],
        "val_loss": val["loss"][best],
        "test_acc": test["acc"][best],
        "test_loss": test["loss"][best],
        "student_params": float(params),
        "best_replica": float(names[best]),
        "ensemble_val_acc": val["ens_acc"],
        "ensemble_val_loss": val["ens_loss"],
        "ensemble_test_acc": test["ens_acc"],
        "churn": val["churn"],
        "test_churn": test["churn"],
        "steps": float(steps),
    }
    for i, k in enumerate(names):
        metrics[f"replica{k}_val_acc"] = val["acc"][i]
        metrics[f"replica{k}_test_acc"] = test["acc"][i]
    return metrics


def make_model(config: ExperimentConfig, dataset: Any, replica: int, device: torch.device | str) -> nn.Module:
    """Replica `replica`'s model with its own random init (the same in every placement)."""
    devices = [torch.device(device)] if torch.device(device).type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(replica_seed(config.seed, replica, "init"))
        model = build_model(
            config.model, dataset.input_shape, dataset.num_classes, preprocessing=dataset.preprocessing
        )
    return model.to(device)


def check_finite(value: float, replica: int, step: int) -> None:
    if not math.isfinite(value):
        raise TrainingError(
            f"replica {replica}'s loss became {value} at step {step}; lower the learning rate or the codistill weight"
        )


# ---------------------------------------------------------------- best-on-validation weights


class KeepBest:
    """One replica's best weights on validation (accuracy, ties to the lower loss), as train/distill keep.

    Training goes on from the current weights (and the exchanged copies are the current ones);
    only the exported replica is the kept one, so the downloaded student is the best it ever was.
    """

    def __init__(self) -> None:
        self.acc: float | None = None
        self.loss = math.inf
        self.step = -1
        self.state: dict[str, Tensor] | None = None

    def offer(self, step: int, acc: float, loss: float, model: nn.Module) -> bool:
        """Keep `model`'s weights if they beat the kept ones; NaN accuracies never win."""
        acc = acc if acc == acc else -1.0
        loss = loss if loss == loss else math.inf
        if self.acc is not None and (acc < self.acc or (acc == self.acc and loss >= self.loss)):
            return False
        self.acc, self.loss, self.step = acc, loss, int(step)
        self.state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        return True

    def restore(self, model: nn.Module) -> None:
        """Put the kept weights back into `model` (nothing kept: the current weights stay)."""
        if self.state is not None:
            model.load_state_dict(self.state)

    def to_dict(self) -> dict[str, Any]:
        return {"acc": self.acc, "loss": self.loss, "step": self.step, "state": self.state or {}}

    @classmethod
    def from_dict(cls, payload: dict[str, Any] | None) -> KeepBest:
        keep = cls()
        if payload and payload.get("state"):
            keep.acc, keep.loss = float(payload["acc"]), float(payload["loss"])
            keep.step, keep.state = int(payload["step"]), dict(payload["state"])
        return keep


# ---------------------------------------------------------------- the in-process loop


@dataclass
class _Replica:
    model: nn.Module
    optimizer: torch.optim.Optimizer
    order: BatchOrder
    sums: list[float]  # loss, hard, distill since the last log


def check_trainable(config: ExperimentConfig, dataset: Any) -> None:
    """Refuse what codistillation cannot do before anything is built."""
    if config.kind != "codistill":
        raise ConfigError(f"run_codistill needs kind 'codistill', got {config.kind!r}")
    if getattr(dataset, "y_train", None) is None:
        raise ConfigError("codistillation trains on labels: this dataset has none")
    cd = config.codistill
    if cd.group_size > 1 and cd.exchange == "predictions":
        raise ConfigError(
            "codistill exchange 'predictions' swaps logits every step between groups in one process: "
            "use group_size 1, or exchange 'checkpoints' for data-parallel groups"
        )
    if cd.group_size > 1 and config.batch_size < 2 * cd.group_size:
        raise ConfigError(
            f"batch_size {config.batch_size} is split over {cd.group_size} workers per group: "
            f"it must be at least {2 * cd.group_size}"
        )


def run_codistill(
    config: ExperimentConfig,
    dataset: Any,
    *,
    out_dir: str | Path,
    sink: MetricsSink,
    should_stop: Callable[[], bool] = lambda: False,
    device: torch.device | str = "cpu",
    checkpoint_path: str | Path | None = None,
    export: bool = True,
) -> RunResult:
    """Train `config.codistill.replicas` replicas together and export them; returns a RunResult.

    With `group_size == 1` all replicas share this process and device and step in one loop;
    with `group_size > 1` each replica is a group of data-parallel subprocesses (see
    `kd_core.codistill_group`). Files: the best replica as student.*, every replica as replica{k}.*.
    This call starts every group itself whatever `codistill.placement` says: placement
    "workers" is read by the Celery side, which calls `run_codistill_group` once per group.
    `export=False` skips the exports (benchmarks).
    """
    check_trainable(config, dataset)
    if config.codistill.group_size > 1:
        from kd_core.codistill_group import run_groups_in_subprocesses

        return run_groups_in_subprocesses(
            config, dataset, out_dir=out_dir, sink=sink, should_stop=should_stop, device=device
        )
    return _run_in_process(
        config, dataset, Path(out_dir), sink, should_stop, torch.device(device), checkpoint_path, export
    )


def _run_in_process(
    config: ExperimentConfig,
    dataset: Any,
    out_dir: Path,
    sink: MetricsSink,
    should_stop: Callable[[], bool],
    device: torch.device,
    checkpoint_path: str | Path | None,
    export: bool = True,
) -> RunResult:
    cd = config.codistill
    out_dir.mkdir(parents=True, exist_ok=True)
    n_rep = cd.replicas
    x_train, y_train = split_tensors(dataset, "train", device)
    val_split, test_split = eval_splits(dataset, x_train, y_train)
    x_val, y_val = val_split
    lockstep = cd.exchange == "predictions"
    augment = make_augment(config, dataset, x_train)
    amp = autocast_dtype(device)
    amp = amp if amp == torch.bfloat16 else None  # fp16 would need a loss scaler per replica

    replicas: list[_Replica] = []
    aug_gens: list[torch.Generator] = []
    orders = replica_orders(config, len(x_train))
    sizes = [len(o.indices) for o in orders]
    for k, order in enumerate(orders):
        model = make_model(config, dataset, k, device)
        model.train()
        replicas.append(_Replica(model, make_optimizer(model, config), order, [0.0, 0.0, 0.0]))
        aug_seed = replica_seed(config.seed, 0 if lockstep else k, "data") + 1
        aug_gens.append(torch.Generator(device=device).manual_seed(aug_seed))
    total, per_epoch = plan_steps(config, min(sizes))
    eval_every = eval_period(config.log_every, per_epoch)
    torch.manual_seed(config.seed)  # dropout

    # The stale copies every replica distils from (checkpoints exchange), refreshed only at
    # copy_step_at boundaries. One set serves everyone: replica k reads all but copies[k].
    copies: list[nn.Module] = []
    copy_step = -1
    if not lockstep and n_rep > 1:
        copies = [copy.deepcopy(r.model).eval().requires_grad_(False) for r in replicas]

    keeps = [KeepBest() for _ in replicas]
    start = 0
    if checkpoint_path is not None and Path(checkpoint_path).is_file():
        start, copy_step = _load_checkpoint(Path(checkpoint_path), replicas, copies, keeps, config, device)

    t0 = time.perf_counter()
    last_log_t, last_log_step, samples_since, samples_total = t0, start, 0, 0
    last_ckpt_t = t0
    best = 0
    stopped = False
    step = start
    val: dict[str, Any] = {}
    while step < total:
        if should_stop():
            stopped = True
            break
        distilling = n_rep > 1 and step >= cd.burn_in_steps
        if copies and distilling:
            want = copy_step_at(step, cd.burn_in_steps, cd.exchange_every)
            if want != copy_step:
                for c, r in zip(copies, replicas):
                    c.load_state_dict(r.model.state_dict())
                copy_step = want
        lr = lr_at(config, step, total, per_epoch)
        batches = []
        for k, r in enumerate(replicas):
            if lockstep and k > 0:
                batches.append(batches[0])
                continue
            idx = torch.as_tensor(r.order.batch(step), device=device)
            xb = x_train[idx]
            if augment is not None:
                xb = augment(xb, aug_gens[k])
            batches.append((xb, y_train[idx]))
        logits: list[Tensor] = []
        if lockstep:
            with autocast(device, amp):
                logits = [r.model(batches[0][0]) for r in replicas]
        for k, r in enumerate(replicas):
            xb, yb = batches[k]
            with autocast(device, amp):
                if lockstep:
                    z = logits[k]
                    peers = [p.detach() for p in peer_logits_for(k, logits)] if distilling else []
                else:
                    z = r.model(xb)
                    peers = []
                    if distilling:
                        # The paper's implementation: run the others' stale copies on MY batch.
                        with torch.no_grad():
                            peers = [copies[j](xb) for j in range(n_rep) if j != k]
            loss, hard, dist = replica_loss(z, yb, peers, distill=distilling, loss=cd.loss, weight=cd.weight)
            set_lr(r.optimizer, lr)
            r.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            r.optimizer.step()
            value = loss.item()
            check_finite(value, k, step)
            r.sums[0] += value
            r.sums[1] += hard.item()
            r.sums[2] += dist.item()
            samples_since += len(yb)
            samples_total += len(yb)
        step += 1

        evaluated = step % eval_every == 0 or step == total
        if evaluated:
            val = split_metrics([predict_logits(r.model, x_val) for r in replicas], y_val)
            best = best_index(val["acc"], val["loss"])
            for k, r in enumerate(replicas):
                keeps[k].offer(step, val["acc"][k], val["loss"][k], r.model)
        if step % config.log_every == 0 or step == total:
            now = time.perf_counter()
            n_steps = step - last_log_step
            values: dict[str, float] = {}
            for k, r in enumerate(replicas):
                values[f"replica{k}/train/loss"] = r.sums[0] / n_steps
                values[f"replica{k}/train/loss_hard"] = r.sums[1] / n_steps
                values[f"replica{k}/train/loss_distill"] = r.sums[2] / n_steps
                r.sums = [0.0, 0.0, 0.0]
            values["train/loss"] = values[f"replica{best}/train/loss"]
            values["lr"] = lr
            values["samples_per_s"] = samples_since / max(now - last_log_t, 1e-9)
            if copies:
                values["exchange/copy_step"] = float(copy_step)
            if evaluated:
                values.update(val_values(val, best))
            sink.log(step, values)
            last_log_t, last_log_step, samples_since = now, step, 0
            done = step - start
            sink.status(step / total, (now - t0) / done * (total - step) if done else None)
        if (
            checkpoint_path is not None
            and step < total
            and time.perf_counter() - last_ckpt_t > CHECKPOINT_EVERY_S
        ):
            flush_sink(sink)
            _save_checkpoint(Path(checkpoint_path), step, copy_step, replicas, copies, keeps, config)
            last_ckpt_t = time.perf_counter()

    if checkpoint_path is not None and stopped:  # a requeued job resumes from here, as train/distill do
        flush_sink(sink)
        _save_checkpoint(Path(checkpoint_path), step, copy_step, replicas, copies, keeps, config)
    for keep, r in zip(keeps, replicas):
        keep.restore(r.model)
    models = [r.model for r in replicas]
    val, test, best = measure_replicas(models, val_split, test_split)
    files: dict[str, str] = {}
    if export:
        per_files = [export_replica(m, dataset, out_dir, f"replica{k}", config) for k, m in enumerate(models)]
        files = student_files(per_files, best, out_dir)
    metrics = final_metrics(val, test, best, count_params(models[best]), step)
    for k, keep in enumerate(keeps):
        metrics[f"replica{k}_kept_step"] = float(keep.step if keep.state is not None else step)
    metrics["train_time_s"] = time.perf_counter() - t0
    metrics["samples_per_s"] = samples_total / max(metrics["train_time_s"], 1e-9)
    if checkpoint_path is not None and not stopped:
        Path(checkpoint_path).unlink(missing_ok=True)
    return RunResult(metrics=metrics, files=files, stopped=stopped, model=models[best])


def val_values(val: dict[str, Any], best: int, names: Sequence[int] | None = None) -> dict[str, float]:
    """The live validation series: each replica's, the best one's under the generic names, the ensemble's."""
    names = list(names) if names is not None else list(range(len(val["acc"])))
    values = {}
    for k, loss, acc in zip(names, val["loss"], val["acc"]):
        values[f"replica{k}/val/loss"] = loss
        values[f"replica{k}/val/acc"] = acc
    values["val/loss"] = val["loss"][best]
    values["val/acc"] = val["acc"][best]
    values["ensemble/val/loss"] = val["ens_loss"]
    values["ensemble/val/acc"] = val["ens_acc"]
    values["churn"] = val["churn"]
    return values


# ---------------------------------------------------------------- checkpoint / resume


def _config_tag(config: ExperimentConfig) -> str:
    return hashlib.sha256(config_key(config).encode()).hexdigest()[:16]


def _save_checkpoint(
    path: Path,
    step: int,
    copy_step: int,
    replicas: list[_Replica],
    copies: list[nn.Module],
    keeps: list[KeepBest],
    config: ExperimentConfig,
) -> None:
    payload = {
        "tag": _config_tag(config),
        "step": step,
        "copy_step": copy_step,
        "models": [r.model.state_dict() for r in replicas],
        "optimizers": [r.optimizer.state_dict() for r in replicas],
        "copies": [c.state_dict() for c in copies],
        "kept": [keep.to_dict() for keep in keeps],
    }
    atomic_write(path, lambda tmp: torch.save(payload, tmp))


def _load_checkpoint(
    path: Path,
    replicas: list[_Replica],
    copies: list[nn.Module],
    keeps: list[KeepBest],
    config: ExperimentConfig,
    device: torch.device,
) -> tuple[int, int]:
    try:
        payload = torch.load(path, map_location=device, weights_only=True)
    except Exception:  # a torn or foreign file: start over rather than fail the job
        return 0, -1
    if not isinstance(payload, dict) or payload.get("tag") != _config_tag(config):
        return 0, -1  # another experiment's checkpoint must not leak into this one
    for r, m, o in zip(replicas, payload["models"], payload["optimizers"]):
        r.model.load_state_dict(m)
        r.optimizer.load_state_dict(o)
    for c, s in zip(copies, payload["copies"]):
        c.load_state_dict(s)
    for k, kept in enumerate(payload.get("kept") or []):
        if k < len(keeps):
            keeps[k] = KeepBest.from_dict(kept)
    return int(payload["step"]), int(payload["copy_step"])
