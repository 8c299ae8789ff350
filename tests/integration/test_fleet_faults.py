"""Faults of the fleet path on a real stack: a client that never reads, a Redis restart, a database stall.

The stack is bench/fleet_stack.py's (uvicorn with 2 web processes, a private redis-server this test may kill,
the database of DATABASE_URL or SQLite); the trainers are bench/bench_fleet.py's worker processes logging
through the real sink (workers/sink.py); the watchers are bench_fleet's `Watcher`, which behaves like the page
(webapp/static/kd/experiment.js): history first, live points merged by (series, step), and on a close it
reconnects and reads `/metrics/?since=` what it missed. Behaviour only, never timings; each test well under
60 s, and the stack's processes (the restarted redis-server too) stop with the module.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import socket
import struct
import time
from pathlib import Path

import pytest

from bench.bench_fleet import Watcher, expected_points, spawn_worker
from bench.fleet_stack import count_rows, make_experiments, start_redis, start_stack, stop_redis

# A socket whose backlog passes this many values (about 1 s of the first test's job), or whose send waits 3 s,
# is closed as too slow: small, so the test is short; not so small that a reading client on a busy machine trips it.
BACKLOG = 5000


@pytest.fixture(scope="module")
def fault_stack(tmp_path_factory: pytest.TempPathFactory):
    env = {"KD_WS_MAX_BACKLOG_VALUES": str(BACKLOG), "KD_WS_SEND_STALL_S": "3"}
    stack = start_stack(tmp_path_factory.mktemp("faults"), web=2, extra_env=env)
    yield stack
    stack.stop()


class NonReader:
    """A real WebSocket client that completes the handshake and then never calls recv (a tiny receive buffer),
    until `drain` reads what the server managed to hand it: text frames, then (it hopes) a close frame."""

    def __init__(self, url: str, token: str, experiment: int) -> None:
        host, port = url.removeprefix("http://").split(":")
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        self.sock.settimeout(30)
        self.sock.connect((host, int(port)))
        key = base64.b64encode(os.urandom(16)).decode()
        self.sock.sendall(
            (f"GET /ws/experiments/{experiment}/ HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\n"
             f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n"
             f"Authorization: Token {token}\r\n\r\n").encode()
        )  # fmt: skip
        head = b""
        while b"\r\n\r\n" not in head:
            head += self.sock.recv(1)  # byte by byte: not one byte of the first frame is read
        assert head.startswith(b"HTTP/1.1 101"), head

    def drain(self, quiet: float) -> tuple[int, list[dict], tuple[int, str] | None]:
        """(bytes read, text messages, (close code, reason) or None) once the server closed or sent nothing
        for `quiet` seconds."""
        self.sock.settimeout(quiet)
        data = b""
        try:
            while chunk := self.sock.recv(1 << 16):
                data += chunk
        except OSError:
            pass
        self.sock.close()
        messages, close, i = [], None, 0
        while i + 2 <= len(data):
            opcode, n, i = data[i] & 0x0F, data[i + 1] & 0x7F, i + 2
            if n == 126:
                n, i = struct.unpack("!H", data[i : i + 2])[0], i + 2
            elif n == 127:
                n, i = struct.unpack("!Q", data[i : i + 8])[0], i + 8
            payload, i = data[i : i + n], i + n
            if len(payload) < n:
                break
            if opcode == 1:
                messages.append(json.loads(payload))
            elif opcode == 8:
                close = (struct.unpack("!H", payload[:2])[0], payload[2:].decode())
        return len(data), messages, close


def _watch(
    stack,
    experiment: int,
    sockets: int,
    tmp: Path,
    *,
    rate: float,
    series: int,
    seconds: float,
    width: int = 0,
    during=None,
    grace: float = 15.0,
) -> list[Watcher]:
    """`sockets` page-like watchers of `experiment` while one reporting worker (the real sink) logs `series`
    values per step at `rate` steps/s for `seconds`, and the coroutine `during()` runs alongside; then until
    every watcher holds every logged point (live or refetched by itself) or `grace` runs out. No final merge.
    Everything runs on this (main) thread: a redis-server started from a thread would die with it."""

    async def main() -> list[Watcher]:
        stop = asyncio.Event()
        deadline = time.monotonic() + 55
        watchers = [Watcher(stack.url, stack.token, experiment) for _ in range(sockets)]
        tasks = [asyncio.create_task(w.run(stop, deadline)) for w in watchers]
        await asyncio.wait_for(asyncio.gather(*(w.connected.wait() for w in watchers)), 30)
        out = tmp / f"w{experiment}.json"
        proc = spawn_worker(stack, experiment, steps=int(rate * seconds) + 1, rate=rate, series=series,
                            seconds=seconds, out=out, name_width=width, log=tmp / "worker.log")  # fmt: skip
        side = asyncio.create_task(during()) if during else None
        try:
            until = time.monotonic() + seconds + 40
            while proc.poll() is None and time.monotonic() < until:
                await asyncio.sleep(0.1)
            if side:
                await asyncio.wait_for(side, 30)
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.wait(5)
        report = json.loads(out.read_text())
        want = expected_points(report["steps"], series, width)
        until = time.monotonic() + grace
        while time.monotonic() < until and not all(want <= set(w.seen) | w.history for w in watchers):
            await asyncio.sleep(0.1)
        stop.set()
        await asyncio.gather(*tasks, return_exceptions=True)
        for w in watchers:
            w.want, w.report = want, report
        return watchers

    return asyncio.run(main())


def test_a_client_that_never_reads_is_cut_off_and_slows_no_one(fault_stack, tmp_path: Path) -> None:
    [experiment] = make_experiments(fault_stack, 1)
    stuck = NonReader(fault_stack.url, fault_stack.token, experiment)
    # ~60,000 values of 64-character series, ~5 MB of frames per socket: more than the kernel buffers between
    # the server and the non-reader hold (tcp_wmem's maximum, 4 MiB by default), so the server has to decide.
    rate, series, seconds, width = 100.0, 50, 12.0, 64
    watchers = _watch(fault_stack, experiment, 4, tmp_path, rate=rate, series=series, seconds=seconds,
                      width=width, grace=10)  # fmt: skip
    want = watchers[0].want
    assert len(want) >= series * rate * 3  # the worker logged for seconds
    for w in watchers:
        # Every reading client has every point and was never found too slow: the non-reader held no one up.
        # (A sink that fell behind a slow database may skip announcing a huge batch: then a reader is closed
        # with 4409 and refetches, which is also fine.)
        assert want <= set(w.seen) | w.history, (len(want - set(w.seen) - w.history), w.closes)
        assert "4408" not in w.closes and sum(c - 1 for c in w.seen.values()) == 0, w.closes
        assert len(w.seen) > len(want) / 2, (len(w.seen), len(want))  # most of it live
    read, messages, close = stuck.drain(quiet=3)
    got = {
        (name, p["step"]) for m in messages for p in (m.get("points") or [m]) for name in p.get("values", {})
    }
    # The server stopped queueing for it: it got a prefix of the stream, no more than the kernel buffers and a
    # bounded backlog hold, then a close with 4408 and the reason.
    assert close is not None and close[0] == 4408 and "too slow" in close[1], (read, close)
    assert len(got) < len(want), (len(got), len(want), read)
    kernel = int(Path("/proc/sys/net/ipv4/tcp_wmem").read_text().split()[2]) + 2 * 4096
    assert read <= kernel + 2**20, read
    rows = count_rows(fault_stack, [experiment])
    assert rows == {"rows": len(want), "duplicate_rows": 0}


def test_redis_restart_under_load_watchers_reconnect_and_refetch(fault_stack, tmp_path: Path) -> None:
    [experiment] = make_experiments(fault_stack, 1)
    rate, series, seconds = 40.0, 5, 10.0

    async def restart() -> None:
        await asyncio.sleep(3)
        stop_redis(fault_stack)  # a crash: every subscription and queued message is gone
        await asyncio.sleep(1.5)
        start_redis(fault_stack)  # empty, on the same port

    watchers = _watch(fault_stack, experiment, 8, tmp_path, rate=rate, series=series, seconds=seconds,
                      during=restart, grace=20)  # fmt: skip
    want = watchers[0].want
    assert len(want) >= series * rate * 5
    # Nothing lost in the database, nothing written twice.
    assert count_rows(fault_stack, [experiment]) == {"rows": len(want), "duplicate_rows": 0}
    for w in watchers:
        # Each watcher saw its socket close (4409: a sink message was missed), reconnected, read what it had
        # missed from /metrics/?since=, and now holds every point exactly once (a point is a (series, step) key).
        assert w.closes.get("4409", 0) >= 1, w.closes
        assert any(since is not None for since in w.history_reads[1:]), w.history_reads
        assert set(w.seen) | w.history == want, len(want - (set(w.seen) | w.history))
        assert sum(c - 1 for c in w.seen.values()) == 0


def _lock_metric_table(stack, seconds: float) -> None:
    """Hold the metric table's write lock from another connection for `seconds` (reads still go through):
    PostgreSQL `LOCK TABLE ... IN EXCLUSIVE MODE` in a transaction, SQLite `BEGIN EXCLUSIVE` (WAL: one writer)."""
    url = stack.env["DATABASE_URL"]
    if url.startswith("sqlite:///"):
        import sqlite3

        db = sqlite3.connect(url.removeprefix("sqlite:///"), isolation_level=None, timeout=30)
        try:
            db.execute("BEGIN EXCLUSIVE")
            time.sleep(seconds)
            db.execute("COMMIT")
        finally:
            db.close()
        return
    import psycopg

    with psycopg.connect(url.replace("postgres://", "postgresql://", 1)) as db:
        db.execute("LOCK TABLE studio_metricpoint IN EXCLUSIVE MODE")
        time.sleep(seconds)
        db.commit()


def test_a_database_stall_is_buffered_then_written(fault_stack, tmp_path: Path) -> None:
    """The metric table is locked for 4 s while a job logs: its sink keeps the rows (a bounded buffer) while
    training goes on, says so in the worker log, writes them once the lock is gone; nothing is lost, and the
    watchers end with every point."""
    from workers.sink import MAX_BUFFERED_ROWS

    [experiment] = make_experiments(fault_stack, 1)
    rate, series, seconds = 40.0, 5, 9.0

    async def stall() -> None:
        await asyncio.sleep(2)
        await asyncio.to_thread(_lock_metric_table, fault_stack, 4.0)

    watchers = _watch(fault_stack, experiment, 3, tmp_path, rate=rate, series=series, seconds=seconds,
                      during=stall, grace=15)  # fmt: skip
    want, report = watchers[0].want, watchers[0].report
    assert count_rows(fault_stack, [experiment]) == {"rows": len(want), "duplicate_rows": 0}
    # Training went on through the stall (more than two seconds of points waited in the buffer), within the bound.
    assert series * rate * 2 < report["peak_buffered"] <= MAX_BUFFERED_ROWS, report
    log = (tmp_path / "worker.log").read_text()
    assert "database write failed" in log and "training goes on" in log, log[-2000:]
    for w in watchers:
        assert set(w.seen) | w.history == want, len(want - (set(w.seen) | w.history))
        assert sum(c - 1 for c in w.seen.values()) == 0
