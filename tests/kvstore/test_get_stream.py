"""Get of a large record: the service streams it in GET_CHUNK_BYTES chunks, and KVStoreClient.get
with get_ranges=1 fetches records over STREAMED_GET_BYTES that way (GetWhole for smaller ones),
returning as soon as the record is whole. (The default, ranges: test_ranged_get.py.)"""

import grpc
from kvpack.common.grpc_server import CHANNEL_OPTIONS
from kvpack.kvstore.client import KVStoreClient
from kvpack.kvstore.protocol import STREAMED_GET_BYTES
from kvpack.kvstore.servicer import GET_CHUNK_BYTES
from kvpack.proto import kvstore_pb2, kvstore_pb2_grpc
from support.blocks import chain, random_record


def _chunks(address: str, namespace: str, block_hash: bytes) -> list:
    with grpc.insecure_channel(address, options=CHANNEL_OPTIONS) as channel:
        stub = kvstore_pb2_grpc.KVStoreStub(channel)
        return list(stub.Get(kvstore_pb2.GetRequest(namespace=namespace, block_hash=block_hash)))


def test_get_streams_a_large_record_in_chunks_of_get_chunk_bytes(store):
    data = random_record("ns", 3 * GET_CHUNK_BYTES + 1000)
    block_hash = chain(1)[0]
    with KVStoreClient(store.address) as client:
        client.put("ns", block_hash, data)
    chunks = _chunks(store.address, "ns", block_hash)
    assert len(chunks) == 4 and all(len(c.data) <= GET_CHUNK_BYTES for c in chunks)
    assert [c.offset for c in chunks] == [i * GET_CHUNK_BYTES for i in range(4)]
    assert chunks[0].found and chunks[0].total_bytes == len(data)
    assert b"".join(c.data for c in chunks) == data


def test_client_gets_small_and_large_records_and_the_service_sees_no_failed_call(store):
    small, large = random_record("small", 1000), random_record("large", STREAMED_GET_BYTES + 1)
    hashes = chain(2)
    with KVStoreClient(store.address, get_ranges=1) as client:  # large records as Get streams
        client.put("small", hashes[0], small)
        client.put("large", hashes[0], large)
        for _ in range(3):  # the first large get learns that this namespace streams
            assert client.get("small", hashes[0]) == small
            assert client.get("large", hashes[0]) == large
            assert client.get("large", hashes[1]) is None
    # get stops reading at the record's end and cancels the call: the service still counts OK
    value = store.metrics.value
    gets = {code: value("kvpack_kvstore_requests_total", op="get", code=code)
            for code in ("OK", "CANCELLED", "UNKNOWN")}
    assert gets == {"OK": 10, "CANCELLED": 0, "UNKNOWN": 0}  # 9 gets + 1 "too large" GetWhole
