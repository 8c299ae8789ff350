"""GET /api/compare/?ids=: config differences, final metrics and downsampled series side by side."""

import pytest

from webapp.studio.models import Experiment, MetricPoint

pytestmark = pytest.mark.django_db


def test_compare_two(owner, make_dataset, make_experiment, owner_client):
    dataset = make_dataset(owner)["id"]
    a = make_experiment(
        owner,
        status=Experiment.SUCCEEDED,
        dataset=dataset,
        config={"temperature": 2.0, "codistill": {"replicas": 2}},
        metrics={"val_acc": 0.8},
    )
    b = make_experiment(
        owner,
        status=Experiment.SUCCEEDED,
        dataset=dataset,
        config={"temperature": 4.0, "codistill": {"replicas": 3}},
        metrics={"val_acc": 0.9},
    )
    MetricPoint.objects.bulk_create(
        [MetricPoint(experiment=a, name="val_acc", step=i, value=i / 1000, time=0) for i in range(1000)]
    )
    body = owner_client.get(f"/api/compare/?ids={a.pk},{b.pk}&max_points=50").json()
    assert [e["id"] for e in body["experiments"]] == [a.pk, b.pk]
    assert body["config_differences"] == {
        "codistill.replicas": {str(a.pk): 2, str(b.pk): 3},
        "temperature": {str(a.pk): 2.0, str(b.pk): 4.0},
    }
    assert body["metrics"] == {str(a.pk): {"val_acc": 0.8}, str(b.pk): {"val_acc": 0.9}}
    series = body["series"][str(a.pk)]["val_acc"]
    assert len(series) <= 50 and series[0] == [0, 0.0] and series[-1] == [999, 0.999]
    assert body["series"][str(b.pk)] == {}


def test_compare_errors(owner, other, make_experiment, owner_client):
    mine = make_experiment(owner)
    theirs = make_experiment(other)
    response = owner_client.get(f"/api/compare/?ids={mine.pk},{theirs.pk}")
    assert response.status_code == 404 and str(theirs.pk) in response.json()["error"]
    assert owner_client.get("/api/compare/").status_code == 400
    assert owner_client.get("/api/compare/?ids=1,x").status_code == 400
    assert owner_client.get("/api/compare/?ids=" + ",".join(str(i) for i in range(1, 30))).status_code == 400
