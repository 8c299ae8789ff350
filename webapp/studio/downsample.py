"""Downsampling of metric series that keeps their shape: min and max per bucket, first and last kept."""

from __future__ import annotations

import math
from collections.abc import Sequence

# A point is (step, value) or (step, value, time); only the value decides which points stay.
Point = Sequence[float]


def downsample(points: Sequence[Point], max_points: int) -> list[Point]:
    """At most `max_points` points of a step-ordered series, chosen so spikes and dips survive.

    The first and last points always stay. The points between are cut into equal buckets, and each
    bucket keeps its lowest and highest value in step order, so a plotted curve keeps its envelope
    (unlike every-k-th sampling, which can miss a loss spike entirely). Non-finite values (a diverged
    loss) are never chosen over finite ones, but a bucket of only non-finite values keeps one.
    """
    n = len(points)
    if max_points < 2:
        raise ValueError("max_points must be at least 2")
    if n <= max_points:
        return list(points)
    inner = points[1:-1]
    buckets = (max_points - 2) // 2
    if buckets == 0:
        return [points[0], points[-1]]
    out: list[Point] = [points[0]]
    size = len(inner) / buckets
    for b in range(buckets):
        chunk = inner[int(b * size) : int((b + 1) * size)]
        if not chunk:
            continue
        finite = [i for i, p in enumerate(chunk) if math.isfinite(p[1])]
        if not finite:
            out.append(chunk[0])
            continue
        lo = min(finite, key=lambda i: chunk[i][1])
        hi = max(finite, key=lambda i: chunk[i][1])
        for i in sorted({lo, hi}):
            out.append(chunk[i])
    out.append(points[-1])
    return out
