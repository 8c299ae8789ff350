"""`make run`: the whole system on one machine (own Redis, SQLite, demo data, one worker, uvicorn) until Ctrl-C.

Everything lives in the state folder (KD_STATE_DIR, default `var/`): the SQLite database, uploads,
Redis's append-only file, and `demo-login.json`. A second run reuses all of it. Only the processes this
run started are stopped on Ctrl-C or SIGTERM; a Redis that an earlier run left alive is reused and kept.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from contextlib import suppress
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent

# The same commands docker-compose.yml and the integration tests run.
WORKER_CMD = ["celery", "-A", "webapp", "worker", "-Q", "gpu,default", "--pool", "prefork", "--concurrency", "1",
              "-n", "local@%h", "--loglevel", "INFO"]  # fmt: skip
# uvicorn reads a request body only as the app asks for it, so webapp/body_guard.py can refuse one unread.
# --http h11: headers are capped (16 KiB; httptools let one endless header line grow the process without
# bound). --ws-max-size: the socket takes only small client messages (pings). --no-proxy-headers: the client
# address is the peer's, never an X-Forwarded-For a local caller wrote (login throttling counts per address).
# --ws-per-message-deflate false: live frames are small JSON; compressing them per socket was a quarter of the
# web CPU at 500 sockets (bench/bench_fleet.py, py-spy) and roughly doubled p95 under load.
WEB_CMD = ["uvicorn", "--host", "127.0.0.1", "--port", "{port}", "--lifespan", "off", "--http", "h11",
           "--ws", "websockets-sansio", "--ws-max-size", "65536", "--ws-per-message-deflate", "false", "--no-proxy-headers",
           "--timeout-graceful-shutdown", "10", "webapp.asgi:application"]  # fmt: skip
# The single local worker also runs Celery beat (webapp/celery.py's beat_schedule: housekeeping);
# docker-compose.yml runs beat as its own service instead.
BEAT_ARGS = ["-B", "-s", "{state}/celerybeat-schedule"]

DEMO_USER = "demo"
DEMO_DATASET = "digits (demo)"
DEMO_TEACHER = "digits teacher (demo)"
# A teacher worth distilling from, yet trained in well under a minute on a laptop CPU.
DEMO_TEACHER_CONFIG = {
    "kind": "train",
    "name": DEMO_TEACHER,
    "model": {"arch": "mlp", "hidden": [256, 128]},
    "epochs": 30,
    "batch_size": 64,
    "lr": 0.001,
    "seed": 0,
}


def say(message: str) -> None:
    print(f"[kd-studio] {message}", flush=True)


def _exe(cmd: list[str]) -> list[str]:
    script = BIN / cmd[0]
    return [str(script) if script.exists() else cmd[0], *cmd[1:]]


def _manage(env: dict[str, str], *args: str) -> None:
    subprocess.run([sys.executable, "manage.py", *args], cwd=ROOT, env=env, check=True)


def _demo_login(state_dir: Path) -> tuple[str, str]:
    """The demo user's password: made once, kept in the state folder (readable by this user only)."""
    path = state_dir / "demo-login.json"
    if path.exists():
        with suppress(ValueError, KeyError, TypeError):
            data = json.loads(path.read_text())
            return str(data["username"]), str(data["password"])
    password = secrets.token_urlsafe(12)
    path.write_text(json.dumps({"username": DEMO_USER, "password": password}))
    path.chmod(0o600)
    return DEMO_USER, password


def ensure_demo_content(state_dir: Path) -> tuple[str, str]:
    """The demo user, the digits dataset as a real NPZ file, and a teacher trained by a real queued job.

    Idempotent: each piece is made only when it is missing (a failed or cancelled teacher job is queued again).
    Runs in this process with the environment already pointing at the stack's database and Redis.
    """
    import django

    django.setup()
    import numpy as np
    from django.contrib.auth import get_user_model
    from django.core.files import File
    from django.db import close_old_connections

    from kd_core.data.builtin import load_builtin
    from webapp.studio import services, stores
    from webapp.studio.models import Checkpoint, Dataset, Experiment

    username, password = _demo_login(state_dir)
    User = get_user_model()
    user, created = User.objects.get_or_create(username=username)
    if created or not user.check_password(password):
        user.set_password(password)
        user.save()

    dataset = Dataset.objects.filter(owner=user, name=DEMO_DATASET).first()
    if dataset is not None and not (
        stores.store_exists(dataset.store)
        or (dataset.file and dataset.file.storage.exists(dataset.file.name))
    ):
        dataset.delete()  # its store (or file) is gone (a cleared media folder): make it again
        dataset = None
    if dataset is None:
        # A real uploaded-style NPZ file, stored and inspected the way an upload is.
        raw = load_builtin("digits", {})
        tmp = state_dir / "digits.npz"
        np.savez_compressed(tmp, x=raw.x, y=raw.y, class_names=np.array(raw.class_names))
        try:
            with open(tmp, "rb") as fh:
                dataset = services.create_dataset(user, File(fh, name="digits.npz"), DEMO_DATASET, {})
        finally:
            tmp.unlink(missing_ok=True)
        say(f"created the demo dataset '{DEMO_DATASET}' ({dataset.num_samples} images of 8x8 digits)")

    teacher_ready = Checkpoint.objects.filter(owner=user, source_experiment__name=DEMO_TEACHER).exists()
    teacher_job = (
        Experiment.objects.filter(owner=user, name=DEMO_TEACHER)
        .exclude(status__in=(Experiment.FAILED, Experiment.CANCELLED))
        .first()
    )
    if not teacher_ready and teacher_job is None:
        experiment = services.create_experiments(user, {**DEMO_TEACHER_CONFIG, "dataset": dataset.pk})[0]
        say(f"queued experiment {experiment.pk}: training the demo teacher on digits (about a minute)")
    close_old_connections()
    return username, password


