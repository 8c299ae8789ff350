"""DbChannelSink: the trainer's metrics go to MetricPoint rows and the experiment's channel group, in batches."""

from __future__ import annotations

import math
import time
from collections.abc import Mapping
from typing import Any


class DbChannelSink:
    """kd_core's MetricsSink for a worker.

    `log` buffers; about every `flush_every` seconds the buffer becomes one bulk insert of MetricPoint rows
    (conflicts ignored, so a step logged again after a resume is harmless) followed by one
    `{"type": "metric", "step", "values", "time"}` message per step to group `experiment-<id>`. Rows are
    written before messages are sent, so a client that reads `/metrics/` and then listens sees no gap.
    `status` updates Experiment.progress/eta_s at most every `status_every` seconds
    (Experiment.report_progress). Messages go through webapp/studio/live.py, the one sender.

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
        flush_every: float = 0.5,
        status_every: float = 1.0,
        lease: Any = None,
    ) -> None:
        self.experiment_id = experiment_id
        self.lease = lease
        self.flush_every = flush_every
        self.status_every = status_every
        self._pending: list[tuple[int, dict[str, float], float]] = []
        self._last_flush = time.monotonic()
        self._last_status = 0.0
        self._status: tuple[float, float | None] | None = None
        self._status_dirty = False
        self.rows_written = 0
        self.closed = False

    def log(self, step: int, values: Mapping[str, float]) -> None:
        clean = {str(k): float(v) for k, v in values.items() if v is not None and math.isfinite(float(v))}
        if clean:
            self._pending.append((int(step), clean, time.time()))
        if time.monotonic() - self._last_flush >= self.flush_every:
            self.flush()

    def status(self, progress: float, eta_s: float | None) -> None:
        progress = min(max(float(progress), 0.0), 1.0)
        eta = None if eta_s is None or not math.isfinite(eta_s) else max(float(eta_s), 0.0)
        self._status = (progress, eta)
        self._status_dirty = True
        if time.monotonic() - self._last_status >= self.status_every:
            self._write_status()
        if self._pending and time.monotonic() - self._last_flush >= self.flush_every:
            self.flush()

    def flush(self) -> None:
        """Write buffered rows, then announce them."""
        self._last_flush = time.monotonic()
        if self.lease is not None and self.lease.lost:
            self._pending = []
            self.lease.check()
        if not self._pending:
            return
        from webapp.studio.live import send
        from webapp.studio.models import MetricPoint

        batch, self._pending = self._pending, []
        rows = [
            MetricPoint(experiment_id=self.experiment_id, name=name, step=step, value=value, time=t)
            for step, values, t in batch
            for name, value in values.items()
        ]
        MetricPoint.objects.bulk_create(rows, ignore_conflicts=True, batch_size=500)
        self.rows_written += len(rows)
        send(
            self.experiment_id,
            [{"type": "metric", "step": step, "values": values, "time": t} for step, values, t in batch],
        )

    def _write_status(self) -> None:
        if self._status is None or not self._status_dirty:
            return
        from webapp.studio.models import Experiment

        self._last_status = time.monotonic()
        self._status_dirty = False
        progress, eta = self._status
        token = self.lease.token if self.lease is not None else None
        Experiment.report_progress(self.experiment_id, progress, eta, token=token)

    def close(self) -> None:
        """Flush what is left; safe to call twice."""
        if self.closed:
            return
        if self.lease is not None and self.lease.lost:
            self._pending, self._status, self.closed = [], None, True
            return
        self.flush()
        self._write_status()
        self.closed = True
