"""The block record and the block hashes: the formats two processes must agree on."""

import os
import subprocess
import sys

import pytest
from kvpack.common import record
from kvpack.common.hashing import BLOCK_HASH_BYTES, block_hashes, namespace_fingerprint
from support.blocks import make_record


def test_round_trip_keeps_header_and_payload():
    payload = os.urandom(1000)
    data = make_record("tenant-a", payload, codec="qjl", dtype="bfloat16",
                       shapes={"keys": [30, 3, 256, 64]}, bits_per_element=3.25, token_count=256)
    header, view = record.decode(data, "tenant-a")
    assert bytes(view) == payload
    assert header.codec == "qjl" and header.token_count == 256
    assert header.shapes == {"keys": [30, 3, 256, 64]}
    assert header.namespace_fingerprint == namespace_fingerprint("tenant-a").hex()


def test_every_flipped_byte_is_detected():
    data = bytearray(make_record("ns", os.urandom(64), codec="kivi"))
    for position in range(len(data)):
        corrupted = bytearray(data)
        corrupted[position] ^= 0x01
        with pytest.raises(record.RecordError):
            record.verify(bytes(corrupted), "ns")


@pytest.mark.parametrize("keep", [0, 5, 20, -1])
def test_truncation_is_detected(keep):
    data = make_record("ns", b"payload")
    with pytest.raises(record.RecordError):
        record.verify(data[:keep])


def test_unknown_version_is_rejected():
    import xxhash

    data = bytearray(make_record("ns", b"payload"))
    data[4:6] = (record.RECORD_VERSION + 1).to_bytes(2, "little")
    body = bytes(data[: -record.CHECKSUM_BYTES])
    resealed = body + xxhash.xxh3_128_digest(body)  # valid checksum, future version
    with pytest.raises(record.RecordError, match="unknown record version"):
        record.verify(resealed)


def test_namespace_mismatch_is_rejected():
    data = make_record("tenant-a", b"payload")
    record.verify(data, "tenant-a")
    with pytest.raises(record.RecordError, match="another namespace"):
        record.verify(data, "tenant-b")


def test_block_hashes_chain_and_only_cover_full_blocks():
    tokens = list(range(1000))
    hashes = block_hashes(tokens, 256)
    assert len(hashes) == 3 and all(len(h) == BLOCK_HASH_BYTES for h in hashes)
    assert block_hashes(tokens[:512], 256) == hashes[:2]  # a prefix has the prefix's hashes
    changed = tokens.copy()
    changed[10] += 1  # one token in block 0 changes every later hash (chaining)
    assert all(a != b for a, b in zip(block_hashes(changed, 256), hashes, strict=True))
    changed = tokens.copy()
    changed[600] += 1
    assert block_hashes(changed, 256)[:2] == hashes[:2]
    assert block_hashes(changed, 256)[2] != hashes[2]


def test_block_hashes_agree_across_processes_with_different_hash_seeds():
    code = ("from kvpack.common.hashing import block_hashes;"
            "print(b''.join(block_hashes(list(range(64)), 16)).hex())")
    outputs = {
        subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                       env={**os.environ, "PYTHONHASHSEED": seed}).stdout.strip()
        for seed in ("1", "2", "random")
    }
    assert outputs == {b"".join(block_hashes(list(range(64)), 16)).hex()}
