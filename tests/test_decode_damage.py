"""Damaged input (issue 21, item 7): corrupt bytes in the middle of a file, a pushed upload or a live
stream are skipped and counted, not the end of the stream; a numbered upload closed with a gap
decodes what arrived; a whole non-fragmented MP4 pushed as one upload is decoded once closed.

Videos are real (PyAV/libx264), textured with noise so that each packet is several KB: 10 KB of
zeros then damages one or two packets, as it would in a real file."""

from __future__ import annotations

import io
import threading

import numpy as np
import pytest
import ray

from actors.decoder import StreamDecoder
from actors.decoder_actor import DecoderActor
from pipeline.decode import DecodeConfig, PushBuffer, open_source
from pipeline.errors import InvalidInputError, VideoDecodeError
from pipeline.upload_format import index_follows_media
from pipeline.video_io import FRAGMENTED_MP4_OPTIONS, write_video
from tests.test_decoder_actor import _recorder_class, frames_of

FPS = 30
N = 120  # 4 s
WAIT_S = 120  # upper bound for an actor scenario to end; never a timing assertion


def textured(n: int = N, h: int = 96, w: int = 128) -> np.ndarray:
    rng = np.random.default_rng(3)
    return rng.integers(0, 256, (n, h, w, 3), dtype=np.uint8)


def encode(container_format: str, n: int = N, **kwargs) -> bytes:
    buf = io.BytesIO()
    write_video(buf, textured(n), FPS, container_format=container_format, gop_size=30, **kwargs)
    return buf.getvalue()


def zeroed(data: bytes, size: int = 10 * 1024) -> bytes:
    """`size` bytes of zeros in the middle of the file."""
    mid = len(data) // 2
    return data[:mid] + bytes(size) + data[mid + size:]


def push_all(buf: PushBuffer, data: bytes, step: int = 4096) -> threading.Thread:
    def feed() -> None:
        try:
            for pos in range(0, len(data), step):
                buf.push(data[pos:pos + step])
            buf.close()
        except InvalidInputError:  # the decoder gave up reading (a test that expects it checks why)
            pass

    thread = threading.Thread(target=feed, daemon=True)
    thread.start()
    return thread


def decode_all(source, config: DecodeConfig = DecodeConfig()) -> tuple[list[float], int]:
    with open_source(source, config) as frames:
        times = [f.time for f in frames]
        return times, frames.packets_skipped


def on_the_grid(times: list[float]) -> bool:
    """Every time is one of the source's frame instants i / FPS, strictly increasing."""
    return all(abs(t * FPS - round(t * FPS)) < 1e-3 for t in times) and times == sorted(set(times))


# --- corrupt packets are skipped -----------------------------------------------------------------


@pytest.mark.parametrize("container_format, options", [("mp4", None), ("mp4", FRAGMENTED_MP4_OPTIONS),
                                                       ("mpegts", None)], ids=["mp4", "fragmented-mp4", "mpegts"])
def test_ten_kb_of_zeros_costs_a_frame_or_two_not_the_stream(container_format, options):
    data = encode(container_format, container_options=options)
    times, skipped = decode_all(zeroed(data))
    assert N - 2 <= len(times) < N, len(times)
    assert on_the_grid(times) and times[-1] == pytest.approx((N - 1) / FPS, abs=1e-3)
    if container_format == "mp4":  # MPEG-TS: FFmpeg's demuxer drops the broken packets itself
        assert skipped >= 1


def test_a_pushed_fragmented_mp4_with_zeros_goes_on_after_them():
    data = zeroed(encode("mp4", container_options=FRAGMENTED_MP4_OPTIONS))
    buf = PushBuffer(max_buffered_bytes=64 * 1024)
    feeder = push_all(buf, data)
    times, skipped = decode_all(buf)
    feeder.join()
    assert N - 2 <= len(times) < N and skipped >= 1 and on_the_grid(times)


