"""A real RTSP server for the tests: GStreamer's gst-rtsp-server (Debian packages python3-gi,
gir1.2-gst-rtsp-server-1.0, gstreamer1.0-plugins-{base,good,bad}; `make test` installs them).

Run by the SYSTEM python (where python3-gi lives), not the project's venv:
    /usr/bin/python3 tests/rtsp_server.py PORT CLIP.ts
serves the H.264 in the MPEG-TS file CLIP.ts at rtsp://127.0.0.1:PORT/clip, at its own pace (real
time), from the start for each client, then ends the session (RTCP BYE). Prints "ready" once it
listens; stops on SIGTERM.
"""

import signal
import sys

import gi

gi.require_version("Gst", "1.0")
gi.require_version("GstRtspServer", "1.0")
from gi.repository import GLib, Gst, GstRtspServer  # noqa: E402


def main() -> None:
    port, clip = sys.argv[1], sys.argv[2]
    Gst.init(None)
    server = GstRtspServer.RTSPServer()
    server.set_address("127.0.0.1")
    server.set_service(port)
    factory = GstRtspServer.RTSPMediaFactory()
    factory.set_launch(f'( filesrc location="{clip}" ! tsdemux ! h264parse ! rtph264pay name=pay0 pt=96 config-interval=1 )')
    factory.set_shared(False)
    server.get_mount_points().add_factory("/clip", factory)
    if server.attach(None) == 0:
        sys.exit(f"cannot listen on 127.0.0.1:{port}")
    loop = GLib.MainLoop()
    GLib.unix_signal_add(GLib.PRIORITY_DEFAULT, signal.SIGTERM, loop.quit)
    print("ready", flush=True)
    loop.run()


if __name__ == "__main__":
    main()
