"""Prometheus metrics of the inference service, one registry per server so tests can run several."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

# 1 ms .. 60 s: a cached prefix on a GPU up to a long CPU prefill.
TTFT_BUCKETS = (1e-3, 2.5e-3, 5e-3, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
# 0.5 ms .. 2 s per token.
TPOT_BUCKETS = (5e-4, 1e-3, 2.5e-3, 5e-3, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2)
STORE_BUCKETS = (1e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5)


class InferenceMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.ttft_seconds = Histogram(
            "kvpack_ttft_seconds",
            "Time from request arrival to its first token",
            ["method"],
            buckets=TTFT_BUCKETS,
            registry=r,
        )
        self.time_per_output_token_seconds = Histogram(
            "kvpack_time_per_output_token_seconds",
            "Time between consecutive output tokens",
            ["method"],
            buckets=TPOT_BUCKETS,
            registry=r,
        )
        self.prompt_tokens = Counter("kvpack_prompt_tokens", "Prompt tokens received", registry=r)
        self.generated_tokens = Counter(
            "kvpack_generated_tokens",
            "Tokens generated (rate() gives tokens per second)",
            ["method"],
            registry=r,
        )
        self.requests = Counter(
            "kvpack_requests", "Finished Generate calls by outcome", ["outcome"], registry=r
        )
        self.active_requests = Gauge(
            "kvpack_active_requests", "Sequences being prefilled or decoded", registry=r
        )
        self.queued_requests = Gauge(
            "kvpack_queued_requests", "Requests waiting for a batch slot", registry=r
        )
        self.compression_ratio = Gauge(
            "kvpack_kv_compression_ratio",
            "fp16 bytes / stored bytes of the KV cache of the last finished request",
            ["method"],
            registry=r,
        )
        self.kv_cache_bytes = Gauge(
            "kvpack_kv_cache_bytes", "Bytes held by the KV caches of active sequences", registry=r
        )
        self.prefix_query_tokens = Counter(
            "kvpack_prefix_query_tokens", "Prompt tokens looked up in the kvstore", registry=r
        )
        self.prefix_hit_tokens = Counter(
            "kvpack_prefix_hit_tokens", "Prompt tokens whose KV came from the kvstore", registry=r
        )
        self.kvstore_request_seconds = Histogram(
            "kvpack_kvstore_request_seconds",
            "kvstore calls made by this server",
            ["op"],
            buckets=STORE_BUCKETS,
            registry=r,
        )
        self.kvstore_errors = Counter(
            "kvpack_kvstore_errors",
            "kvstore failures that fell back to recomputation, by reason",
            ["reason"],
            registry=r,
        )
        self.kvstore_puts_dropped = Counter(
            "kvpack_kvstore_puts_dropped",
            "Blocks not stored because the put queue was full",
            registry=r,
        )
        self.kvstore_put_blocks = Counter(
            "kvpack_kvstore_put_blocks", "Blocks written to the kvstore", registry=r
        )

    def value(self, name: str, **labels: str) -> float:
        return self.registry.get_sample_value(name, labels or None) or 0.0
