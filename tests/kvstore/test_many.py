"""Many blocks at once: GetMany's whole-record messages and read-ahead, and the client's iter_many
over parallel streams (order, misses, corruption, early exit, a store that goes away)."""

import threading

import grpc
import pytest
from kvpack.common.grpc_server import CHANNEL_OPTIONS
from kvpack.common.hashing import namespace_fingerprint
from kvpack.kvstore.backends import block_key
from kvpack.kvstore.client import KVStoreClient, StoreUnavailable
from kvpack.proto import kvstore_pb2, kvstore_pb2_grpc
from support.blocks import chain, random_record


def _records(client, count, sizes=(100, 5_000_000, 70_000)):
    hashes = chain(count, salt=count)
    records = [random_record("ns", sizes[i % len(sizes)] + i) for i in range(count)]
    for block_hash, data in zip(hashes, records, strict=True):
        client.put("ns", block_hash, data)
    return hashes, records


@pytest.mark.parametrize("streams", [1, 2, 4, 7])
def test_iter_many_yields_in_order_with_misses(store, streams):
    with KVStoreClient(store.address, streams=streams) as client:
        hashes, records = _records(client, 9)
        for missing in (0, 4, 8):
            client.delete("ns", hashes[missing])
        expected = [None if i in (0, 4, 8) else records[i] for i in range(9)]
        got = list(client.iter_many("ns", hashes))
        assert got == expected and all(type(b) in (bytes, type(None)) for b in got)
        views = list(client.iter_many("ns", hashes, copy=False))
        assert [None if v is None else bytes(v) for v in views] == expected
        assert all(v is None or (isinstance(v, memoryview) and v.readonly) for v in views)
        assert client.get_many("ns", hashes) == expected
        assert list(client.iter_many("other", hashes)) == [None] * 9
        assert list(client.iter_many("ns", [])) == []


def test_get_many_sends_whole_records_when_asked(store):
    hashes = chain(2, salt=7)
    records = [random_record("ns", 6 << 20), random_record("ns", 10)]
    with KVStoreClient(store.address) as client:
        for block_hash, data in zip(hashes, records, strict=True):
            client.put("ns", block_hash, data)
    channel = grpc.insecure_channel(store.address, options=CHANNEL_OPTIONS)
    stub = kvstore_pb2_grpc.KVStoreStub(channel)
    try:
        for max_chunk_bytes, messages in ((0, 3), (8 << 20, 2), (1 << 30, 2), (1 << 20, 8)):
            chunks = list(stub.GetMany(kvstore_pb2.GetManyRequest(
                namespace="ns", block_hashes=hashes, max_chunk_bytes=max_chunk_bytes)))
            assert len(chunks) == messages
            for index, data in enumerate(records):
                assert b"".join(c.data for c in chunks if c.index == index) == data
            assert chunks[0].total_bytes == len(records[0])
    finally:
        channel.close()


@pytest.mark.parametrize("streams", [1, 3])
def test_corrupt_block_in_redis_is_a_counted_miss_in_the_middle(redis_server, kvstore_factory,
                                                                streams):
    server = kvstore_factory(backend=redis_server.url)
    with KVStoreClient(server.address, streams=streams) as client:
        hashes, records = _records(client, 6)
        key = block_key(namespace_fingerprint("ns"), hashes[2])
        raw = redis_server.client()
        value = raw.get(key)
        raw.set(key, value[:50] + bytes([value[50] ^ 1]) + value[51:])
        got = list(client.iter_many("ns", hashes))
        assert got == [None if i == 2 else records[i] for i in range(6)]
        assert client.stats()["corrupt_blocks"] == 1 and raw.exists(key) == 0


def test_leaving_early_cancels_the_streams(redis_server, kvstore_factory):
    server = kvstore_factory(backend=redis_server.url)
    with KVStoreClient(server.address, streams=3) as client:
        hashes, records = _records(client, 12)
        for index, block in enumerate(client.iter_many("ns", hashes)):
            assert block == records[index]
            if index == 1:
                break
        # every stream thread is free again: the three of them run three jobs at once
        barrier = threading.Barrier(3, timeout=5)
        waits = [client._pool.submit(barrier.wait) for _ in range(3)]
        assert sorted(f.result(timeout=5) for f in waits) == [0, 1, 2]
        assert client.get_many("ns", hashes) == records


def test_redis_gone_mid_stream_is_store_unavailable(redis_server, kvstore_factory):
    server = kvstore_factory(backend=redis_server.url)
    with KVStoreClient(server.address, streams=2, retries=0) as client:
        hashes, records = _records(client, 8)
        blocks = client.iter_many("ns", hashes)
        assert next(blocks) == records[0]
        redis_server.stop()
        with pytest.raises(StoreUnavailable):
            list(blocks)


def test_store_gone_is_store_unavailable(kvstore_factory):
    server = kvstore_factory()
    client = KVStoreClient(server.address, streams=3, retries=1, timeout_seconds=1)
    with client:
        hashes, _ = _records(client, 3)
        server.stop(grace_seconds=0)
        with pytest.raises(StoreUnavailable):
            list(client.iter_many("ns", hashes))
