"""The codec interface on packed caches: growth, preallocation, windows, bytes, blocks, bits."""

from __future__ import annotations

import pytest
import torch
from kvpack.kernels import make_codec

CODECS = {
    "fp16": {},
    "kivi": {"bits": 2, "group_size": 16, "window": 5},
    "qjl": {
        "sketch_dim": 32,
        "outlier_channels": 2,
        "outlier_sketch_dim": 16,
        "group_size": 16,
        "window": 3,
    },
    "qjl_no_outliers": {"sketch_dim": 32, "outlier_channels": 0, "group_size": 16},
}


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(4)


def _codec(key, use_triton=None, head_dim=32):
    name = "qjl" if key.startswith("qjl") else key
    return make_codec(name, head_dim=head_dim, use_triton=use_triton, **CODECS[key])


@pytest.mark.parametrize("key", list(CODECS))
@pytest.mark.parametrize("use_triton", [False, True])
def test_appending_token_by_token_equals_encoding_at_once(key, use_triton):
    codec = _codec(key, use_triton)
    k, v = torch.randn(2, 2, 53, 32), torch.randn(2, 2, 53, 32)
    q = torch.randn(2, 4, 2, 32)
    keys, values = codec.encode_keys(k), codec.encode_values(v)
    grown_keys = codec.new_keys(2, 2, dtype=torch.float32, capacity=64)
    grown_values = codec.new_values(2, 2, dtype=torch.float32, capacity=64)
    pointers = {name: t.data_ptr() for name, t in grown_keys.fields.items()}
    codec.append_keys(grown_keys, k[:, :, :20])  # a prefill chunk, then one token per step
    codec.append_values(grown_values, v[:, :, :20])
    for t in range(20, 53):
        assert codec.append_keys(grown_keys, k[:, :, t : t + 1]) is grown_keys
        codec.append_values(grown_values, v[:, :, t : t + 1])
    # reserved capacity: appending never reallocated the packed storage
    assert {name: t.data_ptr() for name, t in grown_keys.fields.items()} == pointers
    assert codec.length(grown_keys) == codec.length(keys) == 53
    scores = codec.key_scores(q, keys)
    assert scores.shape == (2, 4, 2, 53)
    assert torch.equal(codec.key_scores(q, grown_keys), scores)
    p = torch.softmax(scores, dim=-1)
    assert torch.equal(codec.attend_values(p, grown_values), codec.attend_values(p, values))


