"""Dataset ingestion on a worker: an upload or an import becomes a store; stale ingests restarted or failed.

One writer per dataset: an attempt claims the row with a fresh token (a conditional UPDATE from no token),
so a duplicate or redelivered message finds it held and leaves. The attempt writes its own store folder
(`<store_folder>/<token>`), reports progress and a heartbeat under its token, and records the store only
while it still holds the row; an attempt that finds the row gone (deleted meanwhile) or taken over stops and
removes what it wrote. A worker killed mid-ingest leaves a row whose heartbeat goes stale: `sweep_stale`
(run by `workers.cleanup`) clears the claim, removes the partial files and enqueues the ingest again, and
after KD_MAX_ATTEMPTS claims fails the dataset saying so. A row is ready only with its whole store.

Datasets uploaded before the store existed (ready, an upload, no store) are converted by the same task when
first used (`webapp.studio.dataset_index.ensure_store` enqueues it): the row stays ready throughout (jobs keep
reading the upload), is claimed and heartbeats like an ingest, and gets its store in one conditional UPDATE.
The upload is then deleted, or, while a queued or running experiment may still read it, by a later sweep.
A file the store refuses leaves the row ready with the reason in `error`; a killed conversion is restarted.
"""

from __future__ import annotations

import datetime
import logging
import threading
import time
import uuid
from pathlib import PurePath
from typing import Any

from django.conf import settings
from django.db import connection
from django.db.models import F, Q
from django.utils import timezone

log = logging.getLogger(__name__)

PROGRESS_EVERY_S = 0.5  # at most two progress writes a second, whatever the store reports
HEARTBEAT_EVERY_S = 20.0  # a sign of life even while the store reports no progress
# An ingest message not taken for this long is sent again (a duplicate finds the row claimed: harmless).
UNCLAIMED_AFTER_S = 3600.0


class Attempt:
    """This delivery's hold on an ingesting row: progress writes, heartbeat thread, `should_stop`."""

    def __init__(self, dataset_id: int, token: str, converting: bool = False) -> None:
        self.dataset_id, self.token = dataset_id, token
        self.converting = converting  # a ready row being given its store: its progress stays 1
        self.lost = False
        self._last_progress = 0.0
        self._last_check = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name=f"ingest-{dataset_id}", daemon=True)

    def _rows(self):
        from webapp.studio.models import Dataset

        status = Dataset.READY if self.converting else Dataset.INGESTING
        return Dataset.objects.filter(pk=self.dataset_id, status=status, ingest_token=self.token)

    def progress(self, fraction: float) -> None:
        now = time.monotonic()
        if self.lost or now - self._last_progress < PROGRESS_EVERY_S:
            return
        self._last_progress = self._last_check = now
        value = min(max(float(fraction), 0.0), 0.999)  # 1.0 means ready, written with the store
        fields = {} if self.converting else {"progress": value}
        if not self._rows().update(heartbeat=timezone.now(), **fields):
            self.lost = True

    def should_stop(self) -> bool:
        """True once the row is deleted, settled or taken over; reads it at most every half second."""
        now = time.monotonic()
        if not self.lost and now - self._last_check >= PROGRESS_EVERY_S:
            self._last_check = now
            self.lost = not self._rows().exists()
        return self.lost

    def _beat(self) -> None:
        try:
            while not self._stop.wait(HEARTBEAT_EVERY_S) and not self.lost:
                try:
                    if not self._rows().update(heartbeat=timezone.now()):
                        self.lost = True
                except Exception:  # noqa: BLE001 - a database blip: the next beat tries again
                    log.warning("dataset %s: heartbeat not written", self.dataset_id, exc_info=True)
        finally:
            connection.close()  # this thread's own connection

    def __enter__(self) -> Attempt:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=10)


def claim(dataset_id: int) -> str | None:
    """Take an unclaimed ingesting row for this delivery; its token, or None when gone/settled/held."""
    from webapp.studio.models import Dataset

    token = uuid.uuid4().hex
    claimed = Dataset.objects.filter(pk=dataset_id, status=Dataset.INGESTING, ingest_token="").update(
        ingest_token=token, heartbeat=timezone.now(), attempts=F("attempts") + 1, progress=0.0
    )
    return token if claimed else None


