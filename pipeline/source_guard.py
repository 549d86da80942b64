"""The SSRF guard where connections are made: a loopback HTTP proxy for one source's FFmpeg.

FFmpeg follows redirects, fetches HLS/DASH segments and reconnects on its own; given this proxy
(its `http_proxy` option, which the https and hls layers pass on), every one of those requests
comes here first. Each is checked against the source's `SourcePolicy` (pipeline/source_policy.py):
the host is resolved and checked, and the connection goes to the very address that was checked
(DNS rebinding cannot swap it). Plain http requests are forwarded one per connection
(`Connection: close`), https goes through CONNECT. The bytes read from upstream and the time since
the first request count against the policy's `max_bytes` and `max_seconds`, over every request of
the source. A refused request gets a 403 and `refused` says why (FrameSource raises
SourceRefusedError with it); an upstream that cannot be reached gets the same 502 whatever the
cause, so answers do not tell open ports from closed ones.

RTSP has no proxy in FFmpeg: pipeline/rtsp_guard.py relays an RTSP source's connections the same
way. `cap_exceeded` is the caps' text, also checked in the decode loop (pipeline/decode.py) as a
second line behind both proxies.
"""

from __future__ import annotations

import os
import select
import socket
import threading
import time
from collections.abc import Callable
from urllib.parse import urlsplit, urlunsplit

from pipeline.errors import SourceRefusedError
from pipeline.source_policy import SourcePolicy, check_host, check_url

CONNECT_TIMEOUT_S = 10.0
_HEAD_LIMIT = 64 * 2**10
_REFUSED = b"HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
_UNREACHABLE = b"HTTP/1.1 502 Bad Gateway\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"


class SourceGuard:
    """Start with `SourceGuard(policy)`; give FFmpeg `url` as its http_proxy; `close()` when done."""

    def __init__(self, policy: SourcePolicy):
        # FFmpeg skips the proxy for hosts in $no_proxy: nothing may bypass the guard
        os.environ.pop("no_proxy", None)
        self.policy = policy
        self.refused: str | None = None
        self.bytes_read = 0
        self._started: float | None = None  # time.monotonic() of the source's first request
        self._lock = threading.Lock()
        self._closed = threading.Event()
        self._server = socket.create_server(("127.0.0.1", 0))
        self._server.settimeout(0.5)
        self.url = f"http://127.0.0.1:{self._server.getsockname()[1]}"
        threading.Thread(target=self._accept, name="source-guard", daemon=True).start()

    def close(self) -> None:
        self._closed.set()
        self._server.close()

    def _accept(self) -> None:
        while not self._closed.is_set():
            try:
                conn, _ = self._server.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _refuse(self, reason: str) -> None:
        with self._lock:
            self.refused = self.refused or reason

    def _serve(self, client: socket.socket) -> None:
        opened = [client]  # closed at the end, whatever happens
        try:
            self._handle(client, opened)
        except OSError:
            pass
        finally:
            for sock in opened:
                sock.close()

    def _handle(self, client: socket.socket, opened: list[socket.socket]) -> None:
        """One proxied HTTP request (or CONNECT tunnel): checked, connected, relayed."""
        client.settimeout(CONNECT_TIMEOUT_S)
        head = _read_head(client)
        if head is None:
            return
        method, target, rest = _split_request(head)
        self._start_clock()
        try:
            if self._over_limits():
                raise SourceRefusedError(self.refused or "the source is over its limits")
            if method == "CONNECT":
                host, _, port = target.rpartition(":")
                host, port = host.strip("[]"), int(port)
                address = check_host(host, port, self.policy)
            else:
                checked = check_url(target, self.policy)
                if checked.scheme != "http":
                    raise SourceRefusedError(f"a proxied request for {checked.scheme}")
                host, port, address = checked.host, checked.port, checked.address
        except (SourceRefusedError, ValueError) as exc:
            self._refuse(str(exc))
            client.sendall(_REFUSED)
            return
        try:
            upstream = socket.create_connection((address, port), timeout=CONNECT_TIMEOUT_S)
        except OSError:
            client.sendall(_UNREACHABLE)
            return
        opened.append(upstream)
        if method == "CONNECT":
            client.sendall(b"HTTP/1.1 200 Connection established\r\n\r\n")
        else:
            upstream.sendall(_origin_request(method, target, rest))
        self._relay(client, upstream)

    def _start_clock(self) -> None:
        """The source's time starts at its first request."""
        with self._lock:
            if self._started is None:
                self._started = time.monotonic()

    def _over_limits(self) -> bool:
        reason = cap_exceeded(self.policy, self.bytes_read, self._started)
        if reason:
            self._refuse(reason)
        return reason is not None

    def _relay(self, client: socket.socket, upstream: socket.socket,
               watch: Callable[[bytes], bytes] | None = None) -> None:
        """Copy both ways until either side closes; upstream's bytes are counted and, with `watch`,
        passed through it first (it returns what to forward, or raises SourceRefusedError)."""
        peers = {client: upstream, upstream: client}
        while not self._closed.is_set() and not self._over_limits():
            readable, _, _ = select.select(list(peers), [], [], 0.5)
            for sock in readable:
                data = sock.recv(65536)
                if not data:
                    return
                if sock is upstream:
                    with self._lock:
                        self.bytes_read += len(data)
                    if watch is not None:
                        try:
                            data = watch(data)
                        except SourceRefusedError as exc:
                            self._refuse(str(exc))
                            return
                peers[sock].sendall(data)


def cap_exceeded(policy: SourcePolicy, nbytes: int, started: float | None) -> str | None:
    """Which of the policy's caps a source that read `nbytes` since `started` (time.monotonic) is
    over, as the refusal's text, or None."""
    if policy.max_bytes is not None and nbytes > policy.max_bytes:
        return f"the source read more than its limit of {policy.max_bytes} bytes"
    if started is not None and policy.max_seconds is not None and time.monotonic() - started > policy.max_seconds:
        return f"the source ran longer than its limit of {policy.max_seconds} s"
    return None


def _read_head(sock: socket.socket) -> bytes | None:
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(4096)
        if not chunk or len(data) > _HEAD_LIMIT:
            return None
        data += chunk
    return data


def _split_request(head: bytes) -> tuple[str, str, bytes]:
    line, _, rest = head.partition(b"\r\n")
    method, target, _version = line.decode("latin-1").split(" ", 2)
    return method.upper(), target, rest


def _origin_request(method: str, target: str, rest: bytes) -> bytes:
    """The proxied request in origin form, one per connection."""
    parts = urlsplit(target)
    path = urlunsplit(("", "", parts.path or "/", parts.query, ""))
    head, _, body = rest.partition(b"\r\n\r\n")
    drop = (b"connection:", b"proxy-connection:", b"keep-alive:", b"proxy-authorization:")
    lines = [h for h in head.split(b"\r\n") if h and not h.lower().startswith(drop)]
    return b"\r\n".join([f"{method} {path} HTTP/1.1".encode(), *lines, b"Connection: close", b"", body])
