"""Errors as the service answers them: ``{"error": message, "field": name-or-null}``, always JSON.

Every malformed request gets a 4xx naming the field and the problem: pydantic's
validation errors (the first one leads, all are listed under ``errors``), unknown ids
(404), conflicts (409), bodies over the limit (413), routes and methods that do not exist
(404/405), and bitalloc's own user errors (``BitallocError``: 422). Anything else is a
bug and answers 500 with a generic message (the traceback goes to the server's log).
"""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from bitalloc import BitallocError

__all__ = ["ApiError", "BodyTooLarge", "install_handlers", "field_of"]

log = logging.getLogger("bitalloc.service")


class ApiError(Exception):
    """An answer other than success: HTTP status, message, the field it is about."""

    def __init__(self, status: int, error: str, field: str | None = None, **extra):
        super().__init__(error)
        self.status, self.error, self.field, self.extra = status, error, field, extra


class BodyTooLarge(StarletteHTTPException):
    """A body over the limit, found while it streams (an HTTPException so that FastAPI's body
    reader passes it through instead of turning it into a generic 400)."""

    def __init__(self, limit: int):
        super().__init__(413, f"request body is larger than the limit of {limit} bytes")
        self.field, self.limit = "body", limit


def body(error: str, field: str | None = None, **extra) -> dict:
    return {"error": error, "field": field, **extra}


def field_of(loc) -> str | None:
    """pydantic's location tuple -> ``pins.x`` / ``schemes[2]`` (without the body/query/path prefix)."""
    parts = list(loc)
    if parts and parts[0] in ("body", "query", "path", "header"):
        parts = parts[1:]
    out = ""
    for p in parts:
        if isinstance(p, int):
            out += f"[{p}]"
        elif _is_tag(p):
            continue  # a union branch's tag, not a field
        else:
            out += ("." if out else "") + str(p)
    return out or None


_TAGS = {"str", "int", "float", "bool", "none", "CalibrationText", "GroupSpec"}


def _is_tag(p) -> bool:
    return p in _TAGS or str(p).startswith(("literal[", "function-", "list[", "dict[", "union[", "nullable["))


def _one(err: dict) -> tuple[str | None, str]:
    ctx_err = (err.get("ctx") or {}).get("error")
    if ctx_err is not None and hasattr(ctx_err, "field"):  # schemas._FieldError from a model validator
        return ctx_err.field, ctx_err.msg
    msg = str(err.get("msg", "invalid value"))
    if msg.startswith("Value error, "):
        msg = msg[len("Value error, "):]
    field = field_of(err.get("loc", ()))
    if err.get("type") == "extra_forbidden":
        msg = "unknown field"
    elif err.get("type") == "missing":
        msg = "this field is required"
    elif err.get("type") == "json_invalid":
        msg = f"the body is not valid JSON ({(err.get('ctx') or {}).get('error', msg)})"
        field = "body"
    return field, msg


def _validation_response(errors: list[dict]) -> JSONResponse:
    items = [_one(e) for e in errors] or [(None, "invalid request")]
    field, msg = items[0]
    deeper = [it for it in items if field and it[0] and it[0].startswith((field + ".", field + "["))]
    if deeper:  # a union's branches: the one that got furthest says the most
        field, msg = max(deeper, key=lambda it: len(it[0]))
    status = 400 if field == "body" else 422
    return JSONResponse(body(f"{field}: {msg}" if field and field != "body" else msg, field,
                             errors=[{"field": f, "error": m} for f, m in items[:20]]), status_code=status)


def install_handlers(app: FastAPI) -> None:
    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError):
        return _validation_response(list(exc.errors()))

    @app.exception_handler(ApiError)
    async def _api(request: Request, exc: ApiError):
        headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else None
        return JSONResponse(body(exc.error, exc.field, **exc.extra), status_code=exc.status, headers=headers)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        if isinstance(exc, BodyTooLarge):
            return JSONResponse(body(str(exc.detail), "body", limit_bytes=exc.limit), status_code=413,
                                headers={"connection": "close"})
        msg = {404: f"no route {request.url.path!r}", 405: f"method {request.method} is not allowed on {request.url.path!r}"}
        return JSONResponse(body(msg.get(exc.status_code, str(exc.detail)), None), status_code=exc.status_code,
                            headers=getattr(exc, "headers", None))

    @app.exception_handler(BitallocError)
    async def _user(request: Request, exc: BitallocError):
        return JSONResponse(body(str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__, None),
                            status_code=422)

    @app.exception_handler(Exception)
    async def _bug(request: Request, exc: Exception):
        log.exception("internal error on %s %s", request.method, request.url.path)
        return JSONResponse(body(f"internal error ({type(exc).__name__}); see the server log", None), status_code=500)