def run(dataset_id: int) -> str:
    """Ingest one dataset row into its store; returns "ready", "failed", "stopped", "busy" or "gone"."""
    from kd_core.data.store import IngestStopped
    from kd_core.errors import Cancelled, DatasetError
    from webapp.studio import imports, services, stores
    from webapp.studio.models import Dataset
    from webapp.studio.storage import local_path

    row = Dataset.objects.filter(pk=dataset_id).first()
    if row is not None and row.status == Dataset.READY and not row.store and row.file:
        return convert(row)
    if row is None or row.status != Dataset.INGESTING:
        return "gone"  # deleted meanwhile, or already settled (a redelivered message)
    token = claim(dataset_id)
    if token is None:
        return "busy" if Dataset.objects.filter(pk=dataset_id, status=Dataset.INGESTING).exists() else "gone"
    store = f"{row.store_folder}/{token}"
    shown = PurePath(row.import_path or row.file.name).name
    attempt = Attempt(dataset_id, token)
    try:
        with attempt:
            if row.import_path:
                source = imports.resolve(row.import_path)  # again: the tree may have changed
                if source.format != "folder":
                    open(source.path, "rb").close()  # unreadable: say so, not "not an NPZ archive"
                summary, size = stores.ingest_to_storage(
                    source.path, store, options=row.options or {}, progress=attempt.progress,
                    should_stop=attempt.should_stop,
                )  # fmt: skip
            else:
                with local_path(row.file) as path:
                    summary, size = stores.ingest_to_storage(
                        path, store, options=row.options or {}, progress=attempt.progress,
                        should_stop=attempt.should_stop,
                    )  # fmt: skip
        problem = _over_quota(row, size)
        if problem:
            stores.delete_tree(store)
            services.fail_ingest(dataset_id, problem, token=token)
            return "failed"
        if services.finish_ingest(dataset_id, token, store, summary, size):
            return "ready"
        stores.delete_tree(store)  # deleted or taken over while finishing: the store is nobody's
        return "stopped"
    except Exception as exc:  # noqa: BLE001 - the row must settle whatever went wrong
        stores.delete_tree(store)
        if attempt.lost or isinstance(exc, IngestStopped | Cancelled):
            return "stopped"  # the row is gone or another attempt holds it: nothing to record
        reason = _reason(exc, shown)
        if not isinstance(exc, DatasetError | OSError):
            log.exception("ingesting dataset %s failed", dataset_id)
        services.fail_ingest(dataset_id, reason, token=token)
        return "failed"


def _legacy_rows(dataset_id: int):
    """The row while it is a ready dataset with an upload and no store (what a conversion may touch)."""
    from webapp.studio.models import Dataset

    return Dataset.objects.filter(pk=dataset_id, status=Dataset.READY, store="").exclude(file="")


def claim_conversion(dataset_id: int) -> str | None:
    """Take a ready row that has an upload but no store (and no recorded refusal); its token, or None."""
    token = uuid.uuid4().hex
    claimed = (
        _legacy_rows(dataset_id)
        .filter(ingest_token="", error="")
        .update(ingest_token=token, heartbeat=timezone.now(), attempts=F("attempts") + 1)
    )
    return token if claimed else None


def convert(row: Any) -> str:
    """Give a dataset uploaded before the store existed its store; "converted", "failed", "stopped", "busy"
    or "gone". The row stays ready throughout: jobs read its upload until the store is recorded. No quota
    check: the data was accepted when it was uploaded, and its store replaces it."""
    from kd_core.data.store import IngestStopped
    from kd_core.errors import Cancelled, DatasetError
    from webapp.studio import stores
    from webapp.studio.storage import local_path

    token = claim_conversion(row.pk)
    if token is None:
        return "busy" if _legacy_rows(row.pk).exclude(ingest_token="").exists() else "gone"
    store = f"{row.store_folder}/{token}"
    shown = PurePath(row.file.name).name
    attempt = Attempt(row.pk, token, converting=True)
    try:
        with attempt:
            with local_path(row.file) as path:
                summary, size = stores.ingest_to_storage(
                    path, store, options=row.options or {}, progress=attempt.progress,
                    should_stop=attempt.should_stop,
                )  # fmt: skip
        if finish_conversion(row.pk, token, store, summary, size):
            return "converted"
        stores.delete_tree(store)  # deleted or taken over meanwhile
        return "stopped"
    except Exception as exc:  # noqa: BLE001 - the claim must be released whatever went wrong
        stores.delete_tree(store)
        if attempt.lost or isinstance(exc, IngestStopped | Cancelled):
            return "stopped"
        if not isinstance(exc, DatasetError | OSError):
            log.exception("converting dataset %s failed", row.pk)
        # A refused file is recorded (asking again would fail the same way); anything else may pass later.
        error = (
            f"could not be converted to the dataset store: {_reason(exc, shown)}"
            if isinstance(exc, DatasetError)
            else ""
        )
        _legacy_rows(row.pk).filter(ingest_token=token).update(
            ingest_token="", heartbeat=None, error=error[:2000]
        )
        return "failed"


def finish_conversion(dataset_id: int, token: str, store: str, summary: dict[str, Any], size: int) -> bool:
    """Record the store under `token`; the upload goes now, or (in use by an active experiment) in a sweep."""
    from webapp.studio.models import Experiment
    from webapp.studio.services import jsonable
    from webapp.studio.storage import delete_quietly

    rows = _legacy_rows(dataset_id).filter(ingest_token=token)
    upload = rows.values_list("file", flat=True).first()
    if upload is None:
        return False
    # A job that resolved the upload's path may not have opened it yet: keep it while one is active.
    in_use = Experiment.objects.filter(dataset_id=dataset_id, status__in=Experiment.ACTIVE).exists()
    updated = rows.update(
        store=store, inspection=jsonable(summary), size=size, ingest_token="", heartbeat=None, error="",
        **({} if in_use else {"file": ""}),
    )  # fmt: skip
    if updated and not in_use:
        delete_quietly(upload)
    return bool(updated)


