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