def test_a_pushed_fragmented_mp4_whose_fragment_header_is_damaged_fails_with_the_reason():
    # zeros over the second fragment's `moof` header: FFmpeg's MP4 demuxer cannot find the next
    # fragment and stops as if the file ended; the decoder sees bytes left and says so
    data = encode("mp4", container_options=FRAGMENTED_MP4_OPTIONS)
    moof = data.index(b"moof", data.index(b"moof") + 4) - 4
    buf = PushBuffer(max_buffered_bytes=64 * 1024)
    feeder = push_all(buf, data[:moof] + bytes(64) + data[moof + 64:])
    got = []
    with pytest.raises(VideoDecodeError, match="before the end of the upload"):
        with open_source(buf) as frames:
            got.extend(f.time for f in frames)
    feeder.join(5)
    assert got == pytest.approx([i / FPS for i in range(len(got))], abs=1e-6) and 0 < len(got) < N


def test_nothing_decodable_in_a_row_fails_with_the_reason():
    data = encode("mp4")
    # keep the header (ftyp + mdat box header) and zero the media data: every packet is undecodable
    start = data.index(b"mdat") + 4
    end = data.index(b"moov") - 4
    broken = data[:start] + bytes(end - start) + data[end:]
    with pytest.raises(VideoDecodeError, match="in a row could not be decoded"):
        decode_all(broken, DecodeConfig(max_bad_packets=5))


# --- a whole non-fragmented MP4 pushed as one upload ----------------------------------------------


def test_index_layout_is_told_from_the_first_bytes(tmp_path):
    write_video(tmp_path / "faststart.mp4", textured(10), FPS)  # a path: moov moved to the front
    layouts = {
        "default": encode("mp4", 10),  # file object: moov at the end
        "faststart": (tmp_path / "faststart.mp4").read_bytes(),
        "fragmented": encode("mp4", 10, container_options=FRAGMENTED_MP4_OPTIONS),
        "mpegts": encode("mpegts", 10),
        "matroska": encode("matroska", 10),
    }
    answers = {}
    for name, data in layouts.items():
        stream = io.BytesIO(data)
        whole, head = index_follows_media(stream.read)
        assert data.startswith(head)
        answers[name] = whole
    assert answers == {"default": True, "faststart": False, "fragmented": False, "mpegts": False, "matroska": False}


def test_a_pushed_mp4_with_its_index_at_the_end_is_decoded_once_closed():
    data = encode("mp4")
    assert len(data) > 500_000 and data.index(b"mdat") < data.index(b"moov")
    buf = PushBuffer(max_buffered_bytes=64 * 1024)
    feeder = push_all(buf, data)
    times, skipped = decode_all(buf)
    feeder.join()
    assert times == pytest.approx([i / FPS for i in range(N)], abs=1e-6) and skipped == 0


def test_a_pushed_mp4_over_the_whole_upload_limit_says_how_to_send_it():
    data = encode("mp4")
    buf = PushBuffer(max_buffered_bytes=64 * 1024)
    feeder = push_all(buf, data)
    with pytest.raises(VideoDecodeError, match="fragmented MP4.*MPEG-TS"):
        decode_all(buf, DecodeConfig(max_whole_upload_bytes=100_000))
    feeder.join(5)  # the decoder gave up: the feeder's next push is refused, it ends


# --- numbered uploads closed with a gap -----------------------------------------------------------


def read_to_the_end(buf: PushBuffer) -> bytes:
    data = b""
    while piece := buf.read(timeout=WAIT_S):
        data += piece
    return data


class _AnySink:
    def ingest(self, stream_id, frames, times, seq=None):
        return None


def test_close_without_a_count_gives_missing_chunks_up_at_once():
    decoder = StreamDecoder("g", None, None, _AnySink(), reorder_wait_s=60)
    for seq, piece in ((0, b"0"), (2, b"2"), (3, b"3")):
        decoder.push(piece, seq=seq)
    assert decoder._push.read() == b"0"  # 2 and 3 wait for 1
    decoder.close()
    assert read_to_the_end(decoder._push) == b"23"  # written, then the end
    assert decoder.status()["chunks_skipped"] == 1


