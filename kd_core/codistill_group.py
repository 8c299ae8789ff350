"""Codistillation groups beyond one loop: data-parallel subprocess groups, one group per task, and the merged result.

Entry points:
- `run_codistill_group(config, dataset, g, exchange, ...)`: train group g (its `group_size`
  workers launched as subprocesses when > 1), swapping stale copies with the other groups
  through `exchange`; exports replica{g}.* and returns that replica's RunResult. What a
  Celery task calls, one task per group, on any machine that sees the exchange.
- `combine_group_results(config, dataset, group_files, ...)`: the experiment's result (best
  replica, ensemble accuracy, churn) from every group's exported replica.
- `run_groups_in_subprocesses(...)`: all groups of one experiment from one caller
  (`run_codistill` with `group_size > 1`).
- `python -m kd_core.codistill_group --job DIR --group G --rank R --world W --init URL`: one
  worker process of a group (launched by the functions above, not by users).
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from safetensors.torch import load_file
from torch import nn

from kd_core.atomic import atomic_write
from kd_core.codistill import (
    BatchOrder,
    KeepBest,
    best_index,
    check_finite,
    check_trainable,
    copy_step_at,
    eval_period,
    eval_splits,
    export_replica,
    final_metrics,
    make_model,
    measure_replicas,
    replica_loss,
    replica_seed,
    replica_train_indices,
    split_metrics,
    student_files,
    val_values,
)
from kd_core.codistill_exchange import FileExchange, GroupExchange
from kd_core.config import ExperimentConfig, parse_config
from kd_core.errors import CheckpointError, TrainingError
from kd_core.models import count_params
from kd_core.runner import RunResult
from kd_core.sinks import MetricsSink, NullSink
from kd_core.trainer import (
    lr_at,
    make_augment,
    make_optimizer,
    plan_steps,
    predict_logits,
    set_lr,
    split_tensors,
)

# How long a worker waits for its group's peers in a collective before giving up: a rank that
# died must not hang the others until gloo's 30-minute default.
COLLECTIVE_TIMEOUT_S = 120
RELAY_PERIOD_S = 0.2


def _comm_device(device: torch.device) -> torch.device:
    """Where collectives take their tensors: NCCL on the GPU, gloo on the CPU (any worker device)."""
    if dist.is_initialized() and dist.get_backend() == "nccl":
        return device
    return torch.device("cpu")


# ---------------------------------------------------------------- the dataset handed to subprocesses


def save_dataset(dataset: Any, folder: Path) -> None:
    """Arrays to an .npz, everything else to JSON: what a worker process needs to rebuild the Dataset."""
    folder.mkdir(parents=True, exist_ok=True)
    arrays, meta = {}, {}
    for f in dataclasses.fields(dataset):
        value = getattr(dataset, f.name)
        if isinstance(value, np.ndarray):
            arrays[f.name] = value
        elif f.name != "info":  # loader notes: free-form, not needed for training
            meta[f.name] = list(value) if isinstance(value, tuple) else value
    np.savez(folder / "arrays.npz", **arrays)
    (folder / "meta.json").write_text(json.dumps(meta, default=str))


def load_saved_dataset(folder: Path) -> Any:
    """The Dataset `save_dataset` wrote (our own files: numpy without pickle, plain JSON)."""
    from kd_core.data.dataset import Dataset

    meta = json.loads((folder / "meta.json").read_text())
    with np.load(folder / "arrays.npz", allow_pickle=False) as npz:
        arrays = {k: npz[k] for k in npz.files}
    meta["input_shape"] = tuple(meta["input_shape"])
    return Dataset(**meta, **arrays)


# ---------------------------------------------------------------- one group's loop (any rank)


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
                for tensor in model.state_dict().values():
                    buf = tensor.detach().to(_comm_device(tensor.device), copy=True)
                    dist.broadcast(buf, src=0)
                    tensor.copy_(buf.to(tensor.device))
            self.versions[j] = version

    def live_ensemble(self, own: torch.Tensor, x_val: torch.Tensor, y_val: torch.Tensor) -> dict[str, float]:
        """Live ensemble accuracy/loss and churn on validation: own logits with every held copy.

        The copies are stale (up to `exchange_every` steps), so these curves trail the exact
        final figures `combine_group_results` logs; nothing until every other group's copy is held.
        """
        if not self.others or any(v == 0 for v in self.versions.values()):
            return {}
        logits = [own, *(predict_logits(self.models[j], x_val) for j in self.others)]
        m = split_metrics(logits, y_val)
        return {"ensemble/val/acc": m["ens_acc"], "ensemble/val/loss": m["ens_loss"], "churn": m["churn"]}

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        with torch.no_grad():
            return [self.models[j](x) for j in self.others if j in self.models]


def _group_loop(
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
) -> tuple[dict[str, float] | None, dict[str, str], bool, nn.Module]:
    """Train group `group` (this process is its worker `rank` of `world`).

    Returns (metrics, files, stopped, model); only rank 0 exports replica{group}.* and measures
    (the others return None metrics and no files).
    """
    cd = config.codistill
    x_train, y_train = split_tensors(dataset, "train", device)
    indices = replica_train_indices(config, len(x_train), group)
    order = BatchOrder(indices, config.batch_size, replica_seed(config.seed, group, "data"))
    smallest = min(len(replica_train_indices(config, len(x_train), k)) for k in range(cd.replicas))
    total, per_epoch = plan_steps(config, smallest)
    augment = make_augment(config, dataset, x_train)
    aug_gen = torch.Generator(device=device).manual_seed(replica_seed(config.seed, group, "data") + 1 + rank)
    torch.manual_seed(config.seed + 7919 * rank)  # dropout differs across the group's workers

    model = make_model(config, dataset, group, device).train()
    optimizer = make_optimizer(model, config)
    params = [p for p in model.parameters() if p.requires_grad]
    if world > 1:
        for tensor in model.state_dict().values():  # same seed gives the same init; make sure of it
            buf = tensor.detach().to(_comm_device(tensor.device), copy=True)
            dist.broadcast(buf, src=0)
            tensor.copy_(buf.to(tensor.device))
    peers = _Peers(config, dataset, group, device)
    keep = KeepBest()
    val_split, test_split = eval_splits(dataset, x_train, y_train)
    x_val, y_val = val_split
    eval_every = eval_period(config.log_every, per_epoch)
    p = f"replica{group}/"

    t0 = time.perf_counter()
    last_log_t, last_log_step, samples_since = t0, 0, 0
    sums = torch.zeros(3, dtype=torch.float64)
    copy_step = -1
    stopped = False
    step = 0
    while step < total:
        stop_here = bool(should_stop())
        if world == 1 and stop_here:
            stopped = True
            break
        distilling = cd.replicas > 1 and step >= cd.burn_in_steps
        if distilling:
            want = copy_step_at(step, cd.burn_in_steps, cd.exchange_every)
            if want != copy_step:
                if rank == 0 and exchange is not None:
                    exchange.publish(group, step, model.state_dict())
                peers.refresh(exchange, rank, world)
                copy_step = want
        lr = lr_at(config, step, total, per_epoch)
        batch = order.batch(step)
        part = np.array_split(batch, world)[rank] if world > 1 else batch
        idx = torch.as_tensor(part, device=device)
        xb, yb = x_train[idx], y_train[idx]
        if augment is not None:
            xb = augment(xb, aug_gen)
        share = len(part) / len(batch)
        optimizer.zero_grad(set_to_none=False)
        stats = torch.zeros(3, dtype=torch.float64)
        if len(part):  # a short last batch may leave a worker nothing: it adds zero gradients
            z = model(xb)
            peer_logits = peers.forward(xb) if distilling else []
            loss, hard, term = replica_loss(
                z, yb, peer_logits, distill=distilling, loss=cd.loss, weight=cd.weight
            )
            # Each worker's mean loss weighted by its share of the batch: summed over the group,
            # the gradient is exactly the full batch's mean gradient (synchronous data parallelism).
            (loss * share).backward()
            stats = torch.tensor([loss.item(), hard.item(), term.item()], dtype=torch.float64) * share
        if world > 1:
            grads = [q.grad if q.grad is not None else torch.zeros_like(q) for q in params]
            flat = torch.cat([g.reshape(-1) for g in grads]).to(_comm_device(device), torch.float64)
            extra = torch.tensor([*stats.tolist(), 1.0 if stop_here else 0.0], dtype=torch.float64)
            flat = torch.cat([flat, extra.to(flat.device)])
            dist.all_reduce(flat)
            offset = 0
            for q in params:
                n = q.numel()
                q.grad = flat[offset : offset + n].view_as(q).to(q.device, q.dtype)
                offset += n
            stats = flat[offset : offset + 3].cpu()
            stop_here = bool(flat[offset + 3] > 0)
        set_lr(optimizer, lr)
        optimizer.step()
        check_finite(float(stats[0]), group, step)
        sums += stats
        samples_since += len(batch)
        step += 1
        if world > 1 and stop_here:
            stopped = True

        log_now = step % config.log_every == 0 or step == total or stopped
        val = None
        if log_now and (step % eval_every == 0 or step == total or stopped):
            # Every rank evaluates its (identical) weights, so all keep the same best ones.
            val_logits = predict_logits(model, x_val)
            val = split_metrics([val_logits], y_val)
            keep.offer(step, val["acc"][0], val["loss"][0], model)
        if rank == 0 and log_now:
            now = time.perf_counter()
            n_steps = max(step - last_log_step, 1)
            values = {
                p + "train/loss": float(sums[0]) / n_steps,
                p + "train/loss_hard": float(sums[1]) / n_steps,
                p + "train/loss_distill": float(sums[2]) / n_steps,
                p + "lr": lr,
                p + "samples_per_s": samples_since / max(now - last_log_t, 1e-9),
                p + "exchange/copy_step": float(copy_step),
            }
            for j, v in peers.versions.items():
                values[f"{p}exchange/peer{j}_version"] = float(v)
            if val is not None:
                values[p + "val/loss"] = val["loss"][0]
                values[p + "val/acc"] = val["acc"][0]
                if group == 0 and step < total and not stopped:
                    values.update(peers.live_ensemble(val_logits, x_val, y_val))
            sink.log(step, values)
            sink.status(step / total, (now - t0) / step * (total - step))
            sums.zero_()
            last_log_t, last_log_step, samples_since = now, step, 0
        if stopped:
            break

    keep.restore(model)  # the best weights on validation, as train/distill export
    if rank != 0:
        return None, {}, stopped, model
    if exchange is not None and cd.replicas > 1:
        exchange.publish(group, step, model.state_dict())  # the final (kept) copy, for laggards
    val, test, _ = measure_replicas([model], val_split, test_split)
    files = export_replica(model, dataset, out_dir, f"replica{group}", config)
    metrics = {
        "val_acc": val["acc"][0],
        "val_loss": val["loss"][0],
        "test_acc": test["acc"][0],
        "test_loss": test["loss"][0],
        "student_params": float(count_params(model)),
        "steps": float(step),
        "kept_step": float(keep.step if keep.state is not None else step),
        "group": float(group),
        "train_time_s": time.perf_counter() - t0,
    }
    return metrics, files, stopped, model


# ---------------------------------------------------------------- worker subprocesses


def group_status(
    progress: Mapping[int, float], eta: Mapping[int, float | None]
) -> tuple[float, float | None]:
    """The experiment's (progress, eta_s) from its groups': mean progress, the slowest group's ETA."""
    etas = [e for e in eta.values() if e is not None]
    return sum(progress.values()) / max(len(progress), 1), max(etas) if etas else None


