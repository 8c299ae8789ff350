"""One codistillation group's step (any rank of a data-parallel group), plugged into the shared loop.

The group's workers split each batch, all-reduce their gradients (gloo on the CPU, NCCL on GPUs),
and every `exchange_every` steps swap stale copies of the weights with the other groups through a
`GroupExchange` without ever waiting for them.
"""

from __future__ import annotations

import math
import os
import shutil
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from kd_core.codistill.common import (
    EvalSplit,
    KeepBest,
    copy_step_at,
    dropout_seed,
    eval_period,
    eval_splits,
    export_replica,
    make_model,
    measure_replicas,
    replica_batches,
    replica_loss,
    replica_train_indices,
)
from kd_core.codistill.exchange import GroupExchange
from kd_core.config import ExperimentConfig
from kd_core.data.loader import split_size
from kd_core.errors import CheckpointError
from kd_core.loop import Precision, make_optimizer, plan_steps, run_loop, set_lr
from kd_core.models import count_params
from kd_core.sinks import MetricsSink


def _comm_device(device: torch.device) -> torch.device:
    """Where collectives take their tensors: NCCL on the GPU, gloo on the CPU (any worker device)."""
    if dist.is_initialized() and dist.get_backend() == "nccl":
        return device
    return torch.device("cpu")


def _broadcast_module(module: nn.Module) -> None:
    for tensor in module.state_dict().values():
        buf = tensor.detach().to(_comm_device(tensor.device), copy=True)
        dist.broadcast(buf, src=0)
        tensor.copy_(buf.to(tensor.device))


def all_reduce_gradients(params: list[nn.Parameter], extra: Tensor, device: torch.device) -> Tensor:
    """Sum every rank's gradients of `params` (in place, in float64 on the wire) and `extra`; returns the summed `extra`.

    One flat all-reduce per step: the group's synchronous data parallelism, whatever the mode's loss.
    """
    grads = [q.grad if q.grad is not None else torch.zeros_like(q) for q in params]
    flat = torch.cat([g.reshape(-1) for g in grads]).to(_comm_device(device), torch.float64)
    flat = torch.cat([flat, extra.to(flat.device, torch.float64)])
    dist.all_reduce(flat)
    offset = 0
    for q in params:
        n = q.numel()
        q.grad = flat[offset : offset + n].view_as(q).to(q.device, q.dtype)
        offset += n
    return flat[offset:].to(device)


def agree_stop(local: bool, device: torch.device) -> bool:
    """Every rank stops at the same step: a stop seen by any rank is everyone's."""
    flag = torch.tensor([1.0 if local else 0.0], device=_comm_device(device))
    dist.all_reduce(flag)
    return bool(flag.item() > 0)


def rank_checkpoint(path: str | Path | None, rank: int, every_s: float) -> tuple[Path | None, float]:
    """(the checkpoint file rank `rank` resumes from and writes, its period): the group checkpoints as one.

    Rank 0 writes the group's one checkpoint (weights and optimizer states are the same on every rank, and
    each rank's dropout follows (seed, rank, step), so no per-rank RNG state is needed). The other ranks
    resume from that file through a private link, taken before any rank can step (a step needs all of
    them), and write only that link when stopped; `release_checkpoint` removes it.
    """
    if path is None or rank == 0:
        return (None if path is None else Path(path)), every_s
    path = Path(path)
    own = path.with_name(f"{path.name}.rank{rank}")
    own.unlink(missing_ok=True)
    if path.is_file():
        try:
            os.link(path, own)  # atomic_write replaces the file by rename: the link keeps this version
        except OSError:
            shutil.copyfile(path, own)
    return own, math.inf


def release_checkpoint(path: Path | None, rank: int) -> None:
    """Drop a rank's private link (rank 0's checkpoint stays for the caller to keep or remove)."""
    if path is not None and rank != 0:
        path.unlink(missing_ok=True)


