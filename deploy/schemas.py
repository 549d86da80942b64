"""Request and response models of the HTTP API (deploy/app.py). They are the OpenAPI document.

Request models are strict: a JSON value of the wrong type is a 422 (no "1" or true for a
number, no 1 for a boolean), as the document says.

Stream ids are what clients see; the coordinator holds each stream under an owner-scoped id
(deploy/auth.py), so two tokens may use the same name without meeting.
"""


from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

STREAM_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"
MAX_QUESTION_CHARS = 8000  # the tokenizer's limit (config.max_question_tokens) is checked as well
MAX_MESSAGES = 64


class ErrorBody(BaseModel):
    type: str = Field(description="error class, e.g. UnknownStreamError, invalid_request, unauthorized")
    message: str


class ErrorResponse(BaseModel):
    error: ErrorBody


# ---- streams -----------------------------------------------------------------------------------
class SourceSpec(BaseModel):
    """Where a stream's frames come from (at creation, or a new source: POST /v1/streams/{id}/source)."""

    model_config = ConfigDict(extra="forbid", strict=True)

    source: str | None = Field(None, max_length=2048,
                               description="URL to pull (http, https, rtsp; local files only when enabled); "
                                           "left out: push mode (POST /v1/streams/{id}/chunks)")
    fps: float | None = Field(None, gt=0, le=120, description="sampling rate; none keeps every frame")
    policy: Literal["block", "drop"] | None = Field(
        None, description="backpressure: block loses nothing (files, uploads), drop keeps up with live sources; "
                          "default block, drop for rtsp")
    idle_timeout_s: float | None = Field(
        60.0, gt=0, le=86400, description="push and rtsp sources: the source counts as ended after this long without "
                                          "data (from the first chunk on); null: never")


class CreateStream(SourceSpec):
    stream_id: str | None = Field(None, pattern=STREAM_ID_PATTERN, description="generated when left out")
    method: str = Field("rekv", max_length=32, description="full | recent | rekv | streamkv | livevlm")
    options: dict[str, Any] = Field(default_factory=dict, description="engine knobs (pipeline/config.py)")
    system_prompt: str | None = Field("You are a helpful assistant.", max_length=4000)


class IndexStatus(BaseModel):
    """The stream's entry in the segment index (Redis): answers never wait for it."""
    state: Literal["healthy", "degraded", "unknown"] = Field(
        description="degraded: Redis is unreachable and writes are queued; unknown: the compressor did not answer")
    pending_writes: int | None = Field(None, description="the stream's index records waiting to be written")
    last_error: str | None = None
    incomplete: bool | None = Field(None, description="the index may lack records of this stream for good (a "
                                                      "compressor restart, or the write journal's bound)")


class StreamStatus(BaseModel):
    stream_id: str
    method: str
    state: Literal["live", "lost"] = Field(
        "live", description="lost: the stream's memory could not be kept whole (every replica lost at once, or a "
                            "segment that could not be committed); it takes no more frames or questions: delete "
                            "it and create it again")
    mode: Literal["push", "pull"] | None = None
    frames_ingested: int
    frames_decoded: int | None = None
    frames_dropped: int | None = None
    frames_pending: int | None = Field(None, description="decoded, not yet ingested nor dropped (lag in frames)")
    source_state: str | None = None
    segments: int
    last_time: float | None = None
    retained_bytes: int | None = None
    recoveries: int = 0
    batching: dict[str, int] | None = Field(
        None, description="chunks segmented, and the segmenter calls and commits they took: fewer calls than chunks "
                          "means queued-up work went together")
    last_error: str | None = None
    packets_skipped: int | None = Field(None, description="corrupt packets the decoder skipped (it went on after them)")
    warning: str | None = Field(None, description="why the frames are not the whole video (damage, chunks that "
                                                  "never arrived, decoding ended early); None when they are")
    index: IndexStatus | None = None


class StreamList(BaseModel):
    object: Literal["list"] = "list"
    data: list[StreamStatus]


class SegmentList(BaseModel):
    object: Literal["list"] = "list"
    stream_id: str
    data: list[dict[str, Any]]


class Deleted(BaseModel):
    stream_id: str
    deleted: bool = True


class PushResult(BaseModel):
    stream_id: str
    bytes_received: int
    buffered_bytes: int
    source_state: str | None = None


# ---- OpenAI-compatible chat ---------------------------------------------------------------------
class TextPart(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)
    type: Literal["text"]
    text: str = Field(max_length=MAX_QUESTION_CHARS)


MAX_URL_CHARS = 2048  # stream:// and http(s) URLs; data: URLs have the server's max_inline_bytes


class VideoURL(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)
    url: str = Field(description="stream://<stream-id>; an http(s) URL for a one-shot question; or inline, a "
                                 "data:video/<type>;base64,... URL (a video file) or data:video/jpeg;base64,<jpeg>,"
                                 "<jpeg>,... (frames, as vLLM's)")


class VideoPart(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)
    type: Literal["video_url"]
    video_url: VideoURL


class ImagePart(BaseModel):
    """An image, asked about as a one-frame video."""

    model_config = ConfigDict(extra="allow", strict=True)
    type: Literal["image_url"]
    image_url: VideoURL


ContentPart = TextPart | VideoPart | ImagePart


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)
    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str | list[ContentPart] | None = Field(None)


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)
    include_usage: bool = Field(False, description="a last chunk with empty choices and the usage, as OpenAI's")


class ChatCompletionRequest(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)  # other OpenAI fields (penalties, user, ...) are ignored

    model: str = Field(max_length=256)
    messages: list[ChatMessage] = Field(min_length=1, max_length=MAX_MESSAGES)
    max_tokens: int | None = Field(None, ge=1, le=4096)
    max_completion_tokens: int | None = Field(None, ge=1, le=4096, description="wins over max_tokens")
    stream: bool = False
    stream_options: StreamOptions | None = None
    temperature: float | None = Field(None, ge=0, le=2, description="0 or left out: greedy (exact)")
    top_p: float | None = Field(None, gt=0, le=1)
    seed: int | None = Field(None, ge=0, le=2**63 - 1, description="sampled answers with one seed are the same; "
                                                                   "left out: a random one")
    stop: str | list[str] | None = Field(None, description="up to 4 strings that end the answer (left out of it)")
    n: int | None = Field(None, ge=1, le=1, description="one choice per request (n > 1: 422)")
    logprobs: bool | None = Field(None, description="not supported: true is a 422")
    top_logprobs: int | None = Field(None, ge=0, le=0, description="not supported")


class Evidence(BaseModel):
    frames: list[int]
    times: list[float]
    score: float | None = None
    layers: Any = None


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class Choice(BaseModel):
    index: int = 0
    message: AssistantMessage
    finish_reason: Literal["stop", "length"]


class Usage(BaseModel):
    prompt_tokens: int = 0
    completion_tokens: int
    total_tokens: int


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[Choice]
    usage: Usage
    evidence: list[Evidence] = Field(description="the frame/time ranges the answer attended to")
    stream_id: str | None = None
    warning: str | None = Field(None, description="a one-shot video that was not decoded whole (corrupt packets "
                                                  "skipped, or cut short): the answer is over the frames read")


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "streamkv"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class Health(BaseModel):
    status: Literal["ok"] = "ok"
    model: str
