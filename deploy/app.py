"""The HTTP API: a FastAPI app served by the Ray Serve deployment `StreamKVAPI`.

    serve run deploy/serve.yaml                          # args in the YAML (or STREAMKV_* env)
    serve run deploy.app:build_app model_dir=models/demo api_token=secret

Where things live. The deployment is a thin, stateless HTTP layer. All stream state is in ONE
`StreamCoordinator` actor (actors/coordinator.py), a named, detached actor
(`coordinator_name`, namespace "streamkv") that the first replica creates with fractional CPUs
(`get_if_exists`), so every replica of the deployment (and a later redeploy) talks to the same
one. Ray restarts it if its process dies, and it takes its streams over again from its prefill,
compressor, answer and decoder actors, which outlive it. Meanwhile, requests that are safe to
repeat (reads, questions, numbered chunks) wait for it (RESTART_WAIT_S), others get 503. An
upload goes on with every frame ingested once; should a decoder die too, a live pulled source or
an open upload is attached again, and a stream left without a source gets a new one with
POST /v1/streams/{id}/source.
`deploy.ingest.stop_coordinator(name)` (`streamkv stop`) ends it with every stream.

Routes (all JSON; errors are `{"error": {"type", "message"}}` with a 4xx status):
    GET  /healthz                       liveness (also pings the coordinator); no auth
    GET  /metrics                       Prometheus text; no auth
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
                                        (or an http(s) URL: a one-shot stream, deleted afterwards)

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


import asyncio
import json
import os
import re
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import ray
from fastapi import Depends, FastAPI, Query, Request, Security
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from ray import serve
from starlette.exceptions import HTTPException as StarletteHTTPException

from deploy import auth
from deploy.schemas import (
    STREAM_ID_PATTERN, ChatCompletion, ChatCompletionRequest, CreateStream, Deleted, ErrorResponse, Health,
    ModelList, PushResult, SegmentList, SourceSpec, StreamList, StreamStatus, TextPart, VideoPart,
)
from pipeline.decode import DecodeConfig
from pipeline.errors import (
    ConfigError, InvalidInputError, NoFramesError, PushBufferTimeout, SourceUnavailableError, StreamKVError,
    StreamLostError, UnknownStreamError, VideoDecodeError,
)

PULL_SCHEMES = ("http", "https", "rtsp")
# How long a request that is safe to repeat waits for the coordinator's process to come back
# (Ray refuses calls while it restarts: ~1-2 s, takeover included) before it gets its 503.
RESTART_WAIT_S = 15.0
TERMINAL = ("finished", "failed", "stopped")
_STREAM_ID = re.compile(STREAM_ID_PATTERN)


# ---- configuration ------------------------------------------------------------------------------
@dataclass
class Settings:
    model_dir: str
    index_url: str | None = None
    answerers: int = 1  # the coordinator's answer pool: at least this many actors ...
    max_answerers: int | None = None  # ... at most this many (None: a fixed pool)
    answer_target_ongoing: int = 2  # questions in flight per answer actor before the pool grows
    answer_idle_s: float = 120.0  # an extra answer actor idle this long is removed
    answer_start_timeout_s: float = 600.0  # a new answer actor not placed this long is given up
    restore_timeout_s: float = 120.0  # a restarted actor finds no replica of a stream this long: the stream is lost
    api_tokens: list[str] = field(default_factory=list)
    allow_local_files: bool = False
    max_upload_bytes: int = 64 * 2**20
    max_json_bytes: int = 1 * 2**20
    model_name: str | None = None
    device: str = "cpu"
    placement: str = "local"  # "cluster": pin actor kinds to ray_cluster.yaml's node types (deploy.ingest)
    actor_cpus: float = 0.1  # each prefill/compressor/answer actor
    coordinator_cpus: float = 0.1
    coordinator_name: str = "streamkv-coordinator"
    default_max_tokens: int = 64
    oneshot_timeout_s: float = 120.0

    def __post_init__(self):
        if self.placement not in ("local", "cluster"):
            raise ConfigError(f"placement must be 'local' or 'cluster', not {self.placement!r}")
        if not self.model_name:
            self.model_name = Path(self.model_dir).name or "streamkv"


def _flag(value) -> bool:
    return value if isinstance(value, bool) else str(value).strip().lower() in ("1", "true", "yes", "on")


def settings_from_args(args: dict | None) -> Settings:
    """Builder args (YAML `args:` or `serve run ... key=value`), falling back to STREAMKV_* env."""
    args = dict(args or {})

    def get(key, default=None):
        value = args.get(key)
        return value if value is not None else os.environ.get(f"STREAMKV_{key.upper()}", default)

    model_dir = get("model_dir")
    if not model_dir:
        raise ConfigError("model_dir is required (builder arg or STREAMKV_MODEL_DIR)")
    path = Path(str(model_dir)).expanduser()
    if not path.is_absolute() and path.exists():  # replicas do not share the caller's cwd
        path = path.resolve()
    return Settings(
        model_dir=str(path),
        index_url=get("index_url") or None,
        answerers=int(get("answerers", 1)),
        max_answerers=int(get("max_answerers")) if get("max_answerers") else None,
        answer_target_ongoing=int(get("answer_target_ongoing", 2)),
        answer_idle_s=float(get("answer_idle_s", 120.0)),
        answer_start_timeout_s=float(get("answer_start_timeout_s", 600.0)),
        restore_timeout_s=float(get("restore_timeout_s", 120.0)),
        api_tokens=auth.parse_tokens(get("api_token")),
        allow_local_files=_flag(get("allow_local_files", False)),
        max_upload_bytes=int(get("max_upload_bytes", 64 * 2**20)),
        max_json_bytes=int(get("max_json_bytes", 2**20)),
        model_name=get("model_name") or None,
        device=str(get("device", "cpu")),
        placement=str(get("placement", "local")),
        actor_cpus=float(get("actor_cpus", 0.1)),
        coordinator_cpus=float(get("coordinator_cpus", 0.1)),
        coordinator_name=str(get("coordinator_name", "streamkv-coordinator")),
        default_max_tokens=int(get("default_max_tokens", 64)),
        oneshot_timeout_s=float(get("oneshot_timeout_s", 120.0)),
    )


SETTINGS: Settings | None = None  # this replica's settings (set by the deployment's constructor)


# ---- errors -------------------------------------------------------------------------------------
class APIError(Exception):
    def __init__(self, status: int, type_: str, message: str):
        super().__init__(message)
        self.status, self.type, self.message = status, type_, message


def error_json(status: int, type_: str, message: str, headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"error": {"type": type_, "message": message}}, status_code=status, headers=headers)


_TYPED = [  # most specific first
    (UnknownStreamError, 404), (NoFramesError, 409), (StreamLostError, 409), (VideoDecodeError, 422),
    (SourceUnavailableError, 422), (ConfigError, 422), (InvalidInputError, 422),
]


def _cause(exc: BaseException) -> BaseException:
    """The user's exception inside a Ray task error (which is also an instance of its class)."""
    cause = getattr(exc, "cause", None)
    return cause if isinstance(cause, BaseException) else exc


