"""The SSRF guard on RTSP sources (issue 21, item 4): FFmpeg's RTSP demuxer follows 3xx redirects
on its own (libavformat/rtsp.c), so the guard relays RTSP (pipeline/rtsp_guard.py) and refuses
them; the byte and time caps hold for RTSP as for HTTP. Against a tiny RTSP server in a thread
(OPTIONS answered, DESCRIBE redirected) and GStreamer's real RTSP server (tests/rtsp_server.py)."""

from __future__ import annotations

import socket
import threading

import pytest

from pipeline.decode import DecodeConfig, open_source
from pipeline.errors import SourceRefusedError, SourceUnavailableError, StreamKVError
from pipeline.source_policy import SourcePolicy
from tests.test_http_sources import _Listener
from tests.test_live_sources import N, check_whole, clip, rtsp_serve, textured, ts_bytes  # noqa: F401

ALLOWED = ("127.0.0.2/32",)  # as the strict Serve app: loopback refused except this address


class RedirectingRtspServer:
    """An RTSP server on 127.0.0.2 that answers OPTIONS and redirects DESCRIBE (302) to `location`."""

    def __init__(self, location: str):
        self.location = location
        self.sock = socket.create_server(("127.0.0.2", 0))
        self.url = f"rtsp://127.0.0.2:{self.sock.getsockname()[1]}/cam"
        self.requests: list[str] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        with conn:
            data = b""
            while True:
                while b"\r\n\r\n" not in data:
                    chunk = conn.recv(4096)
                    if not chunk:
                        return
                    data += chunk
                head, _, data = data.partition(b"\r\n\r\n")
                lines = head.decode("latin-1").split("\r\n")
                self.requests.append(lines[0].split(" ")[0])
                cseq = next((line.split(":", 1)[1].strip() for line in lines if line.lower().startswith("cseq:")), "0")
                if lines[0].startswith("OPTIONS"):
                    reply = f"RTSP/1.0 200 OK\r\nCSeq: {cseq}\r\nPublic: OPTIONS, DESCRIBE, SETUP, PLAY, TEARDOWN\r\n\r\n"
                else:
                    reply = f"RTSP/1.0 302 Moved Temporarily\r\nCSeq: {cseq}\r\nLocation: {self.location}\r\n\r\n"
                conn.sendall(reply.encode())

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def redirect_to_loopback():
    target = _Listener()  # 127.0.0.1: refused by the policy
    server = RedirectingRtspServer(f"rtsp://127.0.0.1:{target.port}/internal")
    yield server, target
    server.close()
    target.sock.close()


def test_an_rtsp_redirect_is_not_followed(redirect_to_loopback):
    server, target = redirect_to_loopback
    config = DecodeConfig(source_policy=SourcePolicy(allow_networks=ALLOWED), reconnect=False, max_retries=0)
    with pytest.raises(SourceRefusedError, match="answered 302, a redirect to .*not followed"):
        open_source(server.url, config)
    assert server.requests[:2] == ["OPTIONS", "DESCRIBE"]  # the allowed first hop was connected
    assert not target.connected()


def test_an_rtsp_redirect_over_the_api_is_a_refusal(strict_server, redirect_to_loopback):
    """The strict Serve app (loopback refused except 127.0.0.2/32): the first hop is allowed, so the
    stream is created (201) and then fails with the redirect's refusal; a one-shot question is a 400."""
    from tests.plugins.serve_app import client
    from tests.test_http_api import ask_body, wait_ingested

    server, target = redirect_to_loopback
    with client(strict_server) as http:
        r = http.post("/v1/streams", json={"stream_id": "rtsp-redirected", "source": server.url})
        assert r.status_code == 201, r.text
        status = wait_ingested(http, "rtsp-redirected")
        assert status["source_state"] == "failed" and "SourceRefusedError" in status["last_error"], status
        assert "not followed" in status["last_error"] and status["frames_ingested"] == 0
        assert http.delete("/v1/streams/rtsp-redirected").status_code == 200
        body = ask_body("x")
        body["messages"][0]["content"][0]["video_url"]["url"] = server.url
        r = http.post("/v1/chat/completions", json=body)
        assert r.status_code == 400 and r.json()["error"]["type"] == "SourceRefusedError", r.text
    assert not target.connected()


def test_unguarded_ffmpeg_follows_the_rtsp_redirect(redirect_to_loopback):
    """The fault the guard stops, shown: without a policy (the CLI's trusted sources) FFmpeg
    connects to the redirect's target."""
    server, target = redirect_to_loopback
    config = DecodeConfig(reconnect=False, max_retries=0, open_timeout_s=3, read_timeout_s=1)
    with pytest.raises(StreamKVError):
        open_source(server.url, config)
    assert target.connected()


def test_an_rtsp_redirect_to_an_allowed_address_is_refused_too():
    """Following it would let FFmpeg resolve and connect outside the guard."""
    server = RedirectingRtspServer("rtsp://127.0.0.2:1/elsewhere")
    try:
        config = DecodeConfig(source_policy=SourcePolicy(allow_networks=ALLOWED), reconnect=False, max_retries=0)
        with pytest.raises(SourceRefusedError, match="not followed"):
            open_source(server.url, config)
    finally:
        server.close()


