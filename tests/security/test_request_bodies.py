"""Hostile request bodies against a real web server process on loopback (uvicorn + webapp/body_guard.py).

Each case checks what the server process itself did: the bytes it read off its sockets (/proc/PID/io),
its peak memory, the files left in its temp dir and MEDIA_ROOT, and that it answers the next request.
The client is a raw socket that sends while it listens, as a browser or curl does, so an early answer is
seen; every loop is bounded by bytes and by time.
"""

from __future__ import annotations

import asyncio
import io
import json
import re
import secrets
import select
import socket
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from email.message import Message
from http.cookies import SimpleCookie
from pathlib import Path

import numpy as np
import pytest

from tests.stack import Stack, start_stack

MB = 1024 * 1024
UPLOAD_LIMIT_MB = 8  # the stack's KD_MAX_UPLOAD_MB: small, so "past the limit" is quick to send
BODY_LIMIT = 1024 * 1024  # KD_MAX_BODY_KB's default
# What the server may read of a refused body: socket buffers and the guard's first chunks, never the rest.
READ_SLACK = 2 * MB
PROMPT_S = 3.0  # "at once": generous for two shared cores, far below sending hundreds of MB


@dataclass
class Answer:
    status: int
    body: dict
    seconds: float
    sent: int  # body bytes the client got into the socket before the answer (or the close)
    server_read: int  # bytes the server process read meanwhile (all its reads: sockets, files)
    continued: bool = False  # the server said "100 Continue" first


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """The database, Redis and the production web command; no Celery worker (nothing here runs a job)."""
    base = tmp_path_factory.mktemp("bodies")
    (base / "tmp").mkdir()
    stack = start_stack(
        base,
        workers=0,
        extra_env={
            "KD_HEALTHZ_MIN_WORKERS": "0",
            "KD_MAX_UPLOAD_MB": str(UPLOAD_LIMIT_MB),
            "TMPDIR": str(base / "tmp"),  # the server's temporary files, where this test can count them
        },
    )
    yield stack
    stack.stop()


@pytest.fixture(scope="module")
def token(server: Stack) -> str:
    return server.make_user("bodies-owner", "bodies-owner-pw-1234")


def _read_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/io").read_text().splitlines():
        if line.startswith("rchar:"):
            return int(line.split()[1])
    raise AssertionError("no rchar")


def _peak_rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM")


def _leftovers(server: Stack) -> list[str]:
    """Files in the server's temp dir and MEDIA_ROOT (which this module never fills)."""
    found = []
    for folder in (server.tmp_dir / "tmp", server.tmp_dir / "media"):
        if folder.exists():
            found += [str(p) for p in folder.rglob("*") if p.is_file()]
    return found


def send(
    server: Stack,
    path: str,
    headers: dict[str, str],
    body_bytes: int,
    *,
    chunked: bool = False,
    declared: int | None = None,
    timeout: float = 60,
) -> Answer:
    """POST `body_bytes` of zeros (a multipart preamble first) to `path` while listening for an answer.

    Stops sending at the first byte of an answer, at a close, or when the server stops reading.
    `declared` overrides the Content-Length (a liar's header); `chunked` sends no Content-Length.
    """
    pid = server.procs["web"].pid
    read_before = _read_bytes(pid)
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=5)
    head = f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
    for name, value in headers.items():
        head += f"{name}: {value}\r\n"
    head += "Transfer-Encoding: chunked\r\n" if chunked else f"Content-Length: {declared or body_bytes}\r\n"
    sock.sendall(head.encode() + b"\r\n")
    sock.setblocking(False)
    payload = b'--XX\r\nContent-Disposition: form-data; name="file"; filename="a.npz"\r\n\r\n'
    payload += b"\0" * (256 * 1024 - len(payload))
    started = time.monotonic()
    sent = 0
    pending = b""
    reply = b""
    closed = False
    while time.monotonic() - started < timeout:
        want_write = sent < body_bytes or pending
        readable, writable, _ = select.select([sock], [sock] if want_write else [], [], 2.0)
        if readable:
            try:
                data = sock.recv(65536)
            except OSError:
                data = b""
            reply += data
            if not data:
                closed = True
            if closed or _complete(reply):
                break
        elif writable:
            if not pending:
                piece = payload[: min(len(payload), body_bytes - sent)]
                sent += len(piece)
                pending = (b"%x\r\n%s\r\n" % (len(piece), piece)) if chunked else piece
                if chunked and sent >= body_bytes:
                    pending += b"0\r\n\r\n"
            try:
                pending = pending[sock.send(pending) :]
            except OSError:
                closed = True  # reset while sending: read what answer there is
        elif not want_write:
            continue  # all sent: wait for the answer
        else:
            break  # the server neither reads nor answers
    seconds = time.monotonic() - started
    if not _complete(reply) and not closed:
        sock.setblocking(True)
        sock.settimeout(5)
        try:
            reply += sock.recv(65536)
        except OSError:
            pass
    sock.close()
    continued = reply.startswith(b"HTTP/1.1 100")
    if continued:
        reply = reply.split(b"\r\n\r\n", 1)[1]
    status = int(reply.split(b" ", 2)[1]) if reply.startswith(b"HTTP/1.1 ") else 0
    raw = reply.split(b"\r\n\r\n", 1)[1] if b"\r\n\r\n" in reply else b""
    try:
        body = json.loads(raw) if raw else {}
    except ValueError:
        body = {"raw": raw[:200].decode(errors="replace")}
    return Answer(status, body, seconds, sent, _read_bytes(pid) - read_before, continued)


