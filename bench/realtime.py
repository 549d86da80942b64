"""Real-time load on a StreamCoordinator from the driver: N streams each pushing a frame every
1/fps seconds through `coordinator.ingest`, questions asked meanwhile through `ask_stream`, and
whether the pipeline kept up. Uses only the coordinator's public methods (create_stream, ingest,
ask_stream, delete_stream), so it measures the pipeline as a client sees it.

A step's verdict ("sustained"): no ingest or question failed, every frame pushed was ingested
within `grace_s` of the window's end, and the lag (push -> ingest returned) neither exceeded
`max_lag_s` at its 95th percentile over the window's second half nor grew across the window
(least-squares slope of lag against push time <= `max_slope`: an overload of f grows the lag by
about f seconds per second, which a short window's p95 alone would not show).
"""

from __future__ import annotations

import heapq
import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field

import numpy as np
import ray

STALL_S = 120.0  # a call that gives nothing for this long fails the phase instead of hanging the run


@dataclass
class Stream:
    """A stream as the driver feeds it: its next chunk number and next frame time."""

    stream_id: str
    seq: int = 0
    frames: int = 0  # pushed so far
    interval: float = 2.0

    def next_push(self, frames: int = 1) -> tuple[int, list[float]]:
        times = [(self.frames + i) * self.interval for i in range(frames)]
        self.seq, self.frames = self.seq + 1, self.frames + frames
        return self.seq - 1, times


class FramePool:
    """Random uint8 frames [k, size, size, 3], put in the object store once per (k, variant): the
    driver pushes references, not pixels (a 7B frame is 384 x 384 x 3)."""

    def __init__(self, size: int, variants: int = 8):
        self.size, self.variants, self.refs = size, variants, {}
        self.rng = np.random.default_rng(0)

    def get(self, frames: int, variant: int = 0):
        key = (frames, variant % self.variants)
        if key not in self.refs:
            self.refs[key] = ray.put(self.rng.integers(0, 256, (frames, self.size, self.size, 3), dtype=np.uint8))
        return self.refs[key]


@dataclass
class Question:
    stream_id: str
    sent: float  # perf_counter
    first_text_s: float | None = None  # time to the first text item (TTFT)
    total_s: float | None = None
    tokens: int = 0
    error: str | None = None

    @property
    def decode_tokens_per_s(self) -> float | None:
        if self.first_text_s is None or self.total_s is None or self.tokens < 2 or self.total_s <= self.first_text_s:
            return None
        return (self.tokens - 1) / (self.total_s - self.first_text_s)


@dataclass
class StepResult:
    streams: int
    window_s: float
    offered_fps: float
    frames_pushed: int = 0
    frames_ingested: int = 0  # within the window + grace
    ingested_fps: float = 0.0  # frames ingested per second of window
    lag_p50_s: float | None = None
    lag_p95_s: float | None = None  # over the window's second half
    lag_max_s: float | None = None
    lag_slope: float | None = None  # seconds of lag per second of window
    max_backlog_frames: int = 0  # the most frames one stream had pushed but not ingested
    drain_s: float | None = None  # from the window's end until the last frame was ingested
    errors: list[str] = field(default_factory=list)
    questions: int = 0
    ttft_p50_s: float | None = None
    ttft_p99_s: float | None = None
    decode_tokens_per_s_p50: float | None = None
    answer_tokens_p50: float | None = None  # tokens per answer (a random model may stop early)
    sustained: bool = False
    reason: str = ""
    aborted: bool = False  # pushing stopped early: a stream fell too far behind

    def to_dict(self) -> dict:
        return asdict(self)


def percentile(values: list[float], q: float) -> float | None:
    return float(np.percentile(values, q)) if values else None


def ask(coordinator, question: Question, text: str, max_new_tokens: int) -> Question:
    """One question through ask_stream: the first item is the evidence, then text pieces, last
    the token ids."""
    try:
        items = coordinator.ask_stream.options(num_returns="streaming").remote(question.stream_id, text, max_new_tokens)
        for ref in items:
            item = ray.get(ref, timeout=STALL_S)
            if isinstance(item, str) and question.first_text_s is None:
                question.first_text_s = time.perf_counter() - question.sent
            elif isinstance(item, dict) and "token_ids" in item:
                question.tokens = len(item["token_ids"])
        question.total_s = time.perf_counter() - question.sent
    except Exception as error:  # noqa: BLE001 - recorded, counted as a failure of the step
        question.error = f"{type(error).__name__}: {error}"[:300]
    return question


