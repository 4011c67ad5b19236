"""Errors as HTTP responses: every failure a caller can cause, or the system can be in, has
a status, a stable ``code`` and a message that says what to do (an :class:`ErrorBody`).

rayfin's own exceptions map by type (:data:`STATUS_BY_ERROR`, most specific first), so a
route raises what the domain code raises and nothing else translates it. Anything else is
a bug: a 500 whose body hides the internals (they go to the replica's log).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from rayfin import errors
from rayfin.serve.scoring import NoModelError

logger = logging.getLogger(__name__)


class ApiError(Exception):
    """An error response raised from inside a route or middleware."""

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        *,
        detail: Any = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.detail = detail
        self.headers = dict(headers or {})


STATUS_BY_ERROR: tuple[tuple[type[Exception], int, str], ...] = (
    (errors.PromptTooLongError, 413, "prompt_too_long"),
    (errors.CacheFullError, 503, "kv_cache_full"),
    (errors.SwarmUnavailableError, 503, "llm_unavailable"),
    (errors.SessionError, 422, "bad_generation_request"),
    (errors.LLMError, 503, "llm_unavailable"),
    (errors.ModelInputError, 422, "missing_features"),
    (NoModelError, 503, "no_model"),
    (errors.ModelNotFoundError, 404, "not_found"),
    (errors.RegistryError, 422, "bad_model"),
    (errors.TrainingError, 422, "bad_model"),
    (errors.TradingError, 422, "bad_request"),
    (errors.RayfinError, 503, "unavailable"),
)
"""rayfin exception type -> (HTTP status, error code); the first match wins."""

_HTTP_CODES = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    413: "too_large",
    415: "unsupported_media_type",
    429: "rate_limited",
}


def error_response(
    status: int,
    code: str,
    message: str,
    detail: Any = None,
    headers: Mapping[str, str] | None = None,
) -> JSONResponse:
    """The :class:`~rayfin.serve.schemas.ErrorBody` response."""
    body: dict[str, Any] = {"error": {"code": code, "message": message}}
    if detail is not None:
        body["error"]["detail"] = detail
    return JSONResponse(body, status_code=status, headers=dict(headers or {}))


def for_exception(exc: BaseException) -> ApiError | None:
    """The response a rayfin exception maps to, or None for anything else."""
    if isinstance(exc, ApiError):
        return exc
    for error_type, status, code in STATUS_BY_ERROR:
        if isinstance(exc, error_type):
            headers = {"Retry-After": "1"} if status == 503 else None
            return ApiError(status, code, _first_line(exc), headers=headers)
    return None


def _first_line(exc: BaseException) -> str:
    # Errors raised in another Ray process arrive wrapped; their own message is the last
    # non-empty line of the wrapper's text.
    text = str(getattr(exc, "cause", None) or exc).strip()
    lines = [line for line in text.splitlines() if line.strip()]
    return lines[-1].strip() if lines else type(exc).__name__


def _where(loc: Sequence[Any]) -> str:
    return ".".join(str(part) for part in loc)


def validation_message(problems: Sequence[Mapping[str, Any]]) -> str:
    """One line naming each invalid field: ``body.rows.0.price: Input should be > 0``."""
    parts = [f"{_where(p.get('loc', ()))}: {p.get('msg', 'invalid')}" for p in problems[:5]]
    more = len(problems) - 5
    return "; ".join(parts) + (f"; and {more} more" if more > 0 else "")


def _allowed_methods(request: Request) -> list[str]:
    """Every method some route serves at the request's path (Starlette's 405 names only
    the first route's)."""
    from starlette.routing import Match

    methods: set[str] = set()
    for route in request.app.routes:
        match, _ = route.matches({**request.scope, "method": "GET"})
        if match != Match.NONE:
            methods |= set(getattr(route, "methods", None) or ())
    return sorted(methods)


def install(app: FastAPI) -> None:
    """Register the handlers that turn every exception into an error body."""

    @app.exception_handler(ApiError)
    async def _api_error(_: Request, exc: ApiError) -> JSONResponse:
        return error_response(exc.status, exc.code, exc.message, exc.detail, exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        problems = exc.errors()
        detail = [
            {"loc": list(p.get("loc", ())), "msg": p.get("msg"), "type": p.get("type")}
            for p in problems
        ]
        return error_response(422, "validation_error", validation_message(problems), detail)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        if exc.status_code == 400:
            # FastAPI's only 400: a body that is not even text (JSON is UTF-8). For the
            # caller that is one more invalid body, so it is answered like the others.
            return error_response(
                422, "validation_error", "body: not valid JSON (UTF-8 text expected)"
            )
        headers = dict(getattr(exc, "headers", None) or {})
        if exc.status_code == 405:
            headers["Allow"] = ", ".join(_allowed_methods(request))
        code = _HTTP_CODES.get(exc.status_code, "error")
        return error_response(exc.status_code, code, str(exc.detail), headers=headers)

    @app.exception_handler(Exception)
    async def _other(request: Request, exc: Exception) -> JSONResponse:
        mapped = for_exception(exc)
        if mapped is not None:
            return error_response(
                mapped.status, mapped.code, mapped.message, mapped.detail, mapped.headers
            )
        logger.exception("unhandled error on %s %s", request.method, request.url.path)
        return error_response(
            500, "internal", "an internal error occurred; it has been logged on the server"
        )
