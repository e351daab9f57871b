"""Protobuf wire format of the two messages that carry record bytes: PutChunk and GetChunk.

The generated classes (kvpack.proto.kvstore_pb2) stay the definition of these messages; this module
writes and reads the same bytes without the protobuf runtime, because the runtime copies a block
three times on the way out (into the message, into its arena, into the serialized string: ~1 ms per
4 MiB) and once more on the way in, where a block needs exactly one copy into the message and none
out of it (`data` is a memoryview into the received message). Field numbers come from the
descriptors, so a renumbering in kvstore.proto cannot go unnoticed; tests/kvstore/test_wire.py
checks both directions against the generated classes.

Decoding follows protobuf's rules: fields in any order, the last occurrence wins, unknown fields are
skipped; anything protobuf would reject raises `ValueError` (gRPC then fails the call), and so do
groups (a wire type proto3 never writes).
"""

from __future__ import annotations

from typing import NamedTuple

from kvpack.proto import kvstore_pb2

_VARINT, _FIXED64, _LENGTH, _FIXED32 = 0, 1, 2, 5
_UINT64_MASK = (1 << 64) - 1
_MAX_FIELD_NUMBER = (1 << 29) - 1


class PutChunkView(NamedTuple):
    namespace: str
    block_hash: bytes
    total_bytes: int
    offset: int
    data: memoryview
    upload_id: bytes = b""  # ranged Put: the upload this range belongs to


class GetChunkView(NamedTuple):
    found: bool
    total_bytes: int
    offset: int
    data: memoryview
    index: int


def _numbers(message_class) -> dict[str, int]:
    return {field.name: field.number for field in message_class.DESCRIPTOR.fields}


_PUT = _numbers(kvstore_pb2.PutChunk)
_GET = _numbers(kvstore_pb2.GetChunk)


def _varint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _key(number: int, wire_type: int) -> bytes:
    return _varint(number << 3 | wire_type)


def _scalar(number: int, value: int) -> bytes:
    return _key(number, _VARINT) + _varint(value) if value else b""  # proto3: zero is not sent


def _length_prefix(number: int, length: int) -> bytes:
    return _key(number, _LENGTH) + _varint(length) if length else b""


def encode_put_chunk(namespace: str, block_hash: bytes, total_bytes: int, offset: int,
                     data: bytes | memoryview, upload_id: bytes = b"") -> bytes:
    namespace_bytes = namespace.encode()
    head = b"".join((
        _length_prefix(_PUT["namespace"], len(namespace_bytes)), namespace_bytes,
        _length_prefix(_PUT["block_hash"], len(block_hash)), block_hash,
        _scalar(_PUT["total_bytes"], total_bytes),
        _scalar(_PUT["offset"], offset),
        _length_prefix(_PUT["data"], len(data)),
    ))
    # the one copy of the block; upload_id after data, in field order as protobuf writes it
    return b"".join((head, data, _length_prefix(_PUT["upload_id"], len(upload_id)), upload_id))


def encode_get_chunk(found: bool, total_bytes: int = 0, offset: int = 0,
                     data: bytes | memoryview = b"", index: int = 0) -> bytes:
    head = b"".join((
        _scalar(_GET["found"], int(found)),
        _scalar(_GET["total_bytes"], total_bytes),
        _scalar(_GET["offset"], offset),
        _length_prefix(_GET["data"], len(data)),
    ))
    return b"".join((head, data, _scalar(_GET["index"], index)))


# Spare bytes a record needs in front of it for frame_get_chunk: the largest head it writes (found,
# total_bytes, offset, index and the data field's key and length, every varint at its longest).
HEAD_ROOM = 2 + 11 + 11 + 6 + 11


def frame_get_chunk(buffer: memoryview, start: int, index: int = 0, *,
                    total_bytes: int | None = None, offset: int = 0) -> bytes:
    """A GetChunk with the data `buffer[start:]` (found, index; total_bytes = its length unless
    given, offset), built in place: its head is written into the `start` spare bytes before the
    data (at least HEAD_ROOM, writable), so the data is copied once, into the message. A whole
    record is sent as is; a range of a record (GetWhole with a range) with the record's
    `total_bytes` and the range's `offset`.

    The head carries index before data (fields may come in any order; every protobuf parser reads
    the same message as encode_get_chunk's)."""
    size = len(buffer) - start
    head = b"".join((
        _scalar(_GET["found"], 1),
        _scalar(_GET["total_bytes"], size if total_bytes is None else total_bytes),
        _scalar(_GET["offset"], offset),
        _scalar(_GET["index"], index),
        _key(_GET["data"], _LENGTH) + _varint(size) if size else b"",
    ))
    if len(head) > start:
        raise ValueError(f"{start} spare bytes before the record, the head needs {len(head)}")
    buffer[start - len(head) : start] = head
    return bytes(buffer[start - len(head) :])  # the one copy of the record


def _read_varint(view: memoryview, at: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if at >= len(view) or shift > 63:
            raise ValueError("truncated or overlong varint")
        byte = view[at]
        at += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value & _UINT64_MASK, at
        shift += 7


def _fields(message: bytes) -> dict[tuple[int, int], int | memoryview]:
    """(field number, wire type) -> last value: int for varints, memoryview for length-delimited."""
    view = memoryview(message)
    fields: dict[tuple[int, int], int | memoryview] = {}
    at = 0
    while at < len(view):
        key, at = _read_varint(view, at)
        number, wire_type = key >> 3, key & 7
        if not 0 < number <= _MAX_FIELD_NUMBER:
            raise ValueError(f"field number {number} out of range")
        if wire_type == _VARINT:
            value, at = _read_varint(view, at)
        elif wire_type == _LENGTH:
            length, at = _read_varint(view, at)
            if at + length > len(view):
                raise ValueError("length-delimited field runs past the end of the message")
            value, at = view[at : at + length], at + length
        elif wire_type in (_FIXED64, _FIXED32):
            at += 8 if wire_type == _FIXED64 else 4
            if at > len(view):
                raise ValueError("fixed-width field runs past the end of the message")
            continue  # no field of these messages has a fixed-width type: unknown, skipped
        else:
            raise ValueError(f"unsupported wire type {wire_type}")
        fields[number, wire_type] = value
    return fields


def _typed(fields: dict, number: int, kind: type):
    """The field's last value with its declared wire type, else its default (protobuf keeps an
    occurrence with another wire type as an unknown field)."""
    if kind is int:
        return fields.get((number, _VARINT), 0)
    return fields.get((number, _LENGTH), memoryview(b""))


def decode_put_chunk(message: bytes) -> PutChunkView:
    fields = _fields(message)
    return PutChunkView(
        namespace=str(_typed(fields, _PUT["namespace"], memoryview), "utf-8"),
        block_hash=bytes(_typed(fields, _PUT["block_hash"], memoryview)),
        total_bytes=_typed(fields, _PUT["total_bytes"], int),
        offset=_typed(fields, _PUT["offset"], int),
        data=_typed(fields, _PUT["data"], memoryview),
        upload_id=bytes(_typed(fields, _PUT["upload_id"], memoryview)),
    )


def decode_get_chunk(message: bytes) -> GetChunkView:
    fields = _fields(message)
    return GetChunkView(
        found=bool(_typed(fields, _GET["found"], int)),
        total_bytes=_typed(fields, _GET["total_bytes"], int),
        offset=_typed(fields, _GET["offset"], int),
        data=_typed(fields, _GET["data"], memoryview),
        index=_typed(fields, _GET["index"], int) & 0xFFFFFFFF,  # uint32: protobuf truncates
    )