def test_an_unreachable_rtsp_server_behind_the_relay_is_unavailable_and_retried():
    """FFmpeg only sees the relay close; the relay says why, so it is a transport failure
    (retried), not "invalid data"."""
    closed = _Listener()
    closed.sock.close()
    url = f"rtsp://user:secret@127.0.0.1:{closed.port}/cam"
    config = DecodeConfig(source_policy=SourcePolicy(allow_private=True), max_retries=2, backoff_s=0.05)
    with pytest.raises(SourceUnavailableError, match="cannot be reached .gave up after 2 retries") as info:
        open_source(url, config)
    assert "secret" not in str(info.value)


LIVE_GUARDED = dict(reconnect=False, open_timeout_s=30, read_timeout_s=30)


def test_a_guarded_rtsp_source_gives_every_frame(rtsp_serve):
    url = rtsp_serve(ts_bytes(clip()))
    config = DecodeConfig(source_policy=SourcePolicy(allow_private=True), **LIVE_GUARDED)
    with open_source(url, config) as source:
        check_whole(list(source))


def test_an_rtsp_source_over_its_byte_cap_is_stopped(rtsp_serve):
    url = rtsp_serve(ts_bytes(textured(), gop=30))
    config = DecodeConfig(source_policy=SourcePolicy(allow_private=True, max_bytes=50_000), **LIVE_GUARDED)
    frames = []
    with pytest.raises(SourceRefusedError, match="more than its limit of 50000 bytes"):
        with open_source(url, config) as source:
            frames.extend(source)
    assert len(frames) < N


def test_an_rtsp_source_over_its_time_cap_is_stopped_across_reconnects(rtsp_serve):
    """The clip plays 3 s in real time and the session ends; the decoder reconnects (a live source
    does not end) and the 4 s cap, counted from the first connection, stops the second session."""
    url = rtsp_serve(ts_bytes(clip()))
    config = DecodeConfig(source_policy=SourcePolicy(allow_private=True, max_seconds=4.0), backoff_s=0.05,
                          max_backoff_s=0.2, open_timeout_s=30, read_timeout_s=30)
    frames = []
    with pytest.raises(SourceRefusedError, match="longer than its limit of 4.0 s"):
        with open_source(url, config) as source:
            frames.extend(source)
    assert N < len(frames) < 3 * N  # into the second session, not to its end


@pytest.mark.parametrize("cap, match", [(dict(max_bytes=50_000), "more than its limit of 50000 bytes"),
                                        (dict(max_seconds=1.0), "longer than its limit of 1.0 s")])
def test_the_decode_loop_enforces_the_caps_behind_the_relay(rtsp_serve, monkeypatch, cap, match):
    """The second line of defence: with the relay's own count switched off (a proxy that misses
    bytes: the one fault here that cannot be caused for real), the demuxed packets' bytes and the
    time since the first open still stop the source."""
    from pipeline.source_guard import SourceGuard

    monkeypatch.setattr(SourceGuard, "_over_limits", lambda self: False)
    url = rtsp_serve(ts_bytes(textured(), gop=30))
    config = DecodeConfig(source_policy=SourcePolicy(allow_private=True, **cap), **LIVE_GUARDED)
    frames = []
    with pytest.raises(SourceRefusedError, match=match):
        with open_source(url, config) as source:
            frames.extend(source)
    assert len(frames) < N


OK_REPLY = b"RTSP/1.0 200 OK\r\nCSeq: 2\r\nContent-Length: 5\r\n\r\nv=0\r\n"
PACKET = b"$\x00\x00\x06RTSP/1"  # an interleaved packet whose payload looks like a reply


@pytest.mark.parametrize("before, redirect", [
    (b"", b"RTSP/1.0 302 Found\r\nLocation: rtsp://127.0.0.1/x\r\n\r\n"),
    (b"", b"RTSP/1.0 +301 Moved\nLocation: rtsp://127.0.0.1/x\n\r\r\n"),  # FFmpeg: atoi, "\r" dropped
    (b"\r\n", b"XX 303\r\n\r\n"),  # an empty reply first, then a redirect
    (b"RTSP/1.0 200 OK\r\n" + PACKET + b"Content-Length: +4\r\n\r\nabcd", b"RTSP/1.0 307 x\r\n\r\n"),
])
def test_the_reply_reader_finds_redirects_however_framed(before, redirect):
    """As FFmpeg frames the server's side (libavformat/rtsp.c ff_rtsp_read_reply), fed whole and
    byte by byte: the redirect is refused and nothing of its reply is passed on."""
    from pipeline.rtsp_guard import _RtspReplies

    stream = PACKET + OK_REPLY + before + redirect
    for step in (len(stream), 1):
        reader, passed = _RtspReplies(), b""
        with pytest.raises(SourceRefusedError, match="redirect"):
            for i in range(0, len(stream), step):
                passed += reader.feed(stream[i : i + step])
        assert stream.startswith(passed) and len(passed) <= len(stream) - len(redirect)


def test_the_reply_reader_passes_a_session_whole():
    from pipeline.rtsp_guard import _RtspReplies

    stream = OK_REPLY + PACKET * 3 + b"RTSP/1.0 200 OK\r\nCSeq: 3\r\n\r\n" + b"$\x01\x01\x00" + bytes(256)
    for step in (len(stream), 1, 7):
        reader = _RtspReplies()
        assert b"".join(reader.feed(stream[i : i + step]) for i in range(0, len(stream), step)) == stream
