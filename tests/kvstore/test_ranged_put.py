"""Ranged Put (PutWhole with PutChunk.upload_id) on every backend, and KVStoreClient.put sending a
large record as parallel ranges: round trips, nothing visible before the last range, abandoned
uploads, corrupt ranges, concurrent puts of one key, servers without ranged puts, a dead Redis,
malformed ranges."""

import os
import threading
import time

import grpc
import pytest
import redis
from hypothesis import given, settings
from hypothesis import strategies as st
from kvpack.common import record
from kvpack.common.grpc_server import CHANNEL_OPTIONS
from kvpack.common.hashing import namespace_fingerprint
from kvpack.kvstore import servicer as servicer_module
from kvpack.kvstore.backends import block_key
from kvpack.kvstore.client import InvalidRequest, KVStoreClient, StoreUnavailable
from kvpack.kvstore.protocol import DEFAULT_PUT_RANGES, PUT_RANGE_BYTES
from kvpack.proto import kvstore_pb2, kvstore_pb2_grpc
from support.blocks import chain, make_record, random_record
from support.processes import wait_for

MiB = 1 << 20


@pytest.fixture
def stub_of():
    channels = []

    def open_stub(server):
        channel = grpc.insecure_channel(server.address, options=CHANNEL_OPTIONS)
        channels.append(channel)
        return kvstore_pb2_grpc.KVStoreStub(channel)

    yield open_stub
    for channel in channels:
        channel.close()


def _range(stub, data: bytes, offset: int, length: int, upload_id: bytes, *,
           namespace: str = "ns", block_hash: bytes | None = None, total: int | None = None):
    return stub.PutWhole(kvstore_pb2.PutChunk(
        namespace=namespace, block_hash=block_hash or chain(1)[0],
        total_bytes=len(data) if total is None else total, offset=offset,
        data=data[offset : offset + length], upload_id=upload_id))


def _status(call):
    with pytest.raises(grpc.RpcError) as info:
        call()
    return info.value.code(), info.value.details()


def _uploads(server) -> dict:
    value = server.metrics.value
    return {event: value("kvpack_kvstore_uploads_total", event=event)
            for event in ("staged", "committed", "refused", "abandoned")}


def _nothing_staged(server) -> bool:
    return server.servicer.uploads.open_count() == 0


def _upload_id() -> bytes:
    return os.urandom(16)


# -- the verifier the service checks ranges with --------------------------------------------------

def _flip(data: bytes, at: int) -> bytes:
    return data[:at] + bytes([data[at] ^ 1]) + data[at + 1 :]


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 300), st.lists(st.integers(1, 400), max_size=5), st.integers(0, 4),
       st.integers(0, 10**6))
def test_record_verifier_agrees_with_verify(payload_bytes, cuts, damage, where):
    """Fed in pieces, in order, it raises what record.verify raises on the whole bytes (or passes
    where verify passes), for intact and damaged records."""
    data = make_record("ns", os.urandom(payload_bytes), codec="c")
    data = [data, _flip(data, where % len(data)), data[: where % len(data)],
            make_record("other", b"x" * payload_bytes), b"garbage" * (where % 9)][damage]
    try:
        record.verify(data, "ns")
        expected = None
    except record.RecordError as error:
        expected = str(error)
    verifier = record.RecordVerifier(len(data), "ns")
    at = 0
    for cut in [*cuts, len(data)]:
        verifier.update(data[at : at + cut])
        at += cut
        if at >= len(data):
            break
    try:
        verifier.finish()
        got = None
    except record.RecordError as error:
        got = str(error)
    assert got == expected


# -- round trips -------------------------------------------------------------------------------