class JsonlSink:
    """A sink a worker subprocess writes and its parent tails: one JSON object a line, flushed."""

    def __init__(self, path: Path) -> None:
        self._file = path.open("a", buffering=1)

    def log(self, step: int, values: Mapping[str, float]) -> None:
        self._file.write(
            json.dumps({"step": int(step), "values": {k: float(v) for k, v in values.items()}}) + "\n"
        )

    def status(self, progress: float, eta_s: float | None) -> None:
        self._file.write(json.dumps({"progress": float(progress), "eta_s": eta_s}) + "\n")

    def close(self) -> None:
        self._file.close()


class _Tail:
    """Reads the complete lines appended to a file since the last call."""

    def __init__(self, path: Path) -> None:
        self.path, self.offset, self.rest = path, 0, b""

    def lines(self) -> list[dict[str, Any]]:
        try:
            with self.path.open("rb") as f:
                f.seek(self.offset)
                data = f.read()
        except FileNotFoundError:
            return []
        self.offset += len(data)
        data = self.rest + data
        *complete, self.rest = data.split(b"\n")
        return [json.loads(line) for line in complete if line.strip()]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker_device(device: torch.device, rank: int, world: int) -> tuple[torch.device, str]:
    """(device, backend) of worker `rank`: NCCL when each worker has its own GPU, gloo otherwise.

    Two NCCL ranks cannot share one GPU; on fewer GPUs than workers they share them over gloo.
    """
    if device.type != "cuda":
        return torch.device("cpu"), "gloo"
    count = torch.cuda.device_count()
    if count >= world:
        return torch.device("cuda", rank), "nccl"
    return torch.device("cuda", rank % max(count, 1)), "gloo"


