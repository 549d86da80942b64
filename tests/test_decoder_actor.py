"""DecoderActor on a real Ray runtime, real videos and a real recording sink actor.

Eight decoder actors run AT ONCE (module fixture `runs`), one per scenario, all feeding the same
recording sink: a file sampled at a target fps, "block" under a slow sink, "drop" under a slower
one, push mode (pipelined numbered chunks, and awaited chunks), a truncated file, a sink that
fails, and a stream stopped while blocked. Each test checks one scenario; the isolation test
checks that every stream received only its own frames while the others failed or were stopped.
Every clip encodes the frame index in red (modulo 32) and its stream number in blue.
"""

from __future__ import annotations

import io
import time

import numpy as np
import pytest
import ray
from ray.exceptions import ActorUnavailableError, RayActorError

from actors.decoder import StreamDecoder
from actors.decoder_actor import DecoderActor
from pipeline.decode import DecodeConfig, open_source
from pipeline.errors import ConfigError, InvalidInputError, PushBufferTimeout, VideoDecodeError
from pipeline.video_io import write_video

FPS = 30
H, W = 48, 64
WAIT_S = 120  # generous upper bound for a scenario to end; never a timing assertion


def clip(n: int, stream_no: int) -> np.ndarray:
    red = (np.arange(n) * 8) % 256
    frames = np.empty((n, H, W, 3), np.uint8)
    frames[..., 0] = red[:, None, None]
    frames[..., 1] = 255 - red[:, None, None]
    frames[..., 2] = 16 + 28 * stream_no
    return frames


def _recorder_class():
    # Defined in a function so Ray ships the class by value: its worker does not import this module.
    import threading
    import time as _time

    class Recorder:
        """A real FrameSink: records per stream what each `ingest` call received, the calls that
        were running at once, and can be slowed down or made to fail per stream."""

        def __init__(self) -> None:
            self._lock = threading.Lock()
            self._chunks: dict[str, list] = {}
            self._calls: dict[str, int] = {}
            self._active: dict[str, int] = {}
            self._max_active: dict[str, int] = {}
            self._config: dict[str, tuple] = {}

        def configure(self, stream_id: str, delay_s: float = 0.0, fail_on_call: int | None = None) -> None:
            with self._lock:
                self._config[stream_id] = (delay_s, fail_on_call)

        def ingest(self, stream_id, frames, times, seq=None):
            with self._lock:
                call = self._calls.get(stream_id, 0)
                self._calls[stream_id] = call + 1
                self._active[stream_id] = self._active.get(stream_id, 0) + 1
                self._max_active[stream_id] = max(self._max_active.get(stream_id, 0), self._active[stream_id])
                delay_s, fail_on_call = self._config.get(stream_id, (0.0, None))
            try:
                if fail_on_call is not None and call >= fail_on_call:
                    raise ValueError(f"sink refuses call {call} of {stream_id}")
                _time.sleep(delay_s)
                chunk = {
                    "seq": seq,
                    "times": [float(t) for t in times],
                    "times_dtype": str(times.dtype),
                    "shape": tuple(frames.shape),
                    "dtype": str(frames.dtype),
                    "red": frames[..., 0].mean(axis=(1, 2)).tolist(),
                    "blue": frames[..., 2].mean(axis=(1, 2)).tolist(),
                }
                with self._lock:
                    self._chunks.setdefault(stream_id, []).append(chunk)
            finally:
                with self._lock:
                    self._active[stream_id] -= 1

        def received(self, stream_id: str) -> dict:
            with self._lock:
                chunks = sorted(self._chunks.get(stream_id, []), key=lambda c: c["times"][0])
                return {"chunks": chunks, "calls": self._calls.get(stream_id, 0),
                        "max_active": self._max_active.get(stream_id, 0)}

        def busy(self) -> int:
            """Calls still running, all streams together."""
            with self._lock:
                return sum(self._active.values())

        def streams(self) -> list:
            with self._lock:
                return sorted(self._calls)

    return Recorder


