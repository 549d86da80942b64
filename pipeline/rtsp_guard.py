"""The SSRF guard for RTSP sources: a loopback relay that FFmpeg connects to instead of the camera.

FFmpeg has no proxy option for RTSP, and its RTSP demuxer follows redirects on its own: while
connecting (OPTIONS, DESCRIBE, SETUP), a reply whose status is 3xx makes `ff_rtsp_connect` close
the connection and start again at the reply's Location (libavformat/rtsp.c, `goto redirect`), any
host, any number of times, with no option to turn it off. So FFmpeg is given
rtsp://127.0.0.1:<relay port>/<path> and every connection it makes there (reconnects included) is
checked against the source's policy and relayed to the very address that was checked (no DNS
rebinding). With `rtsp_transport=tcp` (pipeline/decode.py) the whole session, RTP included, runs
over that one connection. The server's side is read as FFmpeg reads it (`_RtspReplies`): a
redirect is refused, never forwarded, so FFmpeg sees the connection end and connects nowhere
else; the source fails with SourceRefusedError saying so. A redirect to an allowed address is
refused too: following it would let FFmpeg resolve and connect on its own, outside the guard.
Bytes and time count against the policy's caps as in the HTTP proxy. The server sees request
URLs with the relay's host and port (path, query and credentials as given; Digest auth covers
the URL FFmpeg sent): RTSP servers route on the path.
"""

from __future__ import annotations

import re
import socket
from urllib.parse import urlsplit, urlunsplit

from pipeline.errors import SourceRefusedError
from pipeline.source_guard import _HEAD_LIMIT, CONNECT_TIMEOUT_S, SourceGuard
from pipeline.source_policy import SourcePolicy, check_url

_INTERLEAVED = 0x24  # "$": an RTP/RTCP packet on the RTSP connection: "$", channel, 16-bit length, data
_HEAD_END = re.compile(rb"\n\r?\n")
_STATUS = re.compile(rb"[^ \t\r\n]+[ \t]+(\d+)")  # FFmpeg takes a reply's second word as its status


class RtspGuard(SourceGuard):
    """`RtspGuard(policy, url)`: give FFmpeg `url` (the relay's) instead of the source's; `close()`."""

    def __init__(self, policy: SourcePolicy, source_url: str):
        self.source_url = source_url
        self.unreachable: str | None = None  # why the last connection found no server (FFmpeg only sees it closed)
        super().__init__(policy)
        parts = urlsplit(source_url)
        userinfo = parts.netloc.rpartition("@")[0]
        netloc = (userinfo + "@" if userinfo else "") + f"127.0.0.1:{self._server.getsockname()[1]}"
        self.url = urlunsplit(parts._replace(netloc=netloc))

    def _handle(self, client: socket.socket, opened: list[socket.socket]) -> None:
        """One connection from FFmpeg: the source checked again, connected, relayed and watched."""
        self._start_clock()
        try:
            if self._over_limits():
                raise SourceRefusedError(self.refused or "the source is over its limits")
            checked = check_url(self.source_url, self.policy)  # at every (re)connection
        except SourceRefusedError as exc:
            self._refuse(str(exc))
            return
        try:
            upstream = socket.create_connection((checked.address, checked.port), timeout=CONNECT_TIMEOUT_S)
        except OSError:
            self.unreachable = "the RTSP server cannot be reached"  # one text whatever the cause
            return
        self.unreachable = None
        opened.append(upstream)
        self._relay(client, upstream, _RtspReplies().feed)


class _RtspReplies:
    """The server's side of an RTSP connection, split as FFmpeg splits it: interleaved packets
    ("$" frames) and messages (lines up to an empty one, then Content-Length bytes of body).
    `feed` returns the bytes that may go on to FFmpeg: whole units only, so a redirect is seen
    before any of it is forwarded."""

    def __init__(self) -> None:
        self._pending = bytearray()
        self._passing = 0  # bytes of the current frame or body still to forward unread

    def feed(self, data: bytes) -> bytes:
        self._pending += data
        out = bytearray()
        while self._pending:
            if self._passing:
                n = min(self._passing, len(self._pending))
                out += self._pending[:n]
                del self._pending[:n]
                self._passing -= n
            elif self._pending[0] == _INTERLEAVED:
                if len(self._pending) < 4:
                    break
                self._passing = 4 + int.from_bytes(self._pending[2:4], "big")
            else:
                end = _HEAD_END.search(self._pending)
                if end is None:
                    if len(self._pending) > _HEAD_LIMIT:
                        raise SourceRefusedError("the RTSP server sent a reply without an end to its header")
                    break
                self._passing = end.end() + _check_head(bytes(self._pending[: end.end()]))
        return bytes(out)


def _check_head(head: bytes) -> int:
    """The body length of a message head; raises SourceRefusedError for a redirect."""
    lines = head.split(b"\n")
    status = _STATUS.match(lines[0])
    fields = {}
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        fields[name.strip().lower()] = value.strip()
    if status and 300 <= int(status.group(1)) < 400:
        location = fields.get(b"location", b"").decode("latin-1")[:200]
        raise SourceRefusedError(f"the RTSP server answered {int(status.group(1))}, a redirect to {location!r}; "
                                 "redirects of RTSP sources are not followed")
    length = re.match(rb"\d*", fields.get(b"content-length", b""))
    return int(length.group() or 0)