@dataclasses.dataclass
class _Launched:
    group: int
    folder: Path
    procs: list[subprocess.Popen]
    logs: list[Path]
    tail: _Tail
    last_step: int = 0


def _launch_group(
    job: Path, group: int, world: int, device: torch.device, out_dir: Path, exchange_dir: Path
) -> _Launched:
    folder = job / f"group{group}"
    folder.mkdir(parents=True, exist_ok=True)
    init = f"tcp://127.0.0.1:{_free_port()}"
    env = dict(os.environ)
    # Several workers on few cores: one thread each, or they fight over the cores.
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // max(world, 1))))
    env["PYTHONPATH"] = os.pathsep.join(
        filter(None, [str(Path(__file__).resolve().parent.parent), env.get("PYTHONPATH")])
    )
    procs, logs = [], []
    for rank in range(world):
        log = folder / f"rank{rank}.log"
        cmd = [
            sys.executable, "-m", "kd_core.codistill_group",
            "--job", str(job), "--group", str(group), "--rank", str(rank), "--world", str(world),
            "--init", init, "--device", str(device), "--out", str(out_dir), "--exchange", str(exchange_dir),
        ]  # fmt: skip
        with log.open("wb") as fh:
            procs.append(subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env))
        logs.append(log)
    return _Launched(group, folder, procs, logs, _Tail(folder / "metrics.jsonl"))


