"""The Redis backend under damage: corrupted values, a dead Redis, a restarted Redis, TTL."""

import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from kvpack.common.hashing import namespace_fingerprint
from kvpack.kvstore.backends import block_key
from kvpack.kvstore.client import KVStoreClient, StoreUnavailable
from kvpack.kvstore.protocol import WHOLE_RECORD_BYTES
from support.blocks import assert_damage_is_a_counted_miss, chain, random_record
from support.processes import wait_for


def _health(address: str) -> int:
    with grpc.insecure_channel(address) as channel:
        return health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service="kvpack.v1.KVStore"), timeout=2).status


def _corrupt_flip(value: bytes) -> bytes:
    middle = len(value) // 2
    return value[:middle] + bytes([value[middle] ^ 0x40]) + value[middle + 1:]


@pytest.mark.parametrize("whole_record_bytes", [WHOLE_RECORD_BYTES, 0], ids=["whole", "streamed"])
@pytest.mark.parametrize(
    "damage", [_corrupt_flip, lambda v: v[:-100], lambda v: v[:10], lambda v: b""])
def test_corruption_written_into_redis_is_a_counted_miss(redis_server, kvstore_factory, damage,
                                                         whole_record_bytes):
    server = kvstore_factory(backend=redis_server.url)
    block_hash = chain(1)[0]
    data = random_record("ns", 10_000)
    with KVStoreClient(server.address, whole_record_bytes=whole_record_bytes) as client:
        client.put("ns", block_hash, data)
        assert_damage_is_a_counted_miss(client, redis_server.client(), "ns", block_hash, data,
                                        damage)


def test_record_moved_under_another_namespace_is_a_counted_miss(redis_server, kvstore_factory):
    server = kvstore_factory(backend=redis_server.url)
    block_hash = chain(1)[0]
    with KVStoreClient(server.address) as client:
        client.put("tenant-a", block_hash, random_record("tenant-a", 100))
        raw = redis_server.client()
        value = raw.get(block_key(namespace_fingerprint("tenant-a"), block_hash))
        raw.set(block_key(namespace_fingerprint("tenant-b"), block_hash), value)
        assert client.match("tenant-b", [block_hash]) == 1  # present, but ...
        assert client.get("tenant-b", block_hash) is None  # ... never served to tenant-b
        assert client.stats()["corrupt_blocks"] == 1


def test_dead_redis_fails_fast_and_recovers_by_itself(redis_server, kvstore_factory):
    server = kvstore_factory(backend=redis_server.url)
    hashes = chain(4)
    with KVStoreClient(server.address, retries=0) as client:
        client.put("ns", hashes[0], random_record("ns", 1000))
        redis_server.stop()
        for call in (lambda: client.match("ns", hashes), lambda: client.get("ns", hashes[0]),
                     lambda: client.put("ns", hashes[1], random_record("ns", 1000)),
                     lambda: client.delete("ns", hashes[0])):
            start = time.monotonic()
            with pytest.raises(StoreUnavailable):
                call()
            assert time.monotonic() - start < 4.0  # bounded timeouts, no hang
        wait_for(lambda: _health(server.address) == health_pb2.HealthCheckResponse.NOT_SERVING)
        assert client.stats()["backend_errors"] >= 4  # the service itself stays up
        redis_server.start()  # same port, empty (no persistence)
        wait_for(lambda: _health(server.address) == health_pb2.HealthCheckResponse.SERVING)
        client.put("ns", hashes[1], random_record("ns", 1000))
        assert client.match("ns", hashes[1:]) == 1


def test_ttl_expires_blocks_in_redis(redis_server, kvstore_factory):
    server = kvstore_factory(backend=redis_server.url, ttl_seconds=1)
    block_hash = chain(1)[0]
    with KVStoreClient(server.address) as client:
        client.put("ns", block_hash, random_record("ns", 100))
        key = block_key(namespace_fingerprint("ns"), block_hash)
        assert 0 < redis_server.client().ttl(key) <= 1
        wait_for(lambda: client.match("ns", [block_hash]) == 0, timeout_seconds=5)


def test_redis_lru_eviction_is_reported(tmp_path, kvstore_factory):
    from support.processes import RedisServer

    redis_server = RedisServer(tmp_path / "lru", extra_args=(
        "--maxmemory", "4mb", "--maxmemory-policy", "allkeys-lru")).start()
    try:
        server = kvstore_factory(backend=redis_server.url)
        with KVStoreClient(server.address) as client:
            for block_hash in chain(60):
                client.put("ns", block_hash, random_record("ns", 200_000))
            stats = client.stats()
        assert stats["evictions"] > 0 and stats["blocks"] < 60
        assert stats["capacity_bytes"] == 4 << 20
    finally:
        redis_server.stop()
