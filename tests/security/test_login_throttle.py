"""Password guessing on the login page and the admin's is throttled by django-axes (username + address).

Most cases use Django's test client; the last one guesses over HTTP against the real server process.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from datetime import timedelta
from http.cookies import SimpleCookie
from pathlib import Path

import pytest
from django.test import Client

from tests.stack import start_stack

pytestmark = pytest.mark.django_db

ROOT = Path(__file__).resolve().parents[2]
PASSWORD = "the-right-password-123"
GUESSES = 30


@pytest.fixture
def alice(django_user_model):
    return django_user_model.objects.create_user("alice", password=PASSWORD)


@pytest.fixture
def admin_user(django_user_model):
    return django_user_model.objects.create_superuser("boss", password=PASSWORD)


def _login(client: Client, username: str, password: str, address: str = "127.0.0.1", path: str = "/login/"):
    return client.post(path, {"username": username, "password": password}, REMOTE_ADDR=address)


def _logged_in(client: Client) -> bool:
    return client.get("/datasets/").status_code == 200


def test_thirty_wrong_passwords_then_the_right_one_is_refused(alice, settings) -> None:
    client = Client()
    codes = [_login(client, "alice", f"guess-{i}").status_code for i in range(GUESSES)]
    limit = settings.AXES_FAILURE_LIMIT
    assert codes[: limit - 1] == [200] * (limit - 1)  # the form again, "didn't match"
    assert set(codes[limit:]) == {429}
    right = _login(client, "alice", PASSWORD)
    assert right.status_code == 429
    page = right.content.decode()
    assert "Too many failed logins" in page and "even with the right password" in page
    assert not _logged_in(client)


def test_a_few_mistakes_are_forgiven_and_reset_by_success(alice, settings) -> None:
    client = Client()
    for _ in range(2):
        for i in range(settings.AXES_FAILURE_LIMIT - 1):
            assert _login(client, "alice", f"typo-{i}").status_code == 200
        assert _login(client, "alice", PASSWORD).status_code == 302  # a success clears the count
        assert _logged_in(client)
        client.logout()


def test_the_lock_is_per_username_and_address(alice, django_user_model, settings) -> None:
    django_user_model.objects.create_user("bob", password=PASSWORD)
    attacker = Client()
    for i in range(settings.AXES_FAILURE_LIMIT + 3):
        _login(attacker, "alice", f"guess-{i}", address="203.0.113.7")
    assert _login(attacker, "alice", PASSWORD, address="203.0.113.7").status_code == 429
    # Alice from her own address, and another user from the attacker's, still log in.
    alice_client = Client()
    assert _login(alice_client, "alice", PASSWORD, address="198.51.100.2").status_code == 302
    assert _logged_in(alice_client)
    assert _login(Client(), "bob", PASSWORD, address="203.0.113.7").status_code == 302


def test_the_lock_lifts_after_the_cool_off(alice, settings) -> None:
    settings.AXES_COOLOFF_TIME = timedelta(seconds=1)
    client = Client()
    for i in range(settings.AXES_FAILURE_LIMIT):
        _login(client, "alice", f"guess-{i}")
    assert _login(client, "alice", PASSWORD).status_code == 429
    time.sleep(1.5)
    assert _login(client, "alice", PASSWORD).status_code == 302
    assert _logged_in(client)


def test_the_admin_login_is_throttled_too(admin_user, settings) -> None:
    client = Client()
    for i in range(GUESSES):
        _login(client, "boss", f"guess-{i}", path="/admin/login/")
    refused = _login(client, "boss", PASSWORD, path="/admin/login/")
    assert refused.status_code == 429 and b"Too many failed logins" in refused.content
    assert client.get("/admin/").status_code == 302  # still sent to the admin's login
    # The site's own login page shares the count: the same pair is locked there as well.
    assert _login(client, "boss", PASSWORD).status_code == 429


def test_throttle_settings_come_from_the_environment() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("KD_", "DJANGO_"))}
    code = "from django.conf import settings as s; print(s.AXES_FAILURE_LIMIT, s.AXES_COOLOFF_TIME.total_seconds())"
    run = subprocess.run(
        [sys.executable, "manage.py", "shell", "-c", code],
        cwd=ROOT, env={**env, "KD_LOGIN_FAILURE_LIMIT": "7", "KD_LOGIN_COOLOFF_S": "60"},
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.split()[-2:] == ["7", "60.0"]
    bad = subprocess.run(
        [sys.executable, "manage.py", "check"], cwd=ROOT, env={**env, "KD_LOGIN_COOLOFF_S": "soon"},
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert bad.returncode != 0 and "KD_LOGIN_COOLOFF_S must be an integer" in bad.stderr


def _form_login(url: str, username: str, password: str, headers: dict[str, str]) -> int:
    """GET the real login form for its CSRF cookie, then POST it; the status, redirects not followed."""
    with urllib.request.urlopen(url + "/login/", timeout=10) as response:
        cookies = SimpleCookie()
        for value in response.headers.get_all("Set-Cookie") or []:
            cookies.load(value)
    csrf = cookies["csrftoken"].value
    form = urllib.parse.urlencode({"username": username, "password": password, "csrfmiddlewaretoken": csrf})
    request = urllib.request.Request(
        url + "/login/", data=form.encode(), method="POST",
        headers={"Cookie": f"csrftoken={csrf}", "Content-Type": "application/x-www-form-urlencoded", **headers},
    )  # fmt: skip

    class NoRedirect(urllib.request.HTTPRedirectHandler):
        def redirect_request(self, *args, **kwargs):
            return None

    try:
        with urllib.request.build_opener(NoRedirect).open(request, timeout=10) as response:
            return response.status
    except urllib.error.HTTPError as exc:
        return exc.code


def test_a_real_server_cannot_be_fooled_by_a_forwarded_address(tmp_path) -> None:
    """Each guess claims another client address in X-Forwarded-For; the server counts the real peer."""
    stack = start_stack(tmp_path, workers=0, extra_env={"KD_HEALTHZ_MIN_WORKERS": "0"})
    try:
        stack.make_user("carol", PASSWORD)
        codes = [
            _form_login(stack.url, "carol", f"guess-{i}", {"X-Forwarded-For": f"198.51.100.{i + 1}"})
            for i in range(GUESSES)
        ]
        assert codes.count(429) >= GUESSES - 5, codes
        assert _form_login(stack.url, "carol", PASSWORD, {"X-Forwarded-For": "192.0.2.99"}) == 429
        assert stack.health()[0] == 200
    finally:
        stack.stop()