def feed(coordinator, streams: list[Stream], pool: FramePool, chunk_frames: int, seconds: float | None = None,
         per_stream: int | None = None, in_flight: int = 4) -> dict:
    """As fast as the pipeline takes them (not real time): chunks of `chunk_frames` frames,
    `in_flight` unfinished per stream, for `seconds` or until every stream got `per_stream`
    frames. Frames ingested per second of it are the pipeline's aggregate encode rate."""
    pending: dict = {}  # ref -> stream
    sent = {s.stream_id: 0 for s in streams}

    def submit(stream: Stream) -> None:
        if per_stream is not None and sent[stream.stream_id] >= per_stream:
            return
        seq, times = stream.next_push(chunk_frames)
        pending[coordinator.ingest.remote(stream.stream_id, pool.get(chunk_frames, seq), times, seq)] = stream
        sent[stream.stream_id] += chunk_frames

    start, done = time.perf_counter(), 0
    for stream in streams:
        for _ in range(in_flight):
            submit(stream)
    while pending:
        ready, _ = ray.wait(list(pending), num_returns=1, timeout=STALL_S)
        if not ready:
            raise TimeoutError(f"no chunk was ingested in {STALL_S:g} s")
        stream = pending.pop(ready[0])
        ray.get(ready[0])
        done += chunk_frames
        if seconds is not None and time.perf_counter() - start >= seconds:
            break
        submit(stream)
    elapsed = time.perf_counter() - start
    ray.get(list(pending), timeout=STALL_S)  # the rest is drained, not counted: the next phase starts clean
    return {"streams": len(streams), "frames": done, "seconds": elapsed, "fps": done / elapsed if elapsed else 0.0,
            "chunk_frames": chunk_frames, "in_flight": in_flight}


def stagger(coordinator, streams: list[Stream], pool: FramePool, segment_frames: int) -> float:
    """Give stream i of N (i * segment_frames) // N frames at once, so that during the window the
    streams close their segments (one per segment_frames frames: the language model's prefill)
    at evenly spread times, as streams that started at random times would; fresh streams all
    in phase would close none for the first segment_frames - 1 frames and then all at once.
    Returns the seconds it took."""
    began, refs = time.perf_counter(), []
    for i, stream in enumerate(streams):
        if count := (i * segment_frames) // len(streams):
            seq, times = stream.next_push(count)
            refs.append(coordinator.ingest.remote(stream.stream_id, pool.get(count, i), times, seq))
    ray.get(refs, timeout=STALL_S)
    return time.perf_counter() - began