def _stop_all(launched: Sequence[_Launched]) -> None:
    for item in launched:
        for proc in item.procs:
            if proc.poll() is None:
                proc.terminate()
    for item in launched:
        for proc in item.procs:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def _log_tail(item: _Launched) -> str:
    text = ""
    for log in item.logs:
        try:
            text += log.read_text(errors="replace")[-1500:]
        except FileNotFoundError:
            pass
    return text.strip()


def _supervise(
    launched: list[_Launched],
    job: Path,
    sink: MetricsSink,
    should_stop: Callable[[], bool],
    on_tick: Callable[[], None] | None = None,
) -> tuple[dict[int, dict[str, str]], bool, dict[int, str]]:
    """Relay the workers' metrics until every group ends; a failed group is ended, the others go on.

    Returns (each finished group's exported files, whether a stop was requested, each failed group's log tail).
    """
    stop_file = job / "stop"
    stop_requested = False
    progress: dict[int, float] = {item.group: 0.0 for item in launched}
    eta: dict[int, float | None] = {}
    latest_val: dict[int, tuple[float, float]] = {}
    latest_train: dict[int, float] = {}
    speed: dict[int, float] = {}
    failed: dict[int, str] = {}
    running = list(launched)
    try:
        while True:
            if not stop_requested and should_stop():
                stop_requested = True
                stop_file.touch()
            if on_tick is not None:
                on_tick()
            for item in launched:
                g = item.group
                for line in item.tail.lines():
                    if "values" in line:
                        item.last_step = max(item.last_step, int(line["step"]))
                        values = dict(line["values"])
                        if f"replica{g}/val/acc" in values:
                            latest_val[g] = (values[f"replica{g}/val/acc"], values[f"replica{g}/val/loss"])
                        if f"replica{g}/train/loss" in values:
                            latest_train[g] = values[f"replica{g}/train/loss"]
                        if f"replica{g}/samples_per_s" in values:
                            speed[g] = values[f"replica{g}/samples_per_s"]
                            values["samples_per_s"] = sum(speed.values())
                        if f"replica{g}/lr" in values:
                            values["lr"] = values[f"replica{g}/lr"]
                        if latest_val and f"replica{g}/val/acc" in values:
                            # The generic series follow the best group so far, as in-process.
                            names = sorted(latest_val)
                            b = names[
                                best_index(
                                    [latest_val[n][0] for n in names], [latest_val[n][1] for n in names]
                                )
                            ]
                            values["val/acc"], values["val/loss"] = latest_val[b]
                            if b in latest_train:
                                values["train/loss"] = latest_train[b]
                        sink.log(line["step"], values)
                    elif "progress" in line:
                        progress[g] = line["progress"]
                        eta[g] = line.get("eta_s")
                        sink.status(*group_status(progress, eta))
            for item in list(running):
                codes = [proc.poll() for proc in item.procs]
                # A worker that crashes while the process group shuts down, after it left its
                # digest (its training is over), has lost nothing: only earlier deaths count.
                died = [
                    r for r, c in enumerate(codes)
                    if c not in (None, 0) and not (item.folder / f"rank{r}.digest").is_file()
                ]  # fmt: skip
                if died:
                    _stop_all([item])  # a group with a dead worker cannot step any more
                    failed[item.group] = f"worker exit codes {codes}\n{_log_tail(item)}"
                    running.remove(item)
                elif all(c is not None for c in codes):
                    running.remove(item)
                if item not in running:  # an ended group (done or failed) counts as done
                    progress[item.group], eta[item.group] = 1.0, None
            if not running:
                break
            time.sleep(RELAY_PERIOD_S)
    except BaseException:
        _stop_all(launched)
        raise
    for item in launched:  # the last lines written before exit
        for line in item.tail.lines():
            if "values" in line:
                item.last_step = max(item.last_step, int(line["step"]))
                sink.log(line["step"], line["values"])
    files: dict[int, dict[str, str]] = {}
    for item in launched:
        result_path = item.folder / "result.json"
        if item.group not in failed and result_path.is_file():
            files[item.group] = json.loads(result_path.read_text())["files"]
    return files, stop_requested, failed


