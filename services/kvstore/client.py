"""Python client of the kvstore (DESIGN.md "Python client of the store").

    with KVStoreClient("127.0.0.1:50051") as store:
        store.put(namespace, block_hash, record_bytes)
        data = store.get(namespace, block_hash)        # None = miss
        n = store.match(namespace, [h0, h1, h2])       # leading hashes present

Every call has a deadline. Calls are idempotent (a put writes the same record under the same
content-derived key), so UNAVAILABLE is retried a few times with backoff; after that the store is
reported as `StoreUnavailable`, the one exception callers handle to fall back to recomputation.
Records returned by `get`/`get_many`/`iter_many` are verified again here (xxh3, off the GIL), so
nothing corrupted in transit is ever used. A record of up to `whole_record_bytes` goes as one
message each way (PutWhole, and whole records in GetMany); larger ones stream in chunks. `get`
uses GetWhole up to STREAMED_GET_BYTES and fetches a larger record as byte ranges over parallel
connections, verifies the joined record and, if it does not verify, fetches it whole with Get.
`put` sends a record of at least 2 x PUT_RANGE_BYTES as byte ranges the same way (one PutWhole
with an upload id per range, in parallel); the service stages them and stores the record when its
last range arrived and the whole verified. Whenever the ranges do not end in a stored record (a
server without ranged puts, an upload the server dropped) it puts the record in one call instead.

Many blocks (a prompt's prefix) come fastest through `iter_many`: it spreads them over `streams`
GetMany calls on separate connections (gRPC's core receives them off the GIL, in parallel) and
yields each block, in order, as soon as it arrived, so the caller loads block i while later
blocks are still on the wire.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

import grpc
from kvpack.common import record
from kvpack.common.grpc_server import CHANNEL_OPTIONS
from kvpack.kvstore import wire
from kvpack.kvstore.protocol import (
    DEFAULT_CHUNK_BYTES,
    DEFAULT_GET_RANGES,
    DEFAULT_MAX_RECORD_BYTES,
    DEFAULT_PUT_RANGES,
    GET_RANGE_BYTES,
    MAX_WHOLE_RECORD_BYTES,
    PUT_RANGE_BYTES,
    STREAMED_GET_BYTES,
    UPLOAD_ID_BYTES,
    WHOLE_RECORD_BYTES,
)
from kvpack.kvstore.rpc_methods import KVStoreMethods
from kvpack.proto import kvstore_pb2

T = TypeVar("T")
_UNAVAILABLE = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
# GetMany connections a client spreads a prefix over by default (see iter_many). More streams
# receive more in parallel (in gRPC's core), but gRPC's Python-side receive copies hold the GIL and
# compete with whoever consumes the blocks: loading an 800 MB prefix on the 2-core VM took 2.1 s
# with 1 stream, 2.3-2.7 s with 2, 2.3-2.7 s with 4 (bench/kvstore/bench_prefix_fetch.py).
DEFAULT_STREAMS = 1


class StoreError(Exception):
    """Base of the client's errors. `code`: the gRPC status the store answered, if any."""

    code: grpc.StatusCode | None = None


class StoreUnavailable(StoreError):
    """The store (or its backend) did not answer in time: recompute instead."""


class InvalidRequest(StoreError, ValueError):
    """The store rejected the request (INVALID_ARGUMENT / RESOURCE_EXHAUSTED); the message says
    why."""


class Unauthenticated(StoreError, PermissionError):
    """Missing or wrong token."""


