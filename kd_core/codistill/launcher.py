"""Codistillation groups beyond one loop: data-parallel worker subprocesses, one group per task, the worker entry.

- `run_groups_in_subprocesses(...)`: all groups of one experiment from one caller (`run_codistill`
  with `group_size > 1`).
- `run_codistill_group(config, dataset, g, exchange, ...)`: train group g (its `group_size` workers
  launched as subprocesses when > 1); what a Celery task calls, one task per group.
- `run_data_parallel(config, dataset, model, ...)`: `devices: N` for a train or distill job, one group of
  N ranks with no peers (the ranks' step is `data_parallel`'s).
- `python -m kd_core.codistill.launcher --job DIR --group G --rank R --world W --init URL`: one worker
  process of a group (launched by the functions above, not by users).

Checkpoints: each group writes one (its rank 0; the other ranks resume from the same file), so a stopped or
killed group started again with the same checkpoint path resumes mid-run.
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
from torch import nn

from kd_core import errors
from kd_core.atomic import atomic_write
from kd_core.cache import CachedLogits
from kd_core.codistill.combine import combine_group_results, load_replica
from kd_core.codistill.common import CHECKPOINT_EVERY_S, best_index, check_trainable
from kd_core.codistill.data_parallel import INIT_WEIGHTS, TEACHER, train_data_parallel
from kd_core.codistill.exchange import FileExchange, GroupExchange
from kd_core.codistill.group_loop import train_group
from kd_core.config import ExperimentConfig, parse_config
from kd_core.errors import ConfigError, KDError, TrainingError
from kd_core.result import RunResult
from kd_core.sinks import MetricsSink, NullSink
from kd_core.trainer import TrainOutcome

# How long a worker waits for its group's peers in a collective before giving up: a rank that
# died must not hang the others until gloo's 30-minute default.
COLLECTIVE_TIMEOUT_S = 120
RELAY_PERIOD_S = 0.2


# ---------------------------------------------------------------- the dataset handed to subprocesses


def save_dataset(dataset: Any, folder: Path) -> None:
    """What a worker process needs to rebuild the Dataset: arrays to an .npz, everything else to JSON.

    A dataset over a store (its splits SplitViews of the store's x.npy) is saved as the store's path
    and each split's row numbers: the worker reads the store itself, and nothing of x is copied.
    """
    from kd_core.data.dataset import SplitView

    folder.mkdir(parents=True, exist_ok=True)
    arrays, meta = {}, {}
    for f in dataclasses.fields(dataset):
        value = getattr(dataset, f.name)
        if isinstance(value, SplitView) and getattr(dataset, "store_path", None):
            arrays[f.name + _STORE_ROWS] = value.index
        elif isinstance(value, SplitView):  # rows of an array with no store behind it: as float32
            arrays[f.name] = np.asarray(value)
        elif isinstance(value, np.ndarray):
            arrays[f.name] = value
        elif f.name != "info":  # loader notes: free-form, not needed for training
            meta[f.name] = list(value) if isinstance(value, tuple) else value
    np.savez(folder / "arrays.npz", **arrays)
    (folder / "meta.json").write_text(json.dumps(meta, default=str))


_STORE_ROWS = "__store_rows"  # suffix of a split saved as row numbers of the store's x.npy


def load_saved_dataset(folder: Path) -> Any:
    """The Dataset `save_dataset` wrote (our own files: numpy without pickle, plain JSON)."""
    from kd_core.data.dataset import Dataset, RowFile, SplitView

    meta = json.loads((folder / "meta.json").read_text())
    with np.load(folder / "arrays.npz", allow_pickle=False) as npz:
        arrays = {k: npz[k] for k in npz.files}
    meta["input_shape"] = tuple(meta["input_shape"])
    rows = [k for k in arrays if k.endswith(_STORE_ROWS)]
    if rows:
        x = RowFile(Path(meta["store_path"]) / "x.npy")
        for key in rows:
            arrays[key[: -len(_STORE_ROWS)]] = SplitView(x, arrays.pop(key), float(meta.get("x_scale", 1.0)))
    return Dataset(**meta, **arrays)


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
    job: Path, group: int, world: int, device: torch.device, out_dir: Path, exchange_dir: Path,
    checkpoint: Path | None = None, checkpoint_every_s: float = CHECKPOINT_EVERY_S,
) -> _Launched:  # fmt: skip
    folder = job / f"group{group}"
    folder.mkdir(parents=True, exist_ok=True)
    # What an earlier attempt of this group left (a resumed job reuses the folder): its relayed lines,
    # digests, errors or result would pass for this attempt's.
    for stale in [folder / "metrics.jsonl", folder / "result.json", *folder.glob("rank*.digest"),
                  *folder.glob("rank*.error.json")]:  # fmt: skip
        stale.unlink(missing_ok=True)
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
            sys.executable, "-m", "kd_core.codistill.launcher",
            "--job", str(job), "--group", str(group), "--rank", str(rank), "--world", str(world),
            "--init", init, "--device", str(device), "--out", str(out_dir), "--exchange", str(exchange_dir),
            "--checkpoint-every", repr(float(checkpoint_every_s)),
        ]  # fmt: skip
        if checkpoint is not None:
            cmd += ["--checkpoint", str(checkpoint)]
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


def _raise_failure(item: _Launched, detail: str, what: str) -> None:
    """Re-raise a rank's own refusal (a ConfigError stays a ConfigError); else a TrainingError with its output."""
    for path in sorted(item.folder.glob("rank*.error.json")):
        try:
            error = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        kind = getattr(errors, str(error.get("type")), None)
        if isinstance(kind, type) and issubclass(kind, KDError):
            raise kind(str(error.get("message", "")))
    raise TrainingError(f"{what}:\n{detail[-1200:]}")


def group_checkpoint(path: str | Path | None, group: int, replicas: int) -> Path | None:
    """Group `group`'s checkpoint file for an experiment checkpointed at `path` (the path itself for one group)."""
    if path is None:
        return None
    path = Path(path)
    return path if replicas == 1 else path.with_name(f"{path.name}.group{group}")


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
    checkpoint_path: str | Path | None = None,
    checkpoint_every_s: float = CHECKPOINT_EVERY_S,
) -> RunResult:
    """Every group of the experiment as `group_size` worker subprocesses; groups exchange through files.

    `checkpoint_path`: each group checkpoints beside it (`group_checkpoint`); a stopped or killed run
    started again with the same path resumes every group, and the exchange folder is kept until the end.
    """
    out_dir = Path(out_dir)
    job = out_dir / "codistill-job"
    _prepare_job(config, dataset, job)
    exchange_dir = job / "exchange"
    FileExchange(exchange_dir)
    world = config.codistill.group_size
    replicas = config.codistill.replicas
    launched: list[_Launched] = []
    try:
        for g in range(replicas):
            ckpt = group_checkpoint(checkpoint_path, g, replicas)
            launched.append(
                _launch_group(
                    job, g, world, torch.device(device), out_dir, exchange_dir, ckpt, checkpoint_every_s
                )
            )
    except BaseException:
        _stop_all(launched)
        raise
    files, stopped, failed = _supervise(launched, job, sink, should_stop)
    # A stopped run keeps its exchange: the groups resume towards the copies they held.
    _tidy_job(job, keep_exchange=stopped and checkpoint_path is not None)
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
    checkpoint_path: str | Path | None = None,
    checkpoint_every_s: float = CHECKPOINT_EVERY_S,
) -> RunResult:
    """Train one codistillation group; returns its replica's RunResult (files replica{g}.*).

    Swaps copies with the other groups through `exchange` every `exchange_every` steps and never
    waits for them. Metrics are logged under `replica{g}/...` only, so several groups can share
    one experiment's series; `combine_group_results` adds the experiment-level figures.

    The group checkpoints to `checkpoint_path` (default `out_dir/replica{g}.ckpt`: a group's out_dir
    is its own, kept across deliveries of its task), every `checkpoint_every_s` and when stopped; a
    call with a checkpoint of this config resumes from it, with the peer copies it held. Removed at the end.
    """
    check_trainable(config, dataset)
    if not 0 <= group_index < config.codistill.replicas:
        raise TrainingError(f"group index {group_index} is outside 0..{config.codistill.replicas - 1}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    checkpoint = (
        Path(checkpoint_path) if checkpoint_path is not None else out_dir / f"replica{group_index}.ckpt"
    )
    world = config.codistill.group_size
    if world == 1:
        metrics, files, stopped, model = train_group(
            config, dataset, group_index, exchange, rank=0, world=1, out_dir=out_dir, sink=sink,
            should_stop=should_stop, device=torch.device(device), checkpoint_path=checkpoint,
            checkpoint_every_s=checkpoint_every_s,
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
    item = _launch_group(
        job, group_index, world, torch.device(device), out_dir, exchange_dir, checkpoint, checkpoint_every_s
    )
    files, stopped, failed = _supervise([item], job, sink, should_stop, on_tick=mirror)
    if mirror is not None:
        mirror()
    _tidy_job(job, keep_exchange=isinstance(exchange, FileExchange))
    if group_index not in files:
        _raise_failure(item, failed.get(group_index, ""), f"codistillation group {group_index} failed")
    result = json.loads((item.folder / "result.json").read_text())
    model = load_replica(config, dataset, files[group_index]["safetensors"], group_index, torch.device("cpu"))
    return RunResult(metrics=result["metrics"], files=files[group_index], stopped=stopped, model=model)


# ---------------------------------------------------------------- devices: N for one train/distill job


def _teacher_files(
    config: ExperimentConfig, job: Path, teacher: Any, logits: Mapping[str, Any], partial: bool
) -> None:
    """What the ranks need of the teacher: its cached logits' files, and its weights when batches are augmented."""
    from safetensors.torch import save_file

    (job / TEACHER).unlink(missing_ok=True)
    if teacher is None and not logits:
        return
    spec: dict[str, Any] = {"logits": {}, "partial": bool(partial), "weights": None}
    for split, entry in logits.items():
        path = getattr(entry, "path", None)
        if path is None:  # logits held in memory: a file of the cache's fp16 layout for the ranks
            path = str(job / f"teacher-{split}.npy")
            array = entry.array if isinstance(entry, CachedLogits) else torch.as_tensor(entry).cpu().numpy()
            np.save(path, np.asarray(array, dtype=np.float16), allow_pickle=False)
        spec["logits"][split] = str(path)
    if "train" not in logits:  # augmented batches: every rank runs the teacher on the views it trains on
        module = getattr(teacher, "module", None)
        if module is None or getattr(teacher, "sandboxed", False) or not hasattr(module, "spec"):
            raise ConfigError(
                f"'devices' > 1 with augment {config.augment!r} runs the teacher in every process, which needs "
                "its weights (safetensors or a state dict); this teacher is a TorchScript/ONNX/torch.export "
                "file that runs only in its sandbox: use augment 'none' (its logits are then computed once "
                "and shared) or devices 1"
            )
        meta = {
            "spec": module.spec, "input_shape": list(module.input_shape), "num_classes": module.num_classes,
            "preprocessing": module.preprocessing,
        }  # fmt: skip
        tensors = {k: v.detach().cpu().contiguous().clone() for k, v in module.state_dict().items()}
        save_file(
            tensors, str(job / "teacher.safetensors"), metadata={k: json.dumps(v) for k, v in meta.items()}
        )
        spec["weights"] = str(job / "teacher.safetensors")
    (job / TEACHER).write_text(json.dumps(spec))


def run_data_parallel(
    config: ExperimentConfig,
    dataset: Any,
    model: nn.Module,
    *,
    out_dir: str | Path,
    sink: MetricsSink,
    should_stop: Callable[[], bool] = lambda: False,
    device: torch.device | str = "cpu",
    teacher: Any | None = None,
    teacher_logits: Mapping[str, Any] | None = None,
    partial_teacher: bool = False,
    checkpoint_path: str | Path | None = None,
    checkpoint_every_s: float = CHECKPOINT_EVERY_S,
) -> TrainOutcome:
    """Train `model` as `config.devices` data-parallel ranks (one group of the codistillation machinery).

    The ranks start from `model`'s weights; a distill job's teacher reaches them as its cached logits
    (`teacher_logits`, the splits "train" and "val"; without "train" the batches are augmented and each
    rank runs a copy of the teacher's weights). `model` ends with the trained (kept) weights, on `device`.
    Returns the `TrainOutcome` one process's `train_model` would. The job checkpoints to `checkpoint_path`.
    """
    from safetensors.torch import load_file, save_file

    world = int(config.devices)
    if config.batch_size < 2 * world:
        raise ConfigError(
            f"batch_size {config.batch_size} is split over {world} processes: it must be at least {2 * world}"
        )
    job = Path(out_dir) / "data-parallel-job"
    _prepare_job(config, dataset, job)
    state = {k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}
    save_file(state, str(job / INIT_WEIGHTS))
    _teacher_files(config, job, teacher, dict(teacher_logits or {}), partial_teacher)
    device = torch.device(device)
    item = _launch_group(
        job, 0, world, device, Path(out_dir), job / "exchange",
        None if checkpoint_path is None else Path(checkpoint_path), checkpoint_every_s,
    )  # fmt: skip
    files, _, failed = _supervise([item], job, sink, should_stop)
    if 0 not in files:
        _raise_failure(
            item, failed.get(0, ""), f"the {config.kind} job's {world} data-parallel processes failed"
        )
    outcome = json.loads((item.folder / "result.json").read_text())["metrics"]
    model.load_state_dict(load_file(files[0]["safetensors"]))
    model.to(device)
    shutil.rmtree(job, ignore_errors=True)  # the logs are in the result; weights and data copies are bulky
    return TrainOutcome(
        state_dict={k: v.detach().clone() for k, v in model.state_dict().items()},
        best=dict(outcome["best"]), steps=int(outcome["steps"]), epochs=float(outcome["epochs"]),
        stopped=bool(outcome["stopped"]), train_time_s=float(outcome["train_time_s"]),
        samples_per_s=float(outcome["samples_per_s"]), resumed_from_step=outcome.get("resumed_from_step"),
        history=list(outcome.get("history") or []), precision=str(outcome["precision"]),
        memory=dict(outcome.get("memory") or {}), notes=list(outcome.get("notes") or []),
    )  # fmt: skip


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
    parser.add_argument("--checkpoint", default=None)
    parser.add_argument("--checkpoint-every", type=float, default=CHECKPOINT_EVERY_S)
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
        common: dict[str, Any] = {
            "rank": args.rank, "world": args.world, "sink": sink, "should_stop": should_stop, "device": device,
            "checkpoint_path": args.checkpoint, "checkpoint_every_s": args.checkpoint_every,
        }  # fmt: skip
        try:
            if config.kind == "codistill":
                result = train_group(
                    config, dataset, args.group, FileExchange(args.exchange), out_dir=Path(args.out), **common
                )
            else:  # devices: N for one train/distill job
                result = train_data_parallel(config, dataset, job, **common)
        except KDError as exc:  # the parent re-raises it as such: a refusal stays a refusal
            error = {"type": type(exc).__name__, "message": str(exc)}
            (folder / f"rank{args.rank}.error.json").write_text(json.dumps(error))
            raise
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