@pytest.mark.parametrize("payload_bytes", [2 * MiB - 1000, 2 * MiB + 1, 5 * MiB + 7])
def test_client_round_trips_around_the_threshold_on_every_backend(any_store, payload_bytes):
    """With 1 MiB ranges: just under 2 ranges' worth is one call, over it 2 ranges, 5 MiB 4."""
    data = random_record("ns", payload_bytes)
    hashes = chain(2, salt=payload_bytes)
    with KVStoreClient(any_store.address, put_range_bytes=MiB, put_ranges=4) as client:
        client.put("ns", hashes[0], data)
        assert client.get("ns", hashes[0]) == data
        client.put("ns", hashes[0], data)  # again, over the stored record
        assert client.get("ns", hashes[0]) == data
        assert client.get("ns", hashes[1]) is None
    ranged = len(data) >= 2 * MiB
    ranges = min(4, len(data) // MiB) if ranged else 0
    assert _uploads(any_store) == {"staged": 2.0 * ranged, "committed": 2.0 * ranged,
                                   "refused": 0, "abandoned": 0}
    assert any_store.metrics.value("kvpack_kvstore_upload_ranges_total") == 2 * ranges
    assert any_store.metrics.value("kvpack_kvstore_put_bytes_total") == 2 * len(data)
    assert _nothing_staged(any_store)


@pytest.mark.parametrize("record_bytes", [2 * PUT_RANGE_BYTES - 1, 2 * PUT_RANGE_BYTES,
                                          DEFAULT_PUT_RANGES * PUT_RANGE_BYTES + 5])
def test_the_defaults(store, record_bytes):
    """A record of at least 2 x PUT_RANGE_BYTES goes in ranges, at most DEFAULT_PUT_RANGES."""
    data = random_record("ns", 1000)
    data = random_record("ns", record_bytes - (len(data) - 1000))
    assert len(data) == record_bytes
    with KVStoreClient(store.address) as client:
        client.put("ns", chain(1)[0], data)
        assert client.get("ns", chain(1)[0]) == data
    ranges = min(DEFAULT_PUT_RANGES, record_bytes // PUT_RANGE_BYTES)
    assert store.metrics.value("kvpack_kvstore_upload_ranges_total") == (
        ranges if ranges > 1 else 0)


def test_one_call_when_put_ranges_is_1(store):
    data = random_record("ns", 5 * MiB)
    with KVStoreClient(store.address, put_ranges=1) as client:
        client.put("ns", chain(1)[0], data)
        assert client.get("ns", chain(1)[0]) == data
    assert _uploads(store)["staged"] == 0


def test_redis_holds_only_the_record_with_the_service_ttl(redis_server, kvstore_factory):
    server = kvstore_factory(backend=redis_server.url, ttl_seconds=300)
    data = random_record("ns", 3 * MiB)
    with KVStoreClient(server.address, put_range_bytes=MiB) as client:
        client.put("ns", chain(1)[0], data)
    raw = redis_server.client()
    key = block_key(namespace_fingerprint("ns"), chain(1)[0])
    assert raw.keys("*") == [key.encode()]  # no staging left behind
    assert raw.get(key) == data and 0 < raw.ttl(key) <= 300


# -- nothing partial visible; corrupt, abandoned, refused uploads --------------------------------

def test_nothing_is_visible_before_the_last_range(any_store, stub_of):
    stub = stub_of(any_store)
    data = random_record("ns", 3 * MiB)
    block_hash, upload = chain(1, salt=78)[0], _upload_id()  # unused by the module's other tests
    third = -(-len(data) // 3)
    with KVStoreClient(any_store.address) as client:
        answers = []
        for offset in (2 * third, 0):  # out of order
            answers.append(_range(stub, data, offset, third, upload, block_hash=block_hash))
            assert client.get("ns", block_hash) is None
            assert client.match("ns", [block_hash]) == 0
        assert [(a.stored_bytes, a.staged_bytes) for a in answers] == [
            (0, len(data) - 2 * third), (0, len(data) - third)]
        last = _range(stub, data, third, third, upload, block_hash=block_hash)
        assert (last.stored_bytes, last.staged_bytes) == (len(data), len(data))
        assert client.get("ns", block_hash) == data
        again = _range(stub, data, third, third, upload, block_hash=block_hash)  # a retry
        assert again.stored_bytes == len(data)
    assert _uploads(any_store)["committed"] == 1 and _nothing_staged(any_store)


@pytest.mark.parametrize("damage", ["flipped", "other-namespace", "short-header"])
def test_a_record_that_fails_verification_is_refused_and_nothing_stored(store, stub_of, damage):
    stub = stub_of(store)
    good = random_record("ns", 2 * MiB)
    data = {"flipped": _flip(good, len(good) // 2 + 10),
            "other-namespace": random_record("other", 2 * MiB),
            "short-header": b"KVPB" + good[4:]}[damage]
    if damage == "short-header":
        data = data[:4] + b"\x07\x00" + data[6:]  # an unknown version
    upload, half = _upload_id(), len(data) // 2
    assert _range(stub, data, half, len(data), upload).stored_bytes == 0
    code, details = _status(lambda: _range(stub, data, 0, half, upload))
    assert code is grpc.StatusCode.INVALID_ARGUMENT and details.startswith("data: "), details
    code, details = _status(lambda: _range(stub, data, 0, half, upload))  # the upload ended
    assert code is grpc.StatusCode.INVALID_ARGUMENT and details.startswith("upload_id: ")
    with KVStoreClient(store.address, put_range_bytes=MiB) as client:
        assert client.get("ns", chain(1)[0]) is None
        with pytest.raises(InvalidRequest, match="^data: "):  # ranges, then one call: refused
            client.put("ns", chain(1)[0], data)
        assert client.get("ns", chain(1)[0]) is None
    assert _uploads(store) == {"staged": 2, "committed": 0, "refused": 2, "abandoned": 0}
    assert _nothing_staged(store)


def test_abandoned_uploads_expire_and_leave_nothing(any_store_ttl, stub_of):
    server = any_store_ttl
    stub = stub_of(server)
    data = random_record("ns", 2 * MiB)
    upload = _upload_id()
    _range(stub, data, 0, MiB, upload)
    assert server.metrics.value("kvpack_kvstore_uploads_open") == 1
    wait_for(lambda: _uploads(server)["abandoned"] == 1, timeout_seconds=10)  # the health loop
    assert _nothing_staged(server)
    assert server.metrics.value("kvpack_kvstore_uploads_open") == 0
    code, details = _status(lambda: _range(stub, data, MiB, len(data), upload))
    assert code is grpc.StatusCode.INVALID_ARGUMENT and details.startswith("upload_id: ")
    assert "abandoned" in details
    with KVStoreClient(server.address) as client:
        assert client.get("ns", chain(1)[0]) is None
    if server.config.backend.startswith("redis"):  # the unfinished SET went with its connection
        assert redis.Redis.from_url(server.config.backend).keys("*") == []


@pytest.fixture(params=["memory", "redis"])
def any_store_ttl(request, kvstore_factory):
    """A store whose uploads expire after 0.3 s."""
    backend = ("memory://" if request.param == "memory"
               else request.getfixturevalue("redis_server").url)
    return kvstore_factory(backend=backend, upload_ttl_seconds=0.3)


def test_staging_is_bounded(kvstore_factory, stub_of):
    server = kvstore_factory(max_staged_bytes=5 * MiB)
    stub = stub_of(server)
    data = random_record("ns", 3 * MiB)
    _range(stub, data, 0, MiB, _upload_id())  # 3 MiB of 5 open
    code, details = _status(lambda: _range(stub, data, 0, MiB, _upload_id()))
    assert code is grpc.StatusCode.RESOURCE_EXHAUSTED and details.startswith("total_bytes: ")
    with KVStoreClient(server.address, put_range_bytes=MiB) as client:  # falls back to one call
        client.put("ns", chain(1)[0], data)
        assert client.get("ns", chain(1)[0]) == data


# -- concurrency --------------------------------------------------------------------------------

def test_concurrent_puts_of_one_key_leave_one_whole_record(any_store):
    records = [random_record("ns", 2 * MiB + 100 * i) for i in range(4)]
    block_hash = chain(1, salt=77)[0]  # a key no other test of the module's cluster uses
    seen, errors = [], []
    done = threading.Event()

    def write(data):
        try:
            with KVStoreClient(any_store.address, put_range_bytes=MiB // 2) as client:
                for _ in range(3):
                    client.put("ns", block_hash, data)
        except Exception as error:  # noqa: BLE001 - reported below
            errors.append(error)

    def read():
        with KVStoreClient(any_store.address) as client:
            while not done.is_set():
                seen.append(client.get("ns", block_hash))

    reader = threading.Thread(target=read)
    reader.start()
    writers = [threading.Thread(target=write, args=(data,)) for data in records]
    for thread in writers:
        thread.start()
    for thread in writers:
        thread.join()
    done.set()
    reader.join()
    assert not errors
    bad = [value for value in seen if value is not None and value not in records]
    assert not bad, [(type(v), len(v), [len(r) for r in records]) for v in bad[:3]]  # never a mix
    with KVStoreClient(any_store.address) as client:
        assert client.get("ns", block_hash) in records
    assert _uploads(any_store)["committed"] == 12 and _nothing_staged(any_store)
    assert any_store.metrics.value("kvpack_kvstore_corrupt_blocks_total") == 0


# -- old servers, dead Redis ---------------------------------------------------------------------

def test_client_against_a_server_without_ranged_puts(store, monkeypatch):
    """A server from before ranged puts reads a range as a whole-record PutWhole and refuses it
    (offset, or an early end): the client puts the record in one call and stops sending ranges."""
    monkeypatch.setattr(servicer_module, "_upload_of", lambda chunk: b"")
    data = random_record("ns", 4 * MiB)
    with KVStoreClient(store.address, put_range_bytes=2 * MiB) as client:  # 2 ranges
        for index in range(3):
            client.put("ns", chain(3)[index], data)
            assert client.get("ns", chain(3)[index]) == data
    value = store.metrics.value
    assert value("kvpack_kvstore_requests_total", op="put", code="INVALID_ARGUMENT") == 2
    assert value("kvpack_kvstore_requests_total", op="put", code="OK") == 3
    assert _uploads(store)["staged"] == 0


def test_dead_redis_fails_a_ranged_put_fast(redis_server, kvstore_factory):
    server = kvstore_factory(backend=redis_server.url)
    data = random_record("ns", 4 * MiB)
    with KVStoreClient(server.address, retries=0, put_range_bytes=MiB) as client:
        client.put("ns", chain(2)[0], data)
        redis_server.stop()
        start = time.monotonic()
        with pytest.raises(StoreUnavailable):
            client.put("ns", chain(2)[1], data)
        assert time.monotonic() - start < 4.0  # bounded timeouts, no hang
        assert _nothing_staged(server)
        redis_server.start()
        wait_for(lambda: server.metrics.value("kvpack_kvstore_backend_up") == 1)
        client.put("ns", chain(2)[1], data)  # recovered by itself
        assert client.get("ns", chain(2)[1]) == data


# -- malformed ranges ----------------------------------------------------------------------------

def test_malformed_ranges_are_invalid_argument_naming_the_field(kvstore_factory, stub_of):
    server = kvstore_factory(max_record_bytes=8 * MiB)
    stub = stub_of(server)
    data = random_record("ns", MiB)
    size, upload = len(data), _upload_id()
    _range(stub, data, 0, 1000, upload)  # the upload's first range: [0, 1000)
    cases = [
        (dict(upload_id=b"short"), 0, 10, "upload_id: expected 16 bytes, got 5"),
        (dict(), size, 10, "offset: "),  # at the end
        (dict(), 2**64 - 1, 10, "offset: "),
        (dict(), size - 5, 10, None),  # [size-5, size) is fine: see below
        (dict(total=size + 1), 5000, 10, "total_bytes: differs"),
        (dict(block_hash=chain(2)[1]), 5000, 10, "block_hash: differs"),
        (dict(namespace=""), 5000, 10, "namespace: must not be empty"),
        (dict(), 500, 1000, "offset: range [500, 1500) overlaps [0, 1000)"),
        (dict(), 999, 1, "offset: range [999, 1000) overlaps"),
        (dict(total=0), 0, 10, "total_bytes: must be positive"),
    ]
    for fields, offset, length, expected in cases:
        fields.setdefault("upload_id", upload)
        def call(fields=fields, offset=offset, length=length):
            return _range(stub, data, offset, length, **fields)

        if expected is None:
            assert call().staged_bytes == 1005
            continue
        code, details = _status(call)
        assert code is grpc.StatusCode.INVALID_ARGUMENT, (fields, offset, details)
        assert details.startswith(expected), (fields, offset, details)
    code, details = _status(lambda: stub.PutWhole(kvstore_pb2.PutChunk(  # past the record's end
        namespace="ns", block_hash=chain(1)[0], total_bytes=size, offset=size - 2, data=b"abc",
        upload_id=upload)))
    assert code is grpc.StatusCode.INVALID_ARGUMENT and details.startswith("data: range")
    code, details = _status(lambda: stub.PutWhole(kvstore_pb2.PutChunk(
        namespace="ns", block_hash=chain(1)[0], total_bytes=size, offset=5000, upload_id=upload)))
    assert code is grpc.StatusCode.INVALID_ARGUMENT and details == (
        "data: a range must not be empty")
    code, details = _status(lambda: _range(stub, data, 0, 10, _upload_id(), total=9 * MiB))
    assert code is grpc.StatusCode.RESOURCE_EXHAUSTED and details.startswith("total_bytes: ")
    code, details = _status(lambda: stub.Put(iter([kvstore_pb2.PutChunk(
        namespace="ns", block_hash=chain(1)[0], total_bytes=size, data=data,
        upload_id=_upload_id())])))
    assert code is grpc.StatusCode.INVALID_ARGUMENT and details.startswith("upload_id: ")
    # the refusals changed nothing: the upload still completes
    assert _range(stub, data, 1000, size - 1005, upload).stored_bytes == size
    with KVStoreClient(server.address) as client:
        assert client.get("ns", chain(1)[0]) == data
    assert _uploads(server) == {"staged": 1, "committed": 1, "refused": 0, "abandoned": 0}


def test_redis_writers_stream_one_set_or_hold_when_the_pool_is_full(redis_server):
    """RedisBackend.open_upload: nothing exists before commit, an abort leaves nothing, and past
    its pool's connections a writer holds its pieces and SETs them at commit."""
    from kvpack.kvstore.backends.redis import RedisBackend

    backend = RedisBackend(redis_server.url)
    backend._upload_pool = redis.ConnectionPool.from_url(redis_server.url, max_connections=1)
    raw = redis_server.client()
    try:
        pieces = [os.urandom(100_000) for _ in range(3)]
        first, second, dropped = (backend.open_upload(name, 300_000) for name in "abc")
        for piece in pieces:
            first.write(memoryview(piece))  # streams: the pool's one connection
            second.write(memoryview(piece))  # holds
        assert raw.keys("*") == []
        first.commit()
        assert raw.get("a") == b"".join(pieces) and not raw.exists("b")
        second.commit()
        assert raw.get("b") == b"".join(pieces)
        dropped.write(memoryview(pieces[0]))  # the connection is free again: streams
        dropped.abort()
        dropped.abort()
        assert not raw.exists("c")
        again = backend.open_upload("c", 100_000)
        again.write(memoryview(pieces[1]))
        again.commit()
        assert raw.get("c") == pieces[1]
    finally:
        backend.close()