def _tidy_job(job: Path, keep_exchange: bool = False) -> None:
    """Drop the bulky parts of a finished job folder (dataset copy, exchanged weights); keep the logs."""
    shutil.rmtree(job / "dataset", ignore_errors=True)
    if not keep_exchange:
        shutil.rmtree(job / "exchange", ignore_errors=True)


def _prepare_job(config: ExperimentConfig, dataset: Any, job: Path) -> None:
    job.mkdir(parents=True, exist_ok=True)
    (job / "stop").unlink(missing_ok=True)
    (job / "config.json").write_text(json.dumps(config.to_dict()))
    save_dataset(dataset, job / "dataset")


def run_groups_in_subprocesses(
    config: ExperimentConfig,
    dataset: Any,
    *,
    out_dir: str | Path,
    sink: MetricsSink,
    should_stop: Callable[[], bool] = lambda: False,
    device: torch.device | str = "cpu",
) -> RunResult:
    """Every group of the experiment as `group_size` worker subprocesses; groups exchange through files."""
    out_dir = Path(out_dir)
    job = out_dir / "codistill-job"
    _prepare_job(config, dataset, job)
    exchange_dir = job / "exchange"
    FileExchange(exchange_dir)
    world = config.codistill.group_size
    launched: list[_Launched] = []
    try:
        for g in range(config.codistill.replicas):
            launched.append(_launch_group(job, g, world, torch.device(device), out_dir, exchange_dir))
    except BaseException:
        _stop_all(launched)
        raise
    files, stopped, failed = _supervise(launched, job, sink, should_stop)
    _tidy_job(job)
    if not files:
        detail = next(iter(failed.values()), "")
        raise TrainingError(f"every codistillation group failed; last output:\n{detail[-1200:]}")
    group_files = [files.get(g) for g in range(config.codistill.replicas)]
    step = max(item.last_step for item in launched)
    result = combine_group_results(
        config, dataset, group_files, out_dir=out_dir, sink=sink, device=device, step=step
    )
    result.stopped = stopped
    if failed:
        result.metrics["failed_groups"] = float(len(failed))
    return result