class KVStoreClient:
    def __init__(self, target: str, *, token: str | None = None, timeout_seconds: float = 5.0,
                 retries: int = 2, chunk_bytes: int = DEFAULT_CHUNK_BYTES,
                 min_bytes_per_second: float = 50e6, streams: int = DEFAULT_STREAMS,
                 whole_record_bytes: int = WHOLE_RECORD_BYTES,
                 get_ranges: int = DEFAULT_GET_RANGES,
                 get_range_bytes: int = GET_RANGE_BYTES,
                 put_ranges: int = DEFAULT_PUT_RANGES,
                 put_range_bytes: int = PUT_RANGE_BYTES) -> None:
        """
        Args:
            target: HOST:PORT of a kvstore.
            token: shared secret, sent as `authorization: Bearer TOKEN`.
            timeout_seconds: deadline of one attempt (puts and gets get extra time for their size,
                at `min_bytes_per_second`).
            retries: extra attempts after UNAVAILABLE / deadline exceeded.
            streams: connections `iter_many`/`get_many` spread many blocks over, in parallel (one
                connection moves at most a few hundred MB/s through Python's gRPC).
            whole_record_bytes: records up to this size go as one message (0: always stream); get
                takes one message only up to protocol.STREAMED_GET_BYTES.
            get_ranges, get_range_bytes: `get` fetches a record over protocol.STREAMED_GET_BYTES
                as at most `get_ranges` byte ranges of at least `get_range_bytes`, in parallel,
                each on its own connection (get_ranges=1: as one Get stream instead).
            put_ranges, put_range_bytes: `put` sends a record that splits into at least 2 ranges
                of at least `put_range_bytes` as at most `put_ranges` such ranges (more only where
                a range would pass the message limit), in parallel, each on its own connection
                (put_ranges=1: always in one call).
        """
        if streams < 1 or get_ranges < 1 or put_ranges < 1:
            raise ValueError(f"streams, get_ranges and put_ranges must be at least 1, got "
                             f"{streams}, {get_ranges}, {put_ranges}")
        self.target = target
        self._timeout = timeout_seconds
        self._retries = retries
        self._chunk_bytes = chunk_bytes
        self._whole_bytes = whole_record_bytes
        # Namespace -> size of its last record too large for one GetWhole: its gets go straight to
        # ranges of that size (or the Get stream) instead of asking for one message first (blocks
        # of one namespace have one size; a record of another size costs one fallback Get).
        self._large_sizes: dict[str, int] = {}
        self._range_count = get_ranges
        self._range_bytes = max(get_range_bytes, 1)
        self._ranges_served = True  # False once the server turned out to ignore ranges (too old)
        self._put_range_count = put_ranges
        self._put_range_bytes = max(put_range_bytes, 1)
        self._put_ranges_served = True  # False once the server refused every range (too old)
        self._min_rate = min_bytes_per_second
        self._metadata = (("authorization", f"Bearer {token}"),) if token else None
        # A local subchannel pool per channel gives each its own TCP connection. Server-streaming
        # calls (Get, GetMany) are read on the caller's thread instead of through the channel's
        # spin thread, one hand-off less per message: a 4 MiB Get in 1 MiB chunks ~0.5 ms faster
        # on the 2-core VM; GetMany of 1-4 MiB blocks 1-8% faster, of 64 KiB blocks over 4
        # streams ~5% slower.
        self._channels = [grpc.insecure_channel(target, options=[
            *CHANNEL_OPTIONS, ("grpc.use_local_subchannel_pool", 1),
            (grpc.experimental.ChannelOptions.SingleThreadedUnaryStream, 1)])
            for _ in range(max(streams, get_ranges, put_ranges))]
        stubs = [KVStoreMethods(channel) for channel in self._channels]
        self._stubs = stubs[:streams]  # iter_many: one GetMany stream per connection
        self._range_stubs = stubs[:get_ranges]  # get: one range per connection
        self._put_range_stubs = stubs[:put_ranges]  # put: likewise
        self._stub = self._stubs[0]
        self._pool = (ThreadPoolExecutor(streams, thread_name_prefix="kvstore-get")
                      if streams > 1 else None)
        # Ranges of one get or put: the caller's thread moves the first, these threads the others.
        range_threads = max(get_ranges, put_ranges) - 1
        self._range_pool = (ThreadPoolExecutor(range_threads, thread_name_prefix="kvstore-range")
                            if range_threads else None)

    # -- API ---------------------------------------------------------------------------------
    def put(self, namespace: str, block_hash: bytes, data: bytes) -> None:
        if (self._put_ranges_served and self._put_range_count > 1
                and self._put_ranges_for(len(data)) > 1):
            refused = self._put_ranges(namespace, block_hash, data)
            if refused is None:
                return  # stored
            self._put_whole(namespace, block_hash, data)  # the server's word on the whole record
            if refused:  # it took the whole record after refusing every range: no ranged puts
                self._put_ranges_served = False
            return
        self._put_whole(namespace, block_hash, data)

    def _put_whole(self, namespace: str, block_hash: bytes, data: bytes) -> None:
        """The record in one call: one PutWhole message up to whole_record_bytes, else a stream."""
        deadline = self._timeout + len(data) / self._min_rate
        if 0 < len(data) <= self._whole_bytes:
            message = wire.encode_put_chunk(namespace, block_hash, len(data), 0, data)
            self._call(lambda: self._stub.put_whole(message, timeout=deadline,
                                                    metadata=self._metadata))
        else:
            self._call(lambda: self._stub.put(self._chunks(namespace, block_hash, data),
                                              timeout=deadline, metadata=self._metadata))

    def get(self, namespace: str, block_hash: bytes) -> bytes | None:
        # Records up to STREAMED_GET_BYTES come in one message (GetWhole); larger ones as byte
        # ranges fetched in parallel over separate connections (see _get_ranges), or with
        # get_ranges=1 as a Get stream of 1 MiB chunks.
        whole_bytes = min(self._whole_bytes, STREAMED_GET_BYTES)
        size = self._large_sizes.get(namespace)
        if whole_bytes and size is None:
            request = kvstore_pb2.GetWholeRequest(namespace=namespace, block_hash=block_hash,
                                                  max_bytes=whole_bytes)
            deadline = self._timeout + whole_bytes / self._min_rate
            chunk = self._call(lambda: self._stub.get_whole(request, timeout=deadline,
                                                            metadata=self._metadata))
            if not chunk.found:
                return None
            if len(chunk.data) == chunk.total_bytes:
                return _verified(bytes(chunk.data), namespace)
            size = self._large_sizes[namespace] = chunk.total_bytes  # too large for one message
        if size and self._range_count > 1 and self._ranges_served:
            data = self._get_ranges(namespace, block_hash, size)
            if data is not _MISMATCH:
                return data
        # The whole record in one Get stream: the server verifies it (a corrupt one is counted,
        # dropped and answered as a miss), and so do we.
        request = kvstore_pb2.GetRequest(namespace=namespace, block_hash=block_hash)
        data = _verified(self._call(lambda: self._receive(request)), namespace)
        if data is not None and size is not None and len(data) != size:
            if len(data) > whole_bytes:
                self._large_sizes[namespace] = len(data)
            else:
                self._large_sizes.pop(namespace, None)
        return data

    def get_many(self, namespace: str, hashes: list[bytes]) -> list[bytes | None]:
        """Several blocks in one call, in order; None for each miss (or corrupt block)."""
        return list(self.iter_many(namespace, hashes))

    def iter_many(self, namespace: str, hashes: list[bytes], *,
                  copy: bool = True) -> Iterator[bytes | memoryview | None]:
        """The blocks of `hashes` in order, each yielded as soon as it and every block before it
        arrived and verified; None for a miss or a corrupt block.

        Block i travels on stream i % streams (one GetMany per stream, whole records per message
        up to `whole_record_bytes`), so blocks arrive nearly in order. `copy=False` yields each
        record as a read-only memoryview into its received message instead of a bytes copy.
        A stream that fails with UNAVAILABLE is restarted for its blocks not yet received (up to
        `retries` times); then StoreUnavailable is raised. Leaving the loop early cancels the
        streams still running.
        """
        if not hashes:
            return
        fetch = _ManyFetch(self, namespace, hashes, copy)
        try:
            yield from fetch.blocks()
        finally:
            fetch.cancel()

    def match(self, namespace: str, hashes: list[bytes]) -> int:
        request = kvstore_pb2.MatchRequest(namespace=namespace, block_hashes=hashes)
        return self._call(lambda: self._stub.match(
            request, timeout=self._timeout, metadata=self._metadata)).matched

    def delete(self, namespace: str, block_hash: bytes) -> bool:
        request = kvstore_pb2.DeleteRequest(namespace=namespace, block_hash=block_hash)
        return self._call(lambda: self._stub.delete(
            request, timeout=self._timeout, metadata=self._metadata)).deleted

    def stats(self) -> dict:
        response = self._call(lambda: self._stub.stats(
            kvstore_pb2.StatsRequest(), timeout=self._timeout, metadata=self._metadata))
        return {field.name: getattr(response, field.name) for field in response.DESCRIPTOR.fields}

    def close(self) -> None:
        for pool in (self._pool, self._range_pool):
            if pool:
                pool.shutdown(wait=True)
        for channel in self._channels:
            channel.close()

    def __enter__(self) -> KVStoreClient:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"KVStoreClient({json.dumps(self.target)})"

    # -- plumbing ----------------------------------------------------------------------------
    def _get_ranges(self, namespace: str, block_hash: bytes, size: int) -> bytes | None | object:
        """A record expected to be `size` bytes, fetched as byte ranges (one GetWhole call each)
        on separate connections at once: the caller's thread fetches the first, the range pool
        the others. Why: one Python gRPC call moving a 4 MiB record costs 2.5-3.5 ms on the 2-core
        VM whatever the server does, while calls on parallel connections overlap (their waits
        and gRPC core's receives run off the GIL; GetMany over 4 connections moves ~1x raw GET).

        The server sends ranges unverified, so the record is verified here, range by range as
        they arrive. Returns the record, None for a miss (no range found), or _MISMATCH when the
        caller must fetch the record whole instead: it failed verification (corrupt, or
        overwritten between the ranges), ranges disagree (another size, evicted midway) or the
        server ignores ranges."""
        count = max(1, min(self._range_count, size // self._range_bytes),
                    -(-size // MAX_WHOLE_RECORD_BYTES))  # no range over the message limit
        step = -(-size // count)
        offsets = range(0, size, step)

        def fetch(index: int) -> wire.GetChunkView | StoreError:
            try:
                return self._fetch_range(index, namespace, block_hash, offsets[index], step)
            except StoreError as error:
                return error

        rest = [self._range_pool.submit(fetch, index) for index in range(1, len(offsets))]
        # Each range is checked and hashed as soon as it and every range before it are here,
        # while later ones are still in flight: the checksum's pass over the record overlaps the
        # transfer instead of following it (xxh3 runs off the GIL).
        verifier = record.RecordVerifier(size, namespace)
        chunks: list = []
        first_bad = None  # the first range that is an error, missing or not where it belongs
        for index, offset in enumerate(offsets):
            chunk = fetch(0) if index == 0 else rest[index - 1].result()  # none outlives this call
            chunks.append(chunk)
            if first_bad is not None:
                continue
            if (isinstance(chunk, StoreError) or not chunk.found or chunk.total_bytes != size
                    or chunk.offset != offset or len(chunk.data) != min(step, size - offset)):
                first_bad = chunk
            else:
                verifier.update(chunk.data)
        errors = [chunk for chunk in chunks if isinstance(chunk, StoreError)]
        for error in errors:
            if not isinstance(error, InvalidRequest):
                raise error
        if errors:  # an offset past the end: the record is shorter than `size`
            return _MISMATCH
        if not any(chunk.found for chunk in chunks):
            return None
        if first_bad is not None:  # another size, evicted midway, or a server without ranges
            if first_bad.found and not first_bad.data:  # without ranges: too large, no data
                self._ranges_served = False
            return _MISMATCH
        try:
            verifier.finish()
        except record.RecordError:
            return _MISMATCH
        return b"".join(chunk.data for chunk in chunks)  # one copy, into the result

    def _put_ranges_for(self, size: int) -> int:
        """How many ranges `put` sends a record of `size` bytes in (1: one call)."""
        return max(1, min(self._put_range_count, size // self._put_range_bytes),
                   -(-size // MAX_WHOLE_RECORD_BYTES))  # no range over the message limit

    def _put_ranges(self, namespace: str, block_hash: bytes, data: bytes) -> bool | None:
        """Put a record as byte ranges under one new upload id, one PutWhole each, on separate
        connections at once (the range pool sends the first ones, the caller's thread the last):
        the call that completes the record answers stored_bytes = its size once the service
        verified and stored it. None when it did; else whether every range was refused as
        invalid (what a server without ranged puts answers), for the caller to put the record in
        one call. StoreUnavailable (after the retries of each range) and Unauthenticated are
        raised: one call would meet them too."""
        size = len(data)
        count = self._put_ranges_for(size)
        step = -(-size // count)
        offsets = range(0, size, step)
        view = memoryview(data)
        upload_id = os.urandom(UPLOAD_ID_BYTES)

        def send(index: int) -> kvstore_pb2.PutResponse | StoreError:
            offset = offsets[index]
            part = view[offset : offset + step]
            message = wire.encode_put_chunk(namespace, block_hash, size, offset, part, upload_id)
            stub = self._put_range_stubs[index % len(self._put_range_stubs)]
            deadline = self._timeout + len(part) / self._min_rate
            try:
                return self._call(lambda: stub.put_whole(message, timeout=deadline,
                                                         metadata=self._metadata))
            except StoreError as error:
                return error

        # The pool sends the first ranges, the calling thread the last: the service writes the
        # record in order as it comes, so the first range had better leave first.
        first = [self._range_pool.submit(send, index) for index in range(len(offsets) - 1)]
        last = send(len(offsets) - 1)
        answers = [*(future.result() for future in first), last]  # none outlives this call
        errors = [answer for answer in answers if isinstance(answer, StoreError)]
        for error in errors:
            if isinstance(error, (StoreUnavailable, Unauthenticated)):
                raise error
        if not errors and any(answer.stored_bytes == size for answer in answers):
            return None
        return len(errors) == len(answers) and all(
            error.code is grpc.StatusCode.INVALID_ARGUMENT for error in errors)

    def _fetch_range(self, index: int, namespace: str, block_hash: bytes, offset: int,
                     length: int) -> wire.GetChunkView:
        """One range of a record, on connection `index` (retried like any call). InvalidRequest
        for an offset past the record's end."""
        request = kvstore_pb2.GetWholeRequest(namespace=namespace, block_hash=block_hash,
                                              max_bytes=length, offset=offset, length=length)
        stub = self._range_stubs[index % len(self._range_stubs)]
        deadline = self._timeout + length / self._min_rate
        return self._call(lambda: stub.get_whole(request, timeout=deadline,
                                                 metadata=self._metadata))

    def _chunks(self, namespace: str, block_hash: bytes, data: bytes) -> Iterator[bytes]:
        """Encoded PutChunks; the first names the block."""
        view = memoryview(data)
        for offset in range(0, max(len(view), 1), self._chunk_bytes):
            first = offset == 0
            yield wire.encode_put_chunk(
                namespace if first else "", block_hash if first else b"",
                len(view) if first else 0, offset, view[offset : offset + self._chunk_bytes])

    def _receive(self, request) -> bytes | None:
        """The record of a Get stream, None for a miss. Returns as soon as the record is whole
        instead of waiting for the call's trailing status (0.1-0.3 ms of a 4 MiB Get on the
        2-core VM), then cancels the call, a no-op if it already ended: the service sends a record
        only after verifying it, and the caller checks its checksum again."""
        # The deadline must cover the transfer, whose size is learnt only from the chunks: allow
        # the largest record a server accepts by default.
        deadline = self._timeout + DEFAULT_MAX_RECORD_BYTES / self._min_rate
        call = self._stub.get(request, timeout=deadline, metadata=self._metadata)
        try:
            for _, data in _assembled(call, 1, self.target):
                return bytes(data)
            return None  # a miss
        finally:
            call.cancel()

    def _call(self, attempt: Callable[[], T]) -> T:
        for attempt_index in range(self._retries + 1):
            try:
                return attempt()
            except grpc.RpcError as error:
                if error.code() in _UNAVAILABLE and attempt_index < self._retries:
                    time.sleep(0.05 * 2**attempt_index)
                    continue
                raise self._error(error) from None
        raise AssertionError("unreachable")

    def _error(self, error: grpc.RpcError) -> StoreError:
        """The client's exception for a failed call."""
        code = error.code()
        if code in _UNAVAILABLE:
            result = StoreUnavailable(f"kvstore at {self.target}: {error.details()}")
        elif code is grpc.StatusCode.UNAUTHENTICATED:
            result = Unauthenticated(error.details())
        elif code in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED):
            result = InvalidRequest(error.details())
        else:
            result = StoreError(f"kvstore at {self.target}: {code.name}: {error.details()}")
        result.code = code
        return result


def _assembled(chunks, count: int, target: str) -> Iterator[tuple[int, memoryview | bytes]]:
    """(index, record) for every found block of a Get/GetMany stream, as each completes. A record
    that came in one chunk is a view into its message; one in several is joined (one copy)."""
    parts: list[memoryview] = []
    expected = received = 0
    for chunk in chunks:
        if not chunk.found:
            continue
        if chunk.offset == 0:
            parts, expected, received = [], chunk.total_bytes, 0
        if chunk.offset != received or chunk.index >= count:
            raise StoreUnavailable(f"kvstore at {target}: malformed Get stream")
        parts.append(chunk.data)
        received += len(chunk.data)
        if received == expected:
            yield chunk.index, parts[0] if len(parts) == 1 else b"".join(parts)
    if received != expected:
        raise StoreUnavailable(f"kvstore at {target}: Get stream ended early")


class _ManyFetch:
    """The streams of one iter_many call and the blocks they delivered."""

    def __init__(self, client: KVStoreClient, namespace: str, hashes: list[bytes], copy: bool):
        self.client = client
        self.namespace = namespace
        self.hashes = hashes
        self.copy = copy
        self.streams = min(len(client._stubs), len(hashes))
        self.results: dict[int, bytes | memoryview | None] = {}
        self.error: BaseException | None = None
        self.ready = threading.Condition()
        self.calls: list = []
        self.cancelled = False
        if self.streams == 1:
            self.workers = []  # the caller's thread runs the one stream itself, in blocks()
        else:
            self.workers = [client._pool.submit(self._run, stream) for stream in
                            range(self.streams)]

    def blocks(self) -> Iterator[bytes | memoryview | None]:
        if self.streams == 1:
            yield from self._stream(0, inline=True)
            return
        for index in range(len(self.hashes)):
            with self.ready:
                while index not in self.results and self.error is None:
                    self.ready.wait()
                if index not in self.results:
                    raise self.error
                yield self.results.pop(index)

    def cancel(self) -> None:
        with self.ready:
            self.cancelled = True
            calls = list(self.calls)
        for call in calls:
            call.cancel()
        for worker in self.workers:
            worker.exception()  # wait: no stream outlives the call that started it

    def _run(self, stream: int) -> None:
        try:
            for index, block in self._stream(stream, inline=False):
                with self.ready:
                    self.results[index] = block
                    self.ready.notify_all()
        except BaseException as error:  # handed to the consumer
            with self.ready:
                if self.error is None:
                    self.error = error
                self.ready.notify_all()

    def _stream(self, stream: int, inline: bool) -> Iterator[tuple[int, object] | object]:
        """Blocks of one stream: (index, block) pairs, or bare blocks in order when inline."""
        client = self.client
        remaining = list(range(stream, len(self.hashes), self.streams))
        attempt = 0
        while remaining:
            request = kvstore_pb2.GetManyRequest(
                namespace=self.namespace, block_hashes=[self.hashes[i] for i in remaining],
                max_chunk_bytes=client._whole_bytes or DEFAULT_CHUNK_BYTES)
            deadline = (client._timeout
                        + len(remaining) * DEFAULT_MAX_RECORD_BYTES / client._min_rate)
            done = 0
            try:
                with self.ready:
                    if self.cancelled:
                        return
                    call = client._stubs[stream].get_many(request, timeout=deadline,
                                                          metadata=client._metadata)
                    self.calls.append(call)
                for position, data in _assembled(call, len(remaining), client.target):
                    if position != done:  # a miss before it: None in its place
                        for missing in remaining[done:position]:
                            yield (None if inline else (missing, None))
                    block = _verified(data, self.namespace)
                    if block is not None and self.copy:
                        block = bytes(block)
                    yield (block if inline else (remaining[position], block))
                    done = position + 1
                for missing in remaining[done:]:
                    yield (None if inline else (missing, None))
                return
            except grpc.RpcError as error:
                remaining = remaining[done:]
                if (error.code() in _UNAVAILABLE and attempt < client._retries
                        and not self.cancelled):
                    time.sleep(0.05 * 2**attempt)
                    attempt += 1
                    continue
                raise client._error(error) from None


# _get_ranges: the ranges do not make up a verified record; fetch it whole instead.
_MISMATCH = object()


def _verified(data: bytes | memoryview | None, namespace: str) -> bytes | memoryview | None:
    """Checked again after the transfer: nothing corrupted on the way is ever used."""
    if data is None:
        return None
    try:
        record.verify(data, namespace)
    except record.RecordError:
        return None
    return data