def _message(exc: BaseException) -> str:
    cause = _cause(exc)
    if isinstance(cause, KeyError) and cause.args:  # KeyError's str() is the repr of its argument
        return str(cause.args[0])
    return str(cause).strip().splitlines()[-1] if str(cause).strip() else type(cause).__name__


def typed_status(exc: BaseException) -> int:
    for cls, status in _TYPED:
        if isinstance(exc, cls):
            return status
    if isinstance(exc, PushBufferTimeout):
        return 503
    return 500  # UnsupportedModelError, PageCorruptError: the server's fault, not the request's


def _error_name(exc: BaseException) -> str:
    for cls, _ in _TYPED:
        if isinstance(exc, cls):
            return cls.__name__
    return type(_cause(exc)).__name__


RESPONSES = {code: {"model": ErrorResponse} for code in (400, 401, 404, 409, 413, 415, 422, 503, 504)}
# The error statuses each operation answers with, as its OpenAPI entry lists them (an operation
# left out lists all of RESPONSES). 401: no or a wrong token; 404: no such stream (or another
# token's), unknown model; 409: no frames yet, the source does not take chunks (anymore), the
# stream has a source still running (a new one), or the stream was lost (delete it and create it
# again);
# 413: a body over the limit; 415: a chunk that is not video; 422: an invalid request; 503: the
# coordinator is unavailable, or a pushed chunk waited too long; 504: a one-shot video URL that
# did not finish decoding in time.
ROUTE_ERRORS = {
    ("get", "/healthz"): (503,),
    ("get", "/metrics"): (503,),
    ("get", "/v1/models"): (401,),
    ("post", "/v1/streams"): (400, 401, 413, 422, 503),
    ("get", "/v1/streams"): (401, 503),
    ("get", "/v1/streams/{stream_id}"): (401, 404, 503),
    ("delete", "/v1/streams/{stream_id}"): (401, 404, 503),
    ("get", "/v1/streams/{stream_id}/segments"): (401, 404, 503),
    ("post", "/v1/streams/{stream_id}/chunks"): (400, 401, 404, 409, 413, 415, 422, 503),
    ("post", "/v1/streams/{stream_id}/close"): (401, 404, 409, 422, 503),
    ("post", "/v1/streams/{stream_id}/source"): (400, 401, 404, 409, 413, 422, 503),
    ("post", "/v1/chat/completions"): (400, 401, 404, 409, 413, 422, 503, 504),
}

