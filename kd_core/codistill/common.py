"""Codistillation pieces every placement shares: seeds, shards, schedules, the replica loss, metrics, exports."""

from __future__ import annotations

import math
import shutil
from collections.abc import Sequence
from itertools import combinations
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kd_core.config import ExperimentConfig
from kd_core.data.loader import (
    Batches,
    eval_batch_size,
    has_labels,
    make_batches,
    sample_inputs,
    split_size,
)
from kd_core.errors import ConfigError
from kd_core.losses import codistillation_loss
from kd_core.models import build_model
from kd_core.trainer import predict_logits

FORMATS = ("safetensors", "torchscript", "onnx", "exported_program")
CHECKPOINT_EVERY_S = 30.0
_EXT = {"safetensors": ".safetensors", "torchscript": ".ts", "onnx": ".onnx", "exported_program": ".pt2"}


# ---------------------------------------------------------------- data, steps, seeds


def replica_seed(seed: int, replica: int, purpose: str) -> int:
    """A seed of its own for each replica and purpose ("init", "data", "shard"), stable across placements."""
    tag = {"init": 1, "data": 2, "shard": 3}[purpose]
    return int(np.random.SeedSequence([int(seed), int(replica), tag]).generate_state(1)[0])


def dropout_seed(seed: int, group: int, rank: int, step: int) -> int:
    """The torch seed of one rank's step: a pure function, so a resumed rank draws the same dropout masks."""
    return int(np.random.SeedSequence([int(seed), int(group), int(rank), int(step), 4]).generate_state(1)[0])


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


def replica_batches(
    config: ExperimentConfig,
    dataset: Any,
    replica: int,
    device: torch.device | str,
    *,
    part: tuple[int, int] = (0, 1),
) -> Batches:
    """Replica `replica`'s batches: its own shuffle (of its shard), or one shared order in lockstep.

    The loader's order is a pure function of (seed, step): resuming, and splitting a batch over
    the ranks of a data-parallel group (`part=(rank, world)`), stay consistent for free.
    """
    lockstep = config.codistill.exchange == "predictions"
    return make_batches(
        dataset, "train", batch_size=config.batch_size, device=device, augment=config.augment, part=part,
        seed=replica_seed(config.seed, 0 if lockstep else replica, "data"),
        indices=replica_train_indices(config, split_size(dataset, "train"), replica),
    )  # fmt: skip


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


class SplitSums:
    """Per-batch sums behind `split_metrics`: counts and loss sums, so a split's figures need O(batch) memory.

    Each replica's cross-entropy sum and correct count, the ensemble's (mean of the replicas' softmax)
    NLL sum and correct count, and each pair of replicas' disagreement count (churn); `metrics()`
    divides by the sample count at the end.
    """

    def __init__(self, replicas: int) -> None:
        self.n = 0
        self.loss = torch.zeros(replicas, dtype=torch.float64)
        self.correct = torch.zeros(replicas, dtype=torch.int64)
        self.ens_loss = torch.zeros((), dtype=torch.float64)
        self.ens_correct = torch.zeros((), dtype=torch.int64)
        self.pairs = list(combinations(range(replicas), 2))
        self.disagree = torch.zeros(len(self.pairs), dtype=torch.int64)

    @torch.no_grad()
    def add(self, logits: Sequence[Tensor], y: Tensor) -> None:
        """One batch: each replica's float32 logits on it and its labels."""
        if len(y) == 0:
            return
        self.n += len(y)
        top = [z.argmax(1) for z in logits]
        for k, z in enumerate(logits):
            self.loss[k] += F.cross_entropy(z, y, reduction="sum").double().cpu()
            self.correct[k] += (top[k] == y).sum().cpu()
        probs = torch.stack([F.softmax(z, dim=1) for z in logits]).mean(0)
        self.ens_loss += F.nll_loss(torch.log(probs.clamp_min(1e-12)), y, reduction="sum").double().cpu()
        self.ens_correct += (probs.argmax(1) == y).sum().cpu()
        for p, (i, j) in enumerate(self.pairs):
            self.disagree[p] += (top[i] != top[j]).sum().cpu()

    def metrics(self) -> dict[str, Any]:
        replicas = len(self.loss)
        if self.n == 0:
            nan = float("nan")
            return {"loss": [nan] * replicas, "acc": [nan] * replicas, "ens_loss": nan, "ens_acc": nan,
                    "churn": nan}  # fmt: skip
        n = self.n
        return {
            "loss": [float(v) / n for v in self.loss],
            "acc": [int(c) / n for c in self.correct],
            "ens_loss": float(self.ens_loss) / n,
            "ens_acc": int(self.ens_correct) / n,
            "churn": float(np.mean([int(d) / n for d in self.disagree])) if self.pairs else 0.0,
        }