class LocalStack:
    """The processes of one `make run`, started in order and stopped in reverse."""

    def __init__(self, port: int, state_dir: Path) -> None:
        self.port = port
        self.state_dir = state_dir
        self.procs: list[tuple[str, subprocess.Popen]] = []
        self.redis = None
        self.env: dict[str, str] = dict(os.environ)

    def spawn(self, name: str, cmd: list[str]) -> None:
        logs = self.state_dir / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        from webapp.redis_server import die_with_parent

        # Their output would drown the terminal: it goes to var/logs/, and the banner says where.
        out = open(logs / f"{name}.log", "ab")  # noqa: SIM115 - the child owns it
        # Own process group, so Ctrl-C reaches only this process, which stops them in order; and they
        # go when it goes, even if it is killed outright (the Redis data server alone is kept for reuse).
        proc = subprocess.Popen(
            _exe(cmd), cwd=ROOT, env=self.env, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
            start_new_session=True, preexec_fn=die_with_parent,
        )  # fmt: skip
        out.close()
        self.procs.append((name, proc))

    def start(self) -> None:
        from webapp import redis_server

        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.env["KD_STATE_DIR"] = str(self.state_dir)
        self.env.setdefault("DJANGO_SETTINGS_MODULE", "webapp.settings")
        self.env["PYTHONUNBUFFERED"] = "1"
        if not self.env.get("REDIS_URL"):
            self.redis = redis_server.start(self.state_dir / "redis", persist=True)
            self.env["REDIS_URL"] = self.redis.url
            how = "started" if self.redis.started_here else "reusing"
            say(f"{how} Redis on 127.0.0.1:{self.redis.port} (data in {self.redis.data_dir})")
        else:
            say(f"using Redis at {self.env['REDIS_URL']}")
        os.environ.update(self.env)
        _manage(self.env, "migrate", "--noinput", "-v", "0")
        if self.env.get("KD_ENV") == "production":
            _manage(self.env, "collectstatic", "--noinput", "-v", "0")
        self.username, self.password = ensure_demo_content(self.state_dir)
        beat = [a.replace("{state}", str(self.state_dir)) for a in BEAT_ARGS]
        self.spawn("worker", WORKER_CMD + beat)
        self.spawn("web", [a.replace("{port}", str(self.port)) for a in WEB_CMD])

    def wait_healthy(self, timeout: float = 120) -> None:
        url = f"http://127.0.0.1:{self.port}/healthz"
        deadline = time.monotonic() + timeout
        last = ""
        while time.monotonic() < deadline:
            self.check_children()
            try:
                with urllib.request.urlopen(url, timeout=3) as r:
                    body = json.loads(r.read())
                    if int(body.get("workers", 0)) >= 1:
                        return
                    last = str(body)
            except urllib.error.HTTPError as e:
                last = e.read().decode(errors="replace")[:300]
            except (OSError, ValueError) as e:
                last = str(e)
            time.sleep(0.5)
        raise RuntimeError(f"the stack did not become healthy in {timeout:.0f}s (last /healthz: {last})")

    def check_children(self) -> None:
        for name, proc in self.procs:
            if proc.poll() is not None:
                log = self.state_dir / "logs" / f"{name}.log"
                tail = log.read_text(errors="replace")[-2000:] if log.exists() else ""
                raise RuntimeError(f"the {name} process exited with code {proc.returncode}:\n{tail}")

    def stop(self) -> None:
        for _, proc in reversed(self.procs):
            with suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + 15
        for _, proc in reversed(self.procs):
            with suppress(subprocess.TimeoutExpired):
                proc.wait(max(0.1, deadline - time.monotonic()))
            with suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)  # pool children that outlived their parent
            with suppress(subprocess.TimeoutExpired):
                proc.wait(5)
        self.procs.clear()
        if self.redis is not None and self.redis.started_here:
            self.redis.stop()
        self.redis = None


def main() -> int:
    port = int(os.environ.get("PORT", "8000"))
    state_dir = Path(os.environ.get("KD_STATE_DIR") or ROOT / "var").resolve()
    stack = LocalStack(port, state_dir)

    def on_signal(signum: int, _frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        stack.start()
        stack.wait_healthy()
        url = f"http://127.0.0.1:{port}"
        say("")
        say(f"KD Studio is running at {url}")
        say(f"log in as '{stack.username}' with password '{stack.password}'")
        say(f"(an admin of your own: .venv/bin/python manage.py createsuperuser; state in {state_dir})")
        say(f"logs: {state_dir / 'logs'}; press Ctrl-C to stop")
        while True:
            stack.check_children()
            time.sleep(1)
    except KeyboardInterrupt:
        say("stopping...")
        return 0
    except (RuntimeError, subprocess.CalledProcessError) as exc:
        say(f"error: {exc}")
        return 1
    finally:
        # A second Ctrl-C while stopping must not leave children behind.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        stack.stop()
        say("stopped")


if __name__ == "__main__":
    raise SystemExit(main())
