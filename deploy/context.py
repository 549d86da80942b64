"""This replica's service (settings, coordinator client, metrics) and the per-request dependencies:
the caller's owner id (bearer token) and checked stream ids.

Serve pickles the deployment class's methods by value, with a copy of their module's globals: the
deployment's constructor sets SERVICE on this imported module, which the routes (in importable
modules, pickled by reference) and the middleware read.
"""

import re
from dataclasses import dataclass

from fastapi import Request, Security
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from deploy import auth
from deploy.errors import APIError
from deploy.schemas import STREAM_ID_PATTERN

_STREAM_ID = re.compile(STREAM_ID_PATTERN)


@dataclass
class Service:
    settings: "Settings"  # noqa: F821 - deploy.settings.Settings
    client: "CoordinatorClient"  # noqa: F821 - deploy.client.CoordinatorClient
    metrics: "Metrics"  # noqa: F821 - deploy.metrics.Metrics
    created: int  # the model card's creation time


SERVICE: Service | None = None


def service() -> Service:
    if SERVICE is None:
        raise APIError(503, "unavailable", "the service is starting")
    return SERVICE


def settings():
    return SERVICE.settings if SERVICE is not None else None


# Declares the bearer scheme in the OpenAPI document; the check itself is auth.authenticate (a
# missing or malformed header is a 401 in the error format, not FastAPI's 403).
BEARER = HTTPBearer(auto_error=False, description="one of the server's API tokens (builder arg api_token)")


async def owner(request: Request, _: HTTPAuthorizationCredentials | None = Security(BEARER)) -> str:
    if SERVICE is None:
        raise APIError(503, "unavailable", "the service is starting")
    s = SERVICE.settings
    metrics_token = s.metrics_token if request.url.path.endswith("/metrics") else None
    try:
        return auth.authenticate(s.api_tokens, s.secret(), request.headers.get("authorization"), metrics_token)
    except auth.Unauthorized as exc:
        raise APIError(401, "unauthorized", str(exc)) from None


def check_id(stream_id: str) -> str:
    if not _STREAM_ID.match(stream_id):
        raise APIError(404, "UnknownStreamError", f"no stream {stream_id!r}")
    return stream_id