SCENARIOS = {  # name: (stream number, decoder arguments, sink configuration)
    "fps": (0, dict(config=DecodeConfig(fps=10), chunk_frames=4, max_in_flight=2, policy="block"), {}),
    "block": (1, dict(chunk_frames=3, max_in_flight=2, policy="block"), dict(delay_s=0.02)),
    "drop": (2, dict(chunk_frames=2, max_in_flight=2, policy="drop"), dict(delay_s=0.3)),
    "push-seq": (3, dict(chunk_frames=8, max_in_flight=2, policy="block", push_buffer_bytes=4096), {}),
    "push-awaited": (4, dict(chunk_frames=8, max_in_flight=2, policy="block"), {}),
    "truncated": (5, dict(chunk_frames=4, max_in_flight=2, policy="block"), {}),
    "sink-fails": (6, dict(chunk_frames=5, max_in_flight=1, policy="block"), dict(fail_on_call=2)),
    "stopped": (7, dict(chunk_frames=2, max_in_flight=1, policy="block"), dict(delay_s=1.0)),
}


def sid(name: str) -> str:
    return f"stream-{SCENARIOS[name][0]}-{name}"


def _encode(frames: np.ndarray, container_format: str) -> bytes:
    buf = io.BytesIO()
    write_video(buf, frames, FPS, container_format=container_format, gop_size=10)
    return buf.getvalue()


def _pieces(data: bytes, size: int) -> list[bytes]:
    return [data[i:i + size] for i in range(0, len(data), size)]


