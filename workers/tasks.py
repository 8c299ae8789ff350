"""Celery tasks (thin): training on queue `gpu`, housekeeping on `default`; the database row is the record."""

from __future__ import annotations

import logging

from celery import shared_task
from celery.signals import worker_ready

from workers import gpu  # noqa: F401 - connects the one-process-per-GPU signals (KD_GPUS)

log = logging.getLogger(__name__)


@shared_task(
    name="workers.run_experiment", bind=True, acks_late=True, reject_on_worker_lost=True, ignore_result=True
)
def run_experiment(self, experiment_id: int) -> str:
    """Run one experiment to its end; a worker that dies mid-job leaves the message to be redelivered."""
    from workers import jobs, search

    try:
        return jobs.run(int(experiment_id), task_id=self.request.id, hostname=self.request.hostname or "")
    finally:
        search.after_job(int(experiment_id))  # a search trial: settle it, advance its search


@shared_task(name="workers.advance_search", ignore_result=True, acks_late=False)
def advance_search(search_id: int) -> str:
    """Ask a search's study for its next trials (or finish it); one advance per search at a time."""
    from workers import search

    return search.advance(int(search_id))


@shared_task(
    name="workers.run_codistill_group",
    bind=True,
    acks_late=True,
    reject_on_worker_lost=True,
    ignore_result=True,
)
def run_codistill_group(self, experiment_id: int, group: int) -> str:
    """One group of a codistillation with placement "workers"; see workers/codistill.py."""
    from workers import codistill

    return codistill.run_group(int(experiment_id), int(group), hostname=self.request.hostname or "")


@shared_task(name="workers.ingest_dataset", ignore_result=True, acks_late=False)
def ingest_dataset(dataset_id: int) -> str:
    """Ingest an uploaded or imported dataset into its store; the row becomes "ready" or "failed".

    Acknowledged on receipt: a file that kills its worker (out of memory) must not be redelivered
    forever; `cleanup` restarts a row whose ingest stopped, a few times at most (see workers/ingest.py).
    A duplicate message finds the row claimed and leaves it alone.
    """
    from workers import ingest

    return ingest.run(int(dataset_id))


@shared_task(name="workers.inspect_upload", ignore_result=True, acks_late=False)
def inspect_upload(dataset_id: int) -> str:
    """The name of ingest_dataset before the dataset store: messages queued by an older version."""
    from workers import ingest

    return ingest.run(int(dataset_id))


@shared_task(name="workers.inspect_checkpoint", ignore_result=True, acks_late=False)
def inspect_checkpoint(checkpoint_id: int) -> str:
    """Inspect a large uploaded model file (TorchScript/ONNX in kd_core's sandbox); see workers/inspection.py.

    Acknowledged on receipt, like inspect_upload; `cleanup` fails rows left inspecting.
    """
    from workers import inspection

    return inspection.inspect_checkpoint(int(checkpoint_id))


@shared_task(name="workers.cleanup", ignore_result=True)
def cleanup(max_age_hours: float = 24.0) -> int:
    """Remove state folders of finished experiments and stale temp downloads; returns how many went.

    Also fails checkpoint rows left inspecting (their worker died) and restarts or fails dataset ingests
    whose worker stopped.
    """
    from workers import ingest, inspection, jobs, search

    return (
        jobs.cleanup(max_age_s=max_age_hours * 3600)
        + inspection.fail_stale_inspections()
        + ingest.sweep_stale()
        + search.sweep()
    )


@shared_task(name="workers.codistill_watchdog", ignore_result=True, acks_late=False)
def codistill_watchdog() -> int:
    """Finish spread codistillations whose remaining groups all died (see codistill.settle_abandoned)."""
    from workers import codistill

    return len(codistill.settle_abandoned())


@worker_ready.connect
def requeue_own_orphans(sender=None, **_: object) -> None:
    """A worker restarting under the same name (same container or host) requeues the jobs it was running.

    Such a job's message is unacknowledged on the broker until its visibility timeout (an hour); the
    requeue gives it a new task id so the late redelivery of the old message is dropped as stale.
    """
    hostname = getattr(sender, "hostname", "") or ""
    if not hostname:
        return
    try:
        from workers import jobs

        for experiment_id in jobs.requeue_orphans(hostname):
            log.warning(
                "requeued experiment %s, which was running on %s when it stopped", experiment_id, hostname
            )
    except Exception:  # noqa: BLE001 - a worker must start even if this check cannot run
        log.exception("could not check for orphaned jobs of %s", hostname)
