"""DbChannelSink: the trainer's metrics go to MetricPoint rows and the experiment's channel group, in batches."""

from __future__ import annotations

import logging
import math
import secrets
import time
from collections.abc import Mapping
from typing import Any

log = logging.getLogger(__name__)

# Rows waiting for a database that refuses writes: past this many the sink stops the trainer and retries until
# the write succeeds (rows are never dropped; memory stays bounded because the trainer waits).
MAX_BUFFERED_ROWS = 200_000
# A periodic write waits at most this long for a lock (a locked table) before the trainer goes on; the
# rows stay buffered and the next try comes after RETRY_FIRST_S, doubling up to RETRY_MAX_S.
WRITE_TIMEOUT_S = 1.0
RETRY_FIRST_S = 0.5
RETRY_MAX_S = 5.0
# How long the sink keeps retrying a stalled database before it gives up and fails the job.
STALL_GIVE_UP_S = 600.0
# A batch with more values than this (a database stall's backlog) is not announced live: one message that large
# would cost every watcher's socket a multi-megabyte frame. Its rows are written; the skipped sequence number
# (see DbChannelSink) tells each consumer its clients missed points: they reconnect and read /metrics/.
MAX_LIVE_VALUES = 20_000


def flush_interval() -> float:
    """Seconds between flushes: settings.KD_SINK_FLUSH_MS (default 150 ms: live p95 under 250 ms)."""
    from django.conf import settings

    return max(0.02, getattr(settings, "KD_SINK_FLUSH_MS", 150) / 1000.0)


def write_points(
    experiment_id: int, rows: list[tuple[str, int, float, float]], *, timeout_s: float | None = None
) -> None:
    """Insert (name, step, value, time) rows of one experiment in one statement; existing steps are kept.

    On PostgreSQL one `INSERT ... SELECT FROM unnest(arrays) ON CONFLICT DO NOTHING` (one round trip and
    one parse whatever the batch size; measured in bench/bench_fleet.py); elsewhere Django's bulk_create.
    `timeout_s`: give up (a DatabaseError) after waiting this long for a lock, e.g. on a locked table
    (PostgreSQL lock_timeout for this statement, SQLite busy_timeout for this write).
    """
    from django.db import connection, transaction

    from webapp.studio.models import MetricPoint

    if not rows:
        return
    if connection.vendor == "postgresql":
        names, steps, values, times = (list(col) for col in zip(*rows))
        table = connection.ops.quote_name(MetricPoint._meta.db_table)
        insert = (
            f"INSERT INTO {table} (experiment_id, name, step, value, time) "
            "SELECT %s, * FROM unnest(%s::varchar[], %s::bigint[], %s::float8[], %s::float8[]) "
            "ON CONFLICT DO NOTHING"
        )
        params = [experiment_id, names, steps, values, times]
        if timeout_s is None:
            with connection.cursor() as cursor:
                cursor.execute(insert, params)
            return
        # The lock wait is bounded for this transaction only (SET LOCAL); inside a caller's transaction the
        # setting is put back after. A large batch on a busy server may still take its time.
        nested = connection.in_atomic_block
        with transaction.atomic(), connection.cursor() as cursor:
            if nested:
                cursor.execute("SELECT current_setting('lock_timeout')")
                before = cursor.fetchone()[0]
            cursor.execute(f"SET LOCAL lock_timeout = {int(timeout_s * 1000)}")
            cursor.execute(insert, params)
            if nested:
                cursor.execute("SELECT set_config('lock_timeout', %s, true)", [before])
        return
    objs = [MetricPoint(experiment_id=experiment_id, name=n, step=s, value=v, time=t) for n, s, v, t in rows]
    if timeout_s is None or connection.vendor != "sqlite":
        MetricPoint.objects.bulk_create(objs, ignore_conflicts=True, batch_size=500)
        return
    connection.ensure_connection()
    with connection.cursor() as cursor:
        cursor.execute("PRAGMA busy_timeout")
        before = cursor.fetchone()[0]
        cursor.execute(f"PRAGMA busy_timeout = {int(timeout_s * 1000)}")
        try:
            MetricPoint.objects.bulk_create(objs, ignore_conflicts=True, batch_size=500)
        finally:
            cursor.execute(f"PRAGMA busy_timeout = {int(before)}")


