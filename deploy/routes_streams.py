"""Stream routes: create (push mode, or a source to pull), list, status, delete, segments, pushed
chunks, close, and a new source for a stream whose source ended."""

import asyncio
import json
import uuid

from fastapi import APIRouter, Depends, Query, Request

from deploy import auth
from deploy.client import over_restarts, plain
from deploy.context import Service, check_id, owner, service
from deploy.errors import APIError, message
from deploy.schemas import CreateStream, Deleted, PushResult, SegmentList, SourceSpec, StreamList, StreamStatus
from pipeline.errors import InvalidInputError, SourceRefusedError, UnknownStreamError

router = APIRouter(tags=["streams"])


@router.post("/v1/streams", status_code=201, response_model=StreamStatus)
async def create_stream(body: CreateStream, caller: str = Depends(owner), api: Service = Depends(service)):
    """Create and attach, or nothing: whatever fails (no room: 503 with Retry-After; max_streams:
    429; a bad source; the request cancelled) leaves no stream and no decoder behind."""
    stream_id = body.stream_id or f"s-{uuid.uuid4().hex[:12]}"
    internal = auth.internal_id(caller, stream_id)
    attach = api.client.attach(internal, body)  # the source is checked before the stream is created
    with api.client.creating():
        await api.client.create(internal, body.method, body.options, body.system_prompt)
        try:
            await attach()
        except BaseException:  # no half-made stream left behind
            await api.client.delete_after_failure(internal)
            raise
    return await api.client.status(caller, stream_id)


@router.post("/v1/streams/{stream_id}/source", response_model=StreamStatus)
async def attach_source(stream_id: str, body: SourceSpec, caller: str = Depends(owner),
                        api: Service = Depends(service)):
    """A new source for a stream whose source has ended or was detached (a coordinator
    restart): its frames and times go on after the stream's; 409 while a source runs."""
    internal = auth.internal_id(caller, check_id(stream_id))
    attach = api.client.attach(internal, body)
    try:
        await attach()
    except SourceRefusedError:
        raise
    except InvalidInputError as exc:
        raise APIError(409, "InvalidInputError", message(exc)) from None
    return await api.client.status(caller, stream_id)


@router.get("/v1/streams", response_model=StreamList)
async def list_streams(caller: str = Depends(owner), api: Service = Depends(service)):
    names = [p for p in (auth.public_id(caller, i) for i in await api.client.internals()) if p]

    async def one(name):
        try:
            return await api.client.status(caller, name)
        except UnknownStreamError:  # deleted meanwhile
            return None

    rows = await asyncio.gather(*[one(n) for n in names])
    return {"object": "list", "data": [r for r in rows if r is not None]}


@router.get("/v1/streams/{stream_id}", response_model=StreamStatus)
async def get_stream(stream_id: str, caller: str = Depends(owner), api: Service = Depends(service)):
    return await api.client.status(caller, check_id(stream_id))


@router.delete("/v1/streams/{stream_id}", response_model=Deleted)
async def delete_stream(stream_id: str, caller: str = Depends(owner), api: Service = Depends(service)):
    internal = auth.internal_id(caller, check_id(stream_id))
    await api.client.coord.delete_stream.remote(internal)
    return {"stream_id": stream_id, "deleted": True}


@router.get("/v1/streams/{stream_id}/segments", response_model=SegmentList)
async def segments(stream_id: str, caller: str = Depends(owner), api: Service = Depends(service)):
    internal = auth.internal_id(caller, check_id(stream_id))
    data = await over_restarts(lambda: api.client.coord.segments.remote(internal))
    return {"object": "list", "stream_id": stream_id, "data": json.loads(json.dumps(data, default=plain))}


@router.post(
    "/v1/streams/{stream_id}/chunks", status_code=202, response_model=PushResult,
    openapi_extra={"requestBody": {"required": True, "content": {
        "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
        "video/*": {"schema": {"type": "string", "format": "binary"}}}}},
)
async def push_chunk(stream_id: str, request: Request, seq: int | None = Query(None, ge=0),
                     caller: str = Depends(owner), api: Service = Depends(service)):
    internal = auth.internal_id(caller, check_id(stream_id))
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype != "application/octet-stream" and not ctype.startswith("video/"):
        raise APIError(415, "unsupported_media_type",
                       f"chunks are raw video bytes: Content-Type application/octet-stream or video/*, not {ctype!r}")
    body = await request.body()  # BodyLimitMiddleware bounds it
    if not body:
        raise APIError(400, "empty_body", "the chunk is empty")
    coord = api.client.coord

    async def push():
        return await coord.push.remote(internal, body, seq)

    try:  # only a numbered chunk may be sent twice: its decoder ignores a repeat
        receipt = await (over_restarts(push) if seq is not None else push())
    except InvalidInputError as exc:  # not push mode, closed, or the source has ended
        raise APIError(409, "InvalidInputError", message(exc)) from None
    api.metrics.chunks.inc(len(body))
    # (one coordinator call per chunk: the push path is what a node's live streams cost, BENCHMARKS.md)
    return PushResult(stream_id=stream_id, bytes_received=len(body), buffered_bytes=receipt.buffered_bytes,
                      source_state=receipt.state.value)


@router.post("/v1/streams/{stream_id}/close", response_model=StreamStatus)
async def close_source(stream_id: str, wait_s: float | None = Query(None, ge=0, le=300),
                       caller: str = Depends(owner), api: Service = Depends(service)):
    internal = auth.internal_id(caller, check_id(stream_id))
    try:
        await api.client.coord.close_source.remote(internal, wait_s or None)
    except InvalidInputError as exc:
        raise APIError(409, "InvalidInputError", message(exc)) from None
    return await api.client.status(caller, stream_id)