def test_close_with_a_count_waits_reorder_wait_s_for_missing_chunks_then_gives_them_up():
    decoder = StreamDecoder("g", None, None, _AnySink(), reorder_wait_s=0.2)
    decoder.push(b"0", seq=0)
    decoder.push(b"2", seq=2)
    assert decoder._push.read() == b"0"
    decoder.close(chunks=5)  # 1, 3 and 4 are still missing
    assert read_to_the_end(decoder._push) == b"2"  # after reorder_wait_s: 1 given up, then 3 and 4
    assert decoder.status()["chunks_skipped"] == 3


# --- the same through the decoder actor, as the coordinator runs it -------------------------------


@pytest.fixture(scope="module")
def actor_runs(ray_runtime, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("damage")
    corrupt = tmp / "corrupt.mp4"
    corrupt.write_bytes(zeroed(encode("mp4")))
    ts = encode("mpegts")
    quarter = len(ts) // 4
    pieces = [ts[i * quarter:(i + 1) * quarter] if i < 3 else ts[3 * quarter:] for i in range(4)]
    sink = ray.remote(num_cpus=0.05, max_concurrency=8)(_recorder_class()).remote()
    actors = {
        "corrupt": DecoderActor.remote("corrupt", str(corrupt), None, sink, chunk_frames=8),
        "gap": DecoderActor.remote("gap", None, None, sink, chunk_frames=8, reorder_wait_s=60),
        "whole-mp4": DecoderActor.remote("whole-mp4", None, None, sink, chunk_frames=8),
    }
    ray.get([a.start.remote() for a in actors.values()])
    ray.get([actors["gap"].push.remote(pieces[seq], seq=seq) for seq in (0, 2, 3)])  # 1 never comes
    ray.get(actors["gap"].close.remote())
    mp4 = encode("mp4")
    ray.get([actors["whole-mp4"].push.remote(mp4[i:i + 50_000], seq=n) for n, i in enumerate(range(0, len(mp4), 50_000))])
    ray.get(actors["whole-mp4"].close.remote())
    status = {name: ray.get(a.wait.remote(timeout_s=WAIT_S)) for name, a in actors.items()}
    received = {name: ray.get(sink.received.remote(name)) for name in actors}
    yield {"status": status, "received": received, "ts_pieces": pieces}
    for actor in [*actors.values(), sink]:
        ray.kill(actor)


def test_actor_skips_corrupt_packets_counts_them_and_warns(actor_runs):
    status, got = actor_runs["status"]["corrupt"], actor_runs["received"]["corrupt"]
    assert status["state"] == "finished" and status["last_error"] is None
    assert status["packets_skipped"] >= 1 and "corrupt packet" in status["warning"]
    times = frames_of(got)[0]
    assert N - 2 <= len(times) < N and on_the_grid(times)


def test_actor_closed_with_a_gap_decodes_the_chunks_after_it(actor_runs):
    status, got = actor_runs["status"]["gap"], actor_runs["received"]["gap"]
    assert status["state"] == "finished" and status["chunks_skipped"] == 1
    assert "never arrived" in status["warning"]
    times = frames_of(got)[0]
    first_piece_only, _ = decode_all(actor_runs["ts_pieces"][0])
    # frames from chunks 2-3 arrived: beyond what chunk 0 holds, up to the last frame
    assert len(times) > len(first_piece_only) + N // 4 and times[-1] == pytest.approx((N - 1) / FPS, abs=1e-3)
    assert on_the_grid(times) and len(times) < N  # chunk 1's frames are missing


def test_actor_decodes_a_whole_non_fragmented_mp4_upload(actor_runs):
    status, got = actor_runs["status"]["whole-mp4"], actor_runs["received"]["whole-mp4"]
    assert status["state"] == "finished" and status["warning"] is None
    assert frames_of(got)[0] == pytest.approx([i / FPS for i in range(N)], abs=1e-6)
