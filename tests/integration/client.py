"""A tiny HTTP client for the stack's REST API (urllib only), used like a script user would."""

from __future__ import annotations

import json
import secrets
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any


class ApiError(Exception):
    def __init__(self, code: int, body: Any) -> None:
        super().__init__(f"HTTP {code}: {body}")
        self.code = code
        self.body = body


class Api:
    """`Authorization: Token` requests against one stack; JSON in, JSON out."""

    def __init__(self, base_url: str, token: str) -> None:
        self.base = base_url.rstrip("/")
        self.token = token

    def request(self, method: str, path: str, body: bytes | None = None, content_type: str | None = None,
                timeout: float = 60) -> tuple[int, bytes, dict[str, str]]:  # fmt: skip
        req = urllib.request.Request(self.base + path, data=body, method=method)
        req.add_header("Authorization", f"Token {self.token}")
        if content_type:
            req.add_header("Content-Type", content_type)
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                return r.status, r.read(), dict(r.headers)
        except urllib.error.HTTPError as e:
            return e.code, e.read(), dict(e.headers)

    def _json(
        self, method: str, path: str, body: bytes | None = None, content_type: str | None = None
    ) -> Any:
        code, data, _ = self.request(method, path, body, content_type)
        parsed = json.loads(data) if data else None
        if code >= 400:
            raise ApiError(code, parsed)
        return parsed

    def get(self, path: str) -> Any:
        return self._json("GET", path)

    def post(self, path: str, payload: Any = None) -> Any:
        return self._json("POST", path, json.dumps(payload or {}).encode(), "application/json")

    def upload(self, path: str, fields: dict[str, str], file_path: Path) -> Any:
        boundary = "kd" + secrets.token_hex(12)
        parts: list[bytes] = []
        for key, value in fields.items():
            parts.append(
                f'--{boundary}\r\nContent-Disposition: form-data; name="{key}"\r\n\r\n{value}\r\n'.encode()
            )
        parts.append(
            f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="{file_path.name}"\r\n'
            "Content-Type: application/octet-stream\r\n\r\n".encode()
            + file_path.read_bytes()
            + f"\r\n--{boundary}--\r\n".encode()
        )
        return self._json("POST", path, b"".join(parts), f"multipart/form-data; boundary={boundary}")

    def download(self, path: str) -> bytes:
        code, data, _ = self.request("GET", path, timeout=120)
        if code != 200:
            raise ApiError(code, data[:500])
        return data