def _complete(reply: bytes) -> bool:
    if b"\r\n\r\n" not in reply:
        return False
    head, rest = reply.split(b"\r\n\r\n", 1)
    if head.startswith(b"HTTP/1.1 100"):
        return _complete(rest)
    match = re.search(rb"(?i)content-length: *(\d+)", head)
    return bool(match) and len(rest) >= int(match.group(1))


def _still_answers(server: Stack) -> None:
    started = time.monotonic()
    code, body = server.health()
    assert code == 200 and body.get("db") == "ok", body
    assert time.monotonic() - started < PROMPT_S


def _refused_unread(answer: Answer, status: int, words: str) -> None:
    assert answer.status == status, answer
    assert re.search(words, answer.body.get("error", "")), answer
    assert answer.seconds < PROMPT_S, answer
    assert answer.server_read < READ_SLACK, f"the server read {answer.server_read / MB:.1f} MiB"


MULTIPART = {"Content-Type": "multipart/form-data; boundary=XX"}


def test_anonymous_huge_upload_is_refused_before_it_is_read(server: Stack) -> None:
    # Over the limit, so refused as too large before the user is even looked up; within it, 401 unread.
    answer = send(server, "/api/datasets/", MULTIPART, 400 * MB)
    _refused_unread(answer, 413, f"limit of {UPLOAD_LIMIT_MB} MB")
    assert answer.sent < 400 * MB
    within = send(server, "/api/datasets/", MULTIPART, UPLOAD_LIMIT_MB * MB)
    _refused_unread(within, 401, "authentication required")
    assert within.sent < UPLOAD_LIMIT_MB * MB
    assert _leftovers(server) == []
    _still_answers(server)


def test_anonymous_declared_gigabytes_and_chunked_and_expect_continue(server: Stack) -> None:
    # A lying Content-Length, a chunked body and a polite client that waits for 100 Continue.
    liar = send(server, "/api/datasets/", MULTIPART, 4 * MB, declared=50 * 1024 * MB)
    _refused_unread(liar, 413, "limit")
    _refused_unread(send(server, "/api/datasets/", MULTIPART, 400 * MB, chunked=True), 401, "authentication")
    polite = send(server, "/api/checkpoints/", {**MULTIPART, "Expect": "100-continue"}, 0, declared=2 * MB)
    _refused_unread(polite, 401, "authentication")
    assert not polite.continued  # told not to send its body at all
    # A JSON body anywhere under /api/ needs a user too, and a bad token or session cookie is no user.
    json_type = {"Content-Type": "application/json"}
    _refused_unread(send(server, "/api/experiments/", json_type, 1000), 401, "authentication")
    bad_token = {**json_type, "Authorization": "Token " + "0" * 40}
    _refused_unread(send(server, "/api/experiments/", bad_token, 1000), 401, "invalid API token")
    bad_cookie = {**json_type, "Cookie": "sessionid=" + secrets.token_hex(16)}
    _refused_unread(send(server, "/api/experiments/", bad_cookie, 1000), 401, "authentication")
    assert _leftovers(server) == []
    _still_answers(server)