@pytest.fixture(scope="module")
def runs(ray_runtime, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("decoder_actor")
    sources = {}
    for name, n in (("fps", 90), ("block", 90), ("drop", 150), ("sink-fails", 90), ("stopped", 90)):
        path = tmp / f"{name}.mp4"
        write_video(path, clip(n, SCENARIOS[name][0]), FPS)
        sources[name] = str(path)
    whole = tmp / "whole.mp4"
    write_video(whole, clip(90, SCENARIOS["truncated"][0]), FPS)
    data = whole.read_bytes()
    cut = tmp / "cut.mp4"
    cut.write_bytes(data[: len(data) // 2])
    sources["truncated"] = str(cut)
    pushed = {"push-seq": _encode(clip(90, 3), "mpegts"), "push-awaited": _encode(clip(60, 4), "matroska")}

    expected_cut = []  # what the decoder itself yields before the error: the frames before the cut
    with pytest.raises(VideoDecodeError):
        for frame in open_source(cut):
            expected_cut.append(frame.time)

    sink = ray.remote(num_cpus=0.05, max_concurrency=32)(_recorder_class()).remote()
    ray.get([sink.configure.remote(sid(name), **cfg) for name, (_, _, cfg) in SCENARIOS.items() if cfg])
    actors = {}
    for name, (_, kwargs, _) in SCENARIOS.items():
        kwargs = dict(kwargs)
        config = kwargs.pop("config", None)
        actors[name] = DecoderActor.remote(sid(name), sources.get(name), config, sink, **kwargs)
    ray.get([a.start.remote() for a in actors.values()])

    # Push mode, two styles: all chunks numbered and in flight at once, then chunks awaited one by one.
    seq_chunks = _pieces(pushed["push-seq"], 2000)
    seq_refs = [actors["push-seq"].push.remote(c, seq=i) for i, c in enumerate(seq_chunks)]
    seq_refs.append(actors["push-seq"].close.remote(chunks=len(seq_chunks)))
    for chunk in _pieces(pushed["push-awaited"], 3000):
        ray.get(actors["push-awaited"].push.remote(chunk))
    ray.get(actors["push-awaited"].close.remote())
    ray.get(seq_refs)

    # The stopped stream: its decode thread is blocked on a sink call of 1 s; status must answer.
    stopped = actors["stopped"]
    deadline = time.monotonic() + WAIT_S
    while True:
        while_blocked = ray.get(stopped.status.remote())
        if while_blocked["state"] == "running" and while_blocked["chunks_in_flight"] == 1:
            break
        assert time.monotonic() < deadline, while_blocked
        time.sleep(0.05)
    stop_reply = ray.get(stopped.stop.remote())

    final = dict(zip(actors, ray.get([a.wait.remote(timeout_s=WAIT_S) for a in actors.values()])))
    after_close = None
    try:
        ray.get(actors["push-awaited"].push.remote(b"late"))
    except InvalidInputError as exc:
        after_close = exc
    restart_reply = ray.get(actors["truncated"].start.remote())  # a failed actor still answers
    while ray.get(sink.busy.remote()):  # the stopped stream's last call may still be running
        assert time.monotonic() < deadline
        time.sleep(0.05)
    received = {name: ray.get(sink.received.remote(sid(name))) for name in SCENARIOS}
    yield {
        "status": final, "received": received, "sink_streams": ray.get(sink.streams.remote()),
        "expected_cut": expected_cut, "while_blocked": while_blocked, "stop_reply": stop_reply,
        "after_close": after_close, "restart_reply": restart_reply,
    }
    for actor in [*actors.values(), sink]:
        ray.kill(actor)


def frames_of(received: dict) -> tuple[list[float], list[int], list[float]]:
    """Times, red-coded frame indices (mod 32) and blue levels of every received frame, in time order."""
    times, idx, blue = [], [], []
    for chunk in received["chunks"]:
        times += chunk["times"]
        idx += [int(round(r / 8)) % 32 for r in chunk["red"]]
        blue += chunk["blue"]
    return times, idx, blue


def check_content(times: list[float], idx: list[int]) -> None:
    assert all(b > a for a, b in zip(times, times[1:])), "times must be strictly increasing"
    assert idx == [round(t * FPS) % 32 for t in times]


def ended_consistently(status: dict) -> None:
    assert status["frames_sent"] + status["frames_dropped"] == status["frames_decoded"]
    assert status["chunks_in_flight"] == 0 or status["state"] == "stopped"


def test_file_at_target_fps_arrives_in_order_with_times(runs):
    status, got = runs["status"]["fps"], runs["received"]["fps"]
    assert status["state"] == "finished" and status["last_error"] is None
    times, idx, _ = frames_of(got)
    assert times == pytest.approx([k / 10 for k in range(30)], abs=1e-3)  # 90 frames at 30 fps, sampled at 10
    check_content(times, idx)
    assert [c["shape"] for c in got["chunks"]] == [(4, H, W, 3)] * 7 + [(2, H, W, 3)]
    assert {c["dtype"] for c in got["chunks"]} == {"uint8"} and {c["times_dtype"] for c in got["chunks"]} == {"float64"}
    assert status["frames_decoded"] == status["frames_sent"] == status["frames_delivered"] == 30
    assert status["frames_dropped"] == 0 and status["chunks_sent"] == 8 and status["chunks_in_flight"] == 0
    info = status["source"]
    assert info["kind"] == "file" and info["name"].endswith("fps.mp4") and info["source_frames"] == 90
    assert info["stream_info"]["width"] == W and info["stream_info"]["height"] == H


def test_block_loses_nothing_under_a_slow_sink(runs):
    status, got = runs["status"]["block"], runs["received"]["block"]
    assert status["state"] == "finished"
    times, idx, _ = frames_of(got)
    assert times == pytest.approx([i / FPS for i in range(90)], abs=1e-3)
    check_content(times, idx)
    assert status["frames_sent"] == status["frames_delivered"] == 90 and status["frames_dropped"] == 0
    assert got["calls"] == 30 and got["max_active"] <= 2 and status["max_chunks_in_flight"] <= 2
    ended_consistently(status)


def test_drop_bounds_in_flight_and_counts_dropped_frames(runs):
    status, got = runs["status"]["drop"], runs["received"]["drop"]
    assert status["state"] == "finished"
    assert 1 <= got["max_active"] <= 2 and status["max_chunks_in_flight"] <= 2  # never above max_in_flight
    assert status["frames_decoded"] == 150
    assert status["frames_dropped"] > 0 and status["chunks_dropped"] > 0
    ended_consistently(status)
    times, idx, _ = frames_of(got)
    assert len(times) == status["frames_sent"] == status["frames_delivered"] == 2 * got["calls"]
    check_content(times, idx)  # the frames that were sent are intact; the gaps are the drops
    assert times[:2] == pytest.approx([0, 1 / FPS], abs=1e-3)  # the first chunk always goes out


@pytest.mark.parametrize("name, n", [("push-seq", 90), ("push-awaited", 60)])
def test_push_mode_decodes_pushed_chunks(runs, name, n):
    status, got = runs["status"][name], runs["received"][name]
    assert status["state"] == "finished" and status["last_error"] is None
    assert status["source"]["kind"] == "push"
    times, idx, _ = frames_of(got)
    assert times == pytest.approx([i / FPS for i in range(n)], abs=1e-3)
    check_content(times, idx)
    assert status["frames_sent"] == n and status["frames_dropped"] == 0
    if name == "push-awaited":
        assert isinstance(runs["after_close"], InvalidInputError)


def test_truncated_file_fails_after_delivering_frames_before_the_cut(runs):
    status, got = runs["status"]["truncated"], runs["received"]["truncated"]
    assert status["state"] == "failed"
    error = status["last_error"]
    assert error["type"] == "VideoDecodeError" and error["where"] == "source" and "cut.mp4" in error["message"]
    expected = runs["expected_cut"]
    assert 10 < len(expected) < 90
    times, idx, _ = frames_of(got)
    assert times == pytest.approx(expected, abs=1e-6)
    check_content(times, idx)
    assert status["frames_sent"] == status["frames_delivered"] == status["frames_decoded"] == len(expected)
    ended_consistently(status)
    assert runs["restart_reply"]["state"] == "failed"  # start() again is a no-op, the actor is alive


def test_failing_sink_marks_the_stream_failed(runs):
    status, got = runs["status"]["sink-fails"], runs["received"]["sink-fails"]
    assert status["state"] == "failed"
    error = status["last_error"]
    assert error["type"] == "ValueError" and error["where"] == "sink" and "refuses call 2" in error["message"]
    # window of 1: chunk 3 is decoded while call 2 runs; call 2's failure stops the stream there.
    assert got["calls"] == 3 and len(frames_of(got)[0]) == 10
    assert status["frames_decoded"] == 20 and status["frames_sent"] == 15 and status["frames_delivered"] == 10
    ended_consistently(status)


def test_status_answers_while_blocked_and_stop_ends_the_stream(runs):
    blocked = runs["while_blocked"]
    assert blocked["state"] == "running" and blocked["chunks_in_flight"] == 1
    status = runs["status"]["stopped"]
    assert runs["stop_reply"]["state"] == status["state"] == "stopped" and status["last_error"] is None
    assert status["frames_decoded"] < 90
    ended_consistently(status)
    times, idx, _ = frames_of(runs["received"]["stopped"])
    assert len(times) <= status["frames_sent"]
    check_content(times, idx)


def test_eight_streams_at_once_each_get_only_their_own_frames(runs):
    assert runs["sink_streams"] == sorted(sid(name) for name in SCENARIOS)
    for name, (stream_no, _, _) in SCENARIOS.items():
        status = runs["status"][name]
        assert status["stream_id"] == sid(name)
        _, _, blue = frames_of(runs["received"][name])
        assert blue, name
        assert np.allclose(blue, 16 + 28 * stream_no, atol=6), name  # 28 levels apart per stream
    # Failures and a stop in some streams did not disturb the others.
    assert {n: s["state"] for n, s in runs["status"].items()} == {
        "fps": "finished", "block": "finished", "drop": "finished", "push-seq": "finished",
        "push-awaited": "finished", "truncated": "failed", "sink-fails": "failed", "stopped": "stopped",
    }


def _until(condition, what: str):
    deadline = time.monotonic() + WAIT_S
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.05)


def _answers(call) -> bool:
    try:
        ray.get(call())
        return True
    except (ActorUnavailableError, RayActorError):
        return False


def test_chunks_lost_with_the_sinks_process_are_sent_again_on_resync(ray_runtime, tmp_path):
    """With reconnect_s, the chunks of calls that died with the sink's process are kept, and
    resync (what the restarted sink calls) sends them again, with their seq, before anything
    newer: every chunk reaches the old process or the new one. Without a resync within
    reconnect_s the stream fails, and the decoder, detached in production, ends itself."""
    write_video(tmp_path / "a.mp4", clip(60, 0), FPS)
    sink = ray.remote(num_cpus=0.05, max_concurrency=8, max_restarts=1)(_recorder_class()).remote()
    ray.get(sink.configure.remote("r", delay_s=0.3))
    decoder = DecoderActor.remote("r", str(tmp_path / "a.mp4"), None, sink, chunk_frames=6, max_in_flight=2,
                                  policy="block", reconnect_s=WAIT_S)
    ray.get(decoder.start.remote())
    _until(lambda: ray.get(sink.received.remote("r"))["chunks"], "a chunk is delivered")
    _until(lambda: ray.get(decoder.status.remote())["chunks_in_flight"] == 2, "the window fills")
    ray.kill(sink, no_restart=False)
    _until(lambda: ray.get(decoder.status.remote())["waiting_for_sink"], "the decoder sees its calls lost")
    _until(lambda: _answers(sink.busy.remote), "the sink restarts")
    assert ray.get(decoder.status.remote())["state"] == "running"  # not failed
    first, end = ray.get(decoder.resync.remote())
    status = ray.get(decoder.wait.remote(WAIT_S))
    # every chunk reached one process once: the old one (its records died with it) or the new one
    assert (status["state"], status["resyncs"], status["frames_delivered"]) == ("finished", 1, 60), status
    again = [c["seq"] for c in ray.get(sink.received.remote("r"))["chunks"]]
    assert sorted(again) == sorted(set(again)) and set(range(first, end)) | set(range(end, 10)) <= set(again)
    assert end > first

    lonely = ray.remote(num_cpus=0.05)(_recorder_class()).remote()
    ray.get(lonely.configure.remote("r", delay_s=5.0))
    orphan = DecoderActor.remote("r", str(tmp_path / "a.mp4"), None, lonely, chunk_frames=6, reconnect_s=1.0)
    ray.get(orphan.start.remote())
    _until(lambda: ray.get(orphan.status.remote())["chunks_in_flight"], "a chunk is in flight")
    ray.kill(lonely)  # for good
    _until(lambda: not _answers(orphan.status.remote), "the orphaned decoder ends itself")


def test_constructor_and_push_validation():
    class NoSink:
        pass

    class AnySink:
        def ingest(self, stream_id, frames, times, seq=None):
            return None

    with pytest.raises(ConfigError):
        StreamDecoder("s", "a.mp4", None, AnySink(), policy="fast")
    with pytest.raises(ConfigError):
        StreamDecoder("s", "a.mp4", None, AnySink(), chunk_frames=0)
    with pytest.raises(ConfigError):
        StreamDecoder("s", "a.mp4", None, AnySink(), max_in_flight=0)
    with pytest.raises(InvalidInputError):
        StreamDecoder("s", "a.mp4", None, NoSink())
    with pytest.raises(InvalidInputError):
        StreamDecoder("", "a.mp4", None, AnySink())
    decoder = StreamDecoder("s", "a.mp4", None, AnySink())
    with pytest.raises(InvalidInputError, match="not in push mode"):
        decoder.push(b"x")
    assert decoder.stop()["state"] == "stopped"  # never started
    assert decoder.start()["state"] == "stopped"


def test_numbered_pushes_are_written_in_order_and_timeouts_keep_the_chunk():
    # In-process (no Ray, not started): inspect what reaches the decoder's byte buffer.
    class AnySink:
        def ingest(self, stream_id, frames, times, seq=None):
            return None

    decoder = StreamDecoder("p", None, None, AnySink(), push_buffer_bytes=100)
    buffer = decoder._push
    assert decoder.push(b"cc", seq=2).buffered_bytes == 0  # parked: 0 and 1 have not arrived
    assert decoder.push(b"aa", seq=0).buffered_bytes == 2  # written; 1 still missing
    assert decoder.push(b"aa", seq=0).buffered_bytes == 2  # a repeat is ignored
    decoder.close(chunks=4)  # the end waits for chunk 3
    assert not buffer.closed
    assert decoder.push(b"bb", seq=1).buffered_bytes == 6  # writes 1, then the parked 2
    assert buffer.read() == b"aabbcc"
    assert decoder.push(b"dd", seq=3).buffered_bytes == 2 and buffer.closed
    assert buffer.read() == b"dd" and buffer.read() == b""
    with pytest.raises(InvalidInputError, match="after close"):
        decoder.push(b"ee", seq=4)

    patient = StreamDecoder("g", None, None, AnySink())  # waits 5 s for a missing chunk
    patient.push(b"0", seq=0)
    for seq in range(2, 7):  # 1 has not come (yet): the chunks after it are parked
        patient.push(str(seq).encode(), seq=seq)
    assert patient._push.read() == b"0" and patient.status()["chunks_skipped"] == 0
    gappy = StreamDecoder("g", None, None, AnySink(), reorder_wait_s=0)
    gappy.push(b"0", seq=0)
    gappy.push(b"2", seq=2)  # 1 is given up at once
    assert gappy._push.read() == b"02" and gappy.status()["chunks_skipped"] == 1
    gappy.push(b"1", seq=1)  # too late: ignored
    gappy.push(b"3", seq=3)
    assert gappy._push.read() == b"3"

    slow = StreamDecoder("q", None, None, AnySink(), push_buffer_bytes=8)
    slow.push(b"1111")
    slow.push(b"2222")
    with pytest.raises(PushBufferTimeout):
        slow.push(b"3333", timeout_s=0.01)  # nobody reads: the buffer stays full
    assert slow._push.read() == b"11112222"
    assert slow.push(b"4444").buffered_bytes == 8  # the timed-out chunk was kept first in line
    assert slow._push.read() == b"33334444"
