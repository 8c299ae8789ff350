"""The job handler: claim an Experiment, run it with kd_core, store its artifacts, final metrics and status.

State of a job lives in three places, each with one owner:
- the database row (status, progress, attempts, lease, metrics, error): the record everybody reads, written
  only through the Experiment transition methods (claim, renew_lease, finish, requeue);
- `KD_STATE_DIR/jobs/<id>/`: the resumable training checkpoint and the run's output folder, so a job
  redelivered after its worker died resumes (attempts > 1) instead of starting over;
- `KD_STATE_DIR/cache/`: teacher logits shared by every job on this machine (or shared volume).

One trainer per job: the delivery that claims the row holds a lease (token + expiry, renewed by a heartbeat
thread, workers/records.Lease). A second delivery of a running job whose lease is live (the broker's
visibility timeout, a duplicate send) waits about one lease length for it to lapse, then exits untouched;
a lapsed lease means its holder died: the job is taken over and resumes from its checkpoint (attempts + 1),
until KD_MAX_ATTEMPTS deliveries have died on it (then it fails, saying so). A trainer that finds its lease
taken stops at once and writes nothing more (no checkpoint, metrics, artifacts or status).
Time limit: the config's `time_limit_s`, capped by KD_MAX_JOB_SECONDS, counts running time over all
deliveries; when reached the job stops, keeps what it trained and succeeds with `metrics.stopped_by`
"time_limit".
Torch (and with it CUDA) is imported inside `run` only: the Celery parent process never touches a device.
"""

from __future__ import annotations

import inspect
import logging
import os
import shutil
import socket
import time
import uuid
from pathlib import Path
from typing import Any

from django.db import close_old_connections
from django.utils import timezone

from workers import search
from workers.records import (
    Lease,
    LeaseLost,
    StopSignal,
    cache_dir,
    close_quietly,
    finish,
    human_error,
    job_dir,
    json_metrics,
    lease_seconds,
    max_attempts,
    resolve_inputs,
    save_artifacts,
    state_dir,
    time_budget_s,
)

log = logging.getLogger(__name__)

# How often a running job saves its resumable checkpoint (a lost worker loses at most this much work).
CHECKPOINT_EVERY_S = float(os.environ.get("KD_CHECKPOINT_EVERY_S", "30"))
# The lease token of a spread codistillation once its groups are queued: they (and the watchdog) own it.
GROUPS_LEASE = "codistill-groups"


def checkpoint_interval() -> tuple[float, bool]:
    """(seconds between resumable checkpoints, whether run_experiment takes it): KD_CHECKPOINT_EVERY_S if
    it can be passed, else the trainer's own default."""
    from kd_core.runner import run_experiment

    if "checkpoint_every_s" in inspect.signature(run_experiment).parameters:
        return CHECKPOINT_EVERY_S, True
    from kd_core.trainer import train_model

    default = inspect.signature(train_model).parameters.get("checkpoint_every_s")
    return (float(default.default) if default is not None else 30.0), False


def claim(exp: Any, token: str, **fields: Any) -> str:
    """Experiment.claim for this delivery; while another delivery's lease is live, wait for it to lapse.

    A live holder renews every third of the lease, so a lease still live after about one lease length
    belongs to a live trainer: then "busy" (this delivery exits). A dead holder's lease lapses within it.
    """
    lease_s = lease_seconds()
    give_up = time.monotonic() + lease_s * 1.2 + 1.0
    while True:
        outcome = exp.claim(token=token, lease_s=lease_s, max_attempts=max_attempts(), **fields)
        if outcome != "busy" or time.monotonic() > give_up:
            return outcome
        time.sleep(min(1.0, lease_s / 6))


