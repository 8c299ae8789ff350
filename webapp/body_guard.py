"""ASGI guard in front of Django: refuses oversized or unauthenticated request bodies before reading them.

The server (uvicorn) reads a request body only as fast as the application asks for it, so what this
guard does not ask for is never read off the socket, nor written anywhere:

- a `Content-Length` over the limit is answered 413 at once, before one byte of the body is read;
- a chunked body (no `Content-Length`) is counted as it arrives and cut off with 413 at the limit;
  Django then sees a disconnect and keeps nothing;
- a body sent to `/api/` without a valid session cookie or `Authorization: Token` header is answered
  401 at once (every API endpoint needs a user; the login forms are outside `/api/`).

Limits: multipart uploads to the dataset and checkpoint endpoints may be as large as
settings.KD_MAX_UPLOAD_BYTES (plus room for the multipart framing); every other body
settings.KD_MAX_BODY_BYTES. Refusals are JSON `{"error": ...}` and close the connection, so a client
still sending is not read further.
"""

from __future__ import annotations

import json
from types import SimpleNamespace
from typing import Any

from channels.db import database_sync_to_async
from django.conf import settings

Scope = dict[str, Any]
Message = dict[str, Any]

# Room for the multipart boundaries and part headers around an upload of the full size (as storage.py).
MULTIPART_SLACK = 64 * 1024
UPLOAD_PATHS = ("/api/datasets/", "/api/checkpoints/")


def _headers(scope: Scope) -> dict[bytes, bytes]:
    # Later duplicates win except for Content-Length, which the server already checked is consistent.
    return {name.lower(): value for name, value in scope.get("headers", [])}


def is_upload(scope: Scope, headers: dict[bytes, bytes]) -> bool:
    """A multipart POST to an endpoint that takes files."""
    content_type = headers.get(b"content-type", b"").split(b";", 1)[0].strip().lower()
    return (
        scope.get("method") == "POST"
        and scope.get("path") in UPLOAD_PATHS
        and content_type == b"multipart/form-data"
    )


def body_limit(scope: Scope, headers: dict[bytes, bytes]) -> tuple[int, str]:
    """(the most bytes this request's body may have, the 413 message when it has more)."""
    if is_upload(scope, headers):
        limit_mb = settings.KD_MAX_UPLOAD_BYTES // (1024 * 1024)
        return (
            settings.KD_MAX_UPLOAD_BYTES + MULTIPART_SLACK,
            f"the upload is larger than the limit of {limit_mb} MB",
        )
    limit = settings.KD_MAX_BODY_BYTES
    return limit, f"the request body is larger than the limit of {limit} bytes"


def _user_for_request(cookie_header: str | None, authorization: str | None) -> Any:
    """The active user a token header or else a session cookie names, or None (runs in a thread)."""
    from django.contrib.auth import get_user
    from django.http.cookie import parse_cookie

    from webapp.studio.auth import token_from_header
    from webapp.studio.models import ApiToken

    if authorization is not None:
        # As the API views: a header, valid or not, decides alone.
        key = token_from_header(authorization)
        return ApiToken.user_for_key(key) if key else None
    session_key = parse_cookie(cookie_header or "").get(settings.SESSION_COOKIE_NAME)
    if not session_key:
        return None
    from importlib import import_module

    store = import_module(settings.SESSION_ENGINE).SessionStore(session_key)
    # django.contrib.auth.get_user needs only `.session`: it checks the session hash and the backend.
    user = get_user(SimpleNamespace(session=store))
    return user if user.is_authenticated and user.is_active else None


_user_for_request_async = database_sync_to_async(_user_for_request)


async def _answer(send: Any, status: int, message: str) -> None:
    body = json.dumps({"error": message}).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                # The rest of the body is not wanted: the server closes instead of reading it to reuse the connection.
                (b"connection", b"close"),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body, "more_body": False})


class BodyGuard:
    """Wraps the HTTP side of the ASGI application (see the module docstring)."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = _headers(scope)
        chunked = b"chunked" in headers.get(b"transfer-encoding", b"").lower()
        try:
            declared = int(headers.get(b"content-length", b"0")) if not chunked else None
        except ValueError:
            declared = 0  # the server refuses a malformed Content-Length before it gets here
        has_body = chunked or bool(declared)
        if not has_body:
            await self.app(scope, receive, send)
            return
        limit, too_large = body_limit(scope, headers)
        if declared is not None and declared > limit:
            await _answer(send, 413, too_large)
            return
        if scope.get("path", "").startswith("/api/"):
            authorization = headers.get(b"authorization")
            user = await _user_for_request_async(
                headers[b"cookie"].decode("latin-1") if b"cookie" in headers else None,
                authorization.decode("latin-1") if authorization is not None else None,
            )
            if user is None:
                reason = (
                    "invalid API token (expected header 'Authorization: Token <key>')"
                    if authorization is not None
                    else "authentication required: log in, or send 'Authorization: Token <key>'"
                )
                await _answer(send, 401, reason)
                return
        await self._counted(scope, receive, send, limit, too_large)

    async def _counted(self, scope: Scope, receive: Any, send: Any, limit: int, too_large: str) -> None:
        """Run the app, counting the body it reads; past `limit`, answer 413 and tell the app the client left."""
        received = 0
        refused = False
        started = False

        async def guarded_receive() -> Message:
            nonlocal received, refused
            if refused:
                return {"type": "http.disconnect"}
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    refused = True
                    if not started:
                        await _answer(send, 413, too_large)
                    return {"type": "http.disconnect"}
            return message

        async def guarded_send(message: Message) -> None:
            nonlocal started
            started = True
            if not refused:  # after a refusal the app has nothing more to say to this client
                await send(message)

        await self.app(scope, guarded_receive, guarded_send)
