"""GET /healthz: database, Redis and Celery workers, 503 naming whatever failed."""

import socket

import pytest

from tests.api.conftest import reachable_redis_url

pytestmark = pytest.mark.django_db


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def real_redis(settings):
    url = reachable_redis_url()
    if url is None:
        pytest.skip("no Redis reachable at REDIS_URL (default 127.0.0.1:6379)")
    settings.REDIS_URL = url
    return url


def test_healthy_without_required_workers(real_redis, settings, anon_client):
    settings.KD_HEALTHZ_MIN_WORKERS = 0
    response = anon_client.get("/healthz")
    assert response.status_code == 200
    assert response.json() == {"db": "ok", "redis": "ok", "workers": 0}


def test_no_worker_answers_is_503_naming_workers(real_redis, anon_client):
    # The tests' broker database has no worker listening.
    response = anon_client.get("/healthz")
    assert response.status_code == 503
    body = response.json()
    assert body["db"] == "ok" and body["redis"] == "ok" and body["workers"] == 0
    assert body["error"] == "unhealthy: workers"


def test_redis_down_is_503_naming_redis(settings, anon_client):
    settings.REDIS_URL = f"redis://127.0.0.1:{closed_port()}/0"
    settings.KD_HEALTHZ_MIN_WORKERS = 0
    response = anon_client.get("/healthz")
    assert response.status_code == 503
    body = response.json()
    assert body["db"] == "ok" and body["redis"].startswith("error")
    assert "redis" in body["error"]
