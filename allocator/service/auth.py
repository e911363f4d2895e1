"""Bearer tokens: read from ``--token-file``, stored hashed, checked on every ``/v1`` request.

The token file holds one token per line (``#`` comments and blank lines ignored); a line
``sha256:<64 hex>`` gives the hash directly, so the plain token need not be on the server
at all (``printf %s TOKEN | sha256sum``). Only sha256 hashes are kept: in the database's
``tokens`` table and in memory; requests are compared by hash in constant time.

Without a token file the server runs open, and only on a loopback address: binding to
anything else without tokens is refused at start-up. With tokens, every route except
``GET /v1/health``, ``/openapi.json`` and ``/docs`` answers 401 without a valid
``Authorization: Bearer <token>``.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import json
import os
import re
from pathlib import Path

from bitalloc import BitallocError

__all__ = ["AuthError", "hash_token", "load_token_file", "is_loopback", "TokenAuth"]

OPEN_PATHS = ("/v1/health", "/openapi.json", "/docs", "/docs/oauth2-redirect", "/redoc")
_HASH_LINE = re.compile(r"^sha256:([0-9a-f]{64})$")


class AuthError(BitallocError, ValueError):
    """The server's authentication setup is unusable (bad token file, open non-loopback bind)."""


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def load_token_file(path: str | os.PathLike) -> list[str]:
    """The token hashes in a token file."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise AuthError(f"--token-file {str(p)!r} cannot be read ({e.__class__.__name__}: {e})") from None
    hashes = []
    for n, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.lower().startswith("sha256:"):
            m = _HASH_LINE.match(line.lower())
            if not m:
                raise AuthError(f"--token-file {str(p)!r} line {n}: 'sha256:' must be followed by 64 hex digits")
            hashes.append(m.group(1))
            continue
        if len(line) < 16 or any(c.isspace() for c in line):
            raise AuthError(f"--token-file {str(p)!r} line {n}: a token must be at least 16 characters, no spaces")
        hashes.append(hash_token(line))
    if not hashes:
        raise AuthError(f"--token-file {str(p)!r} holds no token")
    return sorted(set(hashes))


def is_loopback(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a host name other than localhost: it may resolve anywhere


class TokenAuth:
    """Pure ASGI middleware: 401 JSON unless the bearer token's hash is known (open paths excepted)."""

    def __init__(self, app, hashes: list[str] | None):
        self.app = app
        self.hashes = list(hashes or [])

    def allowed(self, header: str | None) -> bool:
        if not self.hashes:
            return True
        if not header or not header.lower().startswith("bearer "):
            return False
        got = hash_token(header[7:].strip())
        ok = False
        for h in self.hashes:  # constant time, and no early exit
            ok |= hmac.compare_digest(got, h)
        return ok

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or not self.hashes or scope["path"] in OPEN_PATHS:
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        if self.allowed(headers.get("authorization")):
            return await self.app(scope, receive, send)
        why = "missing bearer token" if "authorization" not in headers else "invalid bearer token"
        data = json.dumps({"error": f"{why}: send 'Authorization: Bearer <token>'", "field": "authorization"}).encode()
        await send({"type": "http.response.start", "status": 401,
                    "headers": [(b"content-type", b"application/json"), (b"www-authenticate", b"Bearer"),
                                (b"content-length", str(len(data)).encode())]})
        await send({"type": "http.response.body", "body": data})
