"""workers/sink.py DbChannelSink against the test database: rows once each, batched live messages."""

import pytest

from webapp.studio.models import MetricPoint
from workers.sink import DbChannelSink, live_message

pytestmark = pytest.mark.django_db


def test_rows_written_once_even_when_a_step_is_logged_again(owner, make_experiment):
    experiment = make_experiment(owner, status="running")
    sink = DbChannelSink(experiment.pk, flush_every=3600)
    for step in range(5):
        sink.log(step, {"loss": 1.0 / (step + 1), "acc": step / 10, "bad": float("nan")})
    sink.flush()
    sink.log(3, {"loss": 99.0, "acc": 99.0})  # a resumed job logs a step again: the first value stays
    sink.close()
    rows = MetricPoint.objects.filter(experiment=experiment)
    assert rows.count() == 10
    assert rows.get(name="loss", step=3).value == pytest.approx(0.25)
    assert not rows.filter(name="bad").exists()


def test_one_live_message_per_flush():
    assert live_message([(7, {"a": 1.0}, 5.0)]) == {
        "type": "metric",
        "step": 7,
        "values": {"a": 1.0},
        "time": 5.0,
    }
    assert live_message([(1, {"a": 1.0}, 5.0), (2, {"a": 2.0}, 6.0)]) == {
        "type": "metrics",
        "points": [
            {"step": 1, "values": {"a": 1.0}, "time": 5.0},
            {"step": 2, "values": {"a": 2.0}, "time": 6.0},
        ],
    }


def test_live_messages_are_numbered_and_a_late_backlog_is_not_announced(owner, make_experiment, monkeypatch):
    """Each flush sends one message with the sink's `stream` and the next `seq`; a batch past MAX_LIVE_VALUES
    (written after a database stall) is written but not sent: its number is skipped, and the next one goes out
    at once without points, so consumers see the gap and their pages refetch."""
    import workers.sink as sink_module

    sent: list[dict] = []
    monkeypatch.setattr("webapp.studio.live.send", lambda eid, messages: sent.extend(messages))
    monkeypatch.setattr(sink_module, "MAX_LIVE_VALUES", 5)
    experiment = make_experiment(owner, status="running")
    sink = DbChannelSink(experiment.pk, flush_every=3600)
    sink.log(0, {"a": 1.0})
    sink.flush()
    for step in range(1, 4):
        sink.log(step, {"a": 1.0, "b": 2.0})
    sink.flush()
    sink.log(4, {"a": 1.0})
    sink.close()
    assert [(m["seq"], len(m.get("points", [m]))) for m in sent] == [(0, 1), (2, 0), (3, 1)]
    assert {m["stream"] for m in sent} == {sink.stream} and sink.live_dropped == 1
    assert MetricPoint.objects.filter(experiment=experiment).count() == 8


def test_a_bounded_write_restores_the_connection_lock_wait(owner, make_experiment):
    """A periodic write bounds its lock wait (PostgreSQL lock_timeout, SQLite busy_timeout) for itself only."""
    from django.db import connection

    from workers.sink import write_points

    query = (
        "SELECT current_setting('lock_timeout')"
        if connection.vendor == "postgresql"
        else "PRAGMA busy_timeout"
    )
    experiment = make_experiment(owner, status="running")
    with connection.cursor() as cursor:
        cursor.execute(query)
        before = cursor.fetchone()[0]
        write_points(experiment.pk, [("a", 1, 1.0, 0.0), ("a", 2, 2.0, 0.0)], timeout_s=0.5)
        cursor.execute(query)
        assert cursor.fetchone()[0] == before
    assert MetricPoint.objects.filter(experiment=experiment).count() == 2
