"""The web console (issue 22): a page over the API, and the two routes it adds to it.

    GET /console                                  the page (deploy/console/index.html; no build step)
    GET /console/{asset}                          its scripts and style sheet
    GET /v1/streams/{id}/timeline?after=&limit=   closed segments after segment `after`, each with
                                                  the thumbnail nearest its middle frame (base64 JPEG)
    GET /v1/streams/{id}/thumbnails/{frame}       the thumbnail nearest the frame (image/jpeg; its frame
                                                  in X-Thumbnail-Frame), e.g. an answer's evidence

The page itself holds no stream data, so it needs no token; everything it shows comes from
routes that do. The browser keeps the token (localStorage, sent as a bearer header by fetch,
never in a URL) and so sees only that token's streams. Thumbnails are made by the coordinator's
thumbnailer (actors/thumbnailer.py) as frames are ingested and kept beside the segment index
(cache_store/thumbnails.py: Redis, or embedded in the coordinator), bounded per stream and freed
with it.
"""

from __future__ import annotations

import base64
from pathlib import Path
from typing import Literal

from fastapi import APIRouter, Depends, Path as PathParam, Query
from fastapi.responses import FileResponse, Response
from pydantic import BaseModel, Field

from deploy import auth
from deploy.client import over_restarts
from deploy.context import Service, check_id, owner, service
from deploy.errors import APIError

ASSETS = Path(__file__).with_name("console")
_MEDIA = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8",
          ".css": "text/css; charset=utf-8", ".svg": "image/svg+xml"}
_FILES = {p.name: p for p in ASSETS.iterdir() if p.suffix in _MEDIA} if ASSETS.is_dir() else {}
# The page runs only its own scripts and talks only to this origin; thumbnails come as data: or blob: URLs.
_PAGE_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data: blob:; object-src 'none'; "
                               "base-uri 'none'; frame-ancestors 'none'",
    "Cache-Control": "no-cache", "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer",
}
MAX_FRAME = 2**40
# the error statuses each route answers with (deploy.app's ROUTE_ERRORS)
ROUTE_ERRORS = {
    ("get", "/v1/streams/{stream_id}/timeline"): (401, 404, 422, 503),
    ("get", "/v1/streams/{stream_id}/thumbnails/{frame}"): (401, 404, 422, 503),
}

class Thumbnail(BaseModel):
    frame: int = Field(description="the frame shown: the kept thumbnail nearest the one asked for")
    jpeg_base64: str


class TimelineSegment(BaseModel):
    segment: int
    frames: list[int] = Field(description="[first, last + 1)")
    times: list[float] = Field(description="[start, end] seconds")
    thumbnail: Thumbnail | None = Field(None, description="nearest the segment's middle frame; none yet or none kept")


class Timeline(BaseModel):
    object: Literal["list"] = "list"
    stream_id: str
    data: list[TimelineSegment]
    has_more: bool = Field(description="more segments follow `limit`: ask again with after = the last one's")


def _asset(name: str) -> Response:
    path = _FILES.get(name)
    if path is None:
        raise APIError(404, "not_found", f"no console asset {name!r}")
    return FileResponse(path, media_type=_MEDIA[path.suffix], headers=_PAGE_HEADERS)


def _thumbnail(found) -> Thumbnail | None:
    return found and Thumbnail(frame=found.frame, jpeg_base64=base64.b64encode(found.jpeg).decode())


_JPEG = {200: {"content": {"image/jpeg": {"schema": {"type": "string", "format": "binary"}}},
               "description": "the JPEG of the kept thumbnail nearest the frame",
               "headers": {"X-Thumbnail-Frame": {"schema": {"type": "integer"}, "description": "the frame it shows"}}}}


def router() -> APIRouter:
    """The console's page, its assets, and the timeline and thumbnail routes (the app's auth)."""
    routes = APIRouter()

    @routes.get("/console", include_in_schema=False)
    async def page():
        return _asset("index.html")

    @routes.get("/console/{name}", include_in_schema=False)
    async def asset(name: str):
        return _asset(name)

    @routes.get("/v1/streams/{stream_id}/timeline", response_model=Timeline, tags=["console"])
    async def timeline(stream_id: str, after: int = Query(-1, ge=-1, le=MAX_FRAME, description="segments after this one"),
                       limit: int = Query(100, ge=1, le=500), caller: str = Depends(owner),
                       api: Service = Depends(service)):
        """The stream's closed segments, each with a thumbnail: the web console's timeline."""
        internal = auth.internal_id(caller, check_id(stream_id))
        coord = api.client.coord
        segments = [s for s in await over_restarts(lambda: coord.segments.remote(internal)) if s["segment"] > after]
        page = segments[:limit]
        middles = [(s["frames"][0] + s["frames"][1] - 1) // 2 for s in page]
        thumbs = await over_restarts(lambda: coord.thumbnails.remote(internal, middles)) if page else []
        data = [TimelineSegment(segment=s["segment"], frames=list(s["frames"]), times=list(s["times"]),
                                thumbnail=_thumbnail(t)) for s, t in zip(page, thumbs)]
        return Timeline(stream_id=stream_id, data=data, has_more=len(segments) > limit)

    @routes.get("/v1/streams/{stream_id}/thumbnails/{frame}", tags=["console"], response_class=Response,
                responses=_JPEG)
    async def thumbnail(stream_id: str, frame: int = PathParam(ge=0, le=MAX_FRAME), caller: str = Depends(owner),
                        api: Service = Depends(service)):
        """The thumbnail nearest a frame of the stream (404 while the stream has none)."""
        internal = auth.internal_id(caller, check_id(stream_id))
        coord = api.client.coord
        [found] = await over_restarts(lambda: coord.thumbnails.remote(internal, [frame]))
        if found is None:
            raise APIError(404, "not_found", f"stream {stream_id!r} has no thumbnails yet")
        return Response(found.jpeg, media_type="image/jpeg",
                        headers={"X-Thumbnail-Frame": str(found.frame), "Cache-Control": "private, max-age=30"})

    return routes
