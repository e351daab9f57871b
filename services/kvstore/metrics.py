"""Prometheus metrics of the kvstore, one registry per server so tests can run several."""

from __future__ import annotations

from kvpack.kvstore.backends import Backend, BackendUnavailable
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

OPS = ("match", "put", "get", "get_many", "delete", "stats")
UPLOAD_EVENTS = ("staged", "committed", "refused", "abandoned")

# 100 us .. 10 s: a Match on the memory backend up to a 64 MiB put over a slow link.
LATENCY_BUCKETS = (1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1,
                   2.5, 5, 10)


class KVStoreMetrics:
    def __init__(self, backend: Backend, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.request_seconds = Histogram(
            "kvpack_kvstore_request_seconds", "Time to serve one request", ["op"],
            buckets=LATENCY_BUCKETS, registry=r)
        self.requests = Counter(
            "kvpack_kvstore_requests", "Requests by op and gRPC status code", ["op", "code"],
            registry=r)
        self.hits = Counter("kvpack_kvstore_hits", "Get requests that returned a block", registry=r)
        self.misses = Counter("kvpack_kvstore_misses", "Get requests that found no usable block",
                              registry=r)
        self.match_query_blocks = Counter(
            "kvpack_kvstore_match_query_blocks", "Block hashes asked about by Match", registry=r)
        self.match_hit_blocks = Counter(
            "kvpack_kvstore_match_hit_blocks", "Leading block hashes Match found present",
            registry=r)
        self.corrupt_blocks = Counter(
            "kvpack_kvstore_corrupt_blocks",
            "Stored records that failed verification (checksum, version, namespace) and were "
            "dropped",
            registry=r)
        self.backend_errors = Counter(
            "kvpack_kvstore_backend_errors", "Backend calls that failed (unreachable, timeout)",
            ["op"], registry=r)
        self.put_bytes = Counter("kvpack_kvstore_put_bytes", "Record bytes accepted by Put",
                                 registry=r)
        self.get_bytes = Counter("kvpack_kvstore_get_bytes", "Record bytes returned by Get",
                                 registry=r)
        self.uploads = Counter(
            "kvpack_kvstore_uploads",
            "Ranged Put uploads by event: staged (its first range staged), committed (stored), "
            "refused (failed verification or the store refused the record), abandoned (not "
            "completed in time, or its staged bytes lost)", ["event"], registry=r)
        self.upload_ranges = Counter(
            "kvpack_kvstore_upload_ranges", "Ranges of ranged Puts staged", registry=r)
        self.uploads_open = Gauge(
            "kvpack_kvstore_uploads_open", "Ranged Put uploads staged and not yet ended",
            registry=r)
        self.backend_up = Gauge(
            "kvpack_kvstore_backend_up", "1 when the backend answered its last health check",
            registry=r)
        for op in OPS:  # export zeros from the start, so dashboards and alerts see the series
            self.backend_errors.labels(op)
        for event in UPLOAD_EVENTS:
            self.uploads.labels(event)
        r.register(_UsageCollector(backend))

    def value(self, name: str, **labels: str) -> float:
        return self.registry.get_sample_value(name, labels or None) or 0.0


class _UsageCollector:
    """Blocks, bytes and evictions read from the backend at scrape time (the backend owns them)."""

    def __init__(self, backend: Backend) -> None:
        self._backend = backend

    def describe(self):
        return []

    def collect(self):
        try:
            usage = self._backend.usage()
        except BackendUnavailable:
            return
        yield GaugeMetricFamily("kvpack_kvstore_blocks", "Blocks held", value=usage.blocks)
        yield GaugeMetricFamily(
            "kvpack_kvstore_bytes",
            "Bytes held (memory backend: record bytes; Redis: used_memory)", value=usage.bytes)
        yield GaugeMetricFamily(
            "kvpack_kvstore_capacity_bytes", "Capacity (0 = Redis without maxmemory)",
            value=usage.capacity_bytes)
        yield CounterMetricFamily(
            "kvpack_kvstore_evictions", "Blocks evicted to make room", value=usage.evictions)
