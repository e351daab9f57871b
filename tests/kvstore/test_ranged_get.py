"""Ranged reads (GetWhole with offset/length) on every backend, and KVStoreClient.get fetching a
large record as parallel ranges: round trips, corruption, records changing between the ranges,
servers without ranges."""

import threading
import time

import grpc
import pytest
from kvpack.common.grpc_server import CHANNEL_OPTIONS
from kvpack.kvstore import servicer as servicer_module
from kvpack.kvstore.client import KVStoreClient, StoreUnavailable
from kvpack.kvstore.protocol import GET_RANGE_BYTES, STREAMED_GET_BYTES
from kvpack.proto import kvstore_pb2, kvstore_pb2_grpc
from support.blocks import assert_damage_is_a_counted_miss, chain, random_record


@pytest.fixture
def redis_store(redis_server, kvstore_factory):
    return kvstore_factory(backend=redis_server.url)


def _status(call):
    with pytest.raises(grpc.RpcError) as info:
        call()
    return info.value.code(), info.value.details()


def _hits_misses(server) -> tuple[float, float]:
    value = server.metrics.value
    return value("kvpack_kvstore_hits_total"), value("kvpack_kvstore_misses_total")


def test_ranges_of_a_record_on_every_backend(any_store):
    data = random_record("ns", (3 << 20) + 7)
    size, block_hash = len(data), chain(1)[0]
    with KVStoreClient(any_store.address) as client:
        client.put("ns", block_hash, data)
    with grpc.insecure_channel(any_store.address, options=CHANNEL_OPTIONS) as channel:
        stub = kvstore_pb2_grpc.KVStoreStub(channel)

        def get(offset, length, max_bytes=8 << 20, namespace="ns"):
            return stub.GetWhole(kvstore_pb2.GetWholeRequest(
                namespace=namespace, block_hash=block_hash, max_bytes=max_bytes, offset=offset,
                length=length))

        for offset, length, expected in [
                (0, 1000, data[:1000]),  # the start
                (size // 2, 12345, data[size // 2 : size // 2 + 12345]),  # the middle
                (size - 10, 0, data[-10:]),  # to the end
                (size - 10, 100, data[-10:]),  # a range past the end stops at it
                (size - 1, 1, data[-1:]),  # the last byte
                (1, 0, data[1:])]:  # all but the first byte, in one message
            chunk = get(offset, length)
            assert chunk.found and chunk.total_bytes == size and chunk.offset == offset
            assert chunk.data == expected, (offset, length)
        hits_before = _hits_misses(any_store)[0]
        assert get(0, 2 << 20).data == data[: 2 << 20]
        assert _hits_misses(any_store)[0] == hits_before + 1  # counted once, on the range at 0
        too_long = get(0, 2 << 20, max_bytes=1 << 20)  # longer than max_bytes: size, no data
        assert too_long.found and too_long.total_bytes == size and too_long.data == b""
        assert not get(0, 1000, namespace="other").found  # a miss
        assert not get(5000, 1000, namespace="other").found
        for offset in (size, size + 1, 2**64 - 1):
            code, details = _status(lambda offset=offset: get(offset, 10))
            assert code is grpc.StatusCode.INVALID_ARGUMENT and details.startswith("offset"), (
                offset, details)
        whole = get(0, 0)  # no range: the whole record, as before ranges existed
        assert whole.found and whole.total_bytes == size and whole.data == data


def test_redis_range_reads_stay_in_step_with_redis(redis_server):
    """The raw STRLEN + GETRANGE read: room before the range, nil, errors, and a connection that
    still answers the next caller correctly after an error reply to the first of two commands."""
    from kvpack.kvstore.backends import BackendUnavailable
    from kvpack.kvstore.backends.redis import RedisBackend

    backend = RedisBackend(redis_server.url)
    try:
        value = bytes(range(256)) * 5000
        redis_server.client().set("k", value)
        buffer, start, total = backend.get_range_with_room("k", 1000, 70_000, 40)
        assert (start, total) == (40, len(value)) and not buffer.readonly
        assert bytes(buffer[start:]) == value[1000:71_000]
        buffer, start, total = backend.get_range_with_room("k", len(value) + 5, 10, 40)
        assert bytes(buffer[start:]) == b"" and total == len(value)
        assert backend.get_range_with_room("absent", 0, 10, 40) is None
        redis_server.client().rpush("list", b"x")
        for _ in range(3):  # WRONGTYPE for both commands; neither reply may reach the next read
            with pytest.raises(BackendUnavailable, match="WRONGTYPE"):
                backend.get_range_with_room("list", 0, 10, 40)
            buffer, start, _ = backend.get_range_with_room("k", 0, 5, 40)
            assert bytes(buffer[start:]) == value[:5]
    finally:
        backend.close()


@pytest.mark.parametrize("payload_bytes", [STREAMED_GET_BYTES - 1000, STREAMED_GET_BYTES + 1,
                                           16 << 20, 64 << 20])
@pytest.mark.parametrize("get_ranges", [4, 1], ids=["ranges", "one-call"])
def test_client_round_trips_below_and_above_the_threshold(store, payload_bytes, get_ranges):
    data = random_record("ns", payload_bytes)
    hashes = chain(2, salt=payload_bytes)
    with KVStoreClient(store.address, get_ranges=get_ranges) as client:
        client.put("ns", hashes[0], data)
        for _ in range(2):  # the first large get learns the namespace's size, the next uses it
            assert client.get("ns", hashes[0]) == data
            assert client.get("ns", hashes[1]) is None
    calls = store.metrics.value("kvpack_kvstore_requests_total", op="get", code="OK")
    ranges = max(1, min(get_ranges, len(data) // GET_RANGE_BYTES))  # 1 just above, 4 at 64 MiB
    # below: one GetWhole per get; above: a "too large" GetWhole once, then the ranges of each
    # get (a miss too), or one Get stream each
    large = len(data) > STREAMED_GET_BYTES
    assert calls == (1 + 4 * ranges if large and get_ranges > 1 else 1 + 4 if large else 4)
    assert _hits_misses(store) == (2, 2)
    assert store.metrics.value("kvpack_kvstore_corrupt_blocks_total") == 0


def _flip(value: bytes) -> bytes:
    middle = len(value) // 2
    return value[:middle] + bytes([value[middle] ^ 0x40]) + value[middle + 1 :]


@pytest.mark.parametrize("damage", [_flip, lambda v: v[:-5000], lambda v: v[: 1 << 20],
                                    lambda v: v[:10], lambda v: b""],
                         ids=["flipped", "truncated", "truncated-to-1MiB", "10-bytes", "empty"])
@pytest.mark.parametrize("learnt", [True, False], ids=["size-known", "first-get"])
def test_corruption_in_redis_is_a_counted_miss_and_dropped(redis_server, redis_store, damage,
                                                           learnt):
    data = random_record("ns", 4 << 20)
    block_hash = chain(1)[0]
    with KVStoreClient(redis_store.address) as client:
        client.put("ns", block_hash, data)
        if learnt:
            assert client.get("ns", block_hash) == data
        assert_damage_is_a_counted_miss(client, redis_server.client(), "ns", block_hash, data,
                                        damage)


class _ChangingClient(KVStoreClient):
    """Once `between` is set, runs it after every range of the next ranged get but the first was
    fetched and before the first is: the record changes between the ranges, deterministically."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.between = None
        self.others_done = threading.Semaphore(0)
        self.ranges_fetched = 0

    def _fetch_range(self, index, *args):
        if index == 0 and self.between is not None:
            for _ in range(self._range_count - 1):
                assert self.others_done.acquire(timeout=10)
            self.between()
            self.between = None
        try:
            return super()._fetch_range(index, *args)
        finally:
            self.ranges_fetched += 1
            if index:
                self.others_done.release()


@pytest.mark.parametrize("change", ["same-size", "larger", "smaller", "deleted"])
def test_record_changed_between_ranges_is_the_new_record_or_a_miss(store, change):
    hashes = chain(2)
    old = random_record("ns", 4 << 20)
    new = {"same-size": random_record("ns", 4 << 20), "larger": random_record("ns", 5 << 20),
           "smaller": random_record("ns", 3 << 20), "deleted": None}[change]
    with KVStoreClient(store.address) as writer:
        writer.put("ns", hashes[0], old)
        writer.put("ns", hashes[1], old)

        def between():
            if new is None:
                writer.delete("ns", hashes[1])
            else:
                writer.put("ns", hashes[1], new)

        with _ChangingClient(store.address, get_range_bytes=1 << 20) as client:  # 4 ranges
            assert client.get("ns", hashes[0]) == old  # learns the namespace's record size
            client.between, client.ranges_fetched = between, 0
            assert client.get("ns", hashes[1]) == new  # never a mix of old and new
            assert client.ranges_fetched == 4  # it did read ranges of both versions
            assert client.get("ns", hashes[1]) == new  # and the next get is ordinary again
    assert store.metrics.value("kvpack_kvstore_corrupt_blocks_total") == 0  # changed, not corrupt


def test_client_against_a_server_without_ranges(store, monkeypatch):  # 4 MiB: 2 ranges
    """A server from before ranges reads every GetWholeRequest as the whole record: the client
    sees "too large, no data" for its ranges, fetches the record whole and stops asking."""
    monkeypatch.setattr(servicer_module, "_range_of", lambda request: (0, 0))
    data = random_record("ns", 4 << 20)
    block_hash = chain(1)[0]
    with KVStoreClient(store.address) as client:
        client.put("ns", block_hash, data)
        for _ in range(3):
            assert client.get("ns", block_hash) == data
    calls = store.metrics.value("kvpack_kvstore_requests_total", op="get", code="OK")
    assert calls == 1 + 2 + 3  # "too large", 2 unanswered ranges once, then a Get stream each


def test_dead_redis_fails_a_ranged_get_fast(redis_server, redis_store):
    data = random_record("ns", 4 << 20)
    block_hash = chain(1)[0]
    with KVStoreClient(redis_store.address, retries=0) as client:
        client.put("ns", block_hash, data)
        assert client.get("ns", block_hash) == data
        redis_server.stop()
        start = time.monotonic()
        with pytest.raises(StoreUnavailable):
            client.get("ns", block_hash)
        assert time.monotonic() - start < 4.0  # bounded timeouts, no hang
