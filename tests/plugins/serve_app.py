"""The HTTP API over real HTTP: one Serve app on the shared Ray runtime for the whole session.

`coordinator_name` (session): the name of the app's coordinator (a detached actor in
actors.coordinator.NAMESPACE).
`server` (session): the base URL of a locally started, healthy Serve app (deploy.app:build_app) with the
tiny GQA checkpoint, three bearer tokens (TOKEN_A, TOKEN_B, TOKEN_FUZZ) and a metrics token, a
known owner secret, small body limits and its own
coordinator; deleted, with its coordinator, at the end of the session. It fetches sources on
loopback (`allow_private_sources`), as a local demo would.
`strict_server` (session): the same app (and coordinator) under /strict with the default source
policy (public addresses only) except the network 127.0.0.2/32 (`allow_source_networks`), and a
512 KiB cap on the bytes a source may read.
"""

import socket
import time
import uuid

import httpx
import pytest

TOKEN_A, TOKEN_B = "token-a-secret", "token-b-secret"
TOKEN_FUZZ = "token-fuzz-secret"  # the schema fuzzer's own streams, apart from the hand-written tests'
METRICS_TOKEN = "metrics-secret"  # /metrics with every owner's streams
OWNER_SECRET = "owner-secret-for-tests"  # keys owner ids (shared by the two apps: one coordinator)
MODEL_NAME = "tiny-gqa"
MAX_UPLOAD = 2 * 2**20
MAX_JSON = 64 * 2**10
MAX_INLINE = 2 * 2**20  # inline media per chat request


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def client(base: str, token: str | None = TOKEN_A) -> httpx.Client:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return httpx.Client(base_url=base, headers=headers, timeout=120)


@pytest.fixture(scope="session")
def coordinator_name() -> str:
    return f"http-test-{uuid.uuid4().hex[:8]}"


def run_app(checkpoint_dirs, coordinator_name: str, url: str, name: str, route_prefix: str, **args) -> str:
    """build_app with the tiny checkpoint, the three tokens and small limits (plus `args`), run
    under `route_prefix`; returns once it is healthy as a load balancer's probe sees it: /healthz
    answers 503 until the coordinator (a detached actor the replica starts) answers, which takes
    longer than its 10 s on a busy machine."""
    from ray import serve

    from deploy.app import build_app

    app = build_app({
        "model_dir": checkpoint_dirs["gqa"], "model_name": MODEL_NAME, "api_token": [TOKEN_A, TOKEN_B, TOKEN_FUZZ],
        "max_upload_bytes": MAX_UPLOAD, "max_json_bytes": MAX_JSON, "max_inline_bytes": MAX_INLINE,
        "coordinator_name": coordinator_name,
        "actor_cpus": 0.05, "coordinator_cpus": 0.05, "api_cpus": 0.05, "metrics_token": METRICS_TOKEN,
        "owner_secret": OWNER_SECRET, **args,
    })
    serve.run(app, name=name, route_prefix=route_prefix)
    deadline = time.monotonic() + 180
    while httpx.get(f"{url}/healthz", timeout=60).status_code != 200:
        assert time.monotonic() < deadline, f"the API {name} did not become healthy in 180 s"
        time.sleep(1)
    return url


@pytest.fixture(scope="session")
def server(ray_runtime, checkpoint_dirs, coordinator_name):
    from ray import serve

    from deploy.ingest import stop_coordinator

    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    url = run_app(checkpoint_dirs, coordinator_name, f"http://127.0.0.1:{port}", "streamkv-http-test", "/",
                  restore_timeout_s=10,  # a stream whose every replica is lost is declared lost after this
                  allow_private_sources=True)
    try:
        yield url
    finally:
        serve.delete("streamkv-http-test-strict")
        serve.delete("streamkv-http-test")
        stop_coordinator(coordinator_name)
        serve.shutdown()


STRICT_MAX_SOURCE_BYTES = 512 * 2**10


@pytest.fixture(scope="session")
def strict_server(server, checkpoint_dirs, coordinator_name):
    return run_app(checkpoint_dirs, coordinator_name, f"{server}/strict", "streamkv-http-test-strict", "/strict",
                   allow_source_networks="127.0.0.2/32", max_source_bytes=STRICT_MAX_SOURCE_BYTES)
