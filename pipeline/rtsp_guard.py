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
from pipeline.source_guard import CONNECT_TIMEOUT_S, SourceGuard
from pipeline.source_policy import SourcePolicy, check_url

_INTERLEAVED = ord("$")  # an RTP/RTCP packet on the RTSP connection: "$", channel, 16-bit length, data
_MAX_LINE = 4095  # FFmpeg's line buffer (MAX_URL_SIZE - 1): longer lines are refused, not cut as it cuts them
_HELD_LIMIT = 256 * 2**10  # a reply's head (with any packets inside it) held back at most
_STATUS = re.compile(rb"[ \t]*[^ \t]+[ \t]+\+?(\d+)")  # FFmpeg: atoi() of a reply's second word
_LENGTH = re.compile(rb"content-length:[ \t\n\v\f]*([+-]?\d+)", re.IGNORECASE)  # FFmpeg: strtol()
_LOCATION = re.compile(rb"location:[ \t]*(.*)", re.IGNORECASE)


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
    """The server's side of an RTSP connection, read as FFmpeg's `ff_rtsp_read_reply` reads it:
    lines end at "\\n" and "\\r" is dropped; a "$" at the start of a line is an interleaved
    packet (3 header bytes, then its length), skipped; an empty line ends a reply's head, which
    Content-Length bytes of body follow. `feed` returns the bytes that may go on to FFmpeg: a
    reply's head is held back until it is whole and checked, so a redirect never reaches it."""

    def __init__(self) -> None:
        self._held = bytearray()  # received, not yet forwarded
        self._at = 0  # how much of _held is read
        self._passing = 0  # bytes of a packet or body to pass unread
        self._line = bytearray()  # the line being read, without "\\r"
        self._lines: list[bytes] = []  # the head being read

    def feed(self, data: bytes) -> bytes:
        held = self._held
        held += data
        safe = 0 if self._in_head() else self._at  # what can be forwarded
        while self._at < len(held):
            if self._passing:
                step = min(self._passing, len(held) - self._at)
                self._at += step
                self._passing -= step
            elif not self._line and held[self._at] == _INTERLEAVED:
                if len(held) - self._at < 4:
                    break
                self._passing = 4 + int.from_bytes(held[self._at + 2 : self._at + 4], "big")
            else:
                self._read(held[self._at])
                self._at += 1
            if not self._in_head():
                safe = self._at
        if len(held) - safe > _HELD_LIMIT:
            raise SourceRefusedError("the RTSP server sent a reply head without an end")
        out = bytes(held[:safe])
        del held[:safe]
        self._at -= safe
        return out

    def _in_head(self) -> bool:
        return bool(self._line or self._lines)

    def _read(self, byte: int) -> None:
        if byte == ord("\r"):
            return
        if byte != ord("\n"):
            if len(self._line) >= _MAX_LINE:
                raise SourceRefusedError("the RTSP server sent an over-long line")
            self._line.append(byte)
        elif self._line:
            self._lines.append(bytes(self._line))
            self._line.clear()
        else:  # an empty line: the head is whole
            lines, self._lines = self._lines, []
            self._passing = max(_check_head(lines), 0)


def _check_head(lines: list[bytes]) -> int:
    """The body length of a reply's head (its lines); raises SourceRefusedError for a redirect."""
    status = _STATUS.match(lines[0]) if lines else None
    if status and 300 <= int(status.group(1)) < 400:
        location = next((m.group(1) for line in lines[1:] if (m := _LOCATION.match(line))), b"")
        raise SourceRefusedError(f"the RTSP server answered {int(status.group(1))}, a redirect to "
                                 f"{location.decode('latin-1')[:200]!r}; redirects of RTSP sources are not followed")
    lengths = [int(m.group(1)) for line in lines[1:] if (m := _LENGTH.match(line))]
    return lengths[-1] if lengths else 0
