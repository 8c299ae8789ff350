"""Authentication in one place: the API view decorator (session or token) and the WebSocket stack."""

from __future__ import annotations

import functools
import json
import logging
from collections.abc import Callable

from channels.auth import AuthMiddlewareStack
from channels.db import database_sync_to_async
from channels.middleware import BaseMiddleware
from channels.security.websocket import OriginValidator
from django.conf import settings
from django.contrib.auth.models import AnonymousUser
from django.core.exceptions import BadRequest, RequestDataTooBig, SuspiciousOperation
from django.http import Http404, HttpRequest, HttpResponse, JsonResponse
from django.http.multipartparser import MultiPartParserError
from django.middleware.csrf import CsrfViewMiddleware
from django.views.decorators.csrf import csrf_exempt

from webapp.studio.models import ApiToken

log = logging.getLogger(__name__)


class ApiError(Exception):
    """Raised anywhere below a view to answer `{"error": message}` with `status`.

    `fields` (config key -> message) adds `"fields"` to the answer, so a form marks every bad field.
    """

    def __init__(self, message: str, status: int = 400, fields: dict[str, str] | None = None):
        super().__init__(message)
        self.message = message
        self.status = status
        self.fields = dict(fields or {})


def error(message: str, status: int = 400, fields: dict[str, str] | None = None) -> JsonResponse:
    return JsonResponse({"error": message, "fields": fields} if fields else {"error": message}, status=status)


def token_from_header(value: str | None) -> str | None:
    """The key of an `Authorization: Token <key>` header (also `Bearer`), else None."""
    if not value:
        return None
    scheme, _, key = value.strip().partition(" ")
    if scheme.lower() not in ("token", "bearer") or not key.strip():
        return None
    return key.strip()


class _CsrfCheck(CsrfViewMiddleware):
    def _reject(self, request, reason):
        return reason


def _csrf_failure(request: HttpRequest) -> str | None:
    # Session-authenticated API calls come from our own pages, which send the CSRF token.
    check = _CsrfCheck(lambda req: None)
    check.process_request(request)
    return check.process_view(request, None, (), {})


def api_view(methods: list[str] | tuple[str, ...]) -> Callable:
    """Wrap a JSON API view: allowed methods, authentication, CSRF for sessions, errors as JSON.

    A request with `Authorization: Token <key>` is authenticated by that key alone (a bad key is 401
    even with a session) and needs no CSRF token: no browser sends that header by itself. Any other
    request needs a session, and unsafe methods need the CSRF token as for a form.
    """
    allowed = {m.upper() for m in methods}

    def decorate(view: Callable) -> Callable:
        @csrf_exempt
        @functools.wraps(view)
        def wrapper(request: HttpRequest, *args, **kwargs) -> HttpResponse:
            if request.method not in allowed:
                response = error(f"method {request.method} not allowed here", 405)
                response["Allow"] = ", ".join(sorted(allowed))
                return response
            header = request.META.get("HTTP_AUTHORIZATION")
            key = token_from_header(header)
            if header is not None:
                user = ApiToken.user_for_key(key) if key else None
                if user is None:
                    return error("invalid API token (expected header 'Authorization: Token <key>')", 401)
                request.user = user
            elif not request.user.is_authenticated:
                return error("authentication required: log in, or send 'Authorization: Token <key>'", 401)
            elif request.method not in ("GET", "HEAD", "OPTIONS"):
                reason = _csrf_failure(request)
                if reason:
                    return error(f"CSRF check failed: {reason}", 403)
            try:
                return view(request, *args, **kwargs)
            except ApiError as exc:
                return error(exc.message, exc.status, exc.fields)
            except Http404 as exc:
                return error(str(exc) or "not found", 404)
            except RequestDataTooBig:
                return error(_too_big_message(), 413)
            except (SuspiciousOperation, BadRequest, MultiPartParserError) as exc:
                # Django's own answer would be its HTML 400 page; API clients read JSON.
                return error(f"bad request: {exc}", 400)
            except Exception:
                # Never a traceback or an exception's text: they can name files, settings or SQL.
                log.exception("unexpected error in %s %s", request.method, request.path)
                return error("internal server error; the failure was logged", 500)

        return wrapper

    return decorate


def _too_big_message() -> str:
    return f"the request body is larger than the limit of {settings.DATA_UPLOAD_MAX_MEMORY_SIZE} bytes"


def json_body(request: HttpRequest) -> dict:
    """The request's JSON object body, or ApiError(400, or 413 when too large) saying why not."""
    if request.content_type.startswith("multipart/"):
        raise ApiError("send the body as JSON (Content-Type: application/json)")
    try:
        data = json.loads(request.body or b"{}")
    except (ValueError, UnicodeDecodeError) as exc:
        raise ApiError(f"request body is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise ApiError("request body must be a JSON object")
    return data


# --- WebSocket ------------------------------------------------------------------------------


@database_sync_to_async
def _user_for_key(key: str):
    return ApiToken.user_for_key(key)


def _header(scope: dict, name: bytes) -> str | None:
    for header_name, value in scope.get("headers", []):
        if header_name.lower() == name:
            return value.decode("latin1")
    return None


class TokenAuthMiddleware(BaseMiddleware):
    """Sets scope["user"] from an `Authorization: Token <key>` header when there is one.

    It sits inside Channels' session AuthMiddleware, so a header (valid or not) overrides the cookie.
    """

    async def __call__(self, scope, receive, send):
        header = _header(scope, b"authorization")
        if header is not None:
            key = token_from_header(header)
            user = await _user_for_key(key) if key else None
            scope = dict(scope, user=user or AnonymousUser())
        return await super().__call__(scope, receive, send)


def WebSocketAuthStack(inner):  # noqa: N802 - named like Channels' AuthMiddlewareStack
    """Session cookie first (Channels' stack), then the token header."""
    return AuthMiddlewareStack(TokenAuthMiddleware(inner))


class _BrowserOriginValidator(OriginValidator):
    """Channels' origin check, except a token client without an Origin header is let through.

    Browsers always send Origin on a WebSocket, so a missing one cannot be a cross-site page; the
    token (checked next) then decides.
    """

    async def __call__(self, scope, receive, send):
        if _header(scope, b"origin") is None and _header(scope, b"authorization") is not None:
            return await self.application(scope, receive, send)
        return await super().__call__(scope, receive, send)


def websocket_origin_validator(application):
    """Like Channels' AllowedHostsOriginValidator (Origin must be one of ALLOWED_HOSTS)."""
    allowed_hosts = list(settings.ALLOWED_HOSTS)
    if settings.DEBUG and not allowed_hosts:
        allowed_hosts = ["localhost", "127.0.0.1", "[::1]"]
    return _BrowserOriginValidator(application, allowed_hosts)
