"""Start a real KD Studio stack for tests (own DB, Redis, Celery worker, uvicorn) and stop it cleanly.

Usage::

    from tests.stack import start_stack

    with start_stack(tmp_path) as stack:          # or: stack = start_stack(tmp_path); ...; stack.stop()
        token = stack.make_user("alice", "pw-alice-123")
        requests_like_get(stack.url + "/healthz")   # talk to it over HTTP / WebSocket only

What it starts, each in its own process group (so stop() kills children too):
- the database: a SQLite file in `tmp_dir`, or, when DATABASE_URL names a PostgreSQL server, a fresh
  database `kd_it_<random>` on that server (dropped on stop); `manage.py migrate` runs in a subprocess;
- Redis: REDIS_URL's server with a database number of its own (locked, flushed at start and stop), or,
  when REDIS_URL is unset, a private redis-server from `webapp/redis_server.py`;
- one Celery worker and the web server (uvicorn), with the very commands docker-compose.yml runs (WORKER_CMD, WEB_CMD);
and waits until `/healthz` reports at least one live worker. MEDIA_ROOT and KD_STATE_DIR are in `tmp_dir`;
jobs save resumable checkpoints every 2 s (KD_CHECKPOINT_EVERY_S). `extra_env` adds or overrides variables.
Process logs go to `tmp_dir/logs/*.log`; a failed start raises with their tails. The processes also die
if the test process is killed outright (parent-death signal), so a crashed run leaves nothing behind.
Helpers for fault tests: `stack.kill("worker")`, `stack.start_worker("worker", node=stack.nodes["worker"])`.
"""

from __future__ import annotations

import json
import os
import random
import secrets
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from contextlib import suppress
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent

# The production commands (docker-compose.yml runs these; tests/integration/test_compose.py checks it).
WORKER_CMD = ["celery", "-A", "webapp", "worker", "-Q", "gpu,default", "--pool", "prefork", "--concurrency", "1",
              "-n", "it@%h", "--loglevel", "INFO"]  # fmt: skip
# uvicorn reads a request body only as the app asks for it, so webapp/body_guard.py can refuse one unread.
# --http h11: headers are capped (16 KiB; httptools let one endless header line grow the process without
# bound). --ws-max-size: the socket takes only small client messages (pings). --no-proxy-headers: the client
# address is the peer's, never an X-Forwarded-For a local caller wrote (login throttling counts per address).
# --ws-per-message-deflate false: live frames are small JSON; compressing them per socket was a quarter of the
# web CPU at 500 sockets (bench/bench_fleet.py, py-spy) and roughly doubled p95 under load.
WEB_CMD = ["uvicorn", "--host", "127.0.0.1", "--port", "{port}", "--lifespan", "off", "--http", "h11",
           "--ws", "websockets-sansio", "--ws-max-size", "65536", "--ws-per-message-deflate", "false", "--no-proxy-headers",
           "--timeout-graceful-shutdown", "10", "webapp.asgi:application"]  # fmt: skip