def run_step(coordinator, streams: list[Stream], pool: FramePool, window_s: float, *, fps: float, question_streams: list[Stream],
             question_rate: float, questions: list[str], max_new_tokens: int, grace_s: float, max_lag_s: float,
             max_slope: float, abort_backlog: int, drain_timeout_s: float, log=print) -> StepResult:
    """Push one frame per stream every 1/fps s for `window_s` (stream i offset by i/N of an
    interval), ask at `question_rate` per second round-robin over `question_streams`."""
    n, interval = len(streams), 1.0 / fps
    result = StepResult(streams=n, window_s=window_s, offered_fps=n * fps)
    pending: dict = {}  # ref -> (stream index, push time)
    backlog = [0] * n
    lags: list[tuple[float, float]] = []  # (push time since start, lag)
    asked: list = []
    executor = ThreadPoolExecutor(max_workers=8, thread_name_prefix="ask")
    start = time.perf_counter()
    schedule = [(i * interval / n, i) for i in range(n)]  # (due, stream index), kept sorted by due
    next_question, q_index = (interval / 2 if question_rate > 0 else float("inf")), 0

    def collect(timeout: float) -> None:
        """Take the ingests that finish within `timeout` s, each as soon as it finishes."""
        deadline = time.perf_counter() + max(0.0, timeout)
        while True:
            remaining = deadline - time.perf_counter()
            if not pending:
                time.sleep(max(0.0, remaining))
                return
            first, _ = ray.wait(list(pending), num_returns=1, timeout=max(0.0, remaining))
            if not first:
                return
            ready, _ = ray.wait(list(pending), num_returns=len(pending), timeout=0)
            now = time.perf_counter()
            for ref in set(first) | set(ready):
                i, pushed = pending.pop(ref)
                backlog[i] -= 1
                try:
                    ray.get(ref)
                    lags.append((pushed - start, now - pushed))
                except Exception as error:  # noqa: BLE001 - counted as a failure of the step
                    result.errors.append(f"ingest {streams[i].stream_id}: {type(error).__name__}: {error}"[:300])
            if remaining <= 0:
                return

    while True:
        now = time.perf_counter() - start
        due, i = schedule[0]
        if due >= window_s:
            break
        if max(backlog) > abort_backlog:
            result.aborted = True
            break
        if next_question <= due and next_question <= window_s:
            collect(next_question - now)
            if time.perf_counter() - start >= next_question:
                stream = question_streams[q_index % len(question_streams)]
                question = Question(stream.stream_id, time.perf_counter())
                asked.append(executor.submit(ask, coordinator, question, questions[q_index % len(questions)], max_new_tokens))
                q_index += 1
                next_question += 1.0 / question_rate
            continue
        collect(due - now)
        if time.perf_counter() - start < due:
            continue
        stream = streams[i]
        seq, times = stream.next_push(1)
        ref = coordinator.ingest.remote(stream.stream_id, pool.get(1, stream.seq + i), times, seq)
        pending[ref] = (i, time.perf_counter())
        backlog[i] += 1
        result.max_backlog_frames = max(result.max_backlog_frames, backlog[i])
        result.frames_pushed += 1
        heapq.heapreplace(schedule, (due + interval, i))
    end = time.perf_counter()
    pushed_window = end - start
    while pending and time.perf_counter() - end < grace_s:
        collect(min(0.05, grace_s - (time.perf_counter() - end)))
    result.frames_ingested = len(lags)
    in_grace = not pending
    while pending and time.perf_counter() - end < drain_timeout_s:  # the next step starts clean
        collect(0.1)
    result.drain_s = time.perf_counter() - end if not pending else None
    for ref in list(pending):  # not drained in time: cancel what has not started
        ray.cancel(ref)
    executor.shutdown(wait=True)
    answered = [future.result() for future in asked]
    result.questions = len(answered)
    result.errors += [f"ask {q.stream_id}: {q.error}" for q in answered if q.error]
    ttfts = [q.first_text_s for q in answered if q.first_text_s is not None]
    rates = [r for q in answered if (r := q.decode_tokens_per_s) is not None]
    result.ttft_p50_s, result.ttft_p99_s = percentile(ttfts, 50), percentile(ttfts, 99)
    result.decode_tokens_per_s_p50 = statistics.median(rates) if rates else None
    result.answer_tokens_p50 = statistics.median([q.tokens for q in answered]) if answered else None
    result.ingested_fps = result.frames_ingested / pushed_window if pushed_window > 0 else 0.0
    if lags:
        times, values = np.array([t for t, _ in lags]), np.array([v for _, v in lags])
        second_half = values[times >= pushed_window / 2]
        result.lag_p50_s = float(np.median(values))
        result.lag_p95_s = float(np.percentile(second_half if len(second_half) else values, 95))
        result.lag_max_s = float(values.max())
        result.lag_slope = float(np.polyfit(times, values, 1)[0]) if len(lags) >= 3 and np.ptp(times) > 0 else 0.0
    result.sustained, result.reason = verdict(result, in_grace, max_lag_s, max_slope)
    log(f"  {n} streams: {'sustained' if result.sustained else 'NOT sustained'} ({result.reason}); "
        f"pushed {result.frames_pushed} ingested {result.frames_ingested}, lag p95 {_s(result.lag_p95_s)} "
        f"slope {result.lag_slope if result.lag_slope is not None else float('nan'):.3f}, "
        f"TTFT p50 {_s(result.ttft_p50_s)} ({result.questions} q), drain {_s(result.drain_s)}")
    return result


def verdict(result: StepResult, in_grace: bool, max_lag_s: float, max_slope: float) -> tuple[bool, str]:
    if result.errors:
        return False, f"{len(result.errors)} errors, first: {result.errors[0][:120]}"
    if result.aborted:
        return False, f"a stream fell more than {result.max_backlog_frames - 1} frames behind"
    if not in_grace or result.frames_ingested < result.frames_pushed:
        return False, f"{result.frames_pushed - result.frames_ingested} frames not ingested within the grace period"
    if result.lag_p95_s is not None and result.lag_p95_s > max_lag_s:
        return False, f"lag p95 {result.lag_p95_s:.2f} s > {max_lag_s:g} s"
    if result.lag_slope is not None and result.lag_slope > max_slope:
        return False, f"lag grew {result.lag_slope:.3f} s/s > {max_slope:g}"
    return True, "kept up"


def _s(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f} s"
