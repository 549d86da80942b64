"""The HTTP API: a FastAPI app served by the Ray Serve deployment `StreamKVAPI`.

    serve run deploy/serve.yaml                          # args in the YAML (or STREAMKV_* env)
    serve run deploy.app:build_app model_dir=models/demo api_token=secret

Where things live. The deployment is a thin, stateless HTTP layer. All stream state is in ONE
`StreamCoordinator` actor (actors/coordinator.py), a named, detached actor
(`coordinator_name`, namespace "streamkv") that the first replica creates with fractional CPUs
(`get_if_exists`), so every replica of the deployment (and a later redeploy) talks to the same
one. Ray restarts it if its process dies, and it takes its streams over again from its prefill,
compressor and answer actors and decoder hosts, which outlive it. Meanwhile, requests that are safe to
repeat (reads, questions, numbered chunks) wait for it (RESTART_WAIT_S), others get 503. An
upload goes on with every frame ingested once; should a decoder host die too (or at any time), a live pulled source or
an open upload is attached again, and a stream left without a source gets a new one with
POST /v1/streams/{id}/source.
`deploy.ingest.stop_coordinator(name)` (`streamkv stop`) ends it with every stream.

Files: settings.py (builder args), errors.py (the error format, statuses), limits.py (body
limits), metrics.py, client.py (the coordinator's side: retries over restarts, statuses,
questions, one-shot streams), context.py (this replica's service, the bearer token),
routes_service.py, routes_streams.py, routes_chat.py, schemas.py (the OpenAPI models).

Routes (all JSON; errors are `{"error": {"type", "message"}}` with a 4xx status):
    GET  /healthz                       liveness (also pings the coordinator); no auth, nothing about streams
    GET  /metrics                       Prometheus text; an API token (its streams) or metrics_token (all)
    GET  /v1/models                     the served model
    POST /v1/streams                    create (push mode, or `source` to pull) -> 201 status
    GET  /v1/streams                    the caller's streams with their status
    GET  /v1/streams/{id}               status: frames decoded/ingested/dropped/pending, segments,
                                        retained KV bytes, source state, last error
    DELETE /v1/streams/{id}
    GET  /v1/streams/{id}/segments      closed segments with their frame/time ranges
    POST /v1/streams/{id}/chunks        raw encoded video bytes (MPEG-TS, Matroska, fragmented MP4;
                                        application/octet-stream or video/*), `?seq=` optional
    POST /v1/streams/{id}/close         end a pushed source (`?wait_s=` waits for its frames)
    POST /v1/streams/{id}/source        a new source (pull, or push mode) for a stream whose source
                                        ended or was detached; frames and times continue
    POST /v1/chat/completions           OpenAI-compatible; the video is a content part
                                        {"type": "video_url", "video_url": {"url": "stream://<id>"}}
                                        (or an http(s) or data: URL, or an image_url data: URL: a
                                        one-shot stream, deleted afterwards); conversations and
                                        sampling as OpenAI's (README, issue 21)

Streaming answers: `stream: true` sends SSE `chat.completion.chunk` events as the answer actor
generates tokens (a Ray streaming generator through the coordinator); the last one carries
`finish_reason`, `usage` and `evidence`, then `data: [DONE]`. The retrieval step (evidence) runs
before the first event, so a bad question still gets a plain 4xx JSON error; a failure after that
is an `{"error": ...}` event.

Push mode: the stream's decoder starts at creation; after `idle_timeout_s` (set at creation,
default 60 s, null: never) without data, counted from the first chunk, the source counts as
ended. Close the source when done; a stream whose source ended takes no more chunks (409) until
it is given a new source (POST /v1/streams/{id}/source, push mode by default), which keeps its
memory; chunks' `seq` then count from 0 again.

Scaling: replicas of this deployment hold no state (Serve may autoscale them, deploy/serve.yaml);
the coordinator sizes its answer-actor pool between `answerers` and `max_answerers`.
"""


import os
import time
from dataclasses import asdict

from fastapi import FastAPI
from ray import serve

from deploy import console, context, errors
from deploy.client import CoordinatorClient, stream_status  # noqa: F401 - stream_status: the API's view of a status
from deploy.limits import BodyLimitMiddleware
from deploy.metrics import Metrics
from deploy.routes_chat import router as chat_routes
from deploy.routes_service import router as service_routes
from deploy.routes_streams import router as stream_routes
from deploy.settings import Settings, settings_from_args  # noqa: F401 - Settings: the builder args

app = FastAPI(
    title="streamkv", version="0.1.0", responses=errors.RESPONSES,
    description="Questions about live video streams over a bounded Video-LLM KV cache. "
                "OpenAI-compatible /v1/chat/completions with stream:// video parts.",
)
for router in (service_routes, stream_routes, chat_routes, console.router()):
    app.include_router(router)
errors.ROUTE_ERRORS.update(console.ROUTE_ERRORS)
errors.install(app)
app.add_middleware(BodyLimitMiddleware)


@serve.deployment(name="StreamKVAPI", ray_actor_options={"num_cpus": 0.05}, max_ongoing_requests=64)
@serve.ingress(app)
class StreamKVAPI:
    def __init__(self, settings: dict):
        # Serve pickles this class's methods by value, with a copy of the module's globals: set
        # the service on the imported module, which the routes and the middleware read.
        import deploy.context as module

        s = Settings(**settings)
        metrics = Metrics()
        module.SERVICE = context.Service(s, CoordinatorClient(s, metrics), metrics, int(time.time()))


def build_app(args: dict | None = None) -> serve.Application:
    """Serve application builder (`serve run deploy/serve.yaml` or `serve run deploy.app:build_app k=v`).

    args: model_dir (required), index_url, answerers, max_answerers, answer_target_ongoing,
    answer_idle_s, answer_start_timeout_s, restore_timeout_s, api_token (one, comma-separated, or a
    list), allow_local_files, max_upload_bytes, max_json_bytes, model_name, device, placement
    (local | cluster), actor_cpus, coordinator_cpus, coordinator_name, api_cpus (the HTTP
    replica's CPUs, default 0.05), max_streams (past it a create is a 429), max_creating (creations
    one replica waits on at once; past it a 503), start_timeout_s (the longest a create waits for an
    actor to be placed, then a 503 with Retry-After), replicas (a fixed number of HTTP replicas; left out: one, or
    what the Serve config's autoscaling_config says).
    Missing args come from STREAMKV_<NAME> environment variables.
    """
    args = dict(args or {})
    settings = settings_from_args(args)
    options = {"ray_actor_options": {"num_cpus": float(args.get("api_cpus") or os.environ.get("STREAMKV_API_CPUS", 0.05))}}
    replicas = args.get("replicas") or os.environ.get("STREAMKV_REPLICAS")
    if replicas:
        options["num_replicas"] = int(replicas)
    return StreamKVAPI.options(**options).bind(asdict(settings))
