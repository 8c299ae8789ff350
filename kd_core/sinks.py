"""The one metrics-sink interface the training loop reports to, and the sinks the engine ships."""

from __future__ import annotations

import csv
import math
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Protocol, TextIO, runtime_checkable


@runtime_checkable
class MetricsSink(Protocol):
    """Receives metric values by step and coarse progress; the caller owns its lifetime."""

    def log(self, step: int, values: Mapping[str, float]) -> None: ...

    def status(self, progress: float, eta_s: float | None) -> None: ...

    def close(self) -> None: ...


class NullSink:
    """Drops everything."""

    def log(self, step: int, values: Mapping[str, float]) -> None:
        pass

    def status(self, progress: float, eta_s: float | None) -> None:
        pass

    def close(self) -> None:
        pass


class ListSink:
    """Keeps every row in memory; for tests and for small callers that want the series."""

    def __init__(self) -> None:
        self.rows: list[tuple[int, dict[str, float]]] = []
        self.statuses: list[tuple[float, float | None]] = []
        self.closed = False

    def log(self, step: int, values: Mapping[str, float]) -> None:
        self.rows.append((int(step), {k: float(v) for k, v in values.items()}))

    def status(self, progress: float, eta_s: float | None) -> None:
        self.statuses.append((float(progress), eta_s))

    def close(self) -> None:
        self.closed = True

    def names(self) -> set[str]:
        return {name for _, values in self.rows for name in values}

    def series(self, name: str) -> list[tuple[int, float]]:
        return [(step, values[name]) for step, values in self.rows if name in values]


class CsvSink:
    """Writes `name,step,value` rows, the same layout as the REST API's `?format=csv`."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file: TextIO | None = self.path.open("w", newline="")
        self._writer = csv.writer(self._file)
        self._writer.writerow(["name", "step", "value"])

    def log(self, step: int, values: Mapping[str, float]) -> None:
        if self._file is None:
            return
        for name, value in values.items():
            self._writer.writerow([name, int(step), repr(float(value))])

    def status(self, progress: float, eta_s: float | None) -> None:
        if self._file is not None:
            self._file.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def flush_sink(sink: MetricsSink) -> None:
    """Store what a buffering sink holds, where it has a `flush` (not part of MetricsSink).

    Called right before a resumable checkpoint is written, so the checkpoint never runs ahead of the
    stored series and a resumed run leaves no gap in it.
    """
    flush = getattr(sink, "flush", None)
    if callable(flush):
        flush()


class MultiSink:
    """Fans every call out to several sinks."""

    def __init__(self, *sinks: MetricsSink) -> None:
        self.sinks = list(sinks)

    def log(self, step: int, values: Mapping[str, float]) -> None:
        for sink in self.sinks:
            sink.log(step, values)

    def status(self, progress: float, eta_s: float | None) -> None:
        for sink in self.sinks:
            sink.status(progress, eta_s)

    def flush(self) -> None:
        for sink in self.sinks:
            flush_sink(sink)

    def close(self) -> None:
        for sink in self.sinks:
            sink.close()


class ProgressBarSink:
    """A tqdm bar on stderr for the CLI, showing progress and the latest loss and accuracy."""

    _SHOWN = ("train/loss", "val/acc", "val/agreement")

    def __init__(self, description: str = "training", file: TextIO | None = None) -> None:
        from tqdm import tqdm

        self._bar = tqdm(
            total=1000,
            desc=description,
            file=file or sys.stderr,
            leave=True,
            # Progress arrives as a fraction: show percent and time, not a count of "units".
            bar_format="{desc}: {percentage:3.0f}%|{bar}| {elapsed}<{remaining}{postfix}",
        )
        self._postfix: dict[str, str] = {}

    def log(self, step: int, values: Mapping[str, float]) -> None:
        changed = False
        for name in self._SHOWN:
            value = values.get(name)
            if value is not None and math.isfinite(value):
                self._postfix[name.split("/")[-1] if name != "train/loss" else "loss"] = f"{value:.4f}"
                changed = True
        if changed:
            self._bar.set_postfix(self._postfix, refresh=False)

    def status(self, progress: float, eta_s: float | None) -> None:
        target = int(round(min(max(progress, 0.0), 1.0) * 1000))
        if target > self._bar.n:
            self._bar.update(target - self._bar.n)

    def close(self) -> None:
        self._bar.close()