def run(experiment_id: int, *, task_id: str = "", hostname: str = "") -> str:
    """Run one experiment to its end and record the outcome; returns the final status (or why it was skipped)."""
    from webapp.studio.models import Experiment

    close_old_connections()
    exp = Experiment.objects.select_related("dataset", "teacher").filter(pk=experiment_id).first()
    if exp is None:
        return "missing"
    if exp.status in Experiment.FINISHED:
        return f"skipped: already {exp.status}"
    if task_id and exp.celery_task_id and task_id != exp.celery_task_id:
        # An old message redelivered after the job was requeued under a new task id.
        return "skipped: stale task"
    if exp.status == Experiment.RUNNING and exp.lease_token == GROUPS_LEASE:
        return "skipped: its codistillation groups are running"

    import torch  # noqa: F401 - first touch of torch/CUDA happens here, in the pool child

    from kd_core.device import pick_device

    device = pick_device("auto")
    timings = dict(exp.timings or {})
    if exp.started is None:
        timings["queue_wait"] = (timezone.now() - exp.created).total_seconds()
    token = uuid.uuid4().hex
    worker = (hostname or socket.gethostname())[:200]
    outcome = claim(exp, token, worker=worker, device=str(device), timings=timings)
    if outcome == "busy":
        return "skipped: another delivery is running it (its lease is live)"
    if outcome == "exhausted":
        return Experiment.FAILED
    if outcome != "claimed":
        return f"skipped: {exp.status} meanwhile"
    timings = dict(exp.timings or {})

    from workers import codistill

    lease = Lease(exp, token, timings=timings).start()
    if codistill.spread_enabled(exp):
        lease.stop()  # the groups keep the job alive from here (heartbeat files; the watchdog)
        exp.renew_lease(token, 10 * 365 * 86400, lease_token=GROUPS_LEASE)
        return codistill.fan_out(exp, job_dir(exp.pk))
    try:
        return _train(exp, device, lease, timings)
    finally:
        lease.stop()
        close_old_connections()


def _train(exp: Any, device: Any, lease: Lease, timings: dict[str, Any]) -> str:
    from kd_core.errors import Cancelled
    from webapp.studio.models import Experiment
    from workers.sink import DbChannelSink

    folder = job_dir(exp.pk)
    sink = DbChannelSink(exp.pk, lease=lease)
    stop = StopSignal(exp.pk, lease=lease, budget_s=time_budget_s(exp.config, lease.running_before_s))
    sink, stop = search.wrap(exp, sink, stop)  # a search trial reports val_acc to its pruner
    abandoned = "abandoned: another delivery took the job over"
    try:
        result = _execute(exp, folder, device, sink, stop, timings, lease)
    except LeaseLost:
        close_quietly(sink)  # drops what it holds
        return abandoned
    except BaseException as exc:
        close_quietly(sink)
        timings["running_s"] = round(lease.running_s(), 3)
        if lease.lost:
            return abandoned
        if isinstance(exc, Cancelled) or (
            stop.requested and not isinstance(exc, KeyboardInterrupt | SystemExit)
        ):
            finish(exp, Experiment.CANCELLED, token=lease.token, timings=timings)
            return Experiment.CANCELLED
        if not isinstance(exc, Exception):
            raise  # the worker is shutting down: leave the job to be redelivered and resumed
        log.exception("experiment %s failed", exp.pk)
        finish(exp, Experiment.FAILED, token=lease.token, error=human_error(exc), timings=timings)
        return Experiment.FAILED
    timings["running_s"] = round(lease.running_s(), 3)
    metrics = json_metrics(result.metrics)
    if _time_limited(stop, result):
        metrics["stopped_by"] = "time_limit"  # it keeps what it trained: a result, not a cancellation
        status, done = Experiment.SUCCEEDED, {}
    elif getattr(stop, "pruned", False):
        metrics["stopped_by"] = "pruned"  # a search trial its pruner stopped: a result at fewer epochs
        status, done = Experiment.SUCCEEDED, {}
    elif result.stopped:
        status, done = Experiment.CANCELLED, {}  # a cancelled job keeps how far it got
    else:
        status, done = Experiment.SUCCEEDED, {"progress": 1.0}
    if not finish(exp, status, token=lease.token, eta_s=None, metrics=metrics, timings=timings, **done):
        return abandoned if lease.lost else f"skipped: {exp.status} meanwhile"
    shutil.rmtree(folder, ignore_errors=True)
    return status


