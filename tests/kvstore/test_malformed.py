"""Malformed requests straight through the gRPC stub: right status, message names the field,
nothing stored."""

import grpc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from kvpack.proto import kvstore_pb2, kvstore_pb2_grpc
from support.blocks import chain, random_record


@pytest.fixture
def stub(kvstore):
    channel = grpc.insecure_channel(kvstore.address)
    yield kvstore_pb2_grpc.KVStoreStub(channel)
    channel.close()


def _status(call):
    with pytest.raises(grpc.RpcError) as info:
        call()
    return info.value.code(), info.value.details()


def _put(stub, chunks):
    return stub.Put(iter(chunks), timeout=10)


def _stored_blocks(stub) -> int:
    return stub.Stats(kvstore_pb2.StatsRequest()).blocks


GOOD_HASH = chain(1)[0]


@pytest.mark.parametrize("request_, field", [
    (kvstore_pb2.MatchRequest(namespace="", block_hashes=[GOOD_HASH]), "namespace"),
    (kvstore_pb2.MatchRequest(namespace="ns", block_hashes=[GOOD_HASH, b"short"]),
     "block_hashes[1]"),
    (kvstore_pb2.MatchRequest(namespace="x" * 600, block_hashes=[]), "namespace"),
])
def test_bad_match_names_the_field(stub, request_, field):
    code, details = _status(lambda: stub.Match(request_))
    assert code is grpc.StatusCode.INVALID_ARGUMENT and details.startswith(field)


@pytest.mark.parametrize("method", ["Get", "Delete"])
def test_bad_hash_length_names_the_field(stub, method):
    request_cls = {"Get": kvstore_pb2.GetRequest, "Delete": kvstore_pb2.DeleteRequest}[method]
    call = getattr(stub, method)
    if method == "Get":
        code, details = _status(
            lambda: list(call(request_cls(namespace="ns", block_hash=b"\0" * 31))))
    else:
        code, details = _status(lambda: call(request_cls(namespace="ns", block_hash=b"")))
    assert code is grpc.StatusCode.INVALID_ARGUMENT and details.startswith("block_hash")


def test_put_stream_defects_store_nothing(stub):
    data = random_record("ns", 1000)
    first = dict(namespace="ns", block_hash=GOOD_HASH, total_bytes=len(data))
    cases = {
        "stream ended before": [],
        "namespace": [kvstore_pb2.PutChunk(**{**first, "namespace": ""}, data=data)],
        "block_hash": [kvstore_pb2.PutChunk(**{**first, "block_hash": b"x"}, data=data)],
        "total_bytes": [kvstore_pb2.PutChunk(**{**first, "total_bytes": 0}, data=data)],
        "offset": [kvstore_pb2.PutChunk(**first, data=data[:500]),
                   kvstore_pb2.PutChunk(offset=600, data=data[500:])],
        "stream ended early": [kvstore_pb2.PutChunk(**first, data=data[:500])],
        "data: more than": [kvstore_pb2.PutChunk(**first, data=data + b"extra")],
        "chunk 1": [kvstore_pb2.PutChunk(**first, data=data[:500]),
                    kvstore_pb2.PutChunk(namespace="other", offset=500, data=data[500:])],
        "data: checksum": [kvstore_pb2.PutChunk(**first, data=data[:-1] + bytes([data[-1] ^ 1]))],
    }
    for expected, chunks in cases.items():
        code, details = _status(lambda chunks=chunks: _put(stub, chunks))
        assert code is grpc.StatusCode.INVALID_ARGUMENT, expected
        assert expected in details, (expected, details)
    assert _stored_blocks(stub) == 0
    _put(stub, [kvstore_pb2.PutChunk(**first, data=data[:500]),
                kvstore_pb2.PutChunk(offset=500, data=data[500:])])
    assert _stored_blocks(stub) == 1


chunk_strategy = st.builds(
    kvstore_pb2.PutChunk,
    namespace=st.sampled_from(["", "ns", "other"]),
    block_hash=st.sampled_from([b"", GOOD_HASH, b"\x01" * 32, b"\x02" * 5]),
    total_bytes=st.integers(0, 5000),
    offset=st.integers(0, 5000),
    data=st.binary(max_size=3000),
)


@settings(max_examples=150, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(chunks=st.lists(chunk_strategy, max_size=4))
def test_fuzzed_put_streams_never_crash_or_store_garbage(stub, chunks):
    try:
        _put(stub, chunks)
        stored = True
    except grpc.RpcError as error:
        assert error.code() in (grpc.StatusCode.INVALID_ARGUMENT,
                                grpc.StatusCode.RESOURCE_EXHAUSTED), error
        assert error.details()
        stored = False
    assert not stored  # random bytes are never a valid record
    assert _stored_blocks(stub) == 0


@settings(max_examples=100, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(namespace=st.text(max_size=40), hashes=st.lists(st.binary(max_size=40), max_size=5))
def test_fuzzed_match_requests(stub, namespace, hashes):
    request_ = kvstore_pb2.MatchRequest(namespace=namespace, block_hashes=hashes)
    if namespace and all(len(h) == 32 for h in hashes):
        assert stub.Match(request_).matched == 0
    else:
        code, _ = _status(lambda: stub.Match(request_))
        assert code is grpc.StatusCode.INVALID_ARGUMENT
