"""The kvstore through gRPC with its Python client, on the memory and the Redis backend."""

import urllib.request

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from kvpack.kvstore.client import InvalidRequest, KVStoreClient, Unauthenticated
from support.blocks import chain, random_record
from support.threads import run_in_threads


@pytest.mark.parametrize("payload_bytes", [1, 1000, (1 << 20) - 7, 3 << 20, 64 << 20])
def test_round_trip_from_one_byte_to_64_mib(store, payload_bytes):
    data = random_record("ns", payload_bytes)
    block_hash = chain(1, salt=payload_bytes)[0]
    with KVStoreClient(store.address) as client:
        client.put("ns", block_hash, data)
        assert client.get("ns", block_hash) == data


def test_match_counts_leading_present_hashes(store):
    hashes = chain(6)
    with KVStoreClient(store.address) as client:
        assert client.match("ns", hashes) == 0
        for index in (0, 1, 2, 4):
            client.put("ns", hashes[index], random_record("ns", 10))
        assert client.match("ns", hashes) == 3  # stops at the first gap (block 3)
        assert client.match("ns", hashes[4:]) == 1
        assert client.match("ns", []) == 0
        assert client.delete("ns", hashes[1]) is True
        assert client.delete("ns", hashes[1]) is False
        assert client.match("ns", hashes) == 1


def test_namespaces_are_isolated(store):
    block_hash = chain(1)[0]
    with KVStoreClient(store.address) as client:
        client.put("tenant-a", block_hash, random_record("tenant-a", 100))
        assert client.match("tenant-b", [block_hash]) == 0
        assert client.get("tenant-b", block_hash) is None
        assert client.delete("tenant-b", block_hash) is False
        assert client.get("tenant-a", block_hash) is not None
        with pytest.raises(InvalidRequest, match="another namespace"):  # record written for a
            client.put("tenant-b", block_hash, random_record("tenant-a", 100))


def test_many_client_threads_at_once(store):
    errors = []

    def worker(thread_index: int) -> None:
        try:
            with KVStoreClient(store.address) as client:
                hashes = chain(20, salt=thread_index)
                records = [random_record("ns", 2000 + i) for i in range(20)]
                for block_hash, data in zip(hashes, records, strict=True):
                    client.put("ns", block_hash, data)
                assert client.match("ns", hashes) == 20
                for block_hash, data in zip(hashes, records, strict=True):
                    assert client.get("ns", block_hash) == data
        except Exception as error:  # collected and asserted below
            errors.append(error)

    run_in_threads(worker, 12)
    assert errors == []
    with KVStoreClient(store.address) as client:
        stats = client.stats()
    assert stats["blocks"] == 240 and stats["hits"] == 240 and stats["backend_healthy"]


def test_record_over_the_limit_is_resource_exhausted(kvstore_factory):
    server = kvstore_factory(max_record_bytes=1 << 20)
    with KVStoreClient(server.address) as client:
        with pytest.raises(InvalidRequest, match="maximum record size"):
            client.put("ns", chain(1)[0], random_record("ns", 2 << 20))
        assert client.stats()["blocks"] == 0


def test_memory_capacity_bounds_the_store_under_load(kvstore_factory):
    server = kvstore_factory(capacity_bytes=1 << 20)
    hashes = chain(200)
    with KVStoreClient(server.address) as client:
        for block_hash in hashes:
            client.put("ns", block_hash, random_record("ns", 20_000))
        stats = client.stats()
        assert stats["bytes"] <= 1 << 20
        assert stats["evictions"] == 200 - stats["blocks"] > 0
        assert client.match("ns", hashes[-stats["blocks"]:]) == stats["blocks"]  # newest kept
        assert client.get("ns", hashes[0]) is None


def test_token_is_required_when_set(kvstore_factory):
    server = kvstore_factory(token="s3cret")
    block_hash = chain(1)[0]
    for token in (None, "wrong"):
        with KVStoreClient(server.address, token=token) as client:
            with pytest.raises(Unauthenticated):
                client.match("ns", [block_hash])
            with pytest.raises(Unauthenticated):
                client.put("ns", block_hash, random_record("ns", 10))
            with pytest.raises(Unauthenticated):
                client.get("ns", block_hash)
    with KVStoreClient(server.address, token="s3cret") as client:
        client.put("ns", block_hash, random_record("ns", 10))
        assert client.match("ns", [block_hash]) == 1
    with grpc.insecure_channel(server.address) as channel:  # probes need no token
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""))
        assert reply.status == health_pb2.HealthCheckResponse.SERVING


def test_reflection_lists_the_services(kvstore):
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    with grpc.insecure_channel(kvstore.address) as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        replies = stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(
            list_services="")]))
        names = {s.name for reply in replies for s in reply.list_services_response.service}
    assert {"kvpack.v1.KVStore", "grpc.health.v1.Health"} <= names


def test_metrics_endpoint_reports_requests_and_usage(kvstore_factory):
    server = kvstore_factory(metrics_port=0)
    hashes = chain(3)
    with KVStoreClient(server.address) as client:
        client.put("ns", hashes[0], random_record("ns", 5000))
        client.get("ns", hashes[0])
        client.get("ns", hashes[1])
        client.match("ns", hashes)
    text = urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}/metrics").read().decode()
    samples = {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
               for line in text.splitlines() if line and not line.startswith("#")}
    assert samples['kvpack_kvstore_request_seconds_count{op="put"}'] == 1
    assert samples['kvpack_kvstore_request_seconds_count{op="get"}'] == 2
    assert samples["kvpack_kvstore_hits_total"] == 1 and samples["kvpack_kvstore_misses_total"] == 1
    assert samples["kvpack_kvstore_match_query_blocks_total"] == 3
    assert samples["kvpack_kvstore_match_hit_blocks_total"] == 1
    assert samples["kvpack_kvstore_blocks"] == 1 and samples["kvpack_kvstore_bytes"] > 5000
    assert samples["kvpack_kvstore_evictions_total"] == 0
    assert samples["kvpack_kvstore_corrupt_blocks_total"] == 0
    assert samples["kvpack_kvstore_backend_up"] == 1


@pytest.mark.parametrize("streams", [1, 3])
def test_get_many_returns_blocks_in_order_with_misses(store, streams):
    hashes = chain(5)
    records = {i: random_record("ns", 5_000_000 if i == 1 else 100 + i) for i in (0, 1, 3)}
    with KVStoreClient(store.address, chunk_bytes=1 << 20, streams=streams) as client:
        for index, data in records.items():
            client.put("ns", hashes[index], data)
        assert client.get_many("ns", hashes) == [records.get(i) for i in range(5)]
        assert client.get_many("other", hashes) == [None] * 5
        assert client.get_many("ns", []) == []
