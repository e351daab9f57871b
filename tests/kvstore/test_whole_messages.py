"""PutWhole/GetWhole (a record in one message each way) next to the streaming Put/Get.

The generated protobuf stubs are used where a test talks to the service directly, so these tests
also show that the service's hand-encoded messages are plain protobuf to any other client.
"""

import platform
import subprocess
import sys

import grpc
import pytest
from kvpack.common.grpc_server import CHANNEL_OPTIONS
from kvpack.kvstore.client import KVStoreClient
from kvpack.kvstore.servicer import GET_CHUNK_BYTES
from kvpack.proto import kvstore_pb2, kvstore_pb2_grpc
from support.blocks import chain, random_record


@pytest.fixture
def stub(kvstore):
    channel = grpc.insecure_channel(kvstore.address, options=CHANNEL_OPTIONS)
    yield kvstore_pb2_grpc.KVStoreStub(channel)
    channel.close()


def _status(call):
    with pytest.raises(grpc.RpcError) as info:
        call()
    return info.value.code(), info.value.details()


@pytest.mark.parametrize("payload_bytes", [1000, 3 << 20])
def test_whole_and_streamed_transfers_read_each_others_records(store, payload_bytes):
    whole = KVStoreClient(store.address)
    streamed = KVStoreClient(store.address, whole_record_bytes=0, chunk_bytes=1 << 20)
    hashes = chain(2, salt=payload_bytes)
    records = [random_record("ns", payload_bytes), random_record("ns", payload_bytes + 1)]
    with whole, streamed:
        whole.put("ns", hashes[0], records[0])
        streamed.put("ns", hashes[1], records[1])
        assert streamed.get("ns", hashes[0]) == records[0]
        assert whole.get("ns", hashes[1]) == records[1]


def test_records_over_the_whole_limit_stream_and_count_once(store):
    data = random_record("ns", 3 << 20)
    block_hash = chain(1)[0]
    with KVStoreClient(store.address, whole_record_bytes=1 << 20) as client:
        client.put("ns", block_hash, data)
        assert client.get("ns", block_hash) == data  # GetWhole says "too large", then Get
        assert client.get("ns", block_hash) == data  # straight to Get for this namespace
        assert client.get("ns", chain(1, salt=1)[0]) is None
        stats = client.stats()
    assert (stats["hits"], stats["misses"]) == (2, 1)


def test_get_whole_sends_a_record_only_up_to_max_bytes(kvstore, stub):
    data = random_record("ns", 5 << 20)
    block_hash = chain(1)[0]
    stub.PutWhole(kvstore_pb2.PutChunk(namespace="ns", block_hash=block_hash,
                                       total_bytes=len(data), data=data))
    # max_bytes=0: whatever fits under gRPC's default 4 MiB receive limit
    too_large = stub.GetWhole(kvstore_pb2.GetWholeRequest(namespace="ns", block_hash=block_hash))
    assert too_large.found and too_large.total_bytes == len(data) and too_large.data == b""
    whole = stub.GetWhole(kvstore_pb2.GetWholeRequest(namespace="ns", block_hash=block_hash,
                                                      max_bytes=8 << 20))
    assert whole.found and whole.total_bytes == len(whole.data) and whole.data == data
    chunks = list(stub.Get(kvstore_pb2.GetRequest(namespace="ns", block_hash=block_hash)))
    assert len(chunks) == -(-len(data) // GET_CHUNK_BYTES)  # Get streams GET_CHUNK_BYTES chunks
    assert b"".join(chunk.data for chunk in chunks) == data
    miss = stub.GetWhole(kvstore_pb2.GetWholeRequest(namespace="other", block_hash=block_hash))
    assert not miss.found and miss.data == b""
    stats = stub.Stats(kvstore_pb2.StatsRequest())
    assert (stats.hits, stats.misses) == (2, 1)  # the "too large" answer is not a hit


def test_put_whole_checks_like_put_and_stores_nothing_bad(kvstore_factory):
    server = kvstore_factory(max_record_bytes=1 << 20)
    data = random_record("ns", 1000)
    good = dict(namespace="ns", block_hash=chain(1)[0], total_bytes=len(data), data=data)
    cases = {
        "namespace": (grpc.StatusCode.INVALID_ARGUMENT, {**good, "namespace": ""}),
        "block_hash": (grpc.StatusCode.INVALID_ARGUMENT, {**good, "block_hash": b"x"}),
        "stream ended early": (grpc.StatusCode.INVALID_ARGUMENT, {**good, "data": data[:500]}),
        "offset": (grpc.StatusCode.INVALID_ARGUMENT, {**good, "offset": 1}),
        "data: checksum": (grpc.StatusCode.INVALID_ARGUMENT,
                           {**good, "data": data[:-1] + bytes([data[-1] ^ 1])}),
        "another namespace": (grpc.StatusCode.INVALID_ARGUMENT,
                              {**good, "data": random_record("other", 1000)}),
        "maximum record size": (grpc.StatusCode.RESOURCE_EXHAUSTED,
                                {**good, "total_bytes": 2 << 20}),
    }
    with grpc.insecure_channel(server.address) as channel:
        stub = kvstore_pb2_grpc.KVStoreStub(channel)
        for expected, (code, fields) in cases.items():
            status = _status(lambda fields=fields: stub.PutWhole(kvstore_pb2.PutChunk(**fields)))
            assert status[0] is code and expected in status[1], (expected, status)
        assert stub.Stats(kvstore_pb2.StatsRequest()).blocks == 0
        assert stub.PutWhole(kvstore_pb2.PutChunk(**good)).stored_bytes == len(data)


@pytest.mark.parametrize("garbage", [b"\x0a\x05ns", b"\x2a\xff\xff\xff\xff\x0f", b"\x0b\x0c"])
def test_undecodable_put_whole_fails_and_the_server_stays_up(kvstore, stub, garbage):
    with grpc.insecure_channel(kvstore.address) as channel:
        put_whole = channel.unary_unary("/kvpack.v1.KVStore/PutWhole")  # raw bytes out
        code, _ = _status(lambda: put_whole(garbage, timeout=5))
    assert code is grpc.StatusCode.INTERNAL  # as for any undecodable protobuf request
    assert stub.Stats(kvstore_pb2.StatsRequest()).blocks == 0


def test_allocator_thresholds_apply_with_glibc():
    reply = subprocess.run(
        [sys.executable, "-c",
         "from kvpack.common.allocator import keep_freed_memory; print(keep_freed_memory())"],
        capture_output=True, text=True, check=True).stdout.strip()
    assert reply == str(platform.libc_ver()[0] == "glibc")
