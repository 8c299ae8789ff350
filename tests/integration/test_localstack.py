"""`make run`'s stack (python -m webapp.localstack): starts from nothing, serves demo data, stops all on Ctrl-C."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from tests.integration.client import Api
from tests.stack import ROOT, descendants, free_port


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def _start(env: dict[str, str], log: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "webapp.localstack"], cwd=ROOT, env=env, stdout=log.open("ab"),
        stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
    )  # fmt: skip


def _wait_ready(proc: subprocess.Popen, log: Path, timeout: float = 120) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = log.read_text(errors="replace")
        if "press Ctrl-C to stop" in text:
            return text
        assert proc.poll() is None, f"localstack exited early:\n{text[-3000:]}"
        time.sleep(0.3)
    raise AssertionError(f"localstack not ready in {timeout}s:\n{log.read_text(errors='replace')[-3000:]}")


def _stop(proc: subprocess.Popen, state: Path) -> set[int]:
    started = set(descendants(proc.pid))
    record = state / "redis" / "redis.json"
    if record.exists():
        started.add(json.loads(record.read_text())["pid"])
    proc.send_signal(signal.SIGINT)
    assert proc.wait(60) == 0
    return started


def test_make_run_starts_demo_and_stops_everything(tmp_path: Path) -> None:
    state = tmp_path / "state"
    port = free_port()
    env = {k: v for k, v in os.environ.items()
           if k not in ("REDIS_URL", "DATABASE_URL", "MEDIA_ROOT") and not k.startswith(("KD_", "DJANGO_"))}  # fmt: skip
    env.update(PORT=str(port), KD_STATE_DIR=str(state), OMP_NUM_THREADS="1")
    log = tmp_path / "run.log"
    proc = _start(env, log)
    try:
        text = _wait_ready(proc, log)
        assert f"http://127.0.0.1:{port}" in text
        login = json.loads((state / "demo-login.json").read_text())
        assert f"log in as '{login['username']}' with password '{login['password']}'" in text

        token = subprocess.run(
            [sys.executable, "manage.py", "issue_token", login["username"]], cwd=ROOT, capture_output=True,
            text=True, check=True, env={**env, "KD_STATE_DIR": str(state)},
        ).stdout.strip()  # fmt: skip
        api = Api(f"http://127.0.0.1:{port}", token)
        datasets = api.get("/api/datasets/")["datasets"]
        assert [d["name"] for d in datasets] == ["digits (demo)"]
        assert datasets[0]["num_samples"] == 1797
        experiments = api.get("/api/experiments/")["experiments"]
        assert [e["name"] for e in experiments] == ["digits teacher (demo)"]
        assert experiments[0]["status"] in ("queued", "running", "succeeded")
        # The single worker embeds Celery beat, which schedules workers.cleanup.
        worker_log = state / "logs" / "worker.log"
        deadline = time.monotonic() + 20
        while "beat: Starting" not in worker_log.read_text(errors="replace") and time.monotonic() < deadline:
            time.sleep(0.3)
        assert "beat: Starting" in worker_log.read_text(errors="replace")
    finally:
        started = _stop(proc, state) if proc.poll() is None else set()
    assert started, "no child processes were seen"
    deadline = time.monotonic() + 10
    while any(_alive(p) for p in started) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not [p for p in started if _alive(p)], "processes left running after Ctrl-C"
    assert "stopped" in log.read_text()

    # A second run reuses the database, files and Redis data: no second demo dataset or teacher job.
    log = tmp_path / "run2.log"
    proc = _start(env, log)
    try:
        _wait_ready(proc, log)
        datasets = api.get("/api/datasets/")["datasets"]
        assert len(datasets) == 1
        assert len(api.get("/api/experiments/")["experiments"]) == 1
    finally:
        started = _stop(proc, state)
    time.sleep(0.5)
    assert not [p for p in started if _alive(p)]
