"""kvpack.kvstore.wire writes and reads exactly what the generated protobuf classes do."""

import pytest
from google.protobuf.message import DecodeError
from hypothesis import given, settings
from hypothesis import strategies as st
from kvpack.kvstore import wire
from kvpack.proto import kvstore_pb2

uint64 = st.integers(0, 2**64 - 1)
put_chunks = st.builds(kvstore_pb2.PutChunk, namespace=st.text(max_size=20),
                       block_hash=st.binary(max_size=40), total_bytes=uint64, offset=uint64,
                       data=st.binary(max_size=300), upload_id=st.binary(max_size=20))
get_chunks = st.builds(kvstore_pb2.GetChunk, found=st.booleans(), total_bytes=uint64,
                       offset=uint64, data=st.binary(max_size=300), index=st.integers(0, 2**32 - 1))


def _put_fields(chunk) -> tuple:
    return (chunk.namespace, bytes(chunk.block_hash), chunk.total_bytes, chunk.offset,
            bytes(chunk.data), bytes(chunk.upload_id))


def _get_fields(chunk) -> tuple:
    return chunk.found, chunk.total_bytes, chunk.offset, bytes(chunk.data), chunk.index


@given(put_chunks)
def test_put_chunk_both_ways(chunk):
    encoded = wire.encode_put_chunk(*_put_fields(chunk))
    assert encoded == chunk.SerializeToString()  # proto3 canonical form, byte for byte
    assert _put_fields(kvstore_pb2.PutChunk.FromString(encoded)) == _put_fields(chunk)
    assert _put_fields(wire.decode_put_chunk(chunk.SerializeToString())) == _put_fields(chunk)


@given(get_chunks)
def test_get_chunk_both_ways(chunk):
    encoded = wire.encode_get_chunk(*_get_fields(chunk))
    assert _get_fields(kvstore_pb2.GetChunk.FromString(encoded)) == _get_fields(chunk)
    assert _get_fields(wire.decode_get_chunk(chunk.SerializeToString())) == _get_fields(chunk)


def test_data_is_a_view_into_the_message():
    message = wire.encode_put_chunk("ns", b"h" * 32, 5, 0, b"12345")
    data = wire.decode_put_chunk(message).data
    assert isinstance(data, memoryview) and data.obj is message and data == b"12345"


@given(st.lists(put_chunks, min_size=1, max_size=3), st.binary(max_size=30))
def test_concatenated_messages_and_unknown_fields_parse_like_protobuf(chunks, unknown_value):
    # Protobuf merges concatenated messages (the last scalar wins) and skips unknown fields.
    unknown = bytes([15 << 3 | 2, len(unknown_value)]) + unknown_value  # field 15, bytes
    message = b"".join(chunk.SerializeToString() + unknown for chunk in chunks)
    assert _put_fields(wire.decode_put_chunk(message)) == _put_fields(
        kvstore_pb2.PutChunk.FromString(message))


@settings(max_examples=500)
@given(st.binary(max_size=60))
def test_arbitrary_bytes_decode_like_protobuf_or_fail(message):
    """Whatever protobuf rejects is rejected; whatever is accepted reads the same as protobuf."""
    for decode, message_class, fields in (
            (wire.decode_put_chunk, kvstore_pb2.PutChunk, _put_fields),
            (wire.decode_get_chunk, kvstore_pb2.GetChunk, _get_fields)):
        try:
            ours = fields(decode(message))
        except ValueError:
            continue  # protobuf may accept it (groups), or reject it too
        assert ours == fields(message_class.FromString(message))


@pytest.mark.parametrize("message", [
    b"\x0a\x05ns",  # a length running past the end
    b"\x18\xff\xff",  # a truncated varint
    b"\x18" + b"\xff" * 10 + b"\x01",  # a varint longer than 10 bytes
    b"\x00\x01",  # field number 0
    b"\x0a\x02\xff\xfe",  # namespace that is not UTF-8
])
def test_malformed_messages_fail_in_both(message):
    with pytest.raises(ValueError):
        wire.decode_put_chunk(message)
    with pytest.raises(DecodeError):
        kvstore_pb2.PutChunk.FromString(message)


@given(st.binary(max_size=300), st.integers(0, 2**32 - 1), st.integers(0, 40))
def test_framed_chunk_reads_like_the_encoded_one(data, index, extra_room):
    room = wire.HEAD_ROOM + extra_room
    buffer = memoryview(bytearray(b"\xee" * room + data))
    framed = wire.frame_get_chunk(buffer, room, index)
    expected = (True, len(data), 0, data, index) if data else (True, 0, 0, b"", index)
    assert _get_fields(kvstore_pb2.GetChunk.FromString(framed)) == expected
    assert _get_fields(wire.decode_get_chunk(framed)) == expected


@given(st.binary(max_size=300), uint64, uint64, st.integers(0, 2**32 - 1))
def test_framed_range_reads_like_the_encoded_one(data, total_bytes, offset, index):
    buffer = memoryview(bytearray(b"\xee" * wire.HEAD_ROOM + data))  # the room at its smallest
    framed = wire.frame_get_chunk(buffer, wire.HEAD_ROOM, index, total_bytes=total_bytes,
                                  offset=offset)
    expected = (True, total_bytes, offset, data, index)
    assert _get_fields(kvstore_pb2.GetChunk.FromString(framed)) == expected
    assert _get_fields(wire.decode_get_chunk(framed)) == expected


def test_framing_needs_room_for_the_head():
    with pytest.raises(ValueError, match="spare bytes"):
        wire.frame_get_chunk(memoryview(bytearray(b"\0" * 3 + b"data")), 3)
