"""The API replica's side of the StreamCoordinator actor: calls that wait out a restart of its
process (`over_restarts`, the one retry helper), statuses as the API shows them, questions (plain
and streamed), sources checked before they are attached, and one-shot streams."""

import asyncio
import contextlib
import json
import time
import uuid
from pathlib import Path
from typing import Any

from actors.calls import until_alive
from actors.messages import SourceState, is_terminal
from deploy import auth
from deploy.errors import APIError
from deploy.inline import InlineMedia, decode_images
from deploy.metrics import Metrics
from deploy.schemas import SourceSpec, StreamStatus
from deploy.settings import Settings
from pipeline.decode import DecodeConfig
from pipeline.conversation import Conversation
from pipeline.errors import CapacityError, StreamKVError
from pipeline.sampling import GREEDY, SamplingParams
from pipeline.source_policy import CheckedURL, check_source

# How long a request that is safe to repeat waits for the coordinator's process to come back
# (Ray refuses calls while it restarts: ~1-2 s, takeover included) before it gets its 503.
RESTART_WAIT_S = 15.0
DEFAULT_SYSTEM_PROMPT = "You are a helpful assistant."


async def over_restarts(call):
    """`call()`, made again while the coordinator's process restarts, for up to RESTART_WAIT_S
    (actors/calls.py until_alive). Only for calls that may run twice: one in flight when the
    process died may have run."""
    return await until_alive(call, RESTART_WAIT_S, max_delay_s=1.0)


def get_or_create_coordinator(s: Settings):
    from deploy.ingest import CLUSTER_PLACEMENT, named_coordinator

    return named_coordinator(
        s.coordinator_name, s.model_dir, s.device, s.answerers, s.index_url, s.actor_cpus,
        max_answerers=s.max_answerers, answer_target_ongoing=s.answer_target_ongoing, answer_idle_s=s.answer_idle_s,
        answer_start_timeout_s=s.answer_start_timeout_s, restore_timeout_s=s.restore_timeout_s,
        decoder_capacity=s.decoder_capacity, placement=CLUSTER_PLACEMENT if s.placement == "cluster" else None, num_cpus=s.coordinator_cpus)


def stream_status(stream_id: str, status: dict, retained_bytes: int | None) -> dict:
    """The coordinator's status of a stream as the API's StreamStatus (stream_id: the client's)."""
    last_error = status.get("last_error")
    if isinstance(last_error, dict):  # the decoder's {type, message, where}
        last_error = f"{last_error.get('type')}: {last_error.get('message')} (in {last_error.get('where')})"
    last_error = auth.scrub(last_error) if last_error else last_error
    return StreamStatus(
        stream_id=stream_id, method=status["method"], state=status["state"], mode=status.get("mode"),
        frames_ingested=status["frames_ingested"], frames_decoded=status.get("frames_decoded"),
        frames_dropped=status.get("frames_dropped"), frames_pending=status.get("frames_pending"),
        source_state=status.get("source_state"), segments=status["segments"],
        last_time=status.get("last_time"), retained_bytes=retained_bytes, recoveries=status.get("recoveries", 0),
        batching=status.get("batching"), last_error=last_error,
        packets_skipped=status.get("packets_skipped"), warning=status.get("warning"),
        index=status.get("index") and {**status["index"], "last_error": status["index"].get("last_error") and
                                       auth.scrub(status["index"]["last_error"])},
    ).model_dump()


def plain(value: Any):
    """JSON for numpy scalars/arrays and tuples in coordinator results."""
    if hasattr(value, "tolist"):
        return value.tolist()
    if hasattr(value, "item"):
        return value.item()
    return str(value)


def evidence(items: list[dict]) -> list[dict]:
    return [{"frames": list(e["frames"]), "times": [float(t) for t in e["times"]],
             "score": None if e.get("score") is None else float(e["score"]),
             "layers": json.loads(json.dumps(e.get("layers"), default=plain))} for e in items]


