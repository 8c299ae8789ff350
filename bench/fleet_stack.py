"""The fleet harness's real stack (uvicorn, private Redis, database) and its fault levers, for bench and tests.

`start_stack(tmp, web)` starts uvicorn with the production command (tests/stack.py WEB_CMD) and `--workers N`, a
private redis-server and a migrated database (a private `kd_it_<hex>` one when DATABASE_URL names PostgreSQL,
else SQLite), with no Celery worker: bench/bench_fleet.py's worker role plays the trainers.
`restart_redis(stack)` kills that redis-server and starts a fresh one on the same port (a restart: every
subscription and queued message gone). `make_experiments`, `count_rows`: the database seen through manage.py.
Sampler: CPU seconds and peak RSS of a process tree.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")


def start_stack(tmp: Path, web: int, extra_env: dict[str, str] | None = None) -> Any:
    """uvicorn (`web` processes) + private Redis + migrated database; no Celery worker (the bench is one)."""
    from tests.stack import WEB_CMD, Stack, free_port, postgres_database
    from webapp import redis_server

    tmp = Path(tmp)
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("KD_", "DJANGO_", "WEB_CONCURRENCY"))}
    env.update(
        DJANGO_SETTINGS_MODULE="webapp.settings",
        MEDIA_ROOT=str(tmp / "media"),
        KD_STATE_DIR=str(tmp / "state"),
        SECRET_KEY="bench-fleet-" + secrets.token_hex(8),
        ALLOWED_HOSTS="127.0.0.1,localhost",
        KD_HEALTHZ_MIN_WORKERS="0",
        OMP_NUM_THREADS="1",
        PYTHONUNBUFFERED="1",
    )
    for key in ("KD_SINK_FLUSH_MS", "KD_CHANNEL_LAYER"):
        if os.environ.get(key):
            env[key] = os.environ[key]
    env.update(extra_env or {})
    stack = Stack(tmp_dir=tmp, url=f"http://127.0.0.1:{port}", port=port, redis_url="", env=env)
    try:
        db_url = os.environ.get("DATABASE_URL", "")
        if db_url.startswith(("postgres://", "postgresql://")):
            env["DATABASE_URL"], drop = postgres_database(db_url)
            stack._cleanups.append(drop)
        else:
            env["DATABASE_URL"] = f"sqlite:///{tmp / 'db.sqlite3'}"
        server = redis_server.start(tmp / "redis", persist=False, reuse=False)
        stack.redis_url = env["REDIS_URL"] = server.url
        stack.redis_pid = server.pid
        stack.redis_dir = tmp / "redis"
        stack._cleanups.append(lambda: _stop_redis(stack))
        stack.manage("migrate", "--noinput", timeout=300)
        cmd = [a.replace("{port}", str(port)) for a in WEB_CMD]
        if web > 1:
            cmd[-1:-1] = ["--workers", str(web)]
        # Extra uvicorn flags to compare, e.g. KD_BENCH_FLEET_UVICORN="--ws-per-message-deflate true" (the old default).
        cmd[-1:-1] = os.environ.get("KD_BENCH_FLEET_UVICORN", "").split()
        stack._spawn("web", cmd)
        stack.wait_healthy(workers=0)
        stack.token = stack.make_user("fleet", "pw-" + secrets.token_hex(8))
    except BaseException:
        stack.stop()
        raise
    return stack


def _redis_port(stack: Any) -> int:
    return int(stack.redis_url.rsplit(":", 1)[1].split("/")[0])


def _stop_redis(stack: Any) -> None:
    pid = getattr(stack, "redis_pid", 0)
    if not pid:
        return
    stack.redis_pid = 0
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            if os.waitpid(pid, os.WNOHANG)[0]:
                return
        except ChildProcessError:  # not our child (reaped elsewhere): wait for /proc to forget it
            if not Path(f"/proc/{pid}").exists():
                return
        time.sleep(0.02)


def stop_redis(stack: Any) -> None:
    """Kill the stack's redis-server outright (a crash: nothing saved, every connection dropped)."""
    _stop_redis(stack)


