"""Shared fixtures of the API tests: users (owner, other, anonymous), their clients, tiny real files.

The job queue: creating an experiment really sends `workers.run_experiment` through Celery. With a
Redis reachable (REDIS_URL, else 127.0.0.1:6379) the broker is that server's database 15, emptied
before and after the session, so the messages can be read back and no worker on database 0 takes
them; without Redis the broker is Celery's in-memory transport. No Celery worker runs here.
"""

from __future__ import annotations

import io
import os
from urllib.parse import urlsplit, urlunsplit

import numpy as np
import pytest
import redis
from django.core.files.uploadedfile import SimpleUploadedFile
from django.test import Client

from webapp.celery import app as celery_app
from webapp.studio.models import ApiToken, Experiment

TEST_BROKER_DB = 15


def reachable_redis_url() -> str | None:
    url = os.environ.get("REDIS_URL") or "redis://127.0.0.1:6379/0"
    try:
        redis.Redis.from_url(url, socket_timeout=0.5, socket_connect_timeout=0.5).ping()
    except (redis.RedisError, OSError):
        return None
    return url


def _with_db(url: str, db: int) -> str:
    parts = urlsplit(url)
    return urlunsplit((parts.scheme, parts.netloc, f"/{db}", parts.query, parts.fragment))


@pytest.fixture(scope="session")
def broker_redis():
    """A Redis client on the test broker database, or None when the broker is in memory."""
    url = reachable_redis_url()
    if url is None:
        celery_app.conf.broker_url = "memory://"
        yield None
        return
    broker_url = _with_db(url, TEST_BROKER_DB)
    client = redis.Redis.from_url(broker_url)
    client.flushdb()
    celery_app.conf.broker_url = broker_url
    yield client
    client.flushdb()


@pytest.fixture(autouse=True)
def _isolated(settings, tmp_path, broker_redis):
    settings.MEDIA_ROOT = str(tmp_path / "media")
    # The real-Redis channel layer is exercised by the integration tests.
    settings.CHANNEL_LAYERS = {"default": {"BACKEND": "channels.layers.InMemoryChannelLayer"}}


@pytest.fixture
def owner(django_user_model):
    return django_user_model.objects.create_user("owner")


@pytest.fixture
def other(django_user_model):
    return django_user_model.objects.create_user("other")


def _logged_in(user) -> Client:
    client = Client()
    client.force_login(user)
    return client


@pytest.fixture
def owner_client(owner) -> Client:
    return _logged_in(owner)


@pytest.fixture
def other_client(other) -> Client:
    return _logged_in(other)


@pytest.fixture
def anon_client() -> Client:
    return Client()


@pytest.fixture
def owner_token(owner) -> str:
    return ApiToken.issue(owner)[1]


@pytest.fixture
def token_client(owner_token) -> Client:
    return Client(HTTP_AUTHORIZATION=f"Token {owner_token}")


def npz_bytes(n: int = 60, features: int = 4, classes: int = 3, seed: int = 0) -> bytes:
    rng = np.random.default_rng(seed)
    buffer = io.BytesIO()
    np.savez(buffer, x=rng.normal(size=(n, features)).astype(np.float32), y=np.arange(n) % classes)
    return buffer.getvalue()


def upload(name: str, content: bytes) -> SimpleUploadedFile:
    return SimpleUploadedFile(name, content, content_type="application/octet-stream")


@pytest.fixture
def make_dataset(client_for):
    """Upload a tiny NPZ through the API as `user`; returns the response JSON."""

    def make(user, name: str = "tiny", **npz) -> dict:
        response = client_for(user).post(
            "/api/datasets/", {"name": name, "file": upload("tiny.npz", npz_bytes(**npz))}
        )
        assert response.status_code == 201, response.content
        return response.json()

    return make


@pytest.fixture
def client_for():
    clients: dict[int, Client] = {}

    def get(user) -> Client:
        if user.pk not in clients:
            clients[user.pk] = _logged_in(user)
        return clients[user.pk]

    return get


@pytest.fixture
def make_experiment(make_dataset):
    """An Experiment row in a given state, as a worker would have left it (no job runs here)."""

    def make(user, status: str = Experiment.QUEUED, **fields) -> Experiment:
        dataset = fields.pop("dataset", None)
        if dataset is None:
            dataset_id = make_dataset(user)["id"]
        else:
            dataset_id = dataset
        config = {
            "kind": "train",
            "dataset": dataset_id,
            "epochs": 1,
            "model": {"arch": "mlp", "hidden": [8]},
        }
        config.update(fields.pop("config", {}))
        return Experiment.objects.create(
            owner=user,
            name=fields.pop("name", "exp"),
            kind=config["kind"],
            config=config,
            dataset_id=dataset_id,
            status=status,
            **fields,
        )

    return make
