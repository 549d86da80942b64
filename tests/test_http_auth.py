"""Auth on every route (issue 21, item 5), over real HTTP against the session's Serve app: the
token on /metrics too (or the metrics token), /healthz silent about streams, internal stream ids
never in an answer, owner keys keyed with the server's secret (HMAC), not bare token hashes."""

import hashlib
import re

import httpx
import pytest

from deploy import auth
from tests.plugins.serve_app import METRICS_TOKEN, OWNER_SECRET, TOKEN_A, TOKEN_B, client

INTERNAL = re.compile(r"o[0-9a-f]{32}|t[0-9a-f]{16}|" + hashlib.sha256(TOKEN_A.encode()).hexdigest()[:16])


def metric_rows(text: str) -> set[tuple[str, str]]:
    rows = set()
    for line in text.splitlines():
        if line.startswith("streamkv_segments{"):
            labels = dict(re.findall(r'(\w+)="([^"]*)"', line.split("}", 1)[0]))
            rows.add((labels["owner"], labels["stream"]))
    return rows


@pytest.fixture(scope="module")
def two_owners(server):
    with client(server, TOKEN_A) as a, client(server, TOKEN_B) as b:
        assert a.post("/v1/streams", json={"stream_id": "auth-a"}).status_code == 201
        assert b.post("/v1/streams", json={"stream_id": "auth-b"}).status_code == 201
        yield a, b
        a.delete("/v1/streams/auth-a")
        b.delete("/v1/streams/auth-b")


def test_healthz_docs_and_openapi_are_public_and_say_nothing_about_streams(server, two_owners):
    r = httpx.get(f"{server}/healthz", timeout=120)
    assert r.status_code == 200 and set(r.json()) == {"status", "model"}, r.text
    assert httpx.get(f"{server}/openapi.json", timeout=120).status_code == 200
    assert httpx.get(f"{server}/docs", timeout=120).status_code == 200


def test_metrics_need_a_token_and_show_each_token_its_own_streams(server, two_owners):
    a, b = two_owners
    assert httpx.get(f"{server}/metrics", timeout=120).status_code == 401
    assert httpx.get(f"{server}/metrics", headers={"Authorization": "Bearer wrong"}, timeout=120).status_code == 401
    mine = metric_rows(a.get("/metrics").text)
    assert "auth-a" in {s for _, s in mine} and "auth-b" not in {s for _, s in mine}
    assert len({o for o, _ in mine}) == 1  # one owner: A
    with client(server, METRICS_TOKEN) as operator:
        every = metric_rows(operator.get("/metrics").text)
        assert operator.get("/v1/streams").status_code == 401  # the metrics token is for /metrics only
        assert operator.get("/v1/models").status_code == 401
    owners = {s: o for o, s in every if s in ("auth-a", "auth-b")}
    assert set(owners) == {"auth-a", "auth-b"} and owners["auth-a"] != owners["auth-b"]
    assert mine <= every
    text = a.get("/metrics").text + b.get("/metrics").text
    assert not INTERNAL.search(text) and auth.owner_of(OWNER_SECRET.encode(), TOKEN_A) not in text


def test_owner_keys_are_keyed_hashes_and_never_leave_the_server(server, two_owners, coordinator_name):
    import ray

    from actors.coordinator import NAMESPACE

    a, b = two_owners
    held = set(ray.get(ray.get_actor(coordinator_name, namespace=NAMESPACE).list_streams.remote()))
    key_a = auth.owner_of(OWNER_SECRET.encode(), TOKEN_A)
    assert f"{key_a}:auth-a" in held  # HMAC(owner secret, token) ...
    assert not any(hashlib.sha256(TOKEN_A.encode()).hexdigest()[:16] in i for i in held)  # ... not sha256(token)
    answers = [b.get("/v1/streams/auth-a"), b.delete("/v1/streams/auth-a"), b.get("/v1/streams/auth-a/segments"),
               b.post("/v1/streams/auth-a/close"), a.get("/v1/streams/no-such"),
               b.post("/v1/streams/auth-a/chunks", content=b"x", headers={"Content-Type": "video/mp2t"}),
               a.post("/v1/streams", json={"stream_id": "auth-a"}), a.get("/v1/streams"), a.get("/v1/streams/auth-a")]
    assert [r.status_code for r in answers] == [404, 404, 404, 404, 404, 404, 422, 200, 200], [r.text for r in answers]
    for r in answers:
        assert not INTERNAL.search(r.text) and key_a not in r.text, r.text