def _time_limited(stop: StopSignal, result: Any) -> bool:
    return bool(result.stopped) and (stop.time_limited or result.metrics.get("stopped_by") == "time_limit")


def _execute(
    exp: Any, folder: Path, device: Any, sink: Any, stop: StopSignal, timings: dict[str, Any], lease: Lease
) -> Any:
    """Resolve inputs, run kd_core, then store artifacts and the trained model (all before the final status)."""
    from kd_core.runner import run_experiment
    from webapp.studio.services import register_trained_model

    t0 = time.monotonic()
    config, dataset, teacher = resolve_inputs(exp, folder)
    timings["load"] = time.monotonic() - t0

    t0 = time.monotonic()
    out_dir = folder / "out"
    checkpoint = folder / "train.ckpt"
    if checkpoint.exists():
        log.info("experiment %s: attempt %s resumes from %s", exp.pk, exp.attempts, checkpoint)
    every_s, settable = checkpoint_interval()
    extra: dict[str, Any] = {"checkpoint_every_s": every_s} if settable else {}
    extra |= search.run_options(exp)  # a search trial exports only if it lands on the front (after_run)
    try:
        result = run_experiment(
            config, dataset=dataset, teacher=teacher, out_dir=out_dir, sink=sink, should_stop=stop,
            device=device, cache_dir=cache_dir(), checkpoint_path=checkpoint, **extra,
        )  # fmt: skip
    finally:
        sink.close()
    timings["run"] = time.monotonic() - t0
    result = search.after_run(exp, result, dataset, out_dir, stop)

    # Confirm (and extend) the lease in the database before replacing anything stored.
    lease.renew()
    lease.check()
    t0 = time.monotonic()
    save_artifacts(exp, result.files)
    if (not result.stopped or _time_limited(stop, result)) and result.files.get("safetensors"):
        register_trained_model(exp, str(result.files["safetensors"]))
    timings["store"] = time.monotonic() - t0
    return result


# --- housekeeping ---------------------------------------------------------------------------------------


def requeue_orphans(hostname: str) -> list[int]:
    """Jobs marked running on worker `hostname`, found when a worker of that very name starts: it died.

    Each goes back to the queue under a new task id (the old message, redelivered later, is then stale);
    its next delivery resumes it, or fails it when KD_MAX_ATTEMPTS deliveries have died on it (claim).
    A spread codistillation is left to its groups and the watchdog.
    """
    from webapp.studio.models import Experiment
    from webapp.studio.services import enqueue_experiment

    close_old_connections()
    requeued = []
    for exp in Experiment.objects.filter(status=Experiment.RUNNING, worker=hostname):
        if exp.lease_token == GROUPS_LEASE:
            continue
        if exp.requeue(worker=hostname):
            enqueue_experiment(exp)  # outside a transaction: sent at once
            requeued.append(exp.pk)
    return requeued


def cleanup(max_age_s: float = 24 * 3600) -> int:
    """Remove job folders of finished or deleted experiments left longer than `max_age_s`; returns the count.

    Dataset ingests whose worker stopped are handled by workers/ingest.py (`sweep_stale`).
    """
    from webapp.studio.models import Experiment

    removed = 0
    root = state_dir() / "jobs"
    if not root.is_dir():
        return removed
    cutoff = time.time() - max_age_s
    for folder in root.iterdir():
        if not folder.is_dir() or not folder.name.isdigit() or folder.stat().st_mtime > cutoff:
            continue
        status = Experiment.objects.filter(pk=int(folder.name)).values_list("status", flat=True).first()
        if status is None or status in Experiment.FINISHED:
            shutil.rmtree(folder, ignore_errors=True)
            removed += 1
    return removed