def live_message(batch: list[tuple[int, dict[str, float], float]]) -> dict[str, Any]:
    """One step: the documented `{"type":"metric","step","values","time"}`; several: one
    `{"type":"metrics","points":[{"step","values","time"}, ...]}` (one channel message per flush)."""
    if len(batch) == 1:
        step, values, t = batch[0]
        return {"type": "metric", "step": step, "values": values, "time": t}
    return {"type": "metrics", "points": [{"step": s, "values": v, "time": t} for s, v, t in batch]}


class DbChannelSink:
    """kd_core's MetricsSink for a worker.

    `log` buffers; about every `flush_every` seconds (settings.KD_SINK_FLUSH_MS, 150 ms) the buffer becomes
    one insert of MetricPoint rows (conflicts ignored, so a step logged again after a resume is harmless)
    followed by ONE live message to group `experiment-<id>` carrying every step of the batch (see
    `live_message`): the fan-out cost per socket is one message per flush, not one per step. Rows are
    written before the message is sent, so a client that reads `/metrics/` and then listens sees no gap.
    Each live message carries `stream` (this sink) and `seq` (0, 1, 2, ... per message): a consumer that sees
    a number skipped (a message lost to a Redis restart, or one this sink did not send) closes its socket
    with 4409 so the page reconnects and refetches (webapp/studio/consumers.py).
    `status` updates Experiment.progress/eta_s at most every `status_every` seconds
    (Experiment.report_progress). Messages go through webapp/studio/live.py, the one sender.

    A periodic write waits at most WRITE_TIMEOUT_S; one that fails (a locked table, a stall, a restart) keeps
    the rows buffered while training goes on, and is retried after a backoff (RETRY_FIRST_S doubling to
    RETRY_MAX_S); past MAX_BUFFERED_ROWS, and in an explicit `flush`/`close`, the trainer waits until the
    database takes them (rows are never dropped; the worker log says so). A batch written late is still
    announced, unless it passes MAX_LIVE_VALUES: then its live message is dropped (logged), its number
    skipped, and the next number sent at once with no points, so every watcher reloads what it missed.

    With a `lease` (workers/records.py), a sink whose delivery lost the job writes nothing more: `log`/`flush`
    raise LeaseLost (so the trainer never writes the checkpoint that follows a flush) and `close` drops
    what is buffered.

    The trainer calls `flush` right before it writes a resumable checkpoint: the checkpoint then never
    runs ahead of the stored series, so a job resumed after its worker died (at the step after the
    checkpoint) leaves no gap in its curves.
    """

    def __init__(
        self,
        experiment_id: int,
        *,
        flush_every: float | None = None,
        status_every: float = 1.0,
        lease: Any = None,
    ) -> None:
        self.experiment_id = experiment_id
        self.lease = lease
        self.flush_every = flush_interval() if flush_every is None else flush_every
        self.status_every = status_every
        self._pending: list[tuple[int, dict[str, float], float]] = []
        self._unwritten: list[tuple[int, dict[str, float], float]] = []  # a failed write's batch, retried
        self._last_flush = time.monotonic()
        self._last_status = 0.0
        self._status: tuple[float, float | None] | None = None
        self._status_dirty = False
        self.rows_written = 0
        self.closed = False
        self.stream = secrets.token_hex(4)
        self.seq = 0  # the next live message's number
        self.live_dropped = 0  # live messages not sent (too large): their points are read from /metrics/
        self.buffered = 0  # values logged and not yet written
        self.peak_buffered = 0
        self._retry_at = 0.0  # a stalled database: no periodic write before this (monotonic)
        self._retry_delay = RETRY_FIRST_S

    def log(self, step: int, values: Mapping[str, float]) -> None:
        clean = {str(k): float(v) for k, v in values.items() if v is not None and math.isfinite(float(v))}
        if clean:
            self._pending.append((int(step), clean, time.time()))
            self.buffered += len(clean)
            self.peak_buffered = max(self.peak_buffered, self.buffered)
        if time.monotonic() - self._last_flush >= self.flush_every:
            self._flush(wait=False)

    def status(self, progress: float, eta_s: float | None) -> None:
        progress = min(max(float(progress), 0.0), 1.0)
        eta = None if eta_s is None or not math.isfinite(eta_s) else max(float(eta_s), 0.0)
        self._status = (progress, eta)
        self._status_dirty = True
        if time.monotonic() - self._last_status >= self.status_every:
            self._write_status()
        if self._pending and time.monotonic() - self._last_flush >= self.flush_every:
            self._flush(wait=False)

    def flush(self) -> None:
        """Write every buffered row (waiting out a stalled database), then announce them in one message."""
        self._flush(wait=True)

    def _flush(self, *, wait: bool) -> None:
        self._last_flush = time.monotonic()
        if self.lease is not None and self.lease.lost:
            self._pending, self._unwritten, self.buffered = [], [], 0
            self.lease.check()
        if not self._pending and not self._unwritten:
            return
        wait = wait or self.buffered > MAX_BUFFERED_ROWS
        if not wait and time.monotonic() < self._retry_at:
            return  # the database stalled: keep buffering (bounded above) until the next try
        batch, self._pending = self._unwritten + self._pending, []
        self._unwritten = []
        rows = [(name, step, value, t) for step, values, t in batch for name, value in values.items()]
        if not self._write(rows, wait=wait):
            self._unwritten = batch
            return
        self.buffered = 0
        self.rows_written += len(rows)
        from webapp.studio.live import send

        message = live_message(batch)
        if len(rows) > MAX_LIVE_VALUES:
            # Skip this batch's number and announce the next one with no points: every consumer sees the gap now.
            self.live_dropped += 1
            self.seq += 1
            message = {"type": "metrics", "points": []}
            log.warning(
                "metrics of experiment %s: %d values written late are not sent live (bound %d); watchers "
                "reload them from /metrics/", self.experiment_id, len(rows), MAX_LIVE_VALUES,
            )  # fmt: skip
        seq, self.seq = self.seq, self.seq + 1
        send(self.experiment_id, [{**message, "stream": self.stream, "seq": seq}])

    def _write(self, rows: list[tuple[str, int, float, float]], *, wait: bool) -> bool:
        """True once written; False after one failed try (rows kept), unless `wait`: then retry until done."""
        from django.db import DatabaseError, InterfaceError, connection

        deadline = time.monotonic() + STALL_GIVE_UP_S
        delay = 0.2
        while True:
            try:
                write_points(self.experiment_id, rows, timeout_s=None if wait else WRITE_TIMEOUT_S)
                self._retry_at, self._retry_delay = 0.0, RETRY_FIRST_S
                return True
            except (DatabaseError, InterfaceError) as exc:
                # A broken connection is replaced on the next query.
                connection.close_if_unusable_or_obsolete()
                if connection.connection is not None and not connection.is_usable():
                    connection.close()
                if not wait:
                    log.warning(
                        "metrics of experiment %s: database write failed (%s); %d rows kept (bound %d), "
                        "training goes on, next try in %.1f s",
                        self.experiment_id, exc, len(rows), MAX_BUFFERED_ROWS, self._retry_delay,
                    )  # fmt: skip
                    self._retry_at = time.monotonic() + self._retry_delay
                    self._retry_delay = min(self._retry_delay * 2, RETRY_MAX_S)
                    return False
                if time.monotonic() > deadline:
                    raise
                log.warning(
                    "metrics of experiment %s: %d rows buffered (bound %d); training waits for the database",
                    self.experiment_id, len(rows), MAX_BUFFERED_ROWS,
                )  # fmt: skip
                time.sleep(delay)
                delay = min(delay * 2, 5.0)

    def _write_status(self) -> None:
        if self._status is None or not self._status_dirty:
            return
        from webapp.studio.models import Experiment

        self._last_status = time.monotonic()
        self._status_dirty = False
        progress, eta = self._status
        token = self.lease.token if self.lease is not None else None
        from django.db import DatabaseError, InterfaceError

        try:
            Experiment.report_progress(self.experiment_id, progress, eta, token=token)
        except (DatabaseError, InterfaceError) as exc:
            # Progress is superseded by the next report: keep training through a database stall.
            self._status_dirty = True
            log.warning("progress of experiment %s not recorded (%s)", self.experiment_id, exc)

    def close(self) -> None:
        """Flush what is left (waiting for the database if it must); safe to call twice."""
        if self.closed:
            return
        if self.lease is not None and self.lease.lost:
            self._pending, self._unwritten, self._status, self.closed = [], [], None, True
            return
        self.flush()
        self._write_status()
        self.closed = True
