"""One job per GPU: a real Celery worker started with KD_GPUS runs one pool process per GPU, each pinned to its own.

No GPU is needed: what is checked is the worker's own account of its pool (concurrency, each process's
CUDA_VISIBLE_DEVICES, set before torch is imported there). The worker listens on a queue of its own, so it
takes no other test's jobs; Redis is REDIS_URL's (the database a helper was given) or 127.0.0.1:6379/0.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import redis

from workers.gpu import gpu_for_process, gpu_list

ROOT = Path(__file__).resolve().parents[2]


def test_kd_gpus_is_read_strictly():
    assert gpu_list("") == [] and gpu_list(" 0, 1 ,2") == ["0", "1", "2"]
    assert gpu_list("GPU-8a1b,GPU-77c0") == ["GPU-8a1b", "GPU-77c0"]
    with pytest.raises(ValueError, match="twice"):
        gpu_list("0,1,0")
    assert [gpu_for_process(i, ["3", "5"]) for i in range(3)] == ["3", "5", "3"]


def test_a_worker_runs_one_process_per_gpu_each_seeing_only_its_own(tmp_path):
    url = os.environ.get("REDIS_URL") or "redis://127.0.0.1:6379/0"
    try:
        redis.Redis.from_url(url, socket_timeout=1).ping()
    except (redis.RedisError, OSError):
        pytest.skip("no Redis")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("KD_", "DJANGO_", "CUDA_"))}
    env.update(
        DJANGO_SETTINGS_MODULE="webapp.settings", REDIS_URL=url, KD_STATE_DIR=str(tmp_path / "state"),
        MEDIA_ROOT=str(tmp_path / "media"), SECRET_KEY="gpu-worker-test", PYTHONUNBUFFERED="1",
        DATABASE_URL=f"sqlite:///{tmp_path / 'db.sqlite3'}", KD_GPUS="3,5",
    )  # fmt: skip
    log = tmp_path / "worker.log"
    queue = f"gpu-test-{uuid.uuid4().hex[:8]}"
    # --concurrency 1 on purpose: KD_GPUS decides (one process per GPU).
    cmd = [sys.executable, "-m", "celery", "-A", "webapp", "worker", "-Q", queue, "--pool", "prefork",
           "--concurrency", "1", "-n", f"{queue}@%h", "--loglevel", "INFO", "--without-gossip",
           "--without-mingle", "--without-heartbeat"]  # fmt: skip
    with open(log, "wb") as out:
        worker = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 120
        text = ""
        while time.monotonic() < deadline and worker.poll() is None:
            text = log.read_text(errors="replace")
            if len(re.findall(r"pool process \d \(pid \d+\) uses GPU", text)) >= 2 and " ready." in text:
                break
            time.sleep(0.5)
        assert worker.poll() is None, text
        assert re.search(r"concurrency:\s*2 \(prefork\)", text), text
        pinned = dict(re.findall(r"pool process (\d) \(pid \d+\) uses GPU (\S+)", text))
        assert pinned == {"0": "3", "1": "5"}, text
    finally:
        worker.send_signal(signal.SIGTERM)
        try:
            worker.wait(timeout=30)
        except subprocess.TimeoutExpired:
            worker.kill()
            worker.wait()