@pytest.mark.parametrize("key", ["kivi", "qjl"])
def test_window_and_incomplete_group_stay_in_full_precision(key):
    codec = _codec(key)
    group, window = codec.group_size, codec.window
    keys = codec.new_keys(1, 2, dtype=torch.float32)
    k = torch.randn(1, 2, 80, 32)
    for length in range(1, 81):
        codec.append_keys(keys, k[:, :, length - 1 : length])
        expected_packed = max(0, (length - window) // group * group)
        assert (keys.num_packed, keys.tail_len) == (expected_packed, length - expected_packed)
    # the full-precision tail scores exactly
    q = torch.randn(1, 2, 1, 32)
    tail = k[:, :, keys.num_packed :]
    torch.testing.assert_close(
        codec.key_scores(q, keys)[..., keys.num_packed :], q @ tail.transpose(-1, -2)
    )


@pytest.mark.parametrize("key", list(CODECS))
def test_bytes_round_trip_bit_exactly(key):
    codec = _codec(key)
    keys = codec.encode_keys(torch.randn(2, 2, 45, 32, dtype=torch.float16))
    values = codec.encode_values(torch.randn(2, 2, 45, 32, dtype=torch.float16))
    for packed in (keys, values):
        data = codec.to_bytes(packed)
        again = codec.from_bytes(data)
        assert codec.to_bytes(again) == data
        assert (again.num_packed, again.tail_len) == (packed.num_packed, packed.tail_len)
        for name, tensor in packed.fields.items():
            rows = (
                packed.num_packed // next(s for s in packed.specs if s.name == name).tokens_per_row
            )
            assert torch.equal(again.fields[name][:, :, :rows], tensor[:, :, :rows])
    q = torch.randn(2, 2, 1, 32, dtype=torch.float16)
    assert torch.equal(
        codec.key_scores(q, codec.from_bytes(codec.to_bytes(keys))), codec.key_scores(q, keys)
    )


@pytest.mark.parametrize("key", ["kivi", "qjl"])
def test_blocks_reload_into_an_empty_cache_with_identical_scores(key):
    codec = _codec(key)
    k, v = torch.randn(2, 2, 100, 32), torch.randn(2, 2, 100, 32)
    keys, values = codec.encode_keys(k), codec.encode_values(v)
    assert keys.num_packed == 96 - (0 if codec.window < 4 else 16)
    blocks = [
        codec.kv_block_to_bytes(keys, values, start, start + 32) for start in range(0, 64, 32)
    ]
    restored_keys = codec.new_keys(2, 2, dtype=torch.float32)
    restored_values = codec.new_values(2, 2, dtype=torch.float32)
    for block in blocks:
        codec.append_kv_block(restored_keys, restored_values, block)
    codec.append_keys(restored_keys, k[:, :, 64:])
    codec.append_values(restored_values, v[:, :, 64:])
    q = torch.randn(2, 6, 3, 32)
    scores = codec.key_scores(q, keys)
    assert torch.equal(codec.key_scores(q, restored_keys), scores)
    p = torch.softmax(scores, dim=-1)
    assert torch.equal(codec.attend_values(p, restored_values), codec.attend_values(p, values))


def test_block_errors_name_the_problem():
    codec = _codec("qjl")
    keys = codec.encode_keys(torch.randn(1, 2, 70, 32))
    with pytest.raises(ValueError, match="multiples of group_size"):
        codec.block_to_bytes(keys, 0, 24)
    with pytest.raises(ValueError, match="packed region"):
        codec.block_to_bytes(keys, 32, 80)
    block = codec.block_to_bytes(keys, 16, 32)
    empty = codec.new_keys(1, 2, dtype=torch.float32)
    with pytest.raises(ValueError, match="starts at token 16"):
        codec.append_block(empty, block)
    with pytest.raises(ValueError, match="fingerprint"):
        _codec("kivi").append_block(_codec("kivi").new_keys(1, 2, dtype=torch.float32), block)
    with pytest.raises(ValueError, match="dtype"):
        codec.append_block(
            codec.new_keys(1, 2, dtype=torch.float16), codec.block_to_bytes(keys, 0, 16)
        )
    grown = codec.new_keys(1, 2, dtype=torch.float32)
    codec.append_keys(grown, torch.randn(1, 2, 1, 32))
    with pytest.raises(ValueError, match="before appending tokens"):
        codec.append_block(grown, codec.block_to_bytes(keys, 0, 16))


def test_argument_errors_name_the_argument():
    codec = _codec("kivi")
    keys = codec.encode_keys(torch.randn(1, 2, 16, 32))
    with pytest.raises(ValueError, match="k has shape"):
        codec.append_keys(keys, torch.randn(1, 3, 1, 32))
    with pytest.raises(ValueError, match="k has dtype"):
        codec.append_keys(keys, torch.randn(1, 2, 1, 32, dtype=torch.float16))
    with pytest.raises(ValueError, match="multiple of key/value heads"):
        codec.key_scores(torch.randn(1, 3, 1, 32), keys)
    with pytest.raises(ValueError, match="bits"):
        make_codec("kivi", head_dim=32, bits=3)
    with pytest.raises(ValueError, match="head_dim"):
        make_codec("qjl", head_dim=40)
    with pytest.raises(ValueError, match="sketch_dim"):
        make_codec("qjl", head_dim=32, sketch_dim=12)
    with pytest.raises(ValueError, match="outlier_channels"):
        make_codec("qjl", head_dim=32, outlier_channels=33)
    with pytest.raises(ValueError, match="window"):
        make_codec("kivi", head_dim=32, window=-1)
    with pytest.raises(ValueError, match="unknown codec"):
        make_codec("zip", head_dim=32)


def test_bits_per_number_hand_count():
    # Llama-3-8B-like head: D=128, bf16, QJL m=256 with 8 outliers sketched by 256 bits, G=32;
    # 2-bit values in groups of 32 channels.
    codec = make_codec("qjl", head_dim=128)
    k = torch.randn(1, 2, 64, 128, dtype=torch.bfloat16)
    keys, values = codec.encode_keys(k), codec.encode_values(k)
    tokens_heads = 64 * 2
    # per token: 32 B inlier signs + 2 B norm + 32 B outlier signs + 2 B outlier norm;
    # per group of 32 tokens: 8 B of outlier channel indices
    assert codec.nbytes(keys) == tokens_heads * (32 + 2 + 32 + 2) + 2 * 2 * 8
    # per token: 128 * 2 bits = 32 B codes + 4 groups * (2 B scale + 2 B zero)
    assert codec.nbytes(values) == tokens_heads * (32 + 4 * 4)
    bits_per_number = 8 * (codec.nbytes(keys) + codec.nbytes(values)) / (2 * k.numel())
    assert bits_per_number == pytest.approx((68.25 + 48) * 8 / 256)  # 3.63
    kivi = make_codec("kivi", head_dim=128, bits=2, group_size=32, window=16)
    kivi_keys = kivi.encode_keys(k)
    # 48 tokens packed: 32 B codes each + per group 128 scales and 128 zeros of 2 B; 16 tokens bf16
    assert kivi_keys.num_packed == 32 and kivi_keys.tail_len == 32
    assert kivi.nbytes(kivi_keys) == 2 * (32 * 32 + 128 * 2 * 2 + 32 * 128 * 2)


def test_fingerprint_is_stable_and_covers_every_parameter():
    base = make_codec("qjl", head_dim=64)
    assert base.fingerprint() == make_codec("qjl", head_dim=64, use_triton=False).fingerprint()
    others = [
        make_codec("qjl", head_dim=64, seed=1),
        make_codec("qjl", head_dim=64, sketch_dim=128),
        make_codec("qjl", head_dim=64, outlier_channels=4),
        make_codec("qjl", head_dim=64, window=32),
        make_codec("qjl", head_dim=64, value_bits=4),
        make_codec("qjl", head_dim=128),
        make_codec("kivi", head_dim=64),
        make_codec("fp16", head_dim=64),
    ]
    assert len({base.fingerprint(), *(codec.fingerprint() for codec in others)}) == len(others) + 1
    assert (
        make_codec("kivi", head_dim=64, bits=4).fingerprint()
        != make_codec("kivi", head_dim=64).fingerprint()
    )


def test_batch_and_preallocation_growth_beyond_capacity():
    codec = _codec("kivi")
    keys = codec.new_keys(3, 2, dtype=torch.float32, capacity=16)
    k = torch.randn(3, 2, 90, 32)
    codec.append_keys(keys, k)
    assert keys.capacity >= keys.num_packed == 80
    reference = codec.encode_keys(k)
    q = torch.randn(3, 2, 1, 32)
    assert torch.equal(codec.key_scores(q, keys), codec.key_scores(q, reference))
