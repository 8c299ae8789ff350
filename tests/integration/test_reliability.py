"""Job lifecycle under faults on a real stack (own Redis with an append-only file, real Celery workers).

- the process running a job SIGKILLed three times: the job fails, naming why (KD_MAX_ATTEMPTS);
- the same task delivered again while it runs, to a second, idle worker: one trainer only (the lease);
- Redis stopped and restarted mid-job (same port, same append-only file): the job finishes, no metric gap.
Short leases (KD_LEASE_SECONDS=3) keep the waits short.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Iterator
from contextlib import suppress
from pathlib import Path

import pytest

from tests.integration.client import Api
from tests.integration.jobs import points, wait_for, wait_for_metrics, write_digits_npz
from tests.stack import Stack, descendants, free_port, start_stack

LOG_EVERY = 50


class AofRedis:
    """A redis-server on a fixed port with an append-only file (fsync always): it can be restarted intact."""

    def __init__(self, folder: Path) -> None:
        self.folder, self.port = folder, free_port()
        self.proc: subprocess.Popen | None = None
        self.start()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        from webapp.redis_server import die_with_parent, find_binary, ping

        self.folder.mkdir(parents=True, exist_ok=True)
        args = [find_binary(), "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.folder),
                "--save", "", "--appendonly", "yes", "--appendfsync", "always",
                "--logfile", str(self.folder / "redis.log")]  # fmt: skip
        self.proc = subprocess.Popen(args, start_new_session=True, preexec_fn=die_with_parent)
        deadline = time.monotonic() + 15
        while not ping(self.port):
            assert self.proc.poll() is None and time.monotonic() < deadline, "redis-server did not start"
            time.sleep(0.05)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()  # a graceful stop: the append-only file is complete
            with suppress(subprocess.TimeoutExpired):
                self.proc.wait(10)
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait(5)


@pytest.fixture(scope="module")
def redis_aof(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AofRedis]:
    server = AofRedis(tmp_path_factory.mktemp("redis-aof"))
    yield server
    server.stop()


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, redis_aof: AofRedis) -> Iterator[Stack]:
    saved = os.environ.get("REDIS_URL")
    os.environ["REDIS_URL"] = redis_aof.url  # the stack claims a database number on this server
    try:
        stack = start_stack(
            tmp_path_factory.mktemp("reliability"),
            extra_env={"KD_LEASE_SECONDS": "3", "KD_MAX_ATTEMPTS": "3", "KD_CHECKPOINT_EVERY_S": "1"},
        )
    finally:
        if saved is None:
            os.environ.pop("REDIS_URL", None)
        else:
            os.environ["REDIS_URL"] = saved
    yield stack
    stack.stop()


@pytest.fixture(scope="module")
def client(stack: Stack) -> Api:
    return Api(stack.url, stack.make_user("rel-owner", "rel-owner-pw-1234"))


@pytest.fixture(scope="module")
def dataset_id(client: Api, tmp_path_factory: pytest.TempPathFactory) -> int:
    npz = write_digits_npz(tmp_path_factory.mktemp("data") / "digits.npz")
    return client.upload("/api/datasets/", {"name": "digits-rel"}, npz)["id"]


def _submit(client: Api, dataset_id: int, name: str, steps: int) -> int:
    config = {"kind": "train", "name": name, "dataset": dataset_id, "model": {"arch": "mlp", "hidden": [16]},
              "epochs": 100_000, "max_steps": steps, "log_every": LOG_EVERY}  # fmt: skip
    return client.post("/api/experiments/", config)["id"]


def _wait_running(client: Api, experiment_id: int, attempts: int, timeout: float = 90) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        exp = client.get(f"/api/experiments/{experiment_id}/")
        if exp["status"] == "running" and exp["attempts"] == attempts:
            return exp
        assert exp["status"] in ("queued", "running") and time.monotonic() < deadline, exp
        time.sleep(0.1)


def _train_steps(client: Api, experiment_id: int) -> list[int]:
    series = client.get(f"/api/experiments/{experiment_id}/metrics/")["series"]
    return sorted(step for name, step in points(series) if name == "train/loss")


def test_a_job_whose_worker_dies_three_times_fails_saying_so(
    stack: Stack, client: Api, dataset_id: int
) -> None:
    experiment_id = _submit(client, dataset_id, "rel-killed", steps=10_000_000)
    for attempt in (1, 2, 3):
        _wait_running(client, experiment_id, attempt)
        time.sleep(1.0)  # it trains (or loads) now
        # SIGKILL the process running the job (the pool child), as the kernel's OOM killer would.
        children = descendants(stack.procs["worker"].pid)
        assert children, "no pool process under the worker"
        for pid in children:
            with suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    exp = wait_for(client, experiment_id, timeout=90)
    assert exp["status"] == "failed", exp
    assert exp["error"] == "the worker died 3 times running this job"
    assert exp["attempts"] == 3
    stack.wait_healthy()  # the worker itself lives on


def test_a_second_delivery_of_a_running_job_leaves_one_trainer(
    stack: Stack, client: Api, dataset_id: int
) -> None:
    stack.start_worker("worker2")
    stack.wait_healthy(workers=2)
    try:
        total = 16000  # about 12 s here: it outlasts the duplicate's wait for the lease (about 5 s)
        experiment_id = _submit(client, dataset_id, "rel-duplicate", steps=total)
        first = _wait_running(client, experiment_id, 1)
        wait_for_metrics(client, experiment_id)
        # The very message again (same task id), as the broker's visibility timeout would hand it out.
        stack.manage("shell", "-c", (
            "from webapp.celery import app; from webapp.studio.models import Experiment; "
            f"e = Experiment.objects.get(pk={experiment_id}); "
            f"app.send_task('workers.run_experiment', args=[{experiment_id}], queue='gpu', task_id=e.celery_task_id)"
        ))  # fmt: skip
        exp = wait_for(client, experiment_id, timeout=120)
        assert exp["status"] == "succeeded", exp
        assert exp["attempts"] == 1 and exp["worker"] == first["worker"], exp
        # The idle worker got the duplicate and left it alone once the lease proved live.
        log = stack.tmp_dir / "logs"
        deadline = time.monotonic() + 30
        skipped = "skipped: another delivery is running it (its lease is live)"
        while skipped not in "".join(p.read_text(errors="replace") for p in log.glob("worker*.log")):
            assert time.monotonic() < deadline, "the duplicate delivery never reported"
            time.sleep(0.2)
        runs = sum(p.read_text(errors="replace").count("resumes from") for p in log.glob("worker*.log"))
        assert runs == 0, "a second trainer resumed the job"
        assert _train_steps(client, experiment_id) == list(range(LOG_EVERY, total + 1, LOG_EVERY))
    finally:
        stack.kill("worker2")
        stack.procs.pop("worker2", None)


def test_redis_restarted_mid_job_leaves_no_metric_gap(
    stack: Stack, client: Api, dataset_id: int, redis_aof: AofRedis
) -> None:
    total = 10000  # about 7 s here
    experiment_id = _submit(client, dataset_id, "rel-redis", steps=total)
    _wait_running(client, experiment_id, 1)
    wait_for_metrics(client, experiment_id)
    redis_aof.stop()
    time.sleep(2.0)  # the job trains on (rows go to the database) while the broker is away
    redis_aof.start()
    assert client.get(f"/api/experiments/{experiment_id}/")["status"] == "running", (
        "finished before the restart"
    )
    exp = wait_for(client, experiment_id, timeout=180)
    assert exp["status"] == "succeeded", exp
    assert _train_steps(client, experiment_id) == list(range(LOG_EVERY, total + 1, LOG_EVERY))
    stack.wait_healthy()
