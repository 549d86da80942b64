"""Prometheus metrics of the API: per-stream figures read from the coordinator at scrape time,
answer latency and outcomes, bytes received."""


LABELS = ["owner", "stream"]  # a keyed label of the owner (deploy.auth.owner_label), the client's name


class _StreamMetrics:
    """Per-stream figures read from the coordinator at scrape time: rows of ((owner, stream), status)."""

    def __init__(self):
        self.rows: list[tuple[tuple[str, str], dict]] = []

    def collect(self):
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        ingested = CounterMetricFamily("streamkv_frames_ingested", "Frames ingested into the stream's memory",
                                       labels=LABELS)
        dropped = CounterMetricFamily("streamkv_frames_dropped", "Decoded frames dropped by backpressure",
                                      labels=LABELS)
        decoded = CounterMetricFamily("streamkv_frames_decoded", "Frames decoded from the source", labels=LABELS)
        retained = GaugeMetricFamily("streamkv_retained_kv_bytes", "Bytes of KV retained by the stream",
                                     labels=LABELS)
        segments = GaugeMetricFamily("streamkv_segments", "Segments committed", labels=LABELS)
        lost = GaugeMetricFamily("streamkv_stream_lost", "1 if the stream's memory is lost (delete it and create it "
                                 "again)", labels=LABELS)
        for labels, row in self.rows:
            ingested.add_metric(list(labels), row.get("frames_ingested") or 0)
            dropped.add_metric(list(labels), row.get("frames_dropped") or 0)
            decoded.add_metric(list(labels), row.get("frames_decoded") or 0)
            segments.add_metric(list(labels), row.get("segments") or 0)
            lost.add_metric(list(labels), int(row.get("state") == "lost"))
            if row.get("retained_bytes") is not None:
                retained.add_metric(list(labels), row["retained_bytes"])
        yield from (ingested, dropped, decoded, retained, segments, lost)


# The segment index's health (coordinator.index_health, cache_store/index_writer.py): not per stream.
INDEX_GAUGES = {"pending_writes": "Index records waiting to be written (Redis unreachable)",
                "pending_deletes": "Stream deletions waiting for Redis", "journal_bytes": "Bytes of index records journaled",
                "last_catch_up_s": "Seconds the last catch-up after an outage took"}
INDEX_COUNTERS = {"outages": "Index outages seen", "resets": "Times Redis came back empty",
                  "records_rewritten": "Index records written again after an outage or reset",
                  "records_dropped": "Index records dropped past the journal's bound (never written)",
                  "records_unrecoverable": "Index records Redis lost after the journal had let them go"}


class _IndexMetrics:
    def __init__(self):
        self.health: dict = {}

    def collect(self):
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        if not self.health:
            return
        yield GaugeMetricFamily("streamkv_index_healthy", "1 if every index write has gone through",
                                value=int(self.health.get("state") == "healthy"))
        for key, text in INDEX_GAUGES.items():
            if self.health.get(key) is not None:
                yield GaugeMetricFamily(f"streamkv_index_{key.removesuffix('_s')}" + ("_seconds" if key.endswith("_s") else ""),
                                        text, value=self.health[key])
        for key, text in INDEX_COUNTERS.items():
            if self.health.get(key) is not None:
                yield CounterMetricFamily(f"streamkv_index_{key}", text, value=self.health[key])


class Metrics:
    def __init__(self):
        from prometheus_client import CollectorRegistry, Counter, Histogram

        self.registry = CollectorRegistry()
        self.streams = _StreamMetrics()
        self.registry.register(self.streams)
        self.index = _IndexMetrics()
        self.registry.register(self.index)
        self.answer_latency = Histogram(
            "streamkv_answer_latency_seconds", "Time to answer a question (coordinator ask)",
            buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120), registry=self.registry)
        self.answers = Counter("streamkv_answers", "Questions answered", ["outcome"], registry=self.registry)
        self.chunks = Counter("streamkv_chunk_bytes", "Encoded video bytes received", registry=self.registry)

    def scrape(self, rows: list[tuple[tuple[str, str], dict]], index: dict | None = None) -> bytes:
        from prometheus_client import generate_latest

        self.streams.rows, self.index.health = rows, index or {}
        return generate_latest(self.registry)
