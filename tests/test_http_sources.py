"""The SSRF guard (issue 21, item 4): what the server refuses to fetch, over real HTTP against the
session's strict Serve app (public addresses only, except 127.0.0.2/32), with real listeners that
must see no connection, a real redirect, and PyAV pulling through the guard's proxy."""

import functools
import ipaddress
import socket
import threading
import time
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest

from pipeline.errors import SourceRefusedError
from pipeline.source_policy import SourcePolicy, check_source, refusal
from tests.plugins.serve_app import STRICT_MAX_SOURCE_BYTES, client
from tests.stages import scene_video as video
from tests.test_http_api import ask_body, wait_ingested

REFUSED = ["127.0.0.1", "127.1", "2130706433", "0x7f.1", "0.0.0.0", "::1", "::ffff:127.0.0.1", "::127.0.0.1",
           "64:ff9b::7f00:1", "2002:7f00:1::", "10.1.2.3", "172.16.0.1", "192.168.1.1", "100.64.0.1",
           "169.254.169.254", "100.100.100.200", "fd00:ec2::254", "fe80::1", "224.0.0.1", "ff02::1",
           "240.0.0.1", "255.255.255.255", "192.0.2.1", "198.18.0.1"]


@pytest.mark.parametrize("host", REFUSED)
def test_non_public_addresses_are_refused_however_spelt(host):
    url = f"http://{'[' + host + ']' if ':' in host else host}:8080/v.mp4"
    with pytest.raises(SourceRefusedError, match="public addresses only"):
        check_source(url, SourcePolicy())
    assert check_source(url, SourcePolicy(allow_private=True)).url == url  # the setting for tests and demos


@pytest.mark.parametrize("address", ["8.8.8.8", "2001:4860:4860::8888", "1.1.1.1"])
def test_public_addresses_pass(address):
    assert refusal(ipaddress.ip_address(address), SourcePolicy()) is None


@pytest.mark.parametrize("source", ["file:///etc/passwd", "/etc/passwd", "ftp://example.com/v.mp4",
                                    "gopher://127.0.0.1:6379/_INFO", "http:///v.mp4", "http://x:99999/v.mp4"])
def test_schemes_files_and_malformed_urls_are_refused(source):
    with pytest.raises(SourceRefusedError):
        check_source(source, SourcePolicy(allow_private=True))


class _Listener:
    """A TCP port that records whether anything connected to it."""

    def __init__(self, host: str = "127.0.0.1"):
        self.sock = socket.create_server((host, 0))
        self.sock.setblocking(False)
        self.port = self.sock.getsockname()[1]

    def connected(self) -> bool:
        try:
            conn, _ = self.sock.accept()
        except BlockingIOError:
            return False
        conn.close()
        return True


