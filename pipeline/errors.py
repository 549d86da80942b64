"""Typed errors raised by streamkv. Every user-facing failure is one of these."""


class StreamKVError(Exception):
    """Base class of every error streamkv raises on purpose."""


class ConfigError(StreamKVError, ValueError):
    """An unknown knob, an impossible value, or an inconsistent combination."""


class UnsupportedModelError(StreamKVError, ValueError):
    """The checkpoint is missing or is not an architecture the engine supports."""


class InvalidInputError(StreamKVError, ValueError):
    """Frames or a question of the wrong type, shape, dtype or size."""


class NoFramesError(StreamKVError, RuntimeError):
    """A question was asked before any frame of the stream was ingested."""


class VideoDecodeError(StreamKVError, RuntimeError):
    """A video source is corrupt, truncated, or not a video."""


class SourceUnavailableError(StreamKVError, RuntimeError):
    """A video source could not be opened or reached (after retries, for live sources)."""


class PushBufferTimeout(StreamKVError, TimeoutError):
    """Pushed video bytes waited longer than their timeout for the decoder to make room."""


class UnknownStreamError(StreamKVError, KeyError):
    """A stream id that does not exist (or is not visible to the caller)."""


class StreamLostError(StreamKVError, RuntimeError):
    """A stream's memory has a gap that cannot be repaired (every replica of it was lost at once,
    or a segment could not be committed): it takes no more frames or questions; delete it and
    create it again."""


class AnswerResumeError(StreamKVError, RuntimeError):
    """A streamed answer whose answer actor was lost midway could not resume: the stream took
    updates since the answer began, so a new generation would not continue the same text."""


class PageCorruptError(StreamKVError, ValueError):
    """A stored KV page or index record is malformed or fails its content-hash check."""


class IndexUnavailableError(StreamKVError, RuntimeError):
    """The segment index (Redis) cannot be reached, and what was asked of it is not held in the
    process either (e.g. a stream's segment list after its oldest records left the write journal)."""

class SourceRefusedError(InvalidInputError):
    """A source the server will not fetch: a scheme not allowed, a local file, or a host that
    resolves to a loopback, private, link-local, multicast, reserved or metadata address."""


class CapacityError(StreamKVError, RuntimeError):
    """No room for a new stream: the cluster could not place its actors (or they did not answer)
    within the bound (`at_limit` False: a 503), or the server holds its configured maximum of
    streams (`at_limit` True: a 429). Nothing of the stream is left; retry after `retry_after_s`."""

    def __init__(self, message: str, retry_after_s: float = 5.0, at_limit: bool = False):
        super().__init__(message)
        self.retry_after_s, self.at_limit = retry_after_s, at_limit
