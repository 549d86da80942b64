"""KV page format, the envelope stream pieces travel in, and the per-stream segment summary index.

Exports load lazily (PEP 562): the coordinator imports cache_store.envelope without torch, which
cache_store.pages needs.
"""

from importlib import import_module

_LAZY = {
    "EmbeddedIndex": "cache_store.index", "RedisIndex": "cache_store.index", "SegmentIndex": "cache_store.index",
    "SegmentRecord": "cache_store.index", "UnknownSegmentError": "cache_store.index",
    "KINDS": "cache_store.pages", "KVPage": "cache_store.pages", "PageHeader": "cache_store.pages",
    "content_hash": "cache_store.pages",
    "Wire": "cache_store.envelope",
}

__all__ = list(_LAZY)


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'cache_store' has no attribute {name!r}")
