"""KV page format and the per-stream segment summary index."""

from cache_store.index import (
    EmbeddedIndex,
    RedisIndex,
    SegmentIndex,
    SegmentRecord,
    UnknownSegmentError,
)
from cache_store.pages import KINDS, KVPage, PageHeader, content_hash

__all__ = [
    "KINDS", "KVPage", "PageHeader", "content_hash",
    "SegmentIndex", "SegmentRecord", "EmbeddedIndex", "RedisIndex", "UnknownSegmentError",
]
