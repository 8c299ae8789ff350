"""docker-compose.yml and the Dockerfile run the very commands the tests and `make run` run, with production settings."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.stack import ROOT, WEB_CMD, WORKER_CMD
from webapp import localstack

yaml = pytest.importorskip("yaml")

# Options whose values are per deployment (bind address, port, queues, node name, pool size).
VARIABLE = {"--host", "--port", "-Q", "-n", "--concurrency"}


def shape(cmd: list[str]) -> list[str]:
    """The command with per-deployment option values blanked."""
    return [("*" if i and cmd[i - 1] in VARIABLE else arg) for i, arg in enumerate(cmd)]


def option(cmd: list[str], name: str) -> str:
    return cmd[cmd.index(name) + 1]


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def test_services_run_the_tested_commands(compose: dict) -> None:
    services = compose["services"]
    assert shape(services["web"]["command"]) == shape(WEB_CMD)
    assert (
        option(services["web"]["command"], "--host") == "0.0.0.0"
    )  # inside its container; published on loopback
    for name, queue in (("worker-cpu", "default"), ("worker-gpu", "gpu"), ("worker-train-cpu", "gpu")):
        cmd = services[name]["command"]
        assert shape(cmd) == shape(WORKER_CMD), name
        assert option(cmd, "-Q") == queue
    assert option(services["worker-gpu"]["command"], "--concurrency") == "1"  # one job per GPU
    # `make run` runs the same two commands.
    assert shape(localstack.WORKER_CMD) == shape(WORKER_CMD)
    assert shape(localstack.WEB_CMD) == shape(WEB_CMD)


def test_gpu_worker_reserves_a_gpu_and_uses_the_cuda_build(compose: dict) -> None:
    gpu = compose["services"]["worker-gpu"]
    devices = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert devices == [{"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}]
    assert gpu["build"]["target"] == "cuda"
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert " AS cpu" in dockerfile and " AS cuda" in dockerfile
    assert "whl/cpu" in dockerfile and "whl/${CUDA_INDEX}" in dockerfile


def test_redis_persists_and_never_evicts(compose: dict) -> None:
    cmd = compose["services"]["redis"]["command"]
    assert option(cmd, "--appendonly") == "yes"
    assert option(cmd, "--maxmemory-policy") == "noeviction"


def test_app_services_share_storage_and_production_settings(compose: dict) -> None:
    app = [n for n, s in compose["services"].items() if n.startswith(("web", "worker", "migrate"))]
    assert {"web", "worker-cpu", "worker-gpu", "migrate"} <= set(app)
    for name in app:
        service = compose["services"][name]
        assert service["volumes"] == ["${KD_STORAGE:-storage}:/data"], name
        env = service["environment"]
        assert env["KD_ENV"] == "production" and env["MEDIA_ROOT"] == "/data/media", name
        assert env["KD_STATE_DIR"] == "/data/state", name
    assert {"postgres", "redis"} <= set(compose["services"]["web"]["depends_on"])


def test_dockerignore_keeps_local_state_out() -> None:
    ignored = set((ROOT / ".dockerignore").read_text().split())
    assert {".venv", "var", "node_modules", ".git"} <= ignored
    assert Path(ROOT / "Dockerfile").exists()


def test_beat_schedules_housekeeping_once(compose: dict) -> None:
    from webapp.celery import app

    services = compose["services"]
    beat = services["beat"]["command"]
    assert beat[:4] == ["celery", "-A", "webapp", "beat"]
    assert services["beat"]["environment"] == services["worker-cpu"]["environment"]
    # Exactly one scheduler: no worker embeds beat in compose; `make run`'s single worker does.
    for name, service in services.items():
        if name.startswith("worker"):
            assert "-B" not in service["command"] and "--beat" not in service["command"], name
    assert localstack.BEAT_ARGS[0] == "-B"
    entry = app.conf.beat_schedule["cleanup"]
    assert entry["task"] == "workers.cleanup" and entry["options"]["queue"] == "default"
    assert services["worker-cpu"]["command"][services["worker-cpu"]["command"].index("-Q") + 1] == "default"


def test_passwords_are_required_never_defaulted() -> None:
    """PostgreSQL and Redis passwords, like SECRET_KEY, must be given: `${VAR:?message}`, no fallback."""
    text = (ROOT / "docker-compose.yml").read_text()
    assert "kd-change-me" not in text
    for name in ("SECRET_KEY", "POSTGRES_PASSWORD", "REDIS_PASSWORD"):
        parts = text.split("${")
        # `$${...}` is the container's own shell expanding its variable, not compose.
        uses = [
            part for before, part in zip(parts, parts[1:]) if part.startswith(name) and before[-1:] != "$"
        ]
        assert uses, name
        for use in uses:
            assert use.startswith(f"{name}:?"), f"${{{use[:60]}"


def test_the_image_runs_the_tested_web_command() -> None:
    dockerfile = (ROOT / "Dockerfile").read_text()
    start = dockerfile.index('CMD ["uvicorn"')
    cmd = json.loads(dockerfile[start + 4 : dockerfile.index("]", start) + 1].replace("\\\n", ""))
    assert shape(cmd) == shape(WEB_CMD)
