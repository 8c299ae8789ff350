"""Auth in one place: anonymous 401, token or session, CSRF for sessions only, JSON for every error."""

import pytest
from django.test import Client

from webapp.studio.models import ApiToken

pytestmark = pytest.mark.django_db

ENDPOINTS = [
    ("get", "/api/datasets/"),
    ("post", "/api/datasets/"),
    ("get", "/api/datasets/1/"),
    ("delete", "/api/datasets/1/"),
    ("get", "/api/checkpoints/"),
    ("post", "/api/checkpoints/"),
    ("get", "/api/checkpoints/1/"),
    ("get", "/api/experiments/"),
    ("post", "/api/experiments/"),
    ("get", "/api/experiments/1/"),
    ("get", "/api/experiments/1/metrics/"),
    ("post", "/api/experiments/1/cancel/"),
    ("get", "/api/experiments/1/download/"),
    ("get", "/api/compare/?ids=1"),
]


@pytest.mark.parametrize(("method", "url"), ENDPOINTS)
def test_anonymous_gets_401_json(anon_client, method, url):
    response = getattr(anon_client, method)(url)
    assert response.status_code == 401
    assert "authentication required" in response.json()["error"]


def test_token_authenticates_and_needs_no_csrf(owner, token_client, make_experiment):
    experiment = make_experiment(owner)
    assert token_client.get("/api/experiments/").json()["experiments"][0]["id"] == experiment.pk
    csrf_checking = Client(
        enforce_csrf_checks=True, HTTP_AUTHORIZATION=token_client.defaults["HTTP_AUTHORIZATION"]
    )
    response = csrf_checking.post(f"/api/experiments/{experiment.pk}/cancel/")
    assert response.status_code == 200
    assert ApiToken.objects.get(user=owner).last_used is not None


def test_bad_token_is_401_even_with_a_session(owner):
    client = Client(HTTP_AUTHORIZATION="Token " + "0" * 40)
    client.force_login(owner)
    response = client.get("/api/datasets/")
    assert response.status_code == 401 and "invalid API token" in response.json()["error"]
    assert Client(HTTP_AUTHORIZATION="Basic dXNlcjpwYXNz").get("/api/datasets/").status_code == 401


def test_inactive_users_token_is_refused(owner, owner_token):
    owner.is_active = False
    owner.save()
    assert Client(HTTP_AUTHORIZATION=f"Token {owner_token}").get("/api/datasets/").status_code == 401


def test_session_post_needs_csrf(owner, make_experiment):
    experiment = make_experiment(owner)
    client = Client(enforce_csrf_checks=True)
    client.force_login(owner)
    response = client.post(f"/api/experiments/{experiment.pk}/cancel/")
    assert response.status_code == 403 and "CSRF" in response.json()["error"]
    client.get("/api/experiments/")  # any GET is fine without a token
    client.cookies["csrftoken"] = "a" * 32
    response = client.post(f"/api/experiments/{experiment.pk}/cancel/", HTTP_X_CSRFTOKEN="a" * 32)
    assert response.status_code == 200


def test_wrong_method_and_unknown_path_are_json(owner_client):
    response = owner_client.put("/api/datasets/")
    assert response.status_code == 405 and response["Allow"] == "GET, POST"
    assert "not allowed" in response.json()["error"]
    response = owner_client.get("/api/nothing-here/")
    assert response.status_code == 404 and "no API endpoint" in response.json()["error"]
    assert "try /api/datasets/" in owner_client.get("/api/datasets").json()["error"]


def test_keys_are_stored_hashed(owner):
    token, key = ApiToken.issue(owner)
    assert len(key) == 40 and int(key, 16) >= 0
    assert key not in (token.key_hash, token.prefix + "x") and token.prefix == key[:8]
    assert ApiToken.user_for_key(key) == owner
    assert ApiToken.user_for_key(key[:-1] + ("0" if key[-1] != "0" else "1")) is None