def split_metrics(logits: Sequence[Tensor], y: Tensor) -> dict[str, Any]:
    """Per-replica loss/acc, the ensemble's (mean of the replicas' softmax) and churn on one split."""
    sums = SplitSums(len(logits))
    sums.add(logits, y)
    return sums.metrics()


def eval_splits(dataset: Any) -> tuple[str, str | None]:
    """(split to rank replicas on, split to test them on).

    Without a labelled validation split replicas are ranked on the training data; without test
    labels there is no test split (its metrics are NaN).
    """
    val = "val" if split_size(dataset, "val") and has_labels(dataset, "val") else "train"
    test = "test" if split_size(dataset, "test") and has_labels(dataset, "test") else None
    return val, test


class EvalSplit:
    """One split read in order for evaluation; the batches are kept (on the device when small)."""

    def __init__(self, dataset: Any, split: str | None, device: torch.device | str) -> None:
        self.batches = (
            None if split is None
            else make_batches(
                dataset, split, batch_size=eval_batch_size(dataset), seed=0, device=device, shuffle=False
            )
        )  # fmt: skip

    def metrics(self, models: Sequence[nn.Module]) -> dict[str, Any]:
        """`split_metrics` of the models on the split, batch by batch: no logits outlive their batch."""
        sums = SplitSums(len(models))
        if self.batches is not None:
            for x, y, _ in self.batches.each():
                sums.add([predict_logits(model, x) for model in models], y)
        return sums.metrics()

    def close(self) -> None:
        if self.batches is not None:
            self.batches.close()


def measure_replicas(
    models: Sequence[nn.Module], dataset: Any, device: torch.device | str
) -> tuple[dict[str, Any], dict[str, Any], int]:
    """(validation metrics, test metrics, index of the best model on validation) of trained replicas."""
    val_split, test_split = eval_splits(dataset)
    val_metrics = EvalSplit(dataset, val_split, device).metrics(models)
    test_metrics = EvalSplit(dataset, test_split, device).metrics(models)
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

    sample = sample_inputs(dataset, 16, splits=("val", "train"))
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


# ---------------------------------------------------------------- best-on-validation weights


class KeepBest:
    """One replica's best weights on validation (accuracy, ties to the lower loss), as train/distill keep.

    Training goes on from the current weights (and the exchanged copies are the current ones);
    only the exported replica is the kept one, so the downloaded student is the best it ever was.
    With `keep="last"` (the config's `keep`) nothing is kept: the replica ends with its last weights.
    """

    def __init__(self, keep: str = "best") -> None:
        self.mode = keep
        self.acc: float | None = None
        self.loss = math.inf
        self.step = -1
        self.state: dict[str, Tensor] | None = None

    def offer(self, step: int, acc: float, loss: float, model: nn.Module) -> bool:
        """Keep `model`'s weights if they beat the kept ones; NaN accuracies never win."""
        if self.mode == "last":
            return False
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
    def from_dict(cls, payload: dict[str, Any] | None, keep_mode: str = "best") -> KeepBest:
        keep = cls(keep_mode)
        if payload and payload.get("state"):
            keep.acc, keep.loss = float(payload["acc"]), float(payload["loss"])
            keep.step, keep.state = int(payload["step"]), dict(payload["state"])
        return keep


def check_trainable(config: ExperimentConfig, dataset: Any) -> None:
    """Refuse what codistillation cannot do before anything is built."""
    if config.kind != "codistill":
        raise ConfigError(f"run_codistill needs kind 'codistill', got {config.kind!r}")
    if not has_labels(dataset, "train"):
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
