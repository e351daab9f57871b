"""The block record: what the kvstore keeps for one block, self-describing and checksummed.

Layout (little-endian):

    magic    4 bytes   b"KVPB"
    version  u16       RECORD_VERSION
    hlen     u32       length of the JSON header
    header   hlen      canonical JSON: namespace fingerprint, codec, dtype, shapes, bits,
                       token count, ...
    plen     u64       length of the payload
    payload  plen      codec bytes (KVCodec.to_bytes), opaque to the store
    checksum 16 bytes  xxh3-128 of everything above

One record is one Redis value, so a block can never be half-written or split from its metadata.
A record that fails any check is rejected as a whole: `RecordError` is the only error `decode`
raises.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field
from typing import Any

import xxhash
from kvpack.common.hashing import namespace_fingerprint

MAGIC = b"KVPB"
RECORD_VERSION = 1
_PREFIX = struct.Struct("<4sHI")
_PAYLOAD_LEN = struct.Struct("<Q")
CHECKSUM_BYTES = 16


class RecordError(ValueError):
    """The bytes are not a valid record (bad magic, version, length, checksum or namespace)."""


@dataclass(frozen=True)
class RecordHeader:
    namespace_fingerprint: str  # hex of kvpack.common.hashing.namespace_fingerprint
    codec: str = ""
    dtype: str = ""
    shapes: dict[str, list[int]] = field(default_factory=dict)
    bits_per_element: float = 0.0
    token_count: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def for_namespace(cls, namespace: str, **fields: Any) -> RecordHeader:
        return cls(namespace_fingerprint=namespace_fingerprint(namespace).hex(), **fields)


def encode(header: RecordHeader, payload: bytes) -> bytes:
    header_bytes = json.dumps(header.__dict__, sort_keys=True, separators=(",", ":")).encode()
    body = b"".join(
        (
            _PREFIX.pack(MAGIC, RECORD_VERSION, len(header_bytes)),
            header_bytes,
            _PAYLOAD_LEN.pack(len(payload)),
            payload,
        )
    )
    return body + xxhash.xxh3_128_digest(body)


def verify(data: bytes | memoryview, namespace: str | None = None, *,
           checksum: bool = True) -> RecordHeader:
    """Check a record without copying its payload; return its header.

    `checksum=False` skips the checksum (every other check stays): for bytes whose checksum the
    caller has verified already (KVStoreClient verifies every record it returns).

    Raises:
        RecordError: naming what is wrong. `namespace`, when given, must match the record's.
    """
    view = memoryview(data)
    if len(view) < _PREFIX.size + _PAYLOAD_LEN.size + CHECKSUM_BYTES:
        raise RecordError(f"record too short ({len(view)} bytes)")
    magic, version, header_len = _PREFIX.unpack_from(view, 0)
    if magic != MAGIC:
        raise RecordError("bad magic: not a kvpack block record")
    if version != RECORD_VERSION:
        raise RecordError(f"unknown record version {version} (this build reads {RECORD_VERSION})")
    payload_len_at = _PREFIX.size + header_len
    if payload_len_at + _PAYLOAD_LEN.size + CHECKSUM_BYTES > len(view):
        raise RecordError("header length runs past the end of the record")
    (payload_len,) = _PAYLOAD_LEN.unpack_from(view, payload_len_at)
    body_len = payload_len_at + _PAYLOAD_LEN.size + payload_len
    if body_len + CHECKSUM_BYTES != len(view):
        raise RecordError(
            f"length mismatch: header says {body_len + CHECKSUM_BYTES}, got {len(view)}")
    if checksum and xxhash.xxh3_128_digest(view[:body_len]) != bytes(view[body_len:]):
        raise RecordError("checksum mismatch")
    try:
        fields = json.loads(bytes(view[_PREFIX.size:payload_len_at]))
        header = RecordHeader(**fields)
    except (ValueError, TypeError) as error:
        raise RecordError(f"unreadable header: {error}") from None
    if (namespace is not None
            and header.namespace_fingerprint != namespace_fingerprint(namespace).hex()):
        raise RecordError("record belongs to another namespace")
    return header


def decode(data: bytes | memoryview, namespace: str | None = None, *,
           checksum: bool = True) -> tuple[RecordHeader, memoryview]:
    """Verify a record and return its header and a zero-copy view of its payload (`checksum` as
    in verify)."""
    header = verify(data, namespace, checksum=checksum)
    view = memoryview(data)
    start = len(view) - CHECKSUM_BYTES - _payload_len(view)
    return header, view[start : len(view) - CHECKSUM_BYTES]


def _payload_len(view: memoryview) -> int:
    (_, _, header_len) = _PREFIX.unpack_from(view, 0)
    return _PAYLOAD_LEN.unpack_from(view, _PREFIX.size + header_len)[0]
