"""Prefix reuse through the kvstore: fetch packed prompt blocks, store new ones in the background.

A block is `block_tokens` prompt tokens; its key is the chained hash of the tokens up to its end
(kvpack.common.hashing), in the namespace model id + codec fingerprint + tenant. Its value is one
record (kvpack.common.record): for every layer, the packed keys then the packed values of that
block, exactly as `codec.block_to_bytes` wrote them, with their sizes in the header.

Reads (`load_prefix`) pipeline the transfer with the load: the blocks come through
`KVStoreClient.iter_many` (several GetMany streams on separate connections, received by gRPC's
core off the GIL, each record verified once by the client) and each block is loaded into the cache
as soon as it and the blocks before it arrived, while later ones are still on the wire. The record
is not copied between its received message and the per-layer key/value bytes the codec takes.

Every store failure (down, slow, a record that fails verification or does not fit this model and
codec) degrades to recomputation: `load_prefix` stops at the first bad block and the caller
computes the rest. Puts run on a background thread behind a bounded queue, so they never delay a
token.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from kvpack.common import record
from kvpack.common.hashing import block_hashes
from kvpack.inference.kv_cache import LayerCache, SequenceCache
from kvpack.inference.metrics import InferenceMetrics
from kvpack.kernels.codec import KVCodec

log = logging.getLogger("kvpack.inference.prefix")
RECORD_KIND = "kvpack.inference.block/1"


@dataclass(frozen=True)
class BlockLayout:
    """What a record must say to be loadable into a cache of this model and codec."""

    model_id: str
    codec_name: str
    codec_fingerprint: str
    dtype: str
    num_layers: int
    num_kv_heads: int
    head_dim: int
    block_tokens: int


_END = object()


def _shares(count: int, parts: int) -> list[int]:
    """Bounds [0, b1, ..., count] of `parts` contiguous near-equal shares of `count` items."""
    parts = max(1, min(parts, count))
    return [count * i // parts for i in range(parts + 1)]


class _LayerLoader:
    """Loads every block it is given into its layers, on a pool thread, in order; stops loading
    (and only drains its queue) at the first block the codec refuses."""

    def __init__(self, pool: ThreadPoolExecutor | None, layers: list[LayerCache], first: int):
        self.layers = layers
        self.first = first  # index of layers[0] in the block's parts
        self.queue: queue.SimpleQueue = queue.SimpleQueue()
        self.error: Exception | None = None
        self.loaded = 0
        self._done = pool.submit(self._run)

    def _run(self) -> None:
        while (parts := self.queue.get()) is not None:
            if self.error is not None:
                continue
            try:
                for layer, (key_bytes, value_bytes) in zip(
                    self.layers, parts[self.first :], strict=False
                ):
                    layer.load_block(key_bytes, value_bytes)
                self.loaded += 1
            except Exception as error:  # noqa: BLE001 - reported by finish()
                self.error = error

    def finish(self) -> int:
        """Wait for the blocks given so far; the number it loaded. A refusal (ValueError,
        RuntimeError) is left in `error`; anything else is raised here."""
        self.queue.put(None)
        self._done.result()
        if self.error is not None and not isinstance(self.error, (ValueError, RuntimeError)):
            raise self.error
        return self.loaded


@dataclass
class LoadStats:
    """What one load_prefix did: blocks and record bytes loaded; seconds from the start until the
    last block was handed over (`fetch_seconds`: the transfer, as far as loading kept up with it),
    spent waiting for blocks to arrive (the transfer not hidden behind loading), loading them into
    the cache (splitting the record, the codec's append, host-to-device copies), and in all (match
    included)."""

    blocks: int = 0
    bytes: int = 0
    fetch_seconds: float = 0.0
    wait_seconds: float = 0.0
    load_seconds: float = 0.0
    total_seconds: float = 0.0
    started: float = field(default=0.0, repr=False, compare=False)  # perf_counter at the start


def namespace_of(model_id: str, codec: KVCodec, tenant: str) -> str:
    return f"{model_id}|{codec.name}:{codec.fingerprint()}|{tenant}"


class PrefixStore:
    """Reads and writes prompt blocks of one model in a kvstore."""

    def __init__(
        self,
        client: Any,
        *,
        block_tokens: int,
        metrics: InferenceMetrics,
        max_pending_puts: int = 256,
        load_threads: int = 1,
    ) -> None:
        """`load_threads`: threads that load a fetched block into the cache, each for its share
        of the layers (more than one lets one thread's host-to-device copies, which release the
        GIL, overlap another's Python work)."""
        if block_tokens <= 0:
            raise ValueError(f"block_tokens must be positive, got {block_tokens}")
        if load_threads < 1:
            raise ValueError(f"load_threads must be at least 1, got {load_threads}")
        self.client = client
        self.load_threads = load_threads  # may be changed later; the pool follows
        self._load_pool: ThreadPoolExecutor | None = None
        self._load_pool_lock = threading.Lock()
        self.block_tokens = block_tokens
        self.metrics = metrics
        self.last_load = LoadStats()
        self._puts: queue.Queue = queue.Queue(maxsize=max_pending_puts)
        self._writer = threading.Thread(target=self._write_loop, name="kvstore-put", daemon=True)
        self._writer.start()

    def hashes(self, token_ids: list[int]) -> list[bytes]:
        return block_hashes(token_ids, self.block_tokens)

    def _timed(self, op: str, call: Callable[[], Any]) -> Any:
        start = time.perf_counter()
        try:
            return call()
        finally:
            self.metrics.kvstore_request_seconds.labels(op=op).observe(time.perf_counter() - start)

    # -- read path ---------------------------------------------------------------------------
    def load_prefix(
        self,
        token_ids: list[int],
        namespace: str,
        layout: BlockLayout,
        cache: SequenceCache,
        new_cache: Callable[[], SequenceCache],
    ) -> tuple[SequenceCache, int]:
        """Load the longest stored run of leading full blocks of `token_ids` into the empty `cache`.

        Returns the cache and the number of tokens loaded. Only blocks that end before the last
        prompt token are asked for: that token must be computed to get the logits of the first
        new token. Each block is loaded as soon as it arrived; the first one that is missing,
        unreadable or refused by the codec ends the prefix there (counted), and a block the codec
        refuses halfway (some layers longer than others) makes the cache be rebuilt from the
        blocks before it. `last_load` describes the latest call (see LoadStats).
        """
        from kvpack.kvstore.client import StoreError

        started = time.perf_counter()
        stats = self.last_load = LoadStats()
        hashes = self.hashes(token_ids[:-1])
        self.metrics.prefix_query_tokens.inc(len(token_ids))
        if not hashes:
            return cache, 0
        try:
            matched = self._timed("match", lambda: self.client.match(namespace, hashes))
        except StoreError as error:
            self.count_fallback("unavailable", error)
            return cache, 0
        stats.started = started
        loaded = self._load_blocks(cache, namespace, layout, hashes[:matched], stats)
        if loaded is None:  # refused halfway through a block: rebuild from the good ones
            good = stats.blocks
            cache, stats.blocks, stats.bytes = new_cache(), 0, 0
            if self._load_blocks(cache, namespace, layout, hashes[:good], stats) != good:
                cache, stats.blocks = new_cache(), 0
        tokens = stats.blocks * self.block_tokens
        self.metrics.prefix_hit_tokens.inc(tokens)
        stats.total_seconds = time.perf_counter() - started
        if matched:
            self.metrics.kvstore_request_seconds.labels(op="get_many").observe(stats.total_seconds)
        return cache, tokens

    def _load_blocks(
        self,
        cache: SequenceCache,
        namespace: str,
        layout: BlockLayout,
        hashes: list[bytes],
        stats: LoadStats,
    ) -> int | None:
        """Fetch and load `hashes` in order; the number of blocks loaded, None if a block was
        refused halfway (the cache is then unusable)."""
        from kvpack.kvstore.client import StoreError

        if not hashes:
            return 0
        blocks = self.client.iter_many(namespace, hashes, copy=False)
        # layers [0, first) load here, the others on the helpers (load_threads > 1)
        bounds = _shares(len(cache.layers), self.load_threads)
        pool = self._helpers_pool(len(bounds) - 2)
        helpers = [
            _LayerLoader(pool, cache.layers[start:end], start)
            for start, end in zip(bounds[1:-1], bounds[2:], strict=True)
        ]
        own = cache.layers[: bounds[1]]
        loaded, refused = 0, None
        try:
            while not any(helper.error for helper in helpers):
                waited = time.perf_counter()
                try:
                    data = next(blocks, _END)
                except StoreError as error:
                    self.count_fallback("unavailable", error)
                    break
                finally:
                    stats.wait_seconds += time.perf_counter() - waited
                if data is _END:
                    break
                stats.fetch_seconds = time.perf_counter() - stats.started
                if data is None:  # evicted between Match and Get, or dropped as corrupt
                    self.count_fallback("miss", None)
                    break
                loading = time.perf_counter()
                try:
                    parts = self._split_block(data, namespace, layout)
                except (record.RecordError, ValueError, KeyError, TypeError) as error:
                    self.count_fallback("corrupt", error)
                    stats.load_seconds += time.perf_counter() - loading
                    break
                for helper in helpers:
                    helper.queue.put(parts)
                try:
                    for layer, (key_bytes, value_bytes) in zip(own, parts, strict=False):
                        layer.load_block(key_bytes, value_bytes)
                except (ValueError, RuntimeError) as error:
                    refused = error
                    break
                finally:
                    stats.load_seconds += time.perf_counter() - loading
                loaded += 1
                stats.bytes += len(data)
        finally:
            blocks.close()  # cancels the streams of blocks we no longer want
            finishing = time.perf_counter()
            counts = [helper.finish() for helper in helpers]
            stats.load_seconds += time.perf_counter() - finishing
        errors = [refused] + [helper.error for helper in helpers]
        stats.blocks = min([loaded, *counts])
        if any(errors):
            self.count_fallback("corrupt", next(error for error in errors if error))
            return None
        return stats.blocks

    def _helpers_pool(self, helpers: int) -> ThreadPoolExecutor | None:
        """A pool with at least `helpers` threads (None for none)."""
        if helpers == 0:
            return None
        with self._load_pool_lock:
            if self._load_pool is None or self._load_pool._max_workers < helpers:
                if self._load_pool is not None:
                    self._load_pool.shutdown(wait=False)
                self._load_pool = ThreadPoolExecutor(helpers, thread_name_prefix="prefix-load")
            return self._load_pool

    def _split_block(
        self, data: bytes | memoryview, namespace: str, layout: BlockLayout
    ) -> list[tuple[bytes, bytes]]:
        # The client verified the checksum of these very bytes (and the namespace) on arrival.
        header, payload = record.decode(data, namespace, checksum=False)
        expected = {
            "kind": RECORD_KIND,
            "model": layout.model_id,
            "fingerprint": layout.codec_fingerprint,
        }
        got = {key: header.extra.get(key) for key in expected}
        if (
            got != expected
            or header.codec != layout.codec_name
            or header.dtype != layout.dtype
            or header.token_count != layout.block_tokens
            or header.shapes.get("kv") != self._kv_shape(layout)
        ):
            raise ValueError(f"record does not fit this model/codec: {header}")
        sizes = header.extra["sizes"]
        if len(sizes) != layout.num_layers or sum(map(sum, sizes)) != len(payload):
            raise ValueError("record sizes do not add up to its payload")
        parts = []
        offset = 0
        for key_bytes, value_bytes in sizes:
            middle = offset + key_bytes
            # bytes: the codecs parse a header out of each (the one copy of the payload here)
            parts.append(
                (bytes(payload[offset:middle]), bytes(payload[middle : middle + value_bytes]))
            )
            offset = middle + value_bytes
        return parts

    @staticmethod
    def _kv_shape(layout: BlockLayout) -> list[int]:
        return [layout.num_layers, layout.num_kv_heads, layout.block_tokens, layout.head_dim]

    def count_fallback(self, reason: str, error: Exception | None) -> None:
        """Count (and log) a store failure that we answer by recomputing."""
        self.metrics.kvstore_errors.labels(reason=reason).inc()
        if error is not None:
            log.warning("kvstore %s, recomputing: %s", reason, error)

    # -- write path --------------------------------------------------------------------------
    def put_block(
        self,
        namespace: str,
        block_hash: bytes,
        layers: list[LayerCache],
        start: int,
        layout: BlockLayout,
    ) -> None:
        """Queue tokens [start, start + block_tokens) of `layers` for storage.

        The tokens must be in the packed region, whose rows never change again, so the writer
        thread can serialize them while the sequence keeps growing. A full queue drops the block.
        """
        try:
            self._puts.put_nowait((namespace, block_hash, layers, start, layout))
        except queue.Full:
            self.metrics.kvstore_puts_dropped.inc()

    def _write_loop(self) -> None:
        from kvpack.kvstore.client import StoreError

        while True:
            job = self._puts.get()
            if job is None:
                return
            namespace, block_hash, layers, start, layout = job
            try:
                data = self._encode_block(namespace, layers, start, layout)
                self._timed(
                    "put", lambda n=namespace, h=block_hash, d=data: self.client.put(n, h, d)
                )
                self.metrics.kvstore_put_blocks.inc()
            except StoreError as error:
                self.count_fallback("put_failed", error)
            except Exception:  # a bug here must not kill the writer thread; it is logged
                self.metrics.kvstore_errors.labels(reason="put_failed").inc()
                log.exception("storing a block failed")

    def _encode_block(
        self, namespace: str, layers: list[LayerCache], start: int, layout: BlockLayout
    ) -> bytes:
        parts: list[bytes] = []
        sizes: list[list[int]] = []
        for layer in layers:
            key_bytes, value_bytes = layer.block_bytes(start, start + layout.block_tokens)
            parts += [key_bytes, value_bytes]
            sizes.append([len(key_bytes), len(value_bytes)])
        payload = b"".join(parts)
        num_elements = (
            2 * layout.num_layers * layout.num_kv_heads * layout.block_tokens * layout.head_dim
        )
        header = record.RecordHeader.for_namespace(
            namespace,
            codec=layout.codec_name,
            dtype=layout.dtype,
            shapes={"kv": self._kv_shape(layout)},
            bits_per_element=8 * len(payload) / num_elements,
            token_count=layout.block_tokens,
            extra={
                "kind": RECORD_KIND,
                "model": layout.model_id,
                "fingerprint": layout.codec_fingerprint,
                "sizes": sizes,
            },
        )
        return record.encode(header, payload)

    def close(self) -> None:
        if self._load_pool is not None:
            self._load_pool.shutdown(wait=True)
        self._puts.put(None)
        self._writer.join(timeout=5)
        self.client.close()
