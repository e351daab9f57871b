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
    payload_len_at, body_len = _check_layout(view, len(view))
    if checksum and xxhash.xxh3_128_digest(view[:body_len]) != bytes(view[body_len:]):
        raise RecordError("checksum mismatch")
    return _read_header(view, payload_len_at, namespace)


class RecordVerifier:
    """verify() for a record whose bytes come in order, piece by piece (the kvstore's ranged
    Put): the same checks in the same order, with the checksum computed as the bytes arrive. It
    keeps only the record's head (prefix, header, payload length) and its last 16 bytes.

        verifier = RecordVerifier(total_bytes, namespace)
        for piece in pieces_in_order:
            verifier.update(piece)
        header = verifier.finish()  # RecordError as verify() raises it
    """

    def __init__(self, total_bytes: int, namespace: str | None = None) -> None:
        self.total_bytes = total_bytes
        self.namespace = namespace
        self.received = 0
        self._body_len = max(0, total_bytes - CHECKSUM_BYTES)
        self._hasher = xxhash.xxh3_128()
        self._head = bytearray()
        self._head_wanted = min(total_bytes, _PREFIX.size)  # grows once the prefix is read
        self._trailer = bytearray()

    def update(self, data: bytes | memoryview) -> None:
        view = memoryview(data).cast("B")
        start = self.received
        if start + len(view) > self.total_bytes:
            raise RecordError(f"more than the record's {self.total_bytes} bytes")
        self.received += len(view)
        if len(self._head) < self._head_wanted:
            self._head += view[: self._head_wanted - len(self._head)]
            if len(self._head) == _PREFIX.size and self._head_wanted == _PREFIX.size:
                header_len = _PREFIX.unpack_from(self._head, 0)[2]
                self._head_wanted = min(self.total_bytes,
                                        _PREFIX.size + header_len + _PAYLOAD_LEN.size)
                self._head += view[_PREFIX.size - start : self._head_wanted - start]
        if start < self._body_len:
            self._hasher.update(view[: self._body_len - start])
        if self.received > self._body_len:
            self._trailer += view[max(0, self._body_len - start) :]

    def finish(self) -> RecordHeader:
        if self.received != self.total_bytes:
            raise RecordError(f"{self.received} of the record's {self.total_bytes} bytes arrived")
        head = memoryview(bytes(self._head))
        payload_len_at, _ = _check_layout(head, self.total_bytes)
        if self._hasher.digest() != bytes(self._trailer):
            raise RecordError("checksum mismatch")
        return _read_header(head, payload_len_at, self.namespace)


def _check_layout(view: memoryview, size: int) -> tuple[int, int]:
    """Magic, version and lengths of a record of `size` bytes whose first bytes (at least its
    prefix, header and payload length, where the record is that long) are `view`: (where the
    payload length is, the length of everything before the checksum)."""
    if size < _PREFIX.size + _PAYLOAD_LEN.size + CHECKSUM_BYTES:
        raise RecordError(f"record too short ({size} bytes)")
    magic, version, header_len = _PREFIX.unpack_from(view, 0)
    if magic != MAGIC:
        raise RecordError("bad magic: not a kvpack block record")
    if version != RECORD_VERSION:
        raise RecordError(f"unknown record version {version} (this build reads {RECORD_VERSION})")
    payload_len_at = _PREFIX.size + header_len
    if payload_len_at + _PAYLOAD_LEN.size + CHECKSUM_BYTES > size:
        raise RecordError("header length runs past the end of the record")
    (payload_len,) = _PAYLOAD_LEN.unpack_from(view, payload_len_at)
    body_len = payload_len_at + _PAYLOAD_LEN.size + payload_len
    if body_len + CHECKSUM_BYTES != size:
        raise RecordError(
            f"length mismatch: header says {body_len + CHECKSUM_BYTES}, got {size}")
    return payload_len_at, body_len


def _read_header(view: memoryview, payload_len_at: int, namespace: str | None) -> RecordHeader:
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