class _Peers:
    """Stale copies of the other groups, refreshed only when this group reaches an exchange step."""

    def __init__(self, config: ExperimentConfig, dataset: Any, group: int, device: torch.device) -> None:
        self.config, self.dataset, self.device = config, dataset, device
        self.others = [j for j in range(config.codistill.replicas) if j != group]
        self.models: dict[int, nn.Module] = {}
        self.versions = {j: 0 for j in self.others}

    def _model(self, j: int) -> nn.Module:
        if j not in self.models:
            self.models[j] = (
                make_model(self.config, self.dataset, j, self.device).eval().requires_grad_(False)
            )
        return self.models[j]

    def refresh(self, exchange: GroupExchange | None, rank: int, world: int) -> None:
        """Rank 0 reads the newest copies; the group's other ranks receive the same ones from it."""
        latest = torch.zeros(len(self.others), dtype=torch.int64)
        states: dict[int, dict[str, torch.Tensor]] = {}
        if rank == 0 and exchange is not None:
            for i, j in enumerate(self.others):
                if exchange.version(j) > self.versions[j]:
                    entry = exchange.latest(j)
                    if entry is not None and entry[0] > self.versions[j]:
                        latest[i] = entry[0]
                        states[j] = entry[1]
        if world > 1:
            on_wire = latest.to(_comm_device(self.device))
            dist.broadcast(on_wire, src=0)
            latest = on_wire.cpu()
        for i, j in enumerate(self.others):
            version = int(latest[i])
            if version <= self.versions[j]:
                continue
            model = self._model(j)
            if rank == 0:
                try:
                    model.load_state_dict(states[j])
                except RuntimeError as exc:
                    raise CheckpointError(
                        f"group {j}'s exchanged copy does not fit this model: {exc}"
                    ) from exc
            if world > 1:
                _broadcast_module(model)
            self.versions[j] = version

    def live_ensemble(self, model: nn.Module, split: EvalSplit) -> dict[str, float]:
        """Live ensemble accuracy/loss and churn on validation: own logits with every held copy.

        The copies are stale (up to `exchange_every` steps), so these curves trail the exact
        final figures `combine_group_results` logs; nothing until every other group's copy is held.
        """
        if not self.others or any(v == 0 for v in self.versions.values()):
            return {}
        m = split.metrics([model, *(self.models[j] for j in self.others)])
        return {"ensemble/val/acc": m["ens_acc"], "ensemble/val/loss": m["ens_loss"], "churn": m["churn"]}

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        with torch.no_grad():
            return [self.models[j](x) for j in self.others if j in self.models]

    def state_dict(self) -> dict[str, Any]:
        """The held copies and their versions, so a resumed group distils towards the very same ones."""
        return {
            "versions": {str(j): int(v) for j, v in self.versions.items()},
            "models": {str(j): m.state_dict() for j, m in self.models.items()},
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        for key, weights in (state.get("models") or {}).items():
            if int(key) in self.versions:
                self._model(int(key)).load_state_dict(weights)
        for key, version in (state.get("versions") or {}).items():
            if int(key) in self.versions:
                self.versions[int(key)] = int(version)


class GroupTask:
    """Group `group`'s replica on this rank: a share of each batch, all-reduced gradients, stale peer copies."""

    def __init__(
        self, config: ExperimentConfig, dataset: Any, group: int, exchange: GroupExchange | None, *,
        rank: int, world: int, device: torch.device, precision: Precision,
    ) -> None:  # fmt: skip
        self.config, self.group, self.exchange = config, group, exchange
        self.rank, self.world, self.device, self.precision = rank, world, device, precision
        self.prefix = f"replica{group}/"
        self.batches = replica_batches(config, dataset, group, device, part=(rank, world))
        self.model = make_model(config, dataset, group, device).train()
        self.optimizer = make_optimizer(self.model, config)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        if world > 1:
            _broadcast_module(self.model)  # same seed gives the same init; make sure of it
        self.peers = _Peers(config, dataset, group, device)
        self.keep = KeepBest(config.keep)
        self.eval = EvalSplit(dataset, eval_splits(dataset)[0], device)
        self.copy_step = -1
        self.total = 0  # set by train_group: the live ensemble is not drawn at the last step

    def modules(self) -> dict[str, nn.Module]:
        return {"model": self.model}

    def optimizers(self) -> dict[str, torch.optim.Optimizer]:
        return {"model": self.optimizer}

    def agree_stop(self, local: bool) -> bool:
        return agree_stop(local, self.device)

    def train_step(self, step: int, lr: float) -> tuple[dict[str, Tensor], int]:
        cd = self.config.codistill
        # Dropout from (seed, group, rank, step): a resumed rank draws what the uninterrupted one drew.
        torch.manual_seed(dropout_seed(self.config.seed, self.group, self.rank, step))
        distilling = cd.replicas > 1 and step >= cd.burn_in_steps
        if distilling:
            want = copy_step_at(step, cd.burn_in_steps, cd.exchange_every)
            if want != self.copy_step:
                if self.rank == 0 and self.exchange is not None:
                    self.exchange.publish(self.group, step, self.model.state_dict())
                self.peers.refresh(self.exchange, self.rank, self.world)
                self.copy_step = want
        full = len(self.batches.batch_indices(step))
        xb, yb, idx = self.batches.get(step)
        share = len(idx) / full
        self.optimizer.zero_grad(set_to_none=False)
        stats = torch.zeros(3, dtype=torch.float64, device=self.device)
        if len(idx):  # a short last batch may leave a worker nothing: it adds zero gradients
            with self.precision.autocast():
                z = self.model(xb)
                peer_logits = self.peers.forward(xb) if distilling else []
            loss, hard, term = replica_loss(
                z, yb, peer_logits, distill=distilling, loss=cd.loss, weight=cd.weight
            )
            # Each worker's mean loss weighted by its share of the batch: summed over the group,
            # the gradient is exactly the full batch's mean gradient (synchronous data parallelism).
            self.precision.backward(loss * share)
            stats = torch.stack([loss.detach(), hard.detach(), term.detach()]).double() * share
        if self.world > 1:
            stats = all_reduce_gradients(self.params, stats, self.device)
        set_lr(self.optimizer, lr)
        self.precision.step(self.optimizer)
        return {"loss": stats[0], "loss_hard": stats[1], "loss_distill": stats[2]}, full

    def train_values(self, sums: dict[str, float], steps: int) -> dict[str, float]:
        p = self.prefix
        values = {p + f"train/{k}": sums[k] / steps for k in ("loss", "loss_hard", "loss_distill")}
        values[p + "exchange/copy_step"] = float(self.copy_step)
        for j, v in self.peers.versions.items():
            values[f"{p}exchange/peer{j}_version"] = float(v)
        return values

    def checked(self) -> dict[str, str]:
        g = self.group
        return {"loss_hard": f"replica {g}'s hard-label loss", "loss_distill": f"replica {g}'s codistillation term",
                "loss": f"replica {g}'s loss"}  # fmt: skip

    def evaluate(self, step: int) -> dict[str, float]:
        # Every rank evaluates its (identical) weights, so all keep the same best ones.
        val = self.eval.metrics([self.model])
        self.keep.offer(step, val["acc"][0], val["loss"][0], self.model)
        values = {self.prefix + "val/loss": val["loss"][0], self.prefix + "val/acc": val["acc"][0]}
        if self.group == 0 and self.rank == 0 and step < self.total:
            values.update(self.peers.live_ensemble(self.model, self.eval))
        return values

    def state_dict(self) -> dict[str, Any]:
        return {"copy_step": self.copy_step, "kept": self.keep.to_dict(), "peers": self.peers.state_dict()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.keep = KeepBest.from_dict(state.get("kept"), self.keep.mode)
        if (
            "peers" in state
        ):  # the copies held when the checkpoint was taken: no refresh until the next copy step
            self.peers.load_state_dict(state["peers"])
            self.copy_step = int(state.get("copy_step", -1))

    def close(self) -> None:
        self.batches.close()
        self.eval.close()


def train_group(
    config: ExperimentConfig,
    dataset: Any,
    group: int,
    exchange: GroupExchange | None,
    *,
    rank: int,
    world: int,
    out_dir: Path,
    sink: MetricsSink,
    should_stop: Callable[[], bool],
    device: torch.device,
    checkpoint_path: str | Path | None = None,
    checkpoint_every_s: float = 30.0,
) -> tuple[dict[str, float] | None, dict[str, str], bool, nn.Module]:
    """Train group `group` (this process is its worker `rank` of `world`).

    Returns (metrics, files, stopped, model); only rank 0 exports replica{group}.* and measures
    (the others return None metrics and no files). `checkpoint_path`: the group's one checkpoint
    (see `rank_checkpoint`), resumed from when present, removed once the group has finished.
    """
    cd = config.codistill
    precision = Precision(device, config.precision)
    task = GroupTask(
        config, dataset, group, exchange, rank=rank, world=world, device=device, precision=precision
    )
    n_train = split_size(dataset, "train")
    smallest = min(len(replica_train_indices(config, n_train, k)) for k in range(cd.replicas))
    total, per_epoch = plan_steps(config, smallest)
    task.total = total
    own_checkpoint, every_s = rank_checkpoint(checkpoint_path, rank, checkpoint_every_s)
    t0 = time.perf_counter()
    try:
        result = run_loop(
            task, config, total_steps=total, steps_per_epoch=per_epoch,
            eval_every=eval_period(config.log_every, per_epoch), precision=precision, sink=sink,
            should_stop=should_stop, agree_stop=task.agree_stop if world > 1 else None,
            checkpoint_path=own_checkpoint, checkpoint_every_s=every_s, checkpoint_at_end=False,
        )  # fmt: skip
    finally:
        task.close()
        release_checkpoint(own_checkpoint, rank)
    model = task.model
    task.keep.restore(model)  # the best weights on validation (keep "best"), as train/distill export
    if rank != 0:
        return None, {}, result.stopped, model
    if exchange is not None and cd.replicas > 1:
        exchange.publish(group, result.steps, model.state_dict())  # the final (kept) copy, for laggards
    val, test, _ = measure_replicas([model], dataset, device)
    files = export_replica(model, dataset, out_dir, f"replica{group}", config)
    metrics = {
        "val_acc": val["acc"][0],
        "val_loss": val["loss"][0],
        "test_acc": test["acc"][0],
        "test_loss": test["loss"][0],
        "student_params": float(count_params(model)),
        "steps": float(result.steps),
        "kept_step": float(task.keep.step if task.keep.state is not None else result.steps),
        "group": float(group),
        "train_time_s": time.perf_counter() - t0,
    }
    if checkpoint_path is not None and not result.stopped:
        Path(checkpoint_path).unlink(missing_ok=True)
    return metrics, files, result.stopped, model
