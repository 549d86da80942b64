"""The API's errors: every failure is `{"error": {"type", "message"}}` with a 4xx (or 5xx) status.

Typed streamkv errors map to statuses (`typed_status`); request validation, Starlette's HTTP
errors and unexpected exceptions get the same format. `install(app)` registers the handlers and
makes the OpenAPI document list each operation's own error statuses (ROUTE_ERRORS).
"""

import re

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from deploy import auth
from deploy.schemas import ErrorResponse
from pipeline.errors import (
    CapacityError, ConfigError, IndexUnavailableError, InvalidInputError, NoFramesError, PushBufferTimeout, SourceRefusedError, SourceUnavailableError,
    StreamKVError, StreamLostError, UnknownStreamError, VideoDecodeError,
)


class APIError(Exception):
    def __init__(self, status: int, type_: str, message: str):
        super().__init__(message)
        self.status, self.type, self.message = status, type_, message


def error_json(status: int, type_: str, message: str, headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"error": {"type": type_, "message": message}}, status_code=status, headers=headers)


_TYPED = [  # most specific first
    (UnknownStreamError, 404), (NoFramesError, 409), (StreamLostError, 409), (VideoDecodeError, 422),
    (SourceRefusedError, 400), (SourceUnavailableError, 422), (IndexUnavailableError, 503), (ConfigError, 422), (InvalidInputError, 422),
]


def cause(exc: BaseException) -> BaseException:
    """The user's exception inside a Ray task error (which is also an instance of its class)."""
    inner = getattr(exc, "cause", None)
    return inner if isinstance(inner, BaseException) else exc


def message(exc: BaseException) -> str:
    inner = cause(exc)
    if isinstance(inner, KeyError) and inner.args:  # KeyError's str() is the repr of its argument
        return auth.scrub(str(inner.args[0]))
    return auth.scrub(str(inner).strip().splitlines()[-1]) if str(inner).strip() else type(inner).__name__


def typed_status(exc: BaseException) -> int:
    for cls, status in _TYPED:
        if isinstance(exc, cls):
            return status
    if isinstance(exc, PushBufferTimeout):
        return 503
    if isinstance(exc, CapacityError):  # past max_streams: 429; no room in the cluster now: 503
        return 429 if getattr(cause(exc), "at_limit", False) else 503
    return 500  # UnsupportedModelError, PageCorruptError: the server's fault, not the request's


def error_name(exc: BaseException) -> str:
    for cls, _ in _TYPED:
        if isinstance(exc, cls):
            return cls.__name__
    return type(cause(exc)).__name__


RESPONSES = {code: {"model": ErrorResponse} for code in (400, 401, 404, 409, 413, 415, 422, 429, 503, 504)}
# The error statuses each operation answers with, as its OpenAPI entry lists them (an operation
# left out lists all of RESPONSES). 400: a source the server refuses to fetch; 401: no or a wrong
# token; 404: no such stream (or another token's), unknown model; 409: no frames yet, the source
# does not take chunks (anymore), the stream has a source still running (a new one), or the
# stream was lost (delete it and create it again); 413: a body over the limit; 415: a chunk that
# is not video; 422: an invalid request; 503: the coordinator is unavailable, or a pushed chunk
# waited too long, or no room for a new stream now (Retry-After); 429: the server holds its
# max_streams streams (Retry-After); 504: a one-shot video URL that did not finish decoding in time.
ROUTE_ERRORS = {
    ("get", "/healthz"): (503,),
    ("get", "/metrics"): (401, 503),
    ("get", "/v1/models"): (401,),
    ("post", "/v1/streams"): (400, 401, 413, 422, 429, 503),
    ("get", "/v1/streams"): (401, 503),
    ("get", "/v1/streams/{stream_id}"): (401, 404, 503),
    ("delete", "/v1/streams/{stream_id}"): (401, 404, 503),
    ("get", "/v1/streams/{stream_id}/segments"): (401, 404, 503),
    ("post", "/v1/streams/{stream_id}/chunks"): (400, 401, 404, 409, 413, 415, 422, 503),
    ("post", "/v1/streams/{stream_id}/close"): (401, 404, 409, 422, 503),
    ("post", "/v1/streams/{stream_id}/source"): (400, 401, 404, 409, 413, 422, 503),
    ("post", "/v1/chat/completions"): (400, 401, 404, 409, 413, 422, 429, 503, 504),
}


def install(app: FastAPI) -> None:
    """The error handlers, and the OpenAPI document listing each operation's error statuses."""

    def openapi() -> dict:
        if app.openapi_schema is None:
            document = FastAPI.openapi(app)  # generates and caches app.openapi_schema
            for path, operations in document.get("paths", {}).items():
                for method, operation in operations.items():
                    keep = ROUTE_ERRORS.get((method, path))
                    responses = operation.get("responses", {})
                    for code in [c for c in responses if keep is not None and c.isdigit() and int(c) >= 400]:
                        if int(code) not in keep:
                            del responses[code]
        return app.openapi_schema

    app.openapi = openapi
    app.add_exception_handler(APIError, _api_error)
    app.add_exception_handler(StreamKVError, _typed_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(Exception, _unexpected)


async def _api_error(request: Request, exc: APIError):
    headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else None
    return error_json(exc.status, exc.type, exc.message, headers)


async def _typed_error(request: Request, exc: StreamKVError):
    retry = getattr(cause(exc), "retry_after_s", None) if isinstance(exc, CapacityError) else None
    headers = {"Retry-After": str(max(1, round(retry)))} if retry is not None else None
    return error_json(typed_status(exc), error_name(exc), message(exc), headers)


async def _validation_error(request: Request, exc: RequestValidationError):
    errors = exc.errors()
    if any(e.get("type") == "json_invalid" for e in errors):
        return error_json(400, "invalid_json", "the request body is not valid JSON")
    parts = []
    for e in errors[:5]:
        where = ".".join(str(p) for p in e.get("loc", ()) if p != "body")
        parts.append(f"{where or 'body'}: {e.get('msg')}")
    return error_json(422, "invalid_request", "; ".join(parts) or "invalid request")


async def _http_error(request: Request, exc: StarletteHTTPException):
    kinds = {404: "not_found", 405: "method_not_allowed", 400: "bad_request", 413: "too_large"}
    headers = dict(getattr(exc, "headers", None) or {})
    if exc.status_code == 405:  # Starlette names the methods of one route; the path may have several
        headers["Allow"] = ", ".join(_allowed_methods(request) or [headers.get("Allow", "")])
    return error_json(exc.status_code, kinds.get(exc.status_code, "http_error"), str(exc.detail), headers or None)


def _allowed_methods(request: Request) -> list[str]:
    """The methods the OpenAPI document lists for the request's path."""
    path, root = request.scope["path"], request.scope.get("root_path", "")
    path = (path[len(root):] or "/") if root and path.startswith(root) else path
    methods = set()
    for template, operations in request.app.openapi().get("paths", {}).items():
        if re.fullmatch(re.sub(r"\\\{[^/]+?\\\}", "[^/]+", re.escape(template)), path):
            methods |= {m.upper() for m in operations}
    return sorted(methods)


async def _unexpected(request: Request, exc: Exception):
    from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError

    if isinstance(exc, (RayActorError, ActorDiedError, ActorUnavailableError)):
        return error_json(503, "unavailable", "the stream coordinator is unavailable; retry later")
    return error_json(500, "internal_error", f"{type(cause(exc)).__name__}: {message(exc)}")