app = FastAPI(
    title="streamkv", version="0.1.0", responses=RESPONSES,
    description="Questions about live video streams over a bounded Video-LLM KV cache. "
                "OpenAI-compatible /v1/chat/completions with stream:// video parts.",
)


def _openapi() -> dict:
    """FastAPI's document, each operation listing its own error statuses (ROUTE_ERRORS)."""
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


app.openapi = _openapi


@app.exception_handler(APIError)
async def _api_error(request: Request, exc: APIError):
    headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else None
    return error_json(exc.status, exc.type, exc.message, headers)


@app.exception_handler(StreamKVError)
async def _typed_error(request: Request, exc: StreamKVError):
    return error_json(typed_status(exc), _error_name(exc), _message(exc))


@app.exception_handler(RequestValidationError)
async def _validation_error(request: Request, exc: RequestValidationError):
    errors = exc.errors()
    if any(e.get("type") == "json_invalid" for e in errors):
        return error_json(400, "invalid_json", "the request body is not valid JSON")
    parts = []
    for e in errors[:5]:
        where = ".".join(str(p) for p in e.get("loc", ()) if p != "body")
        parts.append(f"{where or 'body'}: {e.get('msg')}")
    return error_json(422, "invalid_request", "; ".join(parts) or "invalid request")


@app.exception_handler(StarletteHTTPException)
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


@app.exception_handler(Exception)
async def _unexpected(request: Request, exc: Exception):
    from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError

    if isinstance(exc, (RayActorError, ActorDiedError, ActorUnavailableError)):
        return error_json(503, "unavailable", "the stream coordinator is unavailable; retry later")
    return error_json(500, "internal_error", f"{type(_cause(exc)).__name__}: {_message(exc)}")


# ---- request size limits (pure ASGI, so it also covers bodies without Content-Length) -------------
class _BodyTooLarge(Exception):
    pass