def descendants(pid: int) -> list[int]:
    """Every live process below pid (from /proc), each once: a stack's worker pools and servers' children."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    found: list[int] = []
    todo = [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in found:
                found.append(child)
                todo.append(child)
    return found


def free_port() -> int:
    from webapp.redis_server import free_port as _free_port

    return _free_port()


def _exe(cmd: list[str]) -> list[str]:
    # The console scripts of the interpreter running the tests, whatever PATH says.
    script = BIN / cmd[0]
    return [str(script) if script.exists() else cmd[0], *cmd[1:]]


def _tail(path: Path, n: int = 3000) -> str:
    return path.read_text(errors="replace")[-n:] if path.exists() else "(no log)"


@dataclass
class Stack:
    """A running stack. `url` is http://127.0.0.1:PORT; `env` is what its processes got."""

    tmp_dir: Path
    url: str
    port: int
    redis_url: str
    env: dict[str, str]
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)
    nodes: dict[str, str] = field(default_factory=dict)
    _cleanups: list = field(default_factory=list)

    @property
    def ws_url(self) -> str:
        return self.url.replace("http://", "ws://", 1)

    # -- processes ---------------------------------------------------------------------------------------
    def _spawn(self, name: str, cmd: list[str]) -> subprocess.Popen:
        logs = self.tmp_dir / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        out = open(logs / f"{name}.log", "ab")  # noqa: SIM115 - the child owns it for its lifetime
        from webapp.redis_server import die_with_parent

        # Own process group (stop() kills pool children too); dies with the test process if that is killed.
        proc = subprocess.Popen(
            _exe(cmd), cwd=ROOT, env=self.env, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
            start_new_session=True, preexec_fn=die_with_parent,
        )  # fmt: skip
        out.close()
        self.procs[name] = proc
        return proc

    def manage(self, *args: str, timeout: float = 120) -> str:
        """Run `manage.py ARGS` against this stack's database; returns stdout, raises with stderr."""
        res = subprocess.run(
            [sys.executable, "manage.py", *args], cwd=ROOT, env=self.env, capture_output=True, text=True,
            timeout=timeout,
        )  # fmt: skip
        if res.returncode != 0:
            raise RuntimeError(f"manage.py {' '.join(args)} failed ({res.returncode}):\n{res.stderr[-3000:]}")
        return res.stdout

    def start_worker(self, name: str = "worker", node: str | None = None) -> subprocess.Popen:
        """Start (another) Celery worker with the production command; `name` keys it in `procs`.

        `node` is its Celery node name (default: unique); start one under a dead worker's node name
        (`stack.nodes[name]`) to play a worker that restarts on the same host.
        """
        cmd = list(WORKER_CMD)
        node = node or f"{name}-{secrets.token_hex(3)}@%h"
        cmd[cmd.index("-n") + 1] = node
        self.nodes[name] = node
        return self._spawn(name, cmd)

    def kill(self, name: str, sig: int = signal.SIGKILL) -> None:
        """Send `sig` to a started process's whole group (a Celery worker and its pool children)."""
        proc = self.procs[name]
        with suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        with suppress(subprocess.TimeoutExpired):
            proc.wait(10)

    def health(self) -> tuple[int, dict]:
        try:
            with urllib.request.urlopen(self.url + "/healthz", timeout=5) as r:
                return r.status, json.loads(r.read() or b"{}")
        except urllib.error.HTTPError as e:
            try:
                return e.code, json.loads(e.read() or b"{}")
            except ValueError:
                return e.code, {}
        except (OSError, ValueError):
            return 0, {}

    def wait_healthy(self, workers: int = 1, timeout: float = 120) -> dict:
        """Block until /healthz answers 200 with at least `workers` live Celery workers."""
        deadline = time.monotonic() + timeout
        body: dict = {}
        while time.monotonic() < deadline:
            for name, proc in self.procs.items():
                if proc.poll() is not None:
                    raise RuntimeError(f"{name} exited ({proc.returncode}):\n{self.logs(name)}")
            code, body = self.health()
            if code == 200 and int(body.get("workers", 0)) >= workers:
                return body
            time.sleep(0.3)
        raise RuntimeError(
            f"stack not healthy after {timeout}s: last /healthz {body}\n"
            + "\n".join(f"--- {n}\n{self.logs(n)}" for n in self.procs)
        )

    def logs(self, name: str) -> str:
        return _tail(self.tmp_dir / "logs" / f"{name}.log")

    # -- users ---------------------------------------------------------------------------------------------
    def make_user(self, username: str, password: str) -> str:
        """Create (or reset) a user with this password and return an API token for it."""
        self._set_password(username, password)
        return self.manage("issue_token", username).strip().splitlines()[-1].strip()

    def _set_password(self, username: str, password: str) -> None:
        # Passed via the environment, not argv, so it does not show in `ps`.
        env = {**self.env, "KD_IT_USERNAME": username, "KD_IT_PASSWORD": password}
        code = (
            "import os; from django.contrib.auth import get_user_model; U = get_user_model(); "
            "u, _ = U.objects.get_or_create(username=os.environ['KD_IT_USERNAME']); "
            "u.set_password(os.environ['KD_IT_PASSWORD']); u.save()"
        )
        res = subprocess.run(
            [sys.executable, "manage.py", "shell", "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
            timeout=120,
        )  # fmt: skip
        if res.returncode != 0:
            raise RuntimeError(f"creating user {username!r} failed:\n{res.stderr[-3000:]}")

    # -- lifecycle -----------------------------------------------------------------------------------------
    def stop(self) -> None:
        """Stop every process this stack started (TERM, then KILL), then drop its database / Redis db."""
        for proc in self.procs.values():
            with suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + 10
        for proc in self.procs.values():
            with suppress(subprocess.TimeoutExpired):
                proc.wait(max(0.1, deadline - time.monotonic()))
        for proc in self.procs.values():
            # Pool children may outlive their parent; the group id still finds them.
            with suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            with suppress(subprocess.TimeoutExpired):
                proc.wait(5)
        self.procs.clear()
        while self._cleanups:
            with suppress(Exception):
                self._cleanups.pop()()

    def __enter__(self) -> Stack:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


# -- resources: database and Redis ---------------------------------------------------------------------------
def postgres_database(admin_url: str) -> tuple[str, object]:
    import psycopg

    name = f"kd_it_{secrets.token_hex(4)}"
    parts = urlsplit(admin_url)
    conninfo = urlunsplit(parts._replace(scheme="postgresql"))
    with psycopg.connect(conninfo, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')

    def drop() -> None:
        with psycopg.connect(conninfo, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    return urlunsplit(parts._replace(path=f"/{name}")), drop


_LOCK = "kd:stack:lock"


def _redis_database(base_url: str) -> tuple[str, object]:
    """Claim a free database number (1..15) on REDIS_URL's server: a lock key in it says it is taken."""
    import redis

    parts = urlsplit(base_url)
    numbers = list(range(1, 16))
    random.shuffle(numbers)
    for n in numbers:
        url = urlunsplit(parts._replace(path=f"/{n}"))
        client = redis.Redis.from_url(url)
        if client.set(_LOCK, os.getpid(), nx=True, ex=3 * 3600):
            client.flushdb()
            client.set(_LOCK, os.getpid(), ex=3 * 3600)

            def release(client: redis.Redis = client) -> None:
                client.flushdb()
                client.close()

            return url, release
        client.close()
    raise RuntimeError(
        f"no free Redis database number on {base_url} (all of 1..15 are locked by other stacks)"
    )


def start_stack(tmp_dir: Path, *, workers: int = 1, extra_env: dict[str, str] | None = None) -> Stack:
    """Start a whole stack with its state under `tmp_dir`; returns once /healthz sees the worker(s)."""
    tmp_dir = Path(tmp_dir).resolve()
    tmp_dir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("KD_", "DJANGO_"))}
    env.update(
        DJANGO_SETTINGS_MODULE="webapp.settings",
        MEDIA_ROOT=str(tmp_dir / "media"),
        KD_STATE_DIR=str(tmp_dir / "state"),
        SECRET_KEY="integration-tests-" + secrets.token_hex(8),
        ALLOWED_HOSTS="127.0.0.1,localhost",
        PYTHONUNBUFFERED="1",
        # Two cores are shared by the web process, the worker and the test itself.
        OMP_NUM_THREADS="1",
        MKL_NUM_THREADS="1",
        # Resumable checkpoints every 2 s (where kd_core's runner takes the interval), so resume tests are short.
        KD_CHECKPOINT_EVERY_S="2",
    )
    stack = Stack(tmp_dir=tmp_dir, url=f"http://127.0.0.1:{port}", port=port, redis_url="", env=env)
    try:
        db_url = os.environ.get("DATABASE_URL", "")
        if db_url.startswith(("postgres://", "postgresql://")):
            env["DATABASE_URL"], drop = postgres_database(db_url)
            stack._cleanups.append(drop)
        else:
            env["DATABASE_URL"] = f"sqlite:///{tmp_dir / 'db.sqlite3'}"
        if os.environ.get("REDIS_URL"):
            stack.redis_url, release = _redis_database(os.environ["REDIS_URL"])
            stack._cleanups.append(release)
        else:
            from webapp import redis_server

            server = redis_server.start(tmp_dir / "redis", persist=False, reuse=False)
            stack.redis_url = server.url
            stack._cleanups.append(server.stop)
        env["REDIS_URL"] = stack.redis_url
        if extra_env:
            env.update(extra_env)
        stack.manage("migrate", "--noinput", timeout=300)
        stack._spawn("web", [a.replace("{port}", str(port)) for a in WEB_CMD])
        for i in range(workers):
            stack.start_worker("worker" if i == 0 else f"worker{i}")
        stack.wait_healthy(workers=workers)
    except BaseException:
        stack.stop()
        raise
    return stack
