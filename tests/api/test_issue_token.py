"""`manage.py issue_token USERNAME [--create]`."""

import io

import pytest
from django.contrib.auth import get_user_model
from django.core.management import CommandError, call_command
from django.test import Client

pytestmark = pytest.mark.django_db


def issue(*args) -> str:
    out = io.StringIO()
    call_command("issue_token", *args, stdout=out, stderr=io.StringIO())
    return out.getvalue().strip()


def test_create_user_and_token_that_works():
    key = issue("scripted", "--create")
    assert len(key) == 40
    user = get_user_model().objects.get(username="scripted")
    assert not user.has_usable_password()
    response = Client(HTTP_AUTHORIZATION=f"Token {key}").get("/api/experiments/")
    assert response.status_code == 200 and response.json() == {"experiments": []}
    second = issue("scripted")
    assert second != key and len(second) == 40


def test_unknown_user_without_create_fails():
    with pytest.raises(CommandError, match="--create"):
        issue("nobody")
    assert not get_user_model().objects.filter(username="nobody").exists()