def _sweep_conversions(stale_s: float) -> int:
    """Restart conversions whose worker stopped (after KD_MAX_ATTEMPTS, record why and stop), and delete
    uploads kept for experiments that were active when their store was recorded. Returns how many."""
    from webapp.studio import services, stores
    from webapp.studio.models import Dataset, Experiment
    from webapp.studio.storage import delete_quietly

    count = 0
    stale = Dataset.objects.filter(status=Dataset.READY, store="").exclude(ingest_token="").exclude(file="")
    for row in stale.filter(heartbeat__lt=timezone.now() - datetime.timedelta(seconds=stale_s)):
        rows = _legacy_rows(row.pk).filter(ingest_token=row.ingest_token)
        if row.attempts >= int(getattr(settings, "KD_MAX_ATTEMPTS", 3)):
            error = (
                f"could not be converted to the dataset store: the conversion stopped {row.attempts} times "
                "(the worker died, perhaps out of memory)"
            )
            count += rows.update(ingest_token="", heartbeat=None, error=error)
            continue
        if rows.update(ingest_token="", heartbeat=None):
            stores.delete_tree(row.store_folder)  # no store recorded: everything under it is partial
            services.enqueue_ingest(row.pk)
            count += 1
    kept = Dataset.objects.filter(status=Dataset.READY).exclude(store="").exclude(file="")
    for pk, upload in kept.values_list("pk", "file"):
        if Experiment.objects.filter(dataset_id=pk, status__in=Experiment.ACTIVE).exists():
            continue
        if Dataset.objects.filter(pk=pk, file=upload).exclude(store="").update(file=""):
            delete_quietly(upload)
            count += 1
    return count


def _reason(exc: BaseException, shown: str) -> str:
    from kd_core.errors import DatasetError
    from webapp.studio import services

    if isinstance(exc, DatasetError):
        return services.refusal_message(shown, shown, exc)
    if isinstance(exc, OSError):
        name = PurePath(str(exc.filename or "")).name  # never the server's full path
        what = f" ({name})" if name and name != shown else ""
        return f"{shown}: the file cannot be read{what}: {exc.strerror or exc}"
    return f"{shown}: ingestion failed ({type(exc).__name__}); the administrators can find details in the worker log"


def _over_quota(row: Any, store_size: int) -> str | None:
    """The reason when the finished store would put the owner over KD_STORAGE_QUOTA_BYTES, else None."""
    from webapp.studio import services

    quota = settings.KD_STORAGE_QUOTA_BYTES
    if not quota:
        return None
    others = services.storage_used(row.owner) - (row.size or 0)  # this row counts its upload until now
    if others + store_size <= quota:
        return None
    return (
        f"storage quota exceeded: the ingested dataset takes {store_size / 1024**2:,.1f} MiB and you already "
        f"use {others / 1024**2:,.1f} MiB of {quota / 1024**2:,.1f} MiB; delete datasets, checkpoints or "
        "experiments to make room"
    )


def sweep_stale(stale_s: float | None = None, unclaimed_s: float = UNCLAIMED_AFTER_S) -> int:
    """Restart (or, after KD_MAX_ATTEMPTS claims, fail) ingests whose worker stopped; returns how many.

    A claimed row whose heartbeat is older than `stale_s` (KD_INGEST_STALE_S) lost its worker: its claim is
    cleared under the old token (so a late write of that worker changes nothing), its partial files removed,
    and the ingest enqueued again. A row never claimed for `unclaimed_s` (a lost message) is enqueued again.
    Conversions of datasets older than the store get the same restart (`_sweep_conversions`).
    """
    from webapp.studio import services, stores
    from webapp.studio.models import Dataset

    stale_s = float(settings.KD_INGEST_STALE_S if stale_s is None else stale_s)
    now = timezone.now()
    count = 0
    stale = Dataset.objects.filter(status=Dataset.INGESTING).exclude(ingest_token="")
    stale = stale.filter(heartbeat__lt=now - datetime.timedelta(seconds=stale_s))
    for row in stale:
        if row.attempts >= int(getattr(settings, "KD_MAX_ATTEMPTS", 3)):
            reason = (
                f"ingestion stopped {row.attempts} times (the worker died, perhaps out of memory); "
                "upload or import the dataset again"
            )
            count += services.fail_ingest(row.pk, reason, token=row.ingest_token)
            continue
        cleared = Dataset.objects.filter(pk=row.pk, status=Dataset.INGESTING, ingest_token=row.ingest_token)
        if cleared.update(ingest_token="", progress=0.0, heartbeat=None):
            stores.delete_tree(row.store_folder)
            services.enqueue_ingest(row.pk)
            count += 1
    waited = now - datetime.timedelta(seconds=unclaimed_s)
    lost = Dataset.objects.filter(status=Dataset.INGESTING, ingest_token="", created__lt=waited)
    lost = lost.filter(Q(heartbeat__isnull=True) | Q(heartbeat__lt=waited))
    for pk in lost.values_list("pk", flat=True):
        services.enqueue_ingest(pk)
        count += 1
    return count + _sweep_conversions(stale_s)
