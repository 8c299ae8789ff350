"""GET /api/experiments/{id}/metrics/ and the downsampling behind ?max_points=."""

import csv
import io
import math
import time

import pytest

from webapp.studio.downsample import downsample
from webapp.studio.models import MetricPoint


def add_points(experiment, name, values, t0=1_700_000_000.0):
    MetricPoint.objects.bulk_create(
        [
            MetricPoint(experiment=experiment, name=name, step=i, value=v, time=t0 + i)
            for i, v in enumerate(values)
        ]
    )


@pytest.mark.django_db
def test_series_as_json(owner, make_experiment, owner_client):
    experiment = make_experiment(owner)
    add_points(experiment, "train_loss", [2.0, 1.5, 1.0])
    add_points(experiment, "val_acc", [0.1, 0.5, 0.7])
    body = owner_client.get(f"/api/experiments/{experiment.pk}/metrics/").json()
    assert body["series"] == {
        "train_loss": [[0, 2.0], [1, 1.5], [2, 1.0]],
        "val_acc": [[0, 0.1], [1, 0.5], [2, 0.7]],
    }
    assert body["last_step"] == 2


@pytest.mark.django_db
def test_with_time_since_and_names(owner, make_experiment, owner_client):
    experiment = make_experiment(owner)
    add_points(experiment, "train_loss", [2.0, 1.5, 1.0])
    add_points(experiment, "val_acc", [0.1, 0.5, 0.7])
    url = f"/api/experiments/{experiment.pk}/metrics/"
    body = owner_client.get(url, {"with_time": 1, "since": 0, "names": "val_acc"}).json()
    assert body["series"] == {"val_acc": [[1, 0.5, 1_700_000_001.0], [2, 0.7, 1_700_000_002.0]]}


@pytest.mark.django_db
def test_repeated_write_is_harmless(owner, make_experiment):
    experiment = make_experiment(owner)
    add_points(experiment, "loss", [1.0, 2.0])
    MetricPoint.objects.bulk_create(
        [MetricPoint(experiment=experiment, name="loss", step=1, value=2.0, time=0.0)], ignore_conflicts=True
    )
    assert MetricPoint.objects.filter(experiment=experiment).count() == 2


@pytest.mark.django_db
def test_non_finite_values_are_null_in_json(owner, make_experiment, owner_client):
    experiment = make_experiment(owner)
    add_points(experiment, "train_loss", [1.0, math.inf])
    body = owner_client.get(f"/api/experiments/{experiment.pk}/metrics/").json()
    assert body["series"]["train_loss"] == [[0, 1.0], [1, None]]


@pytest.mark.django_db
def test_csv(owner, make_experiment, owner_client):
    experiment = make_experiment(owner, name="csv run")
    add_points(experiment, "train_loss", [2.0, 1.5])
    response = owner_client.get(f"/api/experiments/{experiment.pk}/metrics/?format=csv")
    assert response.status_code == 200
    assert response["Content-Type"].startswith("text/csv")
    assert f"csv-run-{experiment.pk}-metrics.csv" in response["Content-Disposition"]
    assert response.streaming  # a page of rows at a time, never the whole export in memory
    rows = list(csv.reader(io.StringIO(response.getvalue().decode())))
    assert rows == [["name", "step", "value"], ["train_loss", "0", "2.0"], ["train_loss", "1", "1.5"]]


@pytest.mark.django_db
def test_max_points_downsamples_each_series(owner, make_experiment, owner_client):
    experiment = make_experiment(owner)
    values = [math.sin(i / 50) for i in range(2000)]
    values[1234] = 50.0  # a spike that every-k-th sampling would likely drop
    add_points(experiment, "train_loss", values)
    add_points(experiment, "val_acc", [0.5] * 10)
    body = owner_client.get(f"/api/experiments/{experiment.pk}/metrics/?max_points=100").json()
    loss = body["series"]["train_loss"]
    assert len(loss) <= 100
    assert loss[0] == [0, values[0]] and loss[-1] == [1999, values[-1]]
    assert [1234, 50.0] in loss
    assert len(body["series"]["val_acc"]) == 10
    assert owner_client.get(f"/api/experiments/{experiment.pk}/metrics/?max_points=1").status_code == 400
    assert owner_client.get(f"/api/experiments/{experiment.pk}/metrics/?max_points=x").status_code == 400
    assert owner_client.get(f"/api/experiments/{experiment.pk}/metrics/?format=xml").status_code == 400


@pytest.mark.django_db
def test_other_users_metrics_404(other, make_experiment, owner_client):
    experiment = make_experiment(other)
    assert owner_client.get(f"/api/experiments/{experiment.pk}/metrics/").status_code == 404


def test_downsample_100k_points_keeps_shape():
    n = 100_000
    points = [
        (i, math.sin(i / 3000) + (5.0 if i == 54_321 else 0.0) - (5.0 if i == 77_777 else 0.0))
        for i in range(n)
    ]
    started = time.perf_counter()
    out = downsample(points, 1000)
    elapsed = time.perf_counter() - started
    assert len(out) <= 1000
    assert out[0] == points[0] and out[-1] == points[-1]
    steps = [p[0] for p in out]
    assert steps == sorted(steps) and len(set(steps)) == len(steps)
    # The envelope survives: the global max and min, including both spikes, are kept.
    assert max(p[1] for p in out) == max(p[1] for p in points)
    assert min(p[1] for p in out) == min(p[1] for p in points)
    assert points[54_321] in out and points[77_777] in out
    # Every bucket of the original is represented: no gap wider than two buckets' worth of steps.
    assert max(b - a for a, b in zip(steps, steps[1:])) <= 2 * n / 499
    assert elapsed < 5  # generous: a sanity bound for the request path, not a benchmark


def test_downsample_edge_cases():
    assert downsample([(0, 1.0), (1, 2.0)], 10) == [(0, 1.0), (1, 2.0)]
    assert downsample([(i, float(i)) for i in range(10)], 3) == [(0, 0.0), (9, 9.0)]
    nan = float("nan")
    out = downsample([(0, 1.0)] + [(i, nan) for i in range(1, 50)] + [(50, 2.0)], 4)
    assert out[0] == (0, 1.0) and out[-1] == (50, 2.0) and len(out) <= 4
    with pytest.raises(ValueError):
        downsample([(0, 1.0)], 1)