# ---------------------------------------------------------------- one group per task (Celery)


class _ExchangeMirror:
    """Forwards between a group's workers' local FileExchange and the caller's exchange (Redis, ...)."""

    def __init__(self, group: int, replicas: int, local: FileExchange, remote: GroupExchange) -> None:
        self.group, self.replicas, self.local, self.remote = group, replicas, local, remote
        self.sent = 0
        self.seen = {j: 0 for j in range(replicas) if j != group}

    def __call__(self) -> None:
        if self.local.version(self.group) > self.sent:
            entry = self.local.latest_entry(self.group)
            if entry is not None:
                self.remote.publish(self.group, entry[1], entry[2])
                self.sent = entry[0]
        for j in self.seen:
            if self.remote.version(j) > self.seen[j]:
                entry = self.remote.latest(j)
                if entry is not None:
                    self.local.publish(j, -1, entry[1])
                    self.seen[j] = entry[0]


def run_codistill_group(
    config: ExperimentConfig,
    dataset: Any,
    group_index: int,
    exchange: GroupExchange,
    *,
    out_dir: str | Path,
    sink: MetricsSink,
    should_stop: Callable[[], bool] = lambda: False,
    device: torch.device | str = "cpu",
) -> RunResult:
    """Train one codistillation group; returns its replica's RunResult (files replica{g}.*).

    Swaps copies with the other groups through `exchange` every `exchange_every` steps and never
    waits for them. Metrics are logged under `replica{g}/...` only, so several groups can share
    one experiment's series; `combine_group_results` adds the experiment-level figures.
    """
    check_trainable(config, dataset)
    if not 0 <= group_index < config.codistill.replicas:
        raise TrainingError(f"group index {group_index} is outside 0..{config.codistill.replicas - 1}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    world = config.codistill.group_size
    if world == 1:
        metrics, files, stopped, model = _group_loop(
            config, dataset, group_index, exchange, rank=0, world=1, out_dir=out_dir, sink=sink,
            should_stop=should_stop, device=torch.device(device),
        )  # fmt: skip
        return RunResult(metrics=metrics, files=files, stopped=stopped, model=model)

    job = out_dir / f"codistill-group{group_index}-job"
    _prepare_job(config, dataset, job)
    mirror: _ExchangeMirror | None = None
    if isinstance(exchange, FileExchange):
        exchange_dir = exchange.root  # the workers read and write the shared folder themselves
    else:
        local = FileExchange(job / "exchange")
        exchange_dir = local.root
        mirror = _ExchangeMirror(group_index, config.codistill.replicas, local, exchange)
    item = _launch_group(job, group_index, world, torch.device(device), out_dir, exchange_dir)
    files, stopped, failed = _supervise([item], job, sink, should_stop, on_tick=mirror)
    if mirror is not None:
        mirror()
    _tidy_job(job, keep_exchange=isinstance(exchange, FileExchange))
    if group_index not in files:
        raise TrainingError(
            f"codistillation group {group_index} failed:\n{failed.get(group_index, '')[-1200:]}"
        )
    result = json.loads((item.folder / "result.json").read_text())
    model = _load_replica(
        config, dataset, files[group_index]["safetensors"], group_index, torch.device("cpu")
    )
    return RunResult(metrics=result["metrics"], files=files[group_index], stopped=stopped, model=model)


def _load_replica(
    config: ExperimentConfig, dataset: Any, path: str, group: int, device: torch.device
) -> nn.Module:
    model = make_model(config, dataset, group, device)
    try:
        model.load_state_dict(load_file(path, device=str(device)))
    except (RuntimeError, OSError) as exc:
        raise CheckpointError(f"replica {group}'s exported weights do not load: {exc}") from exc
    return model.eval()


def combine_group_results(
    config: ExperimentConfig,
    dataset: Any,
    group_files: Sequence[Mapping[str, str] | None],
    *,
    out_dir: str | Path,
    sink: MetricsSink | None = None,
    device: torch.device | str = "cpu",
    step: int | None = None,
) -> RunResult:
    """The experiment's RunResult from each group's exported replica (None for a group that failed).

    With a `sink`, logs the final ensemble/churn/best-replica series at `step` (the last step
    trained; default config.max_steps or 0).

    `group_files[g]` is group g's RunResult.files ({"safetensors", "torchscript", "onnx"}). The
    best replica (validation accuracy) becomes student.*; metrics as run_codistill's: val_acc,
    test_acc, student_params of the best replica, ensemble_val_acc/ensemble_test_acc over the
    surviving replicas, churn, replica{g}_val_acc/_test_acc, best_replica.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    device = torch.device(device)
    alive = [g for g, f in enumerate(group_files) if f and f.get("safetensors")]
    if not alive:
        raise TrainingError("no codistillation group left a trained replica")
    models = [_load_replica(config, dataset, group_files[g]["safetensors"], g, device) for g in alive]
    x_train, y_train = split_tensors(dataset, "train", device)
    val, test, best = measure_replicas(models, *eval_splits(dataset, x_train, y_train))
    per_files: list[dict[str, str] | None] = [None] * len(group_files)
    for g in alive:
        per_files[g] = dict(group_files[g])
    files = student_files(per_files, alive[best], out_dir)
    metrics = final_metrics(val, test, best, count_params(models[best]), 0, alive=alive)
    metrics.pop("steps")
    if sink is not None:
        sink.log(int(step if step is not None else config.max_steps or 0), val_values(val, best, names=alive))
    return RunResult(metrics=metrics, files=files, stopped=False, model=models[best])


# ---------------------------------------------------------------- worker process entry point


def state_digest(model: nn.Module) -> str:
    """sha256 of a model's parameters and buffers (bytes, in state-dict order)."""
    h = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="one worker process of a codistillation group (internal)")
    parser.add_argument("--job", required=True)
    parser.add_argument("--group", type=int, required=True)
    parser.add_argument("--rank", type=int, required=True)
    parser.add_argument("--world", type=int, required=True)
    parser.add_argument("--init", required=True)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", required=True)
    parser.add_argument("--exchange", required=True)
    args = parser.parse_args(argv)
    job = Path(args.job)
    folder = job / f"group{args.group}"
    config = parse_config(json.loads((job / "config.json").read_text()))
    dataset = load_saved_dataset(job / "dataset")
    device, backend = _worker_device(torch.device(args.device), args.rank, args.world)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(
        backend, init_method=args.init, rank=args.rank, world_size=args.world,
        timeout=timedelta(seconds=COLLECTIVE_TIMEOUT_S),
    )  # fmt: skip
    sink: MetricsSink = JsonlSink(folder / "metrics.jsonl") if args.rank == 0 else NullSink()
    stop_file = job / "stop"
    parent = os.getppid()

    def should_stop() -> bool:
        # Stop when asked, or when the supervising parent died (a killed Celery child): orphans
        # must not train on for nobody.
        return stop_file.exists() or os.getppid() != parent

    try:
        result = _group_loop(
            config, dataset, args.group, FileExchange(args.exchange), rank=args.rank, world=args.world,
            out_dir=Path(args.out), sink=sink, should_stop=should_stop, device=device,
        )  # fmt: skip
        metrics, files, stopped, model = result
        # Every worker leaves a digest of its final weights: the group's workers must agree.
        (folder / f"rank{args.rank}.digest").write_text(state_digest(model))
        if args.rank == 0:
            payload = {"metrics": metrics, "files": files, "stopped": stopped}
            atomic_write(folder / "result.json", lambda tmp: Path(tmp).write_text(json.dumps(payload)))
    finally:
        sink.close()
        try:
            dist.barrier()  # leave together: tearing gloo down under a busy peer aborts
            dist.destroy_process_group()
        except Exception as exc:  # the peers may already be gone; the work is saved
            print(f"destroy_process_group: {exc}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