class CoordinatorClient:
    def __init__(self, settings: Settings, metrics: Metrics):
        self.s, self.metrics = settings, metrics
        self.coord = get_or_create_coordinator(settings)
        self._creating = 0  # creations this replica waits on (creating())

    # ---- streams ----
    async def status(self, owner: str, stream_id: str) -> dict:
        return stream_status(stream_id, *await self.coordinator_status(auth.internal_id(owner, stream_id)))

    async def coordinator_status(self, internal: str) -> tuple[dict, int | None]:
        """The coordinator's status of a stream, and the bytes of KV it retains (None when its
        memory cannot be read: a lost stream). The memory first: reading it may find the stream lost."""
        try:
            retained = int((await over_restarts(lambda: self.coord.memory.remote(internal))).get("total", 0))
        except StreamKVError:
            retained = None
        return await over_restarts(lambda: self.coord.status.remote(internal)), retained

    async def internals(self) -> list[str]:
        return await over_restarts(self.coord.list_streams.remote)

    def source(self, source: str) -> str:
        """The source as the decoder gets it, checked against the server's source policy
        (SourceRefusedError: a 400); a local path must name a file."""
        checked = check_source(source, self.s.source_policy())
        if isinstance(checked, CheckedURL):
            return checked.url
        if not Path(checked).is_file():
            raise APIError(422, "invalid_source", "no such file")
        return checked

    def creating(self) -> contextlib.AbstractContextManager:
        """A slot among the creations this replica waits on (Settings.max_creating); none free:
        CapacityError (503) at once."""
        if self._creating >= self.s.max_creating:
            raise CapacityError(f"{self._creating} stream creations are waiting for room; retry later")

        @contextlib.contextmanager
        def slot():
            self._creating += 1
            try:
                yield
            finally:
                self._creating -= 1

        return slot()

    async def create(self, internal: str, method: str, options: dict | None, system_prompt: str | None) -> dict:
        """Create the stream, bounded (CapacityError: no room, or max_streams reached). A caller
        cancelled meanwhile leaves nothing: the call may still run to the end, and what it made is
        deleted then."""
        ref = self.coord.create_stream.remote(internal, method, options, system_prompt,
                                              max_streams=self.s.max_streams, start_timeout_s=self.s.start_timeout_s)
        try:
            return await ref
        except asyncio.CancelledError:
            async def undo():
                with contextlib.suppress(Exception):
                    await ref
                await self.delete_quietly(internal)

            asyncio.ensure_future(undo())
            raise

    async def delete_after_failure(self, internal: str) -> None:
        """delete_quietly, run to the end even if the caller is cancelled meanwhile."""
        await asyncio.shield(asyncio.ensure_future(self.delete_quietly(internal)))

    def attach(self, internal: str, spec: SourceSpec):
        """Check the source now; returns the call that attaches it to the stream."""
        source = self.source(spec.source) if spec.source is not None else None
        live = source is None or source.lower().startswith("rtsp")
        decode = DecodeConfig(fps=spec.fps, read_timeout_s=spec.idle_timeout_s if live else DecodeConfig.read_timeout_s,
                              source_policy=self.s.source_policy())
        policy = spec.policy or ("drop" if live and source else "block")
        return lambda: self.coord.attach_source.remote(internal, source, decode, policy,
                                                       start_timeout_s=self.s.start_timeout_s)

    async def delete_quietly(self, internal: str) -> None:
        try:
            await self.coord.delete_stream.remote(internal)
        except Exception:  # noqa: BLE001 - best effort clean-up
            pass

    async def oneshot(self, owner: str, source: str | InlineMedia,
                      system_prompt: str | None = None) -> tuple[str, str | None]:
        """A temporary stream holding a whole video: a file / URL, or inline media (the caller
        deletes it); the client's system message, if any, is its system prompt. Also the decoder's
        warning when its frames are not the whole video (damaged or cut short)."""
        checked = self.source(source) if isinstance(source, str) else None
        internal = auth.internal_id(owner, f"oneshot-{uuid.uuid4().hex[:12]}")
        await self.create(internal, "rekv", {}, system_prompt or DEFAULT_SYSTEM_PROMPT)
        try:
            if isinstance(source, InlineMedia) and source.images:
                frames = await asyncio.to_thread(decode_images, source.images)  # [T, H, W, 3]
                await self.coord.ingest.remote(internal, frames, [float(t) for t in range(len(frames))])
                return internal, None
            if checked is not None:  # a whole file: no reconnects (an unreachable URL is an error at once)
                await self.coord.attach_source.remote(internal, checked, DecodeConfig(
                    reconnect=False, max_retries=0, source_policy=self.s.source_policy()),
                    start_timeout_s=self.s.start_timeout_s)
            else:  # an inline video file, pushed whole
                await self.coord.attach_source.remote(internal, None, DecodeConfig(read_timeout_s=None), "block",
                                                      start_timeout_s=self.s.start_timeout_s)
                await self.coord.push.remote(internal, source.video, 0)
                await self.coord.close_source.remote(internal, self.s.oneshot_timeout_s)
            warning = await self._decoded(internal)
        except BaseException:
            await self.delete_after_failure(internal)
            raise
        return internal, warning

    async def _decoded(self, internal: str) -> str | None:
        """Wait until a one-shot stream's source has ended; 422 when it gave no frame; the
        decoder's warning when it gave only part of the video."""
        deadline = time.monotonic() + self.s.oneshot_timeout_s
        while True:
            status = await self.coord.status.remote(internal)
            if is_terminal(status["source_state"]):
                break
            if time.monotonic() > deadline:
                raise APIError(504, "timeout", f"the video did not finish decoding in {self.s.oneshot_timeout_s} s")
            await asyncio.sleep(0.2)
        if status["source_state"] == SourceState.FAILED and not status["frames_ingested"]:
            error = status["last_error"] if isinstance(status["last_error"], dict) else {}
            refused = error.get("type") == "SourceRefusedError"  # a redirect, a cap: the request's fault
            raise APIError(400 if refused else 422, error.get("type") or "VideoDecodeError", auth.scrub(
                           f"the video could not be read: {error.get('message') or status['last_error']}"))
        return status.get("warning")

    # ---- questions ----
    async def ask(self, internal: str, question: Conversation, max_tokens: int, sampling: SamplingParams = GREEDY) -> dict:
        start = time.perf_counter()
        try:
            answer = await over_restarts(lambda: self.coord.ask.remote(internal, question, max_tokens, sampling))
        except Exception:
            self.metrics.answers.labels("error").inc()
            raise
        self.metrics.answer_latency.observe(time.perf_counter() - start)
        self.metrics.answers.labels("ok").inc()
        return answer

    async def ask_stream(self, internal: str, question: Conversation, max_tokens: int, sampling: SamplingParams = GREEDY):
        """The answer's items as they are generated: returns (head, rest). The head (evidence,
        prompt size) is awaited here, so a bad question is an error before any event is sent."""
        start = time.perf_counter()

        async def begin():
            items = self.coord.ask_stream.options(num_returns="streaming").remote(
                internal, question, max_tokens, sampling)
            return items, await (await items.__anext__())

        try:
            items, head = await over_restarts(begin)
        except Exception:
            self.metrics.answers.labels("error").inc()
            raise

        async def rest():
            try:
                async for ref in items:
                    yield await ref
            except Exception:
                self.metrics.answers.labels("error").inc()
                raise
            self.metrics.answer_latency.observe(time.perf_counter() - start)
            self.metrics.answers.labels("ok").inc()

        return head, rest()