def test_authenticated_oversized_content_length_is_413_at_once(server: Stack, token: str) -> None:
    auth = {"Authorization": f"Token {token}"}
    upload = send(server, "/api/datasets/", {**MULTIPART, **auth}, 4 * MB, declared=2048 * MB)
    _refused_unread(upload, 413, f"limit of {UPLOAD_LIMIT_MB} MB")
    just_over = (UPLOAD_LIMIT_MB + 1) * MB
    _refused_unread(send(server, "/api/checkpoints/", {**MULTIPART, **auth}, just_over), 413, "limit")
    # Anything but an upload has the small limit, even multipart to another endpoint.
    config = {"Content-Type": "application/json", **auth}
    _refused_unread(send(server, "/api/experiments/", config, 2 * MB), 413, f"limit of {BODY_LIMIT} bytes")
    _refused_unread(send(server, "/api/experiments/", {**MULTIPART, **auth}, 2 * MB), 413, "bytes")
    # Pages take small forms from anyone (the login form), but not large ones.
    _refused_unread(
        send(server, "/login/", {"Content-Type": "application/x-www-form-urlencoded"}, 2 * MB), 413, "bytes"
    )
    assert _leftovers(server) == []
    _still_answers(server)


def test_chunked_upload_past_the_limit_is_cut_off(server: Stack, token: str) -> None:
    pid = server.procs["web"].pid
    peak_before = _peak_rss(pid)
    auth = {"Authorization": f"Token {token}"}
    answer = send(server, "/api/datasets/", {**MULTIPART, **auth}, 10 * UPLOAD_LIMIT_MB * MB, chunked=True)
    assert answer.status == 413 and f"limit of {UPLOAD_LIMIT_MB} MB" in answer.body["error"], answer
    # Read up to the limit (Django spools it to a temp file it deletes), not the ten times more that was sent.
    assert answer.sent < 10 * UPLOAD_LIMIT_MB * MB
    assert answer.server_read < UPLOAD_LIMIT_MB * MB + READ_SLACK, f"read {answer.server_read / MB:.1f} MiB"
    assert _peak_rss(pid) - peak_before < 32 * MB
    small = send(
        server, "/api/experiments/", {"Content-Type": "application/json", **auth}, 5 * MB, chunked=True
    )
    assert small.status == 413 and "bytes" in small.body["error"], small
    assert small.server_read < BODY_LIMIT + READ_SLACK
    time.sleep(0.2)  # Django closes the spooled temp file as the request task ends
    assert _leftovers(server) == []
    _still_answers(server)


def _npz() -> bytes:
    buffer = io.BytesIO()
    rng = np.random.default_rng(0)
    np.savez(buffer, x=rng.normal(size=(60, 4)).astype(np.float32), y=np.arange(60) % 3)
    return buffer.getvalue()


def _multipart(fields: dict[str, str], data: bytes) -> tuple[bytes, str]:
    boundary = "kd" + secrets.token_hex(8)
    parts = [
        f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n'.encode()
        for k, v in fields.items()
    ]
    parts.append(
        f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="ok.npz"\r\n'
        "Content-Type: application/octet-stream\r\n\r\n".encode()
        + data
        + f"\r\n--{boundary}--\r\n".encode()
    )
    return b"".join(parts), f"multipart/form-data; boundary={boundary}"


def _post(url: str, body: bytes, headers: dict[str, str]) -> tuple[int, dict, Message]:
    request = urllib.request.Request(url, data=body, headers=headers, method="POST")
    opener = urllib.request.build_opener(_NoRedirect)
    try:
        with opener.open(request, timeout=30) as response:
            return response.status, _json(response.read()), response.headers
    except urllib.error.HTTPError as exc:
        return exc.code, _json(exc.read()), exc.headers


def _json(raw: bytes) -> dict:
    try:
        return json.loads(raw)
    except ValueError:
        return {}


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args, **kwargs):
        return None


def _session(server: Stack, username: str, password: str) -> tuple[str, str]:
    """Log in through the real login form; returns (session id, CSRF token)."""
    with urllib.request.urlopen(server.url + "/login/", timeout=10) as response:
        cookies = SimpleCookie(response.headers.get("Set-Cookie", ""))
    csrf = cookies["csrftoken"].value
    form = f"username={username}&password={password}&csrfmiddlewaretoken={csrf}".encode()
    code, _, headers = _post(
        server.url + "/login/",
        form,
        {
            "Content-Type": "application/x-www-form-urlencoded",
            "Cookie": f"csrftoken={csrf}",
            "Referer": server.url + "/login/",
        },
    )
    assert code == 302, code
    cookies = SimpleCookie()
    for value in headers.get_all("Set-Cookie") or []:
        cookies.load(value)
    session = cookies["sessionid"].value
    return session, csrf