def start_redis(stack: Any, timeout: float = 15.0) -> None:
    """Start a fresh redis-server on the port the stack's processes know (after `stop_redis`).

    Call it from the main thread: the server gets SIGTERM when the *thread* that started it ends (the
    parent-death signal that keeps a crashed test from leaving servers behind)."""
    from webapp.redis_server import die_with_parent, find_binary, ping

    port = _redis_port(stack)
    args = [find_binary(), "--port", str(port), "--bind", "127.0.0.1", "--dir", str(stack.redis_dir),
            "--logfile", str(stack.redis_dir / "redis.log"), "--daemonize", "no", "--save", "",
            "--appendonly", "no", "--maxmemory-policy", "noeviction"]  # fmt: skip
    proc = subprocess.Popen(
        args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        start_new_session=True, preexec_fn=die_with_parent,
    )  # fmt: skip
    stack.redis_pid = proc.pid
    deadline = time.monotonic() + timeout
    while not ping(port):
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"redis-server did not come back on port {port}")
        time.sleep(0.05)


def restart_redis(stack: Any, down_s: float = 1.0) -> None:
    """Kill the stack's Redis, leave it down `down_s` seconds, start an empty one on the same port."""
    stop_redis(stack)
    time.sleep(down_s)
    start_redis(stack)


_MAKE = """
import json, os
from django.contrib.auth import get_user_model
from webapp.studio.models import Experiment
u = get_user_model().objects.get(username="fleet")
ids = [Experiment.objects.create(owner=u, name=f"fleet {i}", kind="train", config={"kind": "train"},
       status=Experiment.RUNNING).pk for i in range(int(os.environ["KD_FLEET_N"]))]
print(json.dumps(ids))
"""

_COUNT = """
import json, os
from django.db.models import Count
from webapp.studio.models import MetricPoint
ids = json.loads(os.environ["KD_FLEET_IDS"])
rows = MetricPoint.objects.filter(experiment_id__in=ids)
dups = rows.values("experiment_id", "name", "step").annotate(n=Count("id")).filter(n__gt=1).count()
print(json.dumps({"rows": rows.count(), "duplicate_rows": dups}))
"""


def shell(stack: Any, code: str, **env: str) -> Any:
    """Run `code` in `manage.py shell` against the stack's database; its last stdout line, as JSON."""
    res = subprocess.run(
        [sys.executable, "manage.py", "shell", "-c", code], cwd=ROOT, env={**stack.env, **env},
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    if res.returncode != 0:
        raise RuntimeError(res.stderr[-2000:])
    return json.loads(res.stdout.strip().splitlines()[-1])


def make_experiments(stack: Any, n: int) -> list[int]:
    """`n` running experiments of the user `fleet` (the harness's token owner)."""
    return shell(stack, _MAKE, KD_FLEET_N=str(n))


def count_rows(stack: Any, ids: list[int]) -> dict[str, int]:
    """{"rows", "duplicate_rows"} of MetricPoint for these experiments."""
    return shell(stack, _COUNT, KD_FLEET_IDS=json.dumps(ids))


def proc_stat(pid: int) -> tuple[float, int]:
    """(CPU seconds, RSS bytes) of one process; (0, 0) once it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0, 0
    return (int(fields[11]) + int(fields[12])) / CLK_TCK, int(fields[21]) * PAGE


class Sampler:
    """CPU seconds and peak RSS of a process tree (the web server and its workers), sampled every 0.25 s."""

    def __init__(self, root_pid: int) -> None:
        self.root = root_pid
        self.peak_rss = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def pids(self) -> list[int]:
        from tests.stack import descendants

        return [self.root, *descendants(self.root)]

    def cpu(self) -> float:
        return sum(proc_stat(p)[0] for p in self.pids())

    def rss(self) -> int:
        return sum(proc_stat(p)[1] for p in self.pids())

    def _run(self) -> None:
        while not self._stop.wait(0.25):
            self.peak_rss = max(self.peak_rss, self.rss())

    def __enter__(self) -> Sampler:
        self.cpu0, self.t0 = self.cpu(), time.monotonic()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(2)
        self.cpu_per_s = (self.cpu() - self.cpu0) / max(1e-9, time.monotonic() - self.t0)
