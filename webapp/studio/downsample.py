"""Metric series read from the database, downsampled there: min and max per step bucket, first and last kept.

`series_points` is what the API uses: the database buckets each long series by step and keeps each
bucket's lowest and highest value, so at most `max_points` rows per series ever reach Python, and
series under the limit are read in keyset pages. The SQL is plain window functions and integer
arithmetic, the same on SQLite (3.25+) and PostgreSQL. `downsample` is the same rule over a list
already in memory.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

from django.db import connection
from django.db.models import Count, Max, Min

from webapp.studio.models import MetricPoint

# A point is (step, value) or (step, value, time); only the value decides which points stay.
Point = Sequence[float]
# Rows per query while a series is read whole.
PAGE = 5000
# Largest finite double: NaN (PostgreSQL) and +-inf fall outside, in either database.
_DBL_MAX = "1.7976931348623157e308"


def series_stats(
    experiment_id: int, *, since: int | None = None, names=None
) -> list[tuple[str, int, int, int]]:
    """(name, points, first step, last step) of each series after step `since`, by name (one index scan)."""
    rows = MetricPoint.objects.filter(experiment_id=experiment_id)
    if since is not None:
        rows = rows.filter(step__gt=since)
    if names:
        rows = rows.filter(name__in=names)
    return list(
        rows.values("name")
        .annotate(n=Count("id"), lo=Min("step"), hi=Max("step"))
        .order_by("name")
        .values_list("name", "n", "lo", "hi")
    )


def series_points(
    experiment_id: int,
    *,
    since: int | None = None,
    names=None,
    max_points: int | None = None,
    with_time: bool = False,
) -> Iterator[tuple[str, list[tuple]]]:
    """(name, a page of (step, value[, time]) points) in name then step order, pages of at most PAGE.

    A series over `max_points` comes as one page from `_bucketed`; others are read page by page, so
    a caller that streams never holds more than a page.
    """
    for name, n, lo, hi in series_stats(experiment_id, since=since, names=names):
        if max_points is not None and n > max_points:
            yield name, _bucketed(experiment_id, name, lo, hi, max_points, with_time)
            continue
        yield from ((name, page) for page in _pages(experiment_id, name, since, with_time))


def _pages(experiment_id: int, name: str, since: int | None, with_time: bool) -> Iterator[list[tuple]]:
    fields = ("step", "value", "time") if with_time else ("step", "value")
    last = since
    while True:
        rows = MetricPoint.objects.filter(experiment_id=experiment_id, name=name)
        if last is not None:
            rows = rows.filter(step__gt=last)
        page = list(rows.order_by("step").values_list(*fields)[:PAGE])
        if page:
            yield page
        if len(page) < PAGE:
            return
        last = page[-1][0]


def _bucketed(
    experiment_id: int, name: str, lo: int, hi: int, max_points: int, with_time: bool
) -> list[tuple]:
    """At most `max_points` points of one series (steps lo..hi), chosen by the database.

    The first and last steps stay; the steps between are cut into (max_points - 2) // 2 equal step
    ranges, each keeping its lowest and highest finite value (ties: the earlier step). A bucket with
    no finite value keeps its extremes all the same, so a diverged run still shows where it went.
    """
    buckets = (max_points - 2) // 2
    table = connection.ops.quote_name(MetricPoint._meta.db_table)
    time = connection.ops.quote_name("time")  # a keyword in PostgreSQL's grammar
    time_column = f", {time}" if with_time else ""
    # Every parameter is cast to BIGINT so that '/' divides integers in PostgreSQL as in SQLite.
    sql = f"""
        SELECT step, value{time_column} FROM (
            SELECT step, value, {time}, k,
                ROW_NUMBER() OVER (PARTITION BY k ORDER BY bad, value, step) AS r_lo,
                ROW_NUMBER() OVER (PARTITION BY k ORDER BY bad, value DESC, step) AS r_hi
            FROM (
                SELECT step, value, {time},
                    CASE WHEN step = CAST(%s AS BIGINT) OR step = CAST(%s AS BIGINT) THEN -1
                         ELSE ((step - CAST(%s AS BIGINT) - 1) * CAST(%s AS BIGINT)) / CAST(%s AS BIGINT)
                    END AS k,
                    CASE WHEN value >= -{_DBL_MAX} AND value <= {_DBL_MAX} THEN 0 ELSE 1 END AS bad
                FROM {table}
                WHERE experiment_id = %s AND name = %s AND step >= CAST(%s AS BIGINT)
                    AND step <= CAST(%s AS BIGINT)
            ) AS bucketed
        ) AS ranked
        WHERE k = -1 OR r_lo = 1 OR r_hi = 1
        ORDER BY step
    """  # noqa: S608 - the only interpolations are the table name and constants, never user input
    params = [lo, hi, lo, buckets, hi - lo - 1, experiment_id, name, lo, hi]
    with connection.cursor() as cursor:
        cursor.execute(sql, params)
        return [tuple(row) for row in cursor.fetchall()]


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
