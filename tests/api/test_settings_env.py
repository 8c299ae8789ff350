"""Settings from environment variables: typed helpers, start-up refused with the variable named."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from webapp.env import EnvError, env_bool, env_int, env_list, env_str

ROOT = Path(__file__).resolve().parents[2]


def test_env_helpers(monkeypatch):
    monkeypatch.setenv("KD_T_BOOL", "Yes")
    monkeypatch.setenv("KD_T_INT", " 42 ")
    monkeypatch.setenv("KD_T_LIST", "a.example, ,b.example")
    monkeypatch.delenv("KD_T_UNSET", raising=False)
    assert env_bool("KD_T_BOOL", False) is True
    assert env_bool("KD_T_UNSET", True) is True
    assert env_int("KD_T_INT", 0, minimum=1) == 42
    assert env_int("KD_T_UNSET", 7) == 7
    assert env_list("KD_T_LIST") == ["a.example", "b.example"]
    assert env_list("KD_T_UNSET", ["x"]) == ["x"]
    assert env_str("KD_T_UNSET", "dflt") == "dflt"


@pytest.mark.parametrize(
    ("call", "value", "message"),
    [
        (lambda: env_bool("KD_T", False), "maybe", "KD_T must be a boolean"),
        (lambda: env_int("KD_T", 1), "ten", "KD_T must be an integer; got 'ten'"),
        (lambda: env_int("KD_T", 1, minimum=1), "0", "KD_T must be >= 1"),
        (lambda: env_str("KD_T", "a", choices=("a", "b")), "c", "KD_T must be one of a, b"),
        (lambda: env_str("KD_T", required=True), "", "KD_T is required"),
    ],
)
def test_bad_values_name_the_variable(monkeypatch, call, value, message):
    monkeypatch.setenv("KD_T", value)
    with pytest.raises(EnvError, match=message):
        call()


def run_manage(env: dict, *args: str) -> subprocess.CompletedProcess:
    base = {
        k: v for k, v in os.environ.items() if not k.startswith(("KD_", "DJANGO_", "SECRET_KEY", "DEBUG"))
    }
    base.pop("ALLOWED_HOSTS", None)
    return subprocess.run(
        [sys.executable, "manage.py", *args],
        cwd=ROOT,
        env={**base, **env},
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_startup_refuses_bad_values_naming_them():
    result = run_manage({"KD_ENV": "production"}, "check")
    assert result.returncode != 0 and "SECRET_KEY is required" in result.stderr
    result = run_manage({"KD_ENV": "production", "SECRET_KEY": "s" * 60}, "check")
    assert result.returncode != 0 and "ALLOWED_HOSTS is required" in result.stderr
    result = run_manage({"DATABASE_URL": "nosuchdb://x"}, "check")
    assert result.returncode != 0 and "DATABASE_URL" in result.stderr
    result = run_manage({"KD_MAX_UPLOAD_MB": "lots"}, "check")
    assert result.returncode != 0 and "KD_MAX_UPLOAD_MB must be an integer" in result.stderr


def test_production_passes_check_deploy():
    env = {
        "KD_ENV": "production",
        "SECRET_KEY": "k" * 20 + "Zq8#vP2$mL5!xR9&wT4^yN7*uB1@cF6%hJ3-gD0+",
        "ALLOWED_HOSTS": "kd.example.com",
        "DATABASE_URL": "sqlite:////tmp/kd-check-deploy.sqlite3",
    }
    result = run_manage(env, "check", "--deploy", "--fail-level", "WARNING")
    assert result.returncode == 0, result.stderr
    assert "no issues" in result.stdout