class BodyLimitMiddleware:
    """413 for a body over the limit: `max_upload_bytes` for chunk uploads, `max_json_bytes`
    elsewhere. Checked on Content-Length first, then on the bytes actually received."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or SETTINGS is None:
            return await self.app(scope, receive, send)
        upload = scope["path"].rstrip("/").endswith("/chunks")
        limit = SETTINGS.max_upload_bytes if upload else SETTINGS.max_json_bytes
        message = f"request body over the limit of {limit} bytes"
        headers = dict(scope.get("headers") or [])
        length = headers.get(b"content-length")
        if length is not None:
            try:
                too_big = int(length) > limit
            except ValueError:
                return await error_json(400, "bad_request", "invalid Content-Length")(scope, receive, send)
            if too_big:
                return await error_json(413, "too_large", message)(scope, receive, send)
        state = {"received": 0, "over": False, "started": False}

        async def limited_receive():
            msg = await receive()
            if msg["type"] == "http.request":
                state["received"] += len(msg.get("body", b""))
                if state["received"] > limit:
                    state["over"] = True
                    raise _BodyTooLarge(message)
            return msg

        async def guarded_send(msg):
            if state["over"]:  # whatever the app made of the aborted read, the answer is 413
                return
            state["started"] = state["started"] or msg["type"] == "http.response.start"
            await send(msg)

        try:
            await self.app(scope, limited_receive, guarded_send)
        except _BodyTooLarge:
            pass
        if state["over"] and not state["started"]:
            await error_json(413, "too_large", message)(scope, receive, send)


app.add_middleware(BodyLimitMiddleware)


# ---- metrics --------------------------------------------------------------------------------------
class _StreamMetrics:
    """Per-stream figures read from the coordinator at scrape time."""

    def __init__(self):
        self.rows: list[tuple[str, dict]] = []

    def collect(self):
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        ingested = CounterMetricFamily("streamkv_frames_ingested", "Frames ingested into the stream's memory",
                                       labels=["stream"])
        dropped = CounterMetricFamily("streamkv_frames_dropped", "Decoded frames dropped by backpressure",
                                      labels=["stream"])
        decoded = CounterMetricFamily("streamkv_frames_decoded", "Frames decoded from the source", labels=["stream"])
        retained = GaugeMetricFamily("streamkv_retained_kv_bytes", "Bytes of KV retained by the stream",
                                     labels=["stream"])
        segments = GaugeMetricFamily("streamkv_segments", "Segments committed", labels=["stream"])
        lost = GaugeMetricFamily("streamkv_stream_lost", "1 if the stream's memory is lost (delete it and create it "
                                 "again)", labels=["stream"])
        for name, row in self.rows:
            ingested.add_metric([name], row.get("frames_ingested") or 0)
            dropped.add_metric([name], row.get("frames_dropped") or 0)
            decoded.add_metric([name], row.get("frames_decoded") or 0)
            segments.add_metric([name], row.get("segments") or 0)
            lost.add_metric([name], int(row.get("state") == "lost"))
            if row.get("retained_bytes") is not None:
                retained.add_metric([name], row["retained_bytes"])
        yield from (ingested, dropped, decoded, retained, segments, lost)


class Metrics:
    def __init__(self):
        from prometheus_client import CollectorRegistry, Counter, Histogram

        self.registry = CollectorRegistry()
        self.streams = _StreamMetrics()
        self.registry.register(self.streams)
        self.answer_latency = Histogram(
            "streamkv_answer_latency_seconds", "Time to answer a question (coordinator ask)",
            buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120), registry=self.registry)
        self.answers = Counter("streamkv_answers", "Questions answered", ["outcome"], registry=self.registry)
        self.chunks = Counter("streamkv_chunk_bytes", "Encoded video bytes received", registry=self.registry)


# ---- the deployment -------------------------------------------------------------------------------
# Declares the bearer scheme in the OpenAPI document; the check itself is auth.authenticate (a
# missing or malformed header is a 401 in the error format, not FastAPI's 403).
_BEARER = HTTPBearer(auto_error=False, description="one of the server's API tokens (builder arg api_token)")


async def _owner(request: Request, _: HTTPAuthorizationCredentials | None = Security(_BEARER)) -> str:
    tokens = SETTINGS.api_tokens if SETTINGS is not None else []
    try:
        return auth.authenticate(tokens, request.headers.get("authorization"))
    except auth.Unauthorized as exc:
        raise APIError(401, "unauthorized", str(exc)) from None


def _check_id(stream_id: str) -> str:
    if not _STREAM_ID.match(stream_id):
        raise APIError(404, "UnknownStreamError", f"no stream {stream_id!r}")
    return stream_id


def _evidence(evidence: list[dict]) -> list[dict]:
    return [{"frames": list(e["frames"]), "times": [float(t) for t in e["times"]],
             "score": None if e.get("score") is None else float(e["score"]),
             "layers": json.loads(json.dumps(e.get("layers"), default=_plain))} for e in evidence]


def _plain(value: Any):
    """JSON for numpy scalars/arrays and tuples in coordinator results."""
    if hasattr(value, "tolist"):
        return value.tolist()
    if hasattr(value, "item"):
        return value.item()
    return str(value)


async def _over_restarts(call):
    """`call()`, made again while the coordinator's process restarts, for up to RESTART_WAIT_S.
    Only for calls that may run twice: one in flight when the process died may have run."""
    from ray.exceptions import RayActorError

    deadline, delay = time.monotonic() + RESTART_WAIT_S, 0.1
    while True:
        try:
            return await call()
        except RayActorError:  # ActorUnavailableError while it restarts; ActorDiedError for a call it took along
            if time.monotonic() + delay > deadline:
                raise
            await asyncio.sleep(delay)
            delay = min(2 * delay, 1.0)


def get_or_create_coordinator(s: Settings):
    from deploy.ingest import CLUSTER_PLACEMENT, named_coordinator

    return named_coordinator(
        s.coordinator_name, s.model_dir, s.device, s.answerers, s.index_url, s.actor_cpus,
        max_answerers=s.max_answerers, answer_target_ongoing=s.answer_target_ongoing, answer_idle_s=s.answer_idle_s,
        answer_start_timeout_s=s.answer_start_timeout_s, restore_timeout_s=s.restore_timeout_s,
        placement=CLUSTER_PLACEMENT if s.placement == "cluster" else None, num_cpus=s.coordinator_cpus)


def stream_status(stream_id: str, status: dict, retained_bytes: int | None) -> dict:
    """The coordinator's status of a stream as the API's StreamStatus (stream_id: the client's)."""
    last_error = status.get("last_error")
    if isinstance(last_error, dict):  # the decoder's {type, message, where}
        last_error = f"{last_error.get('type')}: {last_error.get('message')} (in {last_error.get('where')})"
    return StreamStatus(
        stream_id=stream_id, method=status["method"], state=status["state"], mode=status.get("mode"),
        frames_ingested=status["frames_ingested"], frames_decoded=status.get("frames_decoded"),
        frames_dropped=status.get("frames_dropped"), frames_pending=status.get("frames_pending"), source_state=status.get("source_state"), segments=status["segments"],
        last_time=status.get("last_time"), retained_bytes=retained_bytes, recoveries=status.get("recoveries", 0),
        batching=status.get("batching"), last_error=last_error,
    ).model_dump()


# the web console's page and its routes (deploy/console.py), with this app's auth
from deploy import console  # noqa: E402

app.include_router(console.router(_owner))
ROUTE_ERRORS.update(console.ROUTE_ERRORS)


@serve.deployment(name="StreamKVAPI", ray_actor_options={"num_cpus": 0.05}, max_ongoing_requests=64)
@serve.ingress(app)
class StreamKVAPI:
    def __init__(self, settings: dict):
        # Serve pickles this class's methods by value, with a copy of the module's globals: set
        # the settings on the imported module, which the middleware and auth dependency read.
        import deploy.app as module

        self.s = module.Settings(**settings)
        module.SETTINGS = self.s
        self.coord = get_or_create_coordinator(self.s)
        self.metrics = Metrics()
        self.created = int(time.time())

    # ---- helpers ----
    async def _status(self, owner: str, stream_id: str) -> dict:
        return stream_status(stream_id, *await self._coordinator_status(auth.internal_id(owner, stream_id)))

    async def _coordinator_status(self, internal: str) -> tuple[dict, int | None]:
        """The coordinator's status of a stream, and the bytes of KV it retains (None when its
        memory cannot be read: a lost stream). The memory first: reading it may find the stream lost."""
        try:
            retained = int((await _over_restarts(lambda: self.coord.memory.remote(internal))).get("total", 0))
        except StreamKVError:
            retained = None
        return await _over_restarts(lambda: self.coord.status.remote(internal)), retained

    def _source(self, source: str) -> str:
        parts = urlsplit(source)
        scheme = parts.scheme.lower()
        if scheme in PULL_SCHEMES:
            if not parts.netloc:
                raise APIError(422, "invalid_source", f"source URL {source!r} has no host")
            return source
        if scheme == "file" or not scheme or (len(scheme) == 1 and source[1:3] in (":\\", ":/")):
            if not self.s.allow_local_files:
                raise APIError(400, "invalid_source", "local files are not allowed as sources on this server "
                                                      f"(allowed schemes: {', '.join(PULL_SCHEMES)})")
            path = Path(parts.path if scheme == "file" else source)
            if not path.is_file():
                raise APIError(422, "invalid_source", f"no such file: {str(path)!r}")
            return str(path)
        raise APIError(400, "invalid_source", f"source scheme {scheme!r} not allowed "
                                              f"(allowed: {', '.join(PULL_SCHEMES)})")

    def _attach(self, internal: str, spec: SourceSpec):
        """Check the source now; returns the call that attaches it to the stream."""
        source = self._source(spec.source) if spec.source is not None else None
        live = source is None or source.lower().startswith("rtsp")
        decode = DecodeConfig(fps=spec.fps, read_timeout_s=spec.idle_timeout_s if live else DecodeConfig.read_timeout_s)
        policy = spec.policy or ("drop" if live and source else "block")
        return lambda: self.coord.attach_source.remote(internal, source, decode, policy)

    async def _ask(self, internal: str, question: str, max_tokens: int) -> dict:
        start = time.perf_counter()
        try:
            answer = await _over_restarts(lambda: self.coord.ask.remote(internal, question, max_tokens))
        except Exception:
            self.metrics.answers.labels("error").inc()
            raise
        self.metrics.answer_latency.observe(time.perf_counter() - start)
        self.metrics.answers.labels("ok").inc()
        return answer

    async def _ask_stream(self, internal: str, question: str, max_tokens: int):
        """The answer's items as they are generated: returns (head, rest). The head (evidence,
        prompt size) is awaited here, so a bad question is an error before any event is sent."""
        start = time.perf_counter()

        async def begin():
            items = self.coord.ask_stream.options(num_returns="streaming").remote(internal, question, max_tokens)
            return items, await (await items.__anext__())

        try:
            items, head = await _over_restarts(begin)
        except Exception:
            self.metrics.answers.labels("error").inc()
            raise

        async def rest():
            try:
                async for ref in items:
                    yield await ref
            except Exception:
                self.metrics.answers.labels("error").inc()
                raise
            self.metrics.answer_latency.observe(time.perf_counter() - start)
            self.metrics.answers.labels("ok").inc()

        return head, rest()

    async def _oneshot(self, owner: str, url: str) -> str:
        """A temporary stream holding a whole video file / URL (the caller deletes it)."""
        source = self._source(url)
        internal = auth.internal_id(owner, f"oneshot-{uuid.uuid4().hex[:12]}")
        await self.coord.create_stream.remote(internal, "rekv", {}, "You are a helpful assistant.")
        try:
            # a whole file: no reconnects (an unreachable URL is an error at once, not after retries)
            await self.coord.attach_source.remote(internal, source, DecodeConfig(reconnect=False, max_retries=0))
            deadline = time.monotonic() + self.s.oneshot_timeout_s
            while True:
                status = await self.coord.status.remote(internal)
                if status["source_state"] in TERMINAL:
                    break
                if time.monotonic() > deadline:
                    raise APIError(504, "timeout", f"the video did not finish decoding in {self.s.oneshot_timeout_s} s")
                await asyncio.sleep(0.2)
            if status["source_state"] == "failed" and not status["frames_ingested"]:
                error = status["last_error"] if isinstance(status["last_error"], dict) else {}
                raise APIError(422, error.get("type") or "VideoDecodeError",
                               f"the video could not be read: {error.get('message') or status['last_error']}")
        except BaseException:
            await self._delete_quietly(internal)
            raise
        return internal

    async def _delete_quietly(self, internal: str) -> None:
        try:
            await self.coord.delete_stream.remote(internal)
        except Exception:  # noqa: BLE001 - best effort clean-up
            pass

    # ---- service routes ----
    @app.get("/healthz", response_model=Health, tags=["service"])
    async def healthz(self):
        try:
            streams = await asyncio.wait_for(self.coord.list_streams.remote(), timeout=10)
        except Exception as exc:  # noqa: BLE001
            raise APIError(503, "unavailable", f"coordinator not answering: {type(exc).__name__}") from None
        return Health(model=self.s.model_name, streams=len(streams))

    @app.get("/metrics", response_class=PlainTextResponse, tags=["service"])
    async def metrics(self):
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        internals = await _over_restarts(self.coord.list_streams.remote)

        async def row(internal):
            try:
                status, retained = await self._coordinator_status(internal)
            except StreamKVError:  # deleted meanwhile
                return None
            return internal, {**status, "retained_bytes": retained}

        rows = await asyncio.gather(*[row(i) for i in internals])
        self.metrics.streams.rows = [r for r in rows if r is not None]
        return PlainTextResponse(generate_latest(self.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models", response_model=ModelList, tags=["openai"])
    async def models(self, owner: str = Depends(_owner)):
        return {"object": "list", "data": [{"id": self.s.model_name, "object": "model", "created": self.created,
                                            "owned_by": "streamkv"}]}

    # ---- streams ----
    @app.post("/v1/streams", status_code=201, response_model=StreamStatus, tags=["streams"])
    async def create_stream(self, body: CreateStream, owner: str = Depends(_owner)):
        stream_id = body.stream_id or f"s-{uuid.uuid4().hex[:12]}"
        internal = auth.internal_id(owner, stream_id)
        attach = self._attach(internal, body)  # the source is checked before the stream is created
        await self.coord.create_stream.remote(internal, body.method, body.options, body.system_prompt)
        try:
            await attach()
        except Exception:  # no half-made stream left behind
            await self.coord.delete_stream.remote(internal)
            raise
        return await self._status(owner, stream_id)

    @app.post("/v1/streams/{stream_id}/source", response_model=StreamStatus, tags=["streams"])
    async def attach_source(self, stream_id: str, body: SourceSpec, owner: str = Depends(_owner)):
        """A new source for a stream whose source has ended or was detached (a coordinator
        restart): its frames and times go on after the stream's; 409 while a source runs."""
        internal = auth.internal_id(owner, _check_id(stream_id))
        attach = self._attach(internal, body)
        try:
            await attach()
        except InvalidInputError as exc:
            raise APIError(409, "InvalidInputError", _message(exc)) from None
        return await self._status(owner, stream_id)

    @app.get("/v1/streams", response_model=StreamList, tags=["streams"])
    async def list_streams(self, owner: str = Depends(_owner)):
        names = [p for p in (auth.public_id(owner, i) for i in await _over_restarts(self.coord.list_streams.remote)) if p]

        async def one(name):
            try:
                return await self._status(owner, name)
            except UnknownStreamError:  # deleted meanwhile
                return None

        rows = await asyncio.gather(*[one(n) for n in names])
        return {"object": "list", "data": [r for r in rows if r is not None]}

    @app.get("/v1/streams/{stream_id}", response_model=StreamStatus, tags=["streams"])
    async def get_stream(self, stream_id: str, owner: str = Depends(_owner)):
        return await self._status(owner, _check_id(stream_id))

    @app.delete("/v1/streams/{stream_id}", response_model=Deleted, tags=["streams"])
    async def delete_stream(self, stream_id: str, owner: str = Depends(_owner)):
        internal = auth.internal_id(owner, _check_id(stream_id))
        await self.coord.delete_stream.remote(internal)
        return {"stream_id": stream_id, "deleted": True}

    @app.get("/v1/streams/{stream_id}/segments", response_model=SegmentList, tags=["streams"])
    async def segments(self, stream_id: str, owner: str = Depends(_owner)):
        internal = auth.internal_id(owner, _check_id(stream_id))
        data = await _over_restarts(lambda: self.coord.segments.remote(internal))
        return {"object": "list", "stream_id": stream_id, "data": json.loads(json.dumps(data, default=_plain))}

    @app.post(
        "/v1/streams/{stream_id}/chunks", status_code=202, response_model=PushResult, tags=["streams"],
        openapi_extra={"requestBody": {"required": True, "content": {
            "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
            "video/*": {"schema": {"type": "string", "format": "binary"}}}}},
    )
    async def push_chunk(self, stream_id: str, request: Request, seq: int | None = Query(None, ge=0),
                         owner: str = Depends(_owner)):
        internal = auth.internal_id(owner, _check_id(stream_id))
        ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if ctype != "application/octet-stream" and not ctype.startswith("video/"):
            raise APIError(415, "unsupported_media_type",
                           f"chunks are raw video bytes: Content-Type application/octet-stream or video/*, not {ctype!r}")
        body = await request.body()  # BodyLimitMiddleware bounds it
        if not body:
            raise APIError(400, "empty_body", "the chunk is empty")
        async def push():
            return await self.coord.push.remote(internal, body, seq)

        try:  # only a numbered chunk may be sent twice: its decoder ignores a repeat
            buffered = await (_over_restarts(push) if seq is not None else push())
        except InvalidInputError as exc:  # not push mode, closed, or the source has ended
            raise APIError(409, "InvalidInputError", _message(exc)) from None
        self.metrics.chunks.inc(len(body))
        status = await _over_restarts(lambda: self.coord.status.remote(internal))
        return PushResult(stream_id=stream_id, bytes_received=len(body), buffered_bytes=int(buffered or 0),
                          source_state=status.get("source_state"))

    @app.post("/v1/streams/{stream_id}/close", response_model=StreamStatus, tags=["streams"])
    async def close_source(self, stream_id: str, wait_s: float | None = Query(None, ge=0, le=300),
                           owner: str = Depends(_owner)):
        internal = auth.internal_id(owner, _check_id(stream_id))
        try:
            await self.coord.close_source.remote(internal, wait_s or None)
        except InvalidInputError as exc:
            raise APIError(409, "InvalidInputError", _message(exc)) from None
        return await self._status(owner, stream_id)

    # ---- questions ----
    @app.post("/v1/chat/completions", response_model=ChatCompletion, tags=["openai"],
              responses={200: {"content": {"text/event-stream": {}}}})
    async def chat_completions(self, body: ChatCompletionRequest, owner: str = Depends(_owner)):
        if body.model != self.s.model_name:
            raise APIError(404, "model_not_found", f"model {body.model!r} is not served here; see GET /v1/models")
        urls, question = [], None
        for message in body.messages:
            if message.role != "user" or message.content is None:
                continue
            parts = [TextPart(type="text", text=message.content)] if isinstance(message.content, str) else message.content
            texts = [p.text for p in parts if isinstance(p, TextPart)]
            urls += [p.video_url.url for p in parts if isinstance(p, VideoPart)]
            if any(t.strip() for t in texts):
                question = "\n".join(t for t in texts if t.strip())
        if question is None:
            raise APIError(422, "invalid_request", "no user message with text (the question)")
        if len(set(urls)) != 1:
            raise APIError(422, "invalid_request", "exactly one video_url content part is needed "
                                                   "(stream://<stream-id>, or an http(s) URL)")
        url = urls[0]
        max_tokens = body.max_completion_tokens or body.max_tokens or self.s.default_max_tokens
        stream_id = oneshot = None
        if url.startswith("stream://"):
            stream_id = _check_id(url[len("stream://"):].strip("/"))
            internal = auth.internal_id(owner, stream_id)
        else:
            internal = oneshot = await self._oneshot(owner, url)
        ident, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())

        def usage(answer: dict, completion_tokens: int) -> dict:
            return {"prompt_tokens": answer["prompt_tokens"], "completion_tokens": completion_tokens,
                    "total_tokens": answer["prompt_tokens"] + completion_tokens}

        def finish(completion_tokens: int) -> str:
            return "length" if completion_tokens >= max_tokens else "stop"

        try:
            if not body.stream:
                answer = await self._ask(internal, question, max_tokens)
                n = len(answer["token_ids"])
                return {"id": ident, "object": "chat.completion", "created": created, "model": self.s.model_name,
                        "choices": [{"index": 0, "message": {"role": "assistant", "content": answer["text"]},
                                     "finish_reason": finish(n)}],
                        "usage": usage(answer, n), "evidence": _evidence(answer["evidence"]), "stream_id": stream_id}
            head, rest = await self._ask_stream(internal, question, max_tokens)
        except BaseException:
            if oneshot and body.stream:  # the events would have deleted it
                await self._delete_quietly(oneshot)
            raise
        finally:
            if oneshot and not body.stream:
                await self._delete_quietly(oneshot)

        def event(delta: dict, finish_reason=None, **extra) -> str:
            chunk = {"id": ident, "object": "chat.completion.chunk", "created": created, "model": self.s.model_name,
                     "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}], **extra}
            return f"data: {json.dumps(chunk)}\n\n"

        async def events():
            try:
                yield event({"role": "assistant", "content": ""})
                async for item in rest:
                    if isinstance(item, str):
                        yield event({"content": item})
                    else:  # the last item: the generated token ids
                        n = len(item["token_ids"])
                        yield event({}, finish(n), usage=usage(head, n), evidence=_evidence(head["evidence"]),
                                    stream_id=stream_id)
                yield "data: [DONE]\n\n"
            except Exception as exc:  # the answer actor failed mid-answer: say so in the stream
                yield f"data: {json.dumps({'error': {'type': _error_name(exc), 'message': _message(exc)}})}\n\n"
            finally:
                if oneshot:
                    await self._delete_quietly(oneshot)

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


def build_app(args: dict | None = None) -> serve.Application:
    """Serve application builder (`serve run deploy/serve.yaml` or `serve run deploy.app:build_app k=v`).

    args: model_dir (required), index_url, answerers, max_answerers, answer_target_ongoing,
    answer_idle_s, answer_start_timeout_s, restore_timeout_s, api_token (one, comma-separated, or a
    list), allow_local_files, max_upload_bytes, max_json_bytes, model_name, device, placement
    (local | cluster), actor_cpus, coordinator_cpus, coordinator_name, api_cpus (the HTTP
    replica's CPUs, default 0.05), replicas (a fixed number of HTTP replicas; left out: one, or
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