@pytest.fixture(scope="module")
def www(tmp_path_factory):
    """An HTTP server on 127.0.0.2 (the strict server's allowed network): a small clip, a clip over
    the strict server's byte cap, and /redirect, a 302 to a loopback listener."""
    from pipeline.video_io import write_video

    root = tmp_path_factory.mktemp("www2")
    write_video(root / "clip.mp4", video(12, seed=5), fps=4.0)
    write_video(root / "clip.ts", video(12, seed=5), fps=4.0, container_format="mpegts")  # read in one request
    noise = np.random.default_rng(6).integers(0, 256, (60, 128, 128, 3), dtype=np.uint8)
    write_video(root / "big.mp4", noise, fps=4.0, crf=0)  # ~1.5 MB: noise does not compress
    target = _Listener()

    class Handler(SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_GET(self):
            if self.path.startswith("/trickle"):  # the clip, 512 bytes every 0.2 s
                data = (root / "clip.ts").read_bytes()
                self.send_response(200)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                for start in range(0, len(data), 512):
                    self.wfile.write(data[start : start + 512])
                    self.wfile.flush()
                    time.sleep(0.2)
                return
            if self.path.startswith("/redirect"):
                self.send_response(302)
                self.send_header("Location", f"http://127.0.0.1:{target.port}/clip.mp4")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            super().do_GET()

    httpd = ThreadingHTTPServer(("127.0.0.2", 0), functools.partial(Handler, directory=str(root)))
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield {"base": f"http://127.0.0.2:{httpd.server_address[1]}", "target": target,
           "big_bytes": (root / "big.mp4").stat().st_size, "ts_bytes": (root / "clip.ts").stat().st_size}
    httpd.shutdown()


def test_refused_sources_are_400s_and_nothing_is_connected(strict_server):
    listener, closed = _Listener(), _Listener()
    closed.sock.close()  # a closed port: the answer must not differ from an open one's
    with client(strict_server) as http:
        texts = {}
        for port_name, port in (("open", listener.port), ("closed", closed.port)):
            for url in (f"http://127.0.0.1:{port}/", f"http://127.1:{port}/", f"http://2130706433:{port}/",
                        f"http://0.0.0.0:{port}/", f"https://127.0.0.1:{port}/", f"rtsp://127.0.0.1:{port}/cam",
                        f"http://[::ffff:127.0.0.1]:{port}/", f"http://localhost:{port}/"):
                r = http.post("/v1/streams", json={"stream_id": "ssrf", "source": url})
                assert r.status_code == 400 and r.json()["error"]["type"] == "SourceRefusedError", r.text
                texts.setdefault(url.replace(str(port), "PORT"), set()).add(r.json()["error"]["message"])
                body = ask_body("x")
                body["messages"][0]["content"][0]["video_url"]["url"] = url
                assert http.post("/v1/chat/completions", json=body).status_code == 400
                r = http.post("/v1/streams", json={"stream_id": "ssrf"})  # then a source for it: refused too
                assert r.status_code == 201, r.text
                http.post("/v1/streams/ssrf/close", params={"wait_s": 5})
                r = http.post("/v1/streams/ssrf/source", json={"source": url})
                assert r.status_code == 400 and r.json()["error"]["type"] == "SourceRefusedError", r.text
                assert http.delete("/v1/streams/ssrf").status_code == 200
        assert all(len(messages) == 1 for messages in texts.values()), texts  # open and closed: one text
        assert "ssrf" not in {s["stream_id"] for s in http.get("/v1/streams").json()["data"]}
        r = http.post("/v1/streams", json={"source": "file:///etc/passwd"})
        assert r.status_code == 400 and "local files" in r.json()["error"]["message"]
    assert not listener.connected()


def test_an_allowed_network_is_pulled_through_the_guard(strict_server, www):
    with client(strict_server) as http:
        r = http.post("/v1/streams", json={"stream_id": "allowed", "source": f"{www['base']}/clip.mp4"})
        assert r.status_code == 201, r.text
        status = wait_ingested(http, "allowed", 12)
        assert (status["source_state"], status["frames_ingested"]) == ("finished", 12), status
        assert http.delete("/v1/streams/allowed").status_code == 200


def test_a_redirect_to_a_refused_address_is_not_followed(strict_server, www):
    with client(strict_server) as http:
        r = http.post("/v1/streams", json={"stream_id": "redirected", "source": f"{www['base']}/redirect"})
        assert r.status_code == 201, r.text  # the first hop is allowed
        status = wait_ingested(http, "redirected")
        assert status["source_state"] == "failed" and "SourceRefusedError" in status["last_error"], status
        assert "loopback" in status["last_error"] and status["frames_ingested"] == 0
        assert http.delete("/v1/streams/redirected").status_code == 200
        body = ask_body("x")
        body["messages"][0]["content"][0]["video_url"]["url"] = f"{www['base']}/redirect"
        r = http.post("/v1/chat/completions", json=body)
        assert r.status_code == 400 and r.json()["error"]["type"] == "SourceRefusedError", r.text
    assert not www["target"].connected()


def test_a_source_over_its_byte_cap_is_stopped(strict_server, www):
    assert www["big_bytes"] > 2 * STRICT_MAX_SOURCE_BYTES
    with client(strict_server) as http:
        r = http.post("/v1/streams", json={"stream_id": "big", "source": f"{www['base']}/big.mp4"})
        assert r.status_code == 201, r.text
        status = wait_ingested(http, "big")
        assert status["source_state"] == "failed" and "limit of 524288 bytes" in status["last_error"], status
        assert http.delete("/v1/streams/big").status_code == 200


def test_the_guard_connects_to_the_address_it_checked(www, monkeypatch):
    """DNS rebinding: a name that resolves to an allowed address when checked and to loopback
    afterwards. FFmpeg never resolves the name itself (it does not resolve here at all: the
    resolver is stubbed for the guard alone, the one fault here that cannot be caused for real),
    so decoding succeeds only through the connection to the checked address, and the next
    connection, which resolves to loopback, is refused."""
    import pipeline.source_policy as policy_module
    from pipeline.decode import DecodeConfig, open_source

    answers = iter(["127.0.0.2", "127.0.0.1"])
    real = socket.getaddrinfo

    def rebinding(host, port, *args, **kwargs):
        if host == "rebind.test":
            return real(next(answers), port, *args, **kwargs)
        return real(host, port, *args, **kwargs)

    monkeypatch.setattr(policy_module.socket, "getaddrinfo", rebinding)
    port = www["base"].rsplit(":", 1)[1]
    config = DecodeConfig(source_policy=SourcePolicy(allow_networks=("127.0.0.2/32",)), reconnect=False, max_retries=0)
    with open_source(f"http://rebind.test:{port}/clip.ts", config) as frames:
        assert sum(1 for _ in frames) == 12
    with pytest.raises(SourceRefusedError, match="loopback"):
        open_source(f"http://rebind.test:{port}/clip.ts", config)


def test_a_source_over_its_time_cap_is_stopped(www):
    """The trickled clip takes over 4 s to arrive; a source may stay connected 1 s."""
    from pipeline.decode import DecodeConfig, open_source

    assert www["ts_bytes"] > 10 * 1024
    config = DecodeConfig(source_policy=SourcePolicy(allow_networks=("127.0.0.2/32",), max_seconds=1.0),
                          reconnect=False, max_retries=0)
    with pytest.raises(SourceRefusedError, match="longer than its limit of 1.0 s"):
        with open_source(f"{www['base']}/trickle", config) as frames:
            for _ in frames:
                pass
