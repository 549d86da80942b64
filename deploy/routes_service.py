"""Service routes: liveness, Prometheus metrics, the served model."""

import asyncio

from fastapi import APIRouter, Depends
from fastapi.responses import PlainTextResponse

from deploy import auth
from deploy.context import Service, owner, service
from deploy.errors import APIError
from deploy.schemas import Health, ModelList
from pipeline.errors import StreamKVError

router = APIRouter()


@router.get("/healthz", response_model=Health, tags=["service"])
async def healthz(api: Service = Depends(service)):
    """Liveness: the coordinator answers. No token, and nothing about streams."""
    try:
        await asyncio.wait_for(api.client.coord.list_streams.remote(), timeout=10)
    except Exception as exc:  # noqa: BLE001
        raise APIError(503, "unavailable", f"coordinator not answering: {type(exc).__name__}") from None
    return Health(model=api.settings.model_name)


@router.get("/metrics", tags=["service"], responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}}}})
async def metrics(caller: str = Depends(owner), api: Service = Depends(service)):
    """Prometheus text. An API token sees its own streams, the metrics token (or anyone, on a
    server without tokens) every stream; streams are labelled by owner (a keyed label, not the
    owner key) and the client's name."""
    from prometheus_client import CONTENT_TYPE_LATEST

    secret = api.settings.secret()

    async def row(internal):
        stream_owner, name = auth.split(internal)
        if caller not in (auth.OPERATOR, auth.PUBLIC, stream_owner):
            return None
        try:
            status, retained = await api.client.coordinator_status(internal)
        except StreamKVError:  # deleted meanwhile
            return None
        return (auth.owner_label(secret, stream_owner), name), {**status, "retained_bytes": retained}

    rows, index = await asyncio.gather(asyncio.gather(*[row(i) for i in await api.client.internals()]),
                                       api.client.coord.index_health.remote())
    return PlainTextResponse(api.metrics.scrape([r for r in rows if r is not None], index),
                             media_type=CONTENT_TYPE_LATEST)


@router.get("/v1/models", response_model=ModelList, tags=["openai"])
async def models(_caller: str = Depends(owner), api: Service = Depends(service)):
    return {"object": "list", "data": [{"id": api.settings.model_name, "object": "model", "created": api.created,
                                        "owned_by": "streamkv"}]}