@pytest.fixture(scope="module")
def experiment_id(server: Stack, token: str) -> int:
    """A script's normal upload (token) and a queued experiment on it (no worker runs it)."""
    body, content_type = _multipart({"name": "ok by token"}, _npz())
    code, created, _ = _post(
        server.url + "/api/datasets/", body, {"Content-Type": content_type, "Authorization": f"Token {token}"}
    )
    assert code == 201 and created["num_samples"] == 60, created
    config = {
        "kind": "train",
        "name": "ws",
        "dataset": created["id"],
        "model": {"arch": "mlp", "hidden": [4]},
        "epochs": 1,
    }
    code, experiment, _ = _post(
        server.url + "/api/experiments/", json.dumps(config).encode(),
        {"Content-Type": "application/json", "Authorization": f"Token {token}"},
    )  # fmt: skip
    assert code == 201, experiment
    return experiment["id"]


def test_normal_uploads_and_websockets_still_work(server: Stack, token: str, experiment_id: int) -> None:
    # A browser's upload: the session cookie from a real login, and the CSRF token.
    session, csrf = _session(server, "bodies-owner", "bodies-owner-pw-1234")
    body, content_type = _multipart({"name": "ok by session"}, _npz())
    code, by_session, _ = _post(
        server.url + "/api/datasets/",
        body,
        {"Content-Type": content_type, "Cookie": f"sessionid={session}; csrftoken={csrf}", "X-CSRFToken": csrf,
         "Referer": server.url + "/datasets/"},
    )  # fmt: skip
    assert code == 201 and by_session["status"] == "ready", by_session

    assert asyncio.run(_ping(server, experiment_id, token)) == {"type": "pong"}
    assert asyncio.run(_close_code(server, experiment_id)) == 4403  # no user: refused with its code
    _still_answers(server)


async def _ping(server: Stack, experiment_id: int, token: str) -> dict:
    from websockets.asyncio.client import connect

    url = f"{server.ws_url}/ws/experiments/{experiment_id}/"
    async with connect(url, additional_headers={"Authorization": f"Token {token}"}, open_timeout=10) as ws:
        await ws.send(json.dumps({"type": "ping"}))
        return json.loads(await asyncio.wait_for(ws.recv(), timeout=10))


async def _close_code(server: Stack, experiment_id: int) -> int:
    from websockets.asyncio.client import connect
    from websockets.exceptions import ConnectionClosed

    url = f"{server.ws_url}/ws/experiments/{experiment_id}/"
    async with connect(url, origin=server.url, open_timeout=10) as ws:
        try:
            await asyncio.wait_for(ws.recv(), timeout=10)
        except ConnectionClosed as closed:
            return closed.rcvd.code if closed.rcvd else 0
    return 0


def test_an_endless_header_is_refused_not_buffered(server: Stack) -> None:
    pid = server.procs["web"].pid
    peak_before = _peak_rss(pid)
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=5)
    sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Endless: ")
    sent, reply, started = 0, b"", time.monotonic()
    sock.setblocking(False)
    while sent < 64 * MB and time.monotonic() - started < 20 and not reply:
        readable, writable, _ = select.select([sock], [sock], [], 2.0)
        if readable:
            try:
                reply = sock.recv(4096) or b"(closed)"
            except OSError:
                reply = b"(reset)"
        elif writable:
            try:
                sent += sock.send(b"a" * 65536)
            except OSError:
                reply = b"(reset)"
        else:
            break
    sock.close()
    assert reply.startswith((b"HTTP/1.1 400", b"HTTP/1.1 431", b"(closed)", b"(reset)")), reply[:80]
    assert sent < 8 * MB and time.monotonic() - started < PROMPT_S
    assert _peak_rss(pid) - peak_before < 16 * MB
    _still_answers(server)


def test_a_large_websocket_message_closes_that_socket_only(
    server: Stack, token: str, experiment_id: int
) -> None:
    async def send_big() -> int:
        from websockets.asyncio.client import connect
        from websockets.exceptions import ConnectionClosed

        url = f"{server.ws_url}/ws/experiments/{experiment_id}/"
        async with connect(url, additional_headers={"Authorization": f"Token {token}"}, max_size=None) as ws:
            try:
                await ws.send(json.dumps({"type": "ping", "pad": "x" * (4 * MB)}))
                await asyncio.wait_for(ws.recv(), timeout=10)
            except ConnectionClosed as closed:
                return closed.rcvd.code if closed.rcvd else 0
        return 0

    assert asyncio.run(send_big()) == 1009  # "message too big"
    assert asyncio.run(_ping(server, experiment_id, token)) == {"type": "pong"}
    _still_answers(server)
