"""The `kvquant` codec: both paths agree, appends, sink, blocks, bytes, errors, bit accounting."""

from __future__ import annotations

import pytest
import torch
from kvpack.kernels import kvquant_reference as reference
from kvpack.kernels import make_codec
from kvpack.kernels.kvquant import KVQuantCodec
from support.kvquant import default_inv_freq, keys_like, random_calibration, values_like


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def _codec(calibration, *, bits=3, layer=1, sink_tokens=1, use_triton=None, **params):
    return make_codec("kvquant", head_dim=calibration.head_dim, calibration=calibration, bits=bits,
                      outliers=calibration.outliers, sink_tokens=sink_tokens, layer=layer,
                      use_triton=use_triton, **params)


def _exact_scores(q, k):
    """q . RoPE(k) at positions 0..T-1: the quantity key_scores approximates."""
    rotated = reference.apply_rope(k, torch.arange(k.shape[2]), default_inv_freq(k.shape[-1]), 1.0)
    return reference.scores(q, rotated)


@pytest.mark.parametrize(("group", "head_dim", "bits"), [(3, 64, 3), (4, 128, 2), (1, 64, 4)])
def test_triton_and_reference_paths_agree(group, head_dim, bits):
    calibration = random_calibration(head_dim=head_dim, num_kv_heads=2, outliers=0.01)
    g = torch.Generator().manual_seed(group)
    k = keys_like(calibration, 1, batch=2, num_tokens=29, generator=g)
    v = values_like(calibration, 2, 29, g)
    q = torch.randn(2, 2 * group, 2, head_dim, generator=g)
    p = torch.softmax(torch.randn(2, 2 * group, 2, 29, generator=g), -1)
    results = {}
    for use_triton in (True, False):
        codec = _codec(calibration, bits=bits, use_triton=use_triton)
        keys, values = codec.encode_keys(k), codec.encode_values(v)
        results[use_triton] = (keys, values, codec.key_scores(q, keys),
                               codec.attend_values(p, values))
    (keys_t, values_t, scores_t, out_t), (keys_r, values_r, scores_r, out_r) = results.values()
    for name in keys_t.fields:
        if name == "outlier_delta":
            torch.testing.assert_close(keys_t.used()[name], keys_r.used()[name],
                                       rtol=1e-3, atol=1e-3)
        else:
            assert torch.equal(keys_t.used()[name], keys_r.used()[name]), name
    assert torch.equal(keys_t.sink, keys_r.sink) and torch.equal(values_t.sink, values_r.sink)
    assert scores_t.dtype == out_t.dtype == torch.float32
    torch.testing.assert_close(scores_t, scores_r, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(out_t, out_r, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("use_triton", [True, False])
def test_scores_approximate_exact_attention_and_sink_is_exact(use_triton):
    calibration = random_calibration(head_dim=64, num_kv_heads=3, uniform_codebooks=True)
    g = torch.Generator().manual_seed(5)
    k = keys_like(calibration, 1, batch=2, num_tokens=40, generator=g, outlier_rate=0.003)
    v = values_like(calibration, 2, 40, g)
    q = torch.randn(2, 9, 1, 64, generator=g)
    p = torch.softmax(torch.randn(2, 9, 1, 40, generator=g), -1)
    codec = _codec(calibration, bits=4, sink_tokens=2, use_triton=use_triton)
    keys, values = codec.encode_keys(k), codec.encode_values(v)
    scores, out = codec.key_scores(q, keys), codec.attend_values(p, values)
    exact_scores = _exact_scores(q, k)
    exact_out = reference.attend(p, v)
    # sink tokens are fp16 copies: exact up to fp16 rounding of k
    torch.testing.assert_close(scores[..., :2], exact_scores[..., :2], rtol=2e-3, atol=2e-2)
    # the rest equals the scores of the dequantized cache, and is close to the exact ones
    dequantized = codec.dequantize_keys(keys)
    torch.testing.assert_close(scores, _exact_scores(q, dequantized), rtol=1e-4, atol=1e-4)
    relative = (scores - exact_scores).norm() / exact_scores.norm()
    assert relative < 0.1, relative
    torch.testing.assert_close(out, reference.attend(p, codec.dequantize_values(values)),
                               rtol=1e-4, atol=1e-5)
    assert (out - exact_out).norm() / exact_out.norm() < 0.1


def test_appending_token_by_token_equals_encoding_at_once():
    calibration = random_calibration(head_dim=64)
    g = torch.Generator().manual_seed(2)
    k = keys_like(calibration, 1, batch=2, num_tokens=23, generator=g)
    v = values_like(calibration, 2, 23, g)
    codec = _codec(calibration, sink_tokens=3)
    keys_all, values_all = codec.encode_keys(k), codec.encode_values(v)
    keys = codec.new_keys(2, 2, dtype=torch.float32, capacity=4)
    values = codec.new_values(2, 2, dtype=torch.float32)
    codec.append_keys(keys, k[:, :, :10], positions=torch.arange(10))
    codec.append_values(values, v[:, :, :10])
    for t in range(10, 23):
        positions = torch.tensor([[t], [t]])
        assert codec.append_keys(keys, k[:, :, t : t + 1], positions=positions) is keys
        codec.append_values(values, v[:, :, t : t + 1])
    assert codec.length(keys) == codec.length(values) == 23 and keys.capacity >= 23
    for cache, whole in ((keys, keys_all), (values, values_all)):
        for name, tensor in whole.used().items():
            assert torch.equal(cache.used()[name], tensor), name
        assert torch.equal(cache.sink, whole.sink) and cache.sink.shape[2] == 3


def test_blocks_and_bytes_round_trip_bit_exactly():
    calibration = random_calibration(head_dim=64)
    g = torch.Generator().manual_seed(3)
    k = keys_like(calibration, 1, batch=2, num_tokens=48, generator=g)
    v = values_like(calibration, 2, 48, g)
    q = torch.randn(2, 4, 1, 64, generator=g)
    p = torch.softmax(torch.randn(2, 4, 1, 48, generator=g), -1)
    codec = _codec(calibration)
    keys, values = codec.encode_keys(k), codec.encode_values(v)
    rebuilt_keys = codec.new_keys(2, 2)
    rebuilt_values = codec.new_values(2, 2)
    for start, end in ((0, 16), (16, 32), (32, 48)):
        codec.append_block(rebuilt_keys, codec.block_to_bytes(keys, start, end))
        codec.append_block(rebuilt_values, codec.block_to_bytes(values, start, end))
    assert torch.equal(codec.key_scores(q, rebuilt_keys), codec.key_scores(q, keys))
    assert torch.equal(codec.attend_values(p, rebuilt_values), codec.attend_values(p, values))
    for cache in (keys, values):
        copy = codec.from_bytes(codec.to_bytes(cache))
        assert copy.kind == cache.kind and copy.num_tokens == 48
        for name, tensor in cache.used().items():
            assert torch.equal(copy.used()[name], tensor), name
        assert torch.equal(copy.sink, cache.sink)
    # a block that does not continue the cache, or from another codec, is refused
    with pytest.raises(ValueError, match="starts at token 16"):
        codec.append_block(codec.new_keys(2, 2), codec.block_to_bytes(keys, 16, 32))
    other = _codec(calibration, bits=2)
    with pytest.raises(ValueError, match="fingerprint"):
        other.append_block(other.new_keys(2, 2), codec.block_to_bytes(keys, 0, 16))
    with pytest.raises(ValueError, match="payload"):
        codec.from_bytes(b"not a payload")
    with pytest.raises(ValueError, match="keys"):
        codec.append_block(codec.new_values(2, 2), codec.block_to_bytes(keys, 0, 16))


@pytest.mark.parametrize(("head_dim", "bits", "slots"), [(64, 3, 1), (128, 3, 2), (128, 2, 2),
                                                         (128, 4, 2)])
def test_nbytes_counts_every_stored_byte(head_dim, bits, slots):
    calibration = random_calibration(head_dim=head_dim)
    codec = _codec(calibration, bits=bits, sink_tokens=1)
    assert codec.num_slots == slots
    g = torch.Generator().manual_seed(4)
    batch, heads, tokens = 2, 2, 20
    keys = codec.encode_keys(keys_like(calibration, 1, batch, tokens, g))
    values = codec.encode_values(values_like(calibration, batch, tokens, g))
    vectors = batch * heads * tokens
    sink = batch * heads * 1 * head_dim * 2
    # keys: codes + slots x (1-byte channel + fp16 delta); values add fp16 scale and zero
    assert codec.nbytes(keys) == vectors * (head_dim * bits // 8 + 3 * slots) + sink
    assert codec.nbytes(values) == vectors * (head_dim * bits // 8 + 3 * slots + 4) + sink
    # the serialized payload holds at least those bytes
    assert len(codec.to_bytes(keys)) > codec.nbytes(keys)


def test_parameter_and_shape_errors():
    calibration = random_calibration(head_dim=64, bits=(2, 3))
    with pytest.raises(ValueError, match="head_dim"):
        make_codec("kvquant", head_dim=128, calibration=calibration, bits=3)
    with pytest.raises(ValueError, match="no 4-bit codebooks"):
        make_codec("kvquant", head_dim=64, calibration=calibration, bits=4)
    with pytest.raises(ValueError, match="bits must be one of"):
        make_codec("kvquant", head_dim=64, calibration=calibration, bits=5)
    with pytest.raises(ValueError, match="outliers=0.01, not 0.0"):
        make_codec("kvquant", head_dim=64, calibration=calibration, bits=3, outliers=0.0)
    with pytest.raises(ValueError, match="model_id"):
        make_codec("kvquant", head_dim=64, calibration=calibration, model_id="other")
    with pytest.raises(ValueError, match="num_layers"):
        make_codec("kvquant", head_dim=64, calibration=calibration, num_layers=30)
    with pytest.raises(ValueError, match="layer must be in"):
        make_codec("kvquant", head_dim=64, calibration=calibration, layer=2)
    with pytest.raises(ValueError, match="no such file"):
        make_codec("kvquant", head_dim=64, calibration="/nonexistent/artifact.safetensors")
    unbound = make_codec("kvquant", head_dim=64, calibration=calibration)
    with pytest.raises(ValueError, match="for_layer"):
        unbound.encode_keys(torch.zeros(1, 2, 3, 64))
    codec = unbound.for_layer(0)
    assert isinstance(codec, KVQuantCodec) and codec.fingerprint() == unbound.fingerprint()
    with pytest.raises(ValueError, match="KV heads"):
        codec.new_keys(1, 3)
    keys = codec.encode_keys(torch.randn(1, 2, 4, 64))
    with pytest.raises(ValueError, match="positions"):
        codec.append_keys(keys, torch.randn(1, 2, 2, 64), positions=torch.tensor([7, 8]))
    with pytest.raises(ValueError, match=r"\(B, H, D\)"):
        codec.append_keys(keys, torch.randn(2, 2, 1, 64))
    with pytest.raises(ValueError, match="multiple"):
        codec.key_scores(torch.randn(1, 3, 1, 64), keys)
    with pytest.raises(ValueError, match="p must be"):
        codec.attend_values(torch.randn(1, 2, 1, 5), codec.encode_values(torch.randn(1, 2, 4, 64)))
    with pytest.raises(ValueError, match="values cache"):
        codec.append_values(keys, torch.randn(1, 2, 1, 64))


def test_fingerprint_tracks_calibration_and_parameters():
    calibration = random_calibration(head_dim=64)
    base = _codec(calibration).fingerprint()
    assert _codec(calibration).fingerprint() == base
    assert _codec(calibration, bits=2).fingerprint() != base
    assert _codec(calibration, sink_tokens=0).fingerprint() != base
    other = random_calibration(head_dim=64, generator=torch.Generator().manual_seed(9))
    assert _codec(other).fingerprint() != base


def _with_sensitivity(calibration, generator):
    """Random per-layer sensitivities, falling with bits as measured ones do."""
    layers, widths = calibration.num_layers, len(calibration.bits)
    base = torch.rand(layers, 1, generator=generator) * 1e-2
    falls = 4.0 ** -torch.arange(widths, dtype=torch.float32)
    calibration.key_sensitivity = base * falls * 3
    calibration.value_sensitivity = torch.rand(layers, 1, generator=generator) * 1e-2 * falls
    return calibration


@pytest.mark.parametrize(("key_bits", "value_bits", "value_outliers"),
                         [(4, 2, 0.01), (2, 4, 0.0), (3, 4, 0.04)])
def test_separate_key_and_value_widths_agree_across_paths_and_count_bytes(
        key_bits, value_bits, value_outliers):
    calibration = random_calibration(head_dim=64, num_kv_heads=2, outliers=0.01)
    g = torch.Generator().manual_seed(11)
    k = keys_like(calibration, 1, batch=2, num_tokens=21, generator=g)
    v = values_like(calibration, 2, 21, g)
    q = torch.randn(2, 4, 2, 64, generator=g)
    p = torch.softmax(torch.randn(2, 4, 2, 21, generator=g), -1)
    results = {}
    for use_triton in (True, False):
        codec = _codec(calibration, key_bits=key_bits, value_bits=value_bits,
                       value_outliers=value_outliers, use_triton=use_triton)
        keys, values = codec.encode_keys(k), codec.encode_values(v)
        results[use_triton] = (keys, values, codec.key_scores(q, keys),
                               codec.attend_values(p, values))
    (keys_t, values_t, scores_t, out_t), (keys_r, values_r, scores_r, out_r) = results.values()
    assert torch.equal(keys_t.used()["codes"], keys_r.used()["codes"])
    assert torch.equal(values_t.used()["codes"], values_r.used()["codes"])
    torch.testing.assert_close(scores_t, scores_r, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(out_t, out_r, rtol=1e-4, atol=1e-5)
    value_slots = reference.outlier_slots(value_outliers, 64)
    vectors, sink = 2 * 2 * 21, 2 * 2 * 64 * 2
    assert codec.nbytes(keys_r) == vectors * (64 * key_bits // 8 + 3) + sink
    assert codec.nbytes(values_r) == vectors * (64 * value_bits // 8 + 3 * value_slots + 4) + sink
    # the widths are part of the identity and survive the byte round trip
    assert codec.fingerprint() != _codec(calibration, bits=key_bits).fingerprint()
    copy = codec.from_bytes(codec.to_bytes(values_r))
    assert torch.equal(copy.used()["codes"], values_r.used()["codes"])


def test_avg_bits_gives_each_layer_its_allocated_widths():
    calibration = _with_sensitivity(random_calibration(head_dim=64, num_layers=4),
                                    torch.Generator().manual_seed(2))
    unbound = make_codec("kvquant", head_dim=64, calibration=calibration, avg_bits=3.25)
    key_bits, value_bits = unbound.allocation
    assert sum(key_bits) + sum(value_bits) <= 3.25 * 8 and len(key_bits) == 4
    assert len(set(key_bits + value_bits)) > 1  # mixed widths
    g = torch.Generator().manual_seed(3)
    fingerprints = set()
    for layer in range(4):
        codec = unbound.for_layer(layer)
        assert (codec.key_bits, codec.value_bits) == (key_bits[layer], value_bits[layer])
        keys = codec.encode_keys(keys_like(calibration, layer, 1, 5, g))
        values = codec.encode_values(values_like(calibration, 1, 5, g))
        assert keys.fields["codes"].shape[-1] == 64 * key_bits[layer] // 8
        assert values.fields["codes"].shape[-1] == 64 * value_bits[layer] // 8
        fingerprints.add(codec.fingerprint())
    # one identity for the whole allocation, different from any uniform width and budget
    assert len(fingerprints) == 1
    assert fingerprints != {_codec(calibration, bits=3).fingerprint()}
    other = make_codec("kvquant", head_dim=64, calibration=calibration, avg_bits=3.5)
    assert other.fingerprint() not in fingerprints
    with pytest.raises(ValueError, match="without key_bits/value_bits"):
        make_codec("kvquant", head_dim=64, calibration=calibration, avg_bits=3.0, key_bits=4)
    with pytest.raises(ValueError, match=r"avg_bits must be in \[2, 4\]"):
        make_codec("kvquant", head_dim=64, calibration=calibration, avg_bits=4.5)
    with pytest.raises(ValueError, match="no per-layer sensitivities"):
        make_codec("kvquant", head_dim=64, calibration=random_calibration(head_dim=64),
                   avg_bits=3.0)
    with pytest.raises(ValueError, match="value_outliers"):
        _codec(calibration, value_outliers=0.6)


@pytest.mark.parametrize("key_outliers", [0.0, 0.04])
def test_key_outlier_slots_apart_from_the_calibrated_fraction(key_outliers):
    """key_outliers sets the keys' slots per vector; the artifact's fraction still sets the key
    ranges (and stays the checked one). Both paths store the same slots; more slots catch more of
    the elements outside the ranges, so the key error falls; the bytes count the slots."""
    calibration = random_calibration(head_dim=64, num_kv_heads=2, outliers=0.01,
                                     uniform_codebooks=True)
    g = torch.Generator().manual_seed(12)
    # ~5% of the elements outside the ranges: most vectors hold more than one
    k = keys_like(calibration, 1, batch=2, num_tokens=33, generator=g, outlier_rate=0.05)
    q = torch.randn(2, 4, 3, 64, generator=g)
    slots = reference.outlier_slots(key_outliers, 64)
    results = {}
    for use_triton in (True, False):
        codec = _codec(calibration, bits=4, key_outliers=key_outliers, use_triton=use_triton)
        assert (codec.num_slots, codec.value_slots) == (slots, 1)
        keys = codec.encode_keys(k)
        results[use_triton] = (keys, codec.key_scores(q, keys))
    (keys_t, scores_t), (keys_r, scores_r) = results.values()
    assert keys_r.fields["outlier_index"].shape[-1] == slots
    assert torch.equal(keys_t.used()["codes"], keys_r.used()["codes"])
    assert torch.equal(keys_t.used()["outlier_index"], keys_r.used()["outlier_index"])
    torch.testing.assert_close(scores_t, scores_r, rtol=1e-4, atol=1e-4)
    vectors, sink = 2 * 2 * 33, 2 * 2 * 64 * 2
    assert codec.nbytes(keys_r) == vectors * (64 * 4 // 8 + 3 * slots) + sink

    def key_error(codec):
        return float((codec.dequantize_keys(codec.encode_keys(k)) - k).norm() / k.norm())

    one_slot = _codec(calibration, bits=4, use_triton=False)
    if slots > 1:
        assert key_error(codec) < 0.8 * key_error(one_slot)
    else:
        assert key_error(codec) > key_error(one_slot)
    # part of the identity; the default (None) is the calibrated fraction
    assert codec.fingerprint() != one_slot.fingerprint()
    assert codec.params()["key_outliers"] == key_outliers
    assert "key_outliers" not in one_slot.params()
    assert _codec(calibration, bits=4, key_outliers=0.01).fingerprint() == one_slot.fingerprint()
    with pytest.raises(ValueError, match="key_outliers"):
        _codec(calibration, key_outliers=0.5)
