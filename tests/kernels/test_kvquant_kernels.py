"""KVQuant Triton kernels against their PyTorch reference, and the fused RoPE against HF's."""

from __future__ import annotations

import pytest
import torch
import triton
import triton.language as tl
from kvpack.kernels import kvquant_reference as reference
from kvpack.kernels import kvquant_triton as triton_kernels
from support.kvquant import keys_like, random_calibration, values_like


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def _generator(*key: int) -> torch.Generator:
    return torch.Generator().manual_seed(hash(key) % (2**31))


def _tables(calibration, bits, layer=0):
    tables = calibration.layer_tables(layer, bits, qnorm=True)
    tables["inv_freq"] = calibration.inv_freq
    return tables


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("head_dim", [8, 64, 128])
def test_pack_codes_round_trip_and_size(bits, head_dim):
    codes = torch.randint(0, 1 << bits, (3, 5, head_dim))
    packed = reference.pack_codes(codes, bits)
    assert packed.dtype == torch.uint8 and packed.shape[-1] == head_dim * bits // 8
    assert torch.equal(reference.unpack_codes(packed, bits, head_dim), codes)


def test_three_bit_layout_is_two_planes():
    # channel c: low 2 bits in byte c // 4 at bit 2 (c % 4); high bit in byte D/4 + c // 8.
    codes = torch.zeros(16, dtype=torch.long)
    codes[5] = 0b110  # low = 2, high = 1
    packed = reference.pack_codes(codes, 3)
    expected = torch.zeros(6, dtype=torch.uint8)
    expected[1] = 2 << 2
    expected[4 + 0] = 1 << 5
    assert torch.equal(packed, expected)


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("head_dim", [8, 64, 128])
def test_quantize_keys_triton_matches_reference(bits, head_dim):
    calibration = random_calibration(head_dim=head_dim)
    t = _tables(calibration, bits)
    k = keys_like(calibration, 0, batch=2, num_tokens=37, generator=_generator(bits, head_dim))
    num_slots = reference.outlier_slots(0.02, head_dim)
    args = (t["key_zero"], t["key_scale"], t["key_boundaries"], t["key_lut"], bits, num_slots)
    codes, index, delta = reference.quantize_keys(k, *args)
    codes_t, index_t, delta_t = triton_kernels.quantize_keys(k, *args)
    assert torch.equal(codes_t, codes)
    assert torch.equal(index_t.long(), index)
    torch.testing.assert_close(delta_t, delta, rtol=1e-3, atol=1e-3)
    assert (delta != 0).any(), "the inputs must exercise the sparse path"


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("head_dim", [8, 64, 128])
def test_quantize_values_triton_matches_reference(bits, head_dim):
    calibration = random_calibration(head_dim=head_dim)
    t = _tables(calibration, bits)
    v = values_like(calibration, batch=2, num_tokens=37, generator=_generator(bits, head_dim, 1))
    v[0, 0, 3] = 0.25  # a constant vector: the scale floor must keep it finite
    num_slots = reference.outlier_slots(0.02, head_dim)
    args = (t["value_boundaries"], t["value_lut"], bits, num_slots)
    expected = reference.quantize_values(v, *args)
    actual = triton_kernels.quantize_values(v, *args)
    for name, want, got in zip(("codes", "scale", "zero", "index", "delta"), expected, actual,
                              strict=True):
        if name == "delta":
            torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-3)
        else:
            assert torch.equal(got.to(want.dtype), want), name
    dense = reference.dequantize_values(*expected, t["value_lut"], bits, head_dim)
    assert torch.isfinite(dense).all()
    torch.testing.assert_close(dense[0, 0, 3], v[0, 0, 3], rtol=0, atol=1e-3)


def _packed_keys(calibration, bits, batch, num_tokens, seed, layer=0):
    t = _tables(calibration, bits, layer)
    k = keys_like(calibration, layer, batch=batch, num_tokens=num_tokens,
                  generator=_generator(seed))
    num_slots = reference.outlier_slots(calibration.outliers, calibration.head_dim)
    packed = reference.quantize_keys(k, t["key_zero"], t["key_scale"], t["key_boundaries"],
                                     t["key_lut"], bits, num_slots)
    return t, k, packed


# (GQA group, bits, head_dim, query tokens): every group 1/2/3/4/8, every bit width, every
# head_dim, decode and multi-token queries, each at least once (the interpreter is slow).
KERNEL_CASES = [
    (1, 2, 64, 1), (2, 3, 64, 1), (3, 4, 64, 2), (4, 3, 128, 1),
    (8, 2, 128, 3), (3, 3, 8, 2), (4, 4, 128, 1), (2, 2, 8, 1),
]


@pytest.mark.parametrize(("group", "bits", "head_dim", "num_queries"), KERNEL_CASES)
def test_key_scores_triton_matches_reference(group, bits, head_dim, num_queries):
    calibration = random_calibration(head_dim=head_dim, num_kv_heads=2, outliers=0.02)
    t, _, (codes, index, delta) = _packed_keys(calibration, bits, 2, 41, (group, bits, head_dim))
    q = torch.randn(2, 2 * group, num_queries, head_dim)
    dense = reference.dequantize_keys(codes, index, delta, t["key_zero"], t["key_scale"],
                                      t["key_lut"], bits, head_dim)
    rotated = reference.apply_rope(dense, torch.arange(41), t["inv_freq"], 1.0)
    expected = reference.scores(q, rotated)
    # the int32-word reading of the codes where the layout allows it, the byte gather always
    layouts = (True, False) if triton_kernels.words_layout_fits(head_dim, bits) else (False,)
    for token_start, words in ((0, layouts[0]), (1, layouts[-1])):
        out = torch.full((2, 2 * group, num_queries, 41), float("nan"))
        triton_kernels.key_scores(q, codes, index.to(torch.uint8), delta, t["key_zero"],
                                  t["key_scale"], t["key_lut"], t["inv_freq"], 1.0, bits,
                                  token_start=token_start, out=out, words=words)
        assert out[..., :token_start].isnan().all(), "tokens before token_start are not written"
        torch.testing.assert_close(out[..., token_start:], expected[..., token_start:],
                                   rtol=1e-4, atol=1e-4)


def _reference_scores(t, q, codes, index, delta, bits, head_dim, num_tokens, sink=None):
    """q . RoPE(dequantized keys), the first sink.shape[2] keys exact (float32 throughout)."""
    dense = reference.dequantize_keys(codes, index, delta, t["key_zero"], t["key_scale"],
                                      t["key_lut"], bits, head_dim)
    if sink is not None:
        dense[:, :, : sink.shape[2]] = sink.float()
    rotated = reference.apply_rope(dense, torch.arange(num_tokens), t["inv_freq"], 1.0)
    return reference.scores(q.float(), rotated)


@pytest.mark.parametrize(("dtype", "group", "bits", "head_dim"),
                         [(torch.bfloat16, 4, 3, 128), (torch.float16, 3, 2, 64),
                          (torch.bfloat16, 2, 4, 64)])
def test_key_scores_of_16bit_queries_match_reference(dtype, group, bits, head_dim):
    """16-bit queries take the fp16 path (packed fp16 products, fp16 tensor-core dots): close to
    the float32 reference to fp16 rounding, well inside the bf16 rounding of q itself."""
    calibration = random_calibration(head_dim=head_dim, num_kv_heads=2, outliers=0.02)
    t, _, (codes, index, delta) = _packed_keys(calibration, bits, 2, 45, (group, bits, 5))
    q = torch.randn(2, 2 * group, 2, head_dim).to(dtype)
    expected = _reference_scores(t, q, codes, index, delta, bits, head_dim, 45)
    out = torch.full((2, 2 * group, 2, 45), float("nan"))
    triton_kernels.key_scores(q, codes, index.to(torch.uint8), delta, t["key_zero"],
                              t["key_scale"], t["key_lut"], t["inv_freq"], 1.0, bits,
                              token_start=0, out=out)
    assert torch.isfinite(out).all()
    assert ((out - expected).norm() / expected.norm()).item() < 2e-3
    torch.testing.assert_close(out, expected, rtol=1e-2, atol=2e-2 * expected.abs().mean().item())


@pytest.mark.parametrize(("dtype", "group", "num_queries"),
                         [(torch.bfloat16, 4, 1), (torch.float32, 3, 7)])
def test_key_scores_prepared_queries_equal_in_kernel_queries(dtype, group, num_queries):
    """The default (query operands prepared once per call) and the first version (rebuilt per
    tile inside the kernel) give the same scores, bit for bit (same operations and roundings)."""
    calibration = random_calibration(head_dim=64, num_kv_heads=2, outliers=0.02)
    t, _, (codes, index, delta) = _packed_keys(calibration, 3, 2, 37, (group, num_queries))
    q = torch.randn(2, 2 * group, num_queries, 64).to(dtype)
    expected = _reference_scores(t, q, codes, index, delta, 3, 64, 37)
    outs = []
    for prepared in (True, False):
        out = torch.full((2, 2 * group, num_queries, 37), float("nan"))
        triton_kernels.key_scores(q, codes, index.to(torch.uint8), delta, t["key_zero"],
                                  t["key_scale"], t["key_lut"], t["inv_freq"], 1.0, 3,
                                  token_start=0, out=out, prepared_queries=prepared)
        assert torch.isfinite(out).all()
        assert ((out - expected).norm() / expected.norm()).item() < 2e-3
        outs.append(out)
    torch.testing.assert_close(outs[0], outs[1], rtol=0, atol=0)


@pytest.mark.parametrize(("dtype", "group", "num_queries", "token_start", "num_sink", "bits"),
                         [(torch.bfloat16, 4, 1, 1, 0, 3), (torch.float16, 2, 3, 0, 0, 3),
                          (torch.bfloat16, 8, 1, 0, 3, 3), (torch.bfloat16, 4, 1, 1, 0, 2),
                          (torch.float16, 8, 2, 0, 2, 2)])
def test_key_scores_v3_matches_reference_and_v2(dtype, group, num_queries, token_start, num_sink,
                                                bits):
    """version=3 (key operand in the dot's register layout; on the CPU the plain-Triton lookup
    instead of the byte-permute one) against the float32 reference, as tight as the default
    kernel, and against the default kernel (same fp16 products, different summation order).
    2-bit codes: the 3-bit path with an empty 1-bit plane and a 4-entry codebook."""
    calibration = random_calibration(head_dim=128, num_kv_heads=2, outliers=0.02)
    t, k, (codes, index, delta) = _packed_keys(calibration, bits, 2, 37,
                                               (group, num_queries, 128, bits))
    assert t["key_lut"].numel() == 1 << bits
    sink = k[:, :, :num_sink].half() if num_sink else None
    q = torch.randn(2, 2 * group, num_queries, 128).to(dtype)
    expected = _reference_scores(t, q, codes, index, delta, bits, 128, 37, sink=sink)
    outs = []
    for version in (2, 3):
        out = torch.full((2, 2 * group, num_queries, 37), float("nan"))
        triton_kernels.key_scores(q, codes, index.to(torch.uint8), delta, t["key_zero"],
                                  t["key_scale"], t["key_lut"], t["inv_freq"], 1.0, bits,
                                  token_start=token_start, out=out, sink=sink, version=version)
        assert out[..., :token_start].isnan().all()
        out = out[..., token_start:]
        assert torch.isfinite(out).all()
        want = expected[..., token_start:]
        assert ((out - want).norm() / want.norm()).item() < 2e-3
        torch.testing.assert_close(out, want, rtol=1e-2, atol=2e-2 * want.abs().mean().item())
        outs.append(out)
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-3, atol=1e-3 * outs[0].abs().mean().item())


def test_key_scores_v3_load_order_changes_no_value():
    """Loading the next KV head's code words one head ahead, or only the real query rows of the
    operands (4 of the 16-row tile here) (4 KV heads in one program, a partial last tile), gives
    bit-identical scores to loading each just before its use."""
    calibration = random_calibration(head_dim=128, num_kv_heads=4, outliers=0.02)
    t, _, (codes, index, delta) = _packed_keys(calibration, 3, 1, 45, (4, 1, 128))
    q = torch.randn(1, 16, 1, 128).to(torch.bfloat16)
    outs = []
    for prefetch, mask_rows in ((0, False), (1, False), (0, True), (1, True)):
        out = torch.full((1, 16, 1, 45), float("nan"))
        triton_kernels.key_scores(q, codes, index.to(torch.uint8), delta, t["key_zero"],
                                  t["key_scale"], t["key_lut"], t["inv_freq"], 1.0, 3,
                                  token_start=0, out=out, version=3, heads_per_program=4,
                                  prefetch=prefetch, mask_rows=mask_rows)
        assert torch.isfinite(out).all()
        outs.append(out)
    for out in outs[1:]:
        torch.testing.assert_close(out, outs[0], rtol=0, atol=0)


@pytest.mark.parametrize("version", [2, 3])
def test_outlier_pass_row_chunks_agree(version):
    """The sparse-outlier pass updating 1, 2 or 4 query rows at once:
    same scores up to float32 summation order, all as close to the reference as the default
    (GQA 8 x 2 query tokens = 16 rows: four chunks of 4; 4% outliers: most slots used)."""
    calibration = random_calibration(head_dim=128, num_kv_heads=2, outliers=0.04)
    t, k, (codes, index, delta) = _packed_keys(calibration, 3, 1, 40, (8, 2, 128))
    assert (delta != 0).float().mean() > 0.5
    q = torch.randn(1, 16, 2, 128).to(torch.bfloat16)
    expected = _reference_scores(t, q, codes, index, delta, 3, 128, 40)
    outs = []
    for chunk in (1, 2, 4):
        out = torch.full((1, 16, 2, 40), float("nan"))
        triton_kernels.key_scores(q, codes, index.to(torch.uint8), delta, t["key_zero"],
                                  t["key_scale"], t["key_lut"], t["inv_freq"], 1.0, 3,
                                  token_start=0, out=out, version=version,
                                  outlier_row_chunk=chunk)
        assert torch.isfinite(out).all()
        assert ((out - expected).norm() / expected.norm()).item() < 2e-3
        outs.append(out)
    for out in outs[1:]:
        torch.testing.assert_close(out, outs[0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(("head_dim", "bits"), [(64, 3), (128, 4)])
def test_key_scores_v3_rejects_shapes_it_does_not_handle(head_dim, bits):
    calibration = random_calibration(head_dim=head_dim, num_kv_heads=2, outliers=0.02)
    t, _, (codes, index, delta) = _packed_keys(calibration, bits, 1, 16, (head_dim, bits))
    q = torch.randn(1, 4, 1, head_dim).to(torch.bfloat16)
    with pytest.raises(ValueError, match="version=3"):
        triton_kernels.key_scores(q, codes, index.to(torch.uint8), delta, t["key_zero"],
                                  t["key_scale"], t["key_lut"], t["inv_freq"], 1.0, bits,
                                  token_start=0, out=torch.empty(1, 4, 1, 16), version=3)


@pytest.mark.parametrize(("num_sink", "dtype"), [(3, torch.float32), (19, torch.bfloat16)])
def test_key_scores_read_exact_sink_keys(num_sink, dtype):
    """Sink tokens' scores come from their exact keys (19 > one 16-token tile: the sink spans
    tiles, all written by the first tile's program), the others from the codes."""
    calibration = random_calibration(head_dim=64, num_kv_heads=2, outliers=0.02)
    t, k, (codes, index, delta) = _packed_keys(calibration, 3, 2, 40, (num_sink, 3))
    sink = k[:, :, :num_sink].half()
    q = torch.randn(2, 4, 1, 64).to(dtype)
    expected = _reference_scores(t, q, codes, index, delta, 3, 64, 40, sink=sink)
    out = torch.full((2, 4, 1, 40), float("nan"))
    triton_kernels.key_scores(q, codes, index.to(torch.uint8), delta, t["key_zero"],
                              t["key_scale"], t["key_lut"], t["inv_freq"], 1.0, 3,
                              token_start=0, out=out, sink=sink)
    tolerance = 1e-4 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(out, expected, rtol=tolerance, atol=tolerance)


@triton.jit
def _sin_cos_kernel(Angle, Sin, Cos, N: tl.constexpr):
    offsets = tl.arange(0, N)
    sin, cos = triton_kernels._sin_cos(tl.load(Angle + offsets))
    tl.store(Sin + offsets, sin)
    tl.store(Cos + offsets, cos)


def test_sin_cos_keeps_float32_accuracy_at_long_positions():
    """RoPE angles fl32(position * inv_freq) up to 1M tokens (Llama-3 frequencies): the kernel's
    sin/cos of the float32 angle are within 1e-6 of the exact ones (a plain float32 reduction
    would be off by ~1e-2 rad at 500K)."""
    inv_freq = 1.0 / (500000.0 ** (torch.arange(0, 128, 2).float() / 128))
    positions = torch.tensor([0, 1, 7, 4095, 131071, 500000, 524287, 1048575]).float()
    angle = (positions[:, None] * inv_freq[None, :]).flatten()
    angle = torch.cat([angle, torch.zeros(1024 - angle.numel())])
    sin, cos = torch.empty_like(angle), torch.empty_like(angle)
    _sin_cos_kernel[(1,)](angle, sin, cos, N=1024)
    exact = angle.double()
    assert (sin.double() - exact.sin()).abs().max().item() < 1e-6
    assert (cos.double() - exact.cos()).abs().max().item() < 1e-6


@pytest.mark.parametrize("rope_scaling", [None, "llama3"])
@pytest.mark.parametrize("head_dim", [64, 128])
def test_fused_rope_equals_hf_rope_of_dequantized_keys(rope_scaling, head_dim):
    """The kernel's scores equal HF's apply_rotary_pos_emb(dequantized k) . q, RoPE scaling too."""
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

    rope = {"rope_type": "default", "rope_theta": 500000.0}
    if rope_scaling == "llama3":
        rope = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 64}
    config = LlamaConfig(hidden_size=4 * head_dim, num_attention_heads=4, num_key_value_heads=2,
                         head_dim=head_dim, max_position_embeddings=4096, rope_parameters=rope)
    rotary = LlamaRotaryEmbedding(config)
    if rope_scaling == "llama3":  # the scaling must actually change some frequencies
        plain = 1.0 / (500000.0 ** (torch.arange(0, head_dim, 2).float() / head_dim))
        assert not torch.allclose(rotary.inv_freq, plain)
    calibration = random_calibration(head_dim=head_dim, inv_freq=rotary.inv_freq,
                                     attention_scaling=rotary.attention_scaling)
    num_tokens = 300
    t, _, (codes, index, delta) = _packed_keys(calibration, 3, 1, num_tokens, (head_dim, 7))
    dense = reference.dequantize_keys(codes, index, delta, t["key_zero"], t["key_scale"],
                                      t["key_lut"], 3, head_dim)
    positions = torch.arange(num_tokens)[None]
    cos, sin = rotary(dense, positions)
    _, hf_keys = apply_rotary_pos_emb(dense, dense, cos, sin)
    q = torch.randn(1, 4, 2, head_dim)
    expected = q @ hf_keys.repeat_interleave(2, dim=1).transpose(-1, -2)
    out = torch.empty(1, 4, 2, num_tokens)
    triton_kernels.key_scores(q, codes, index.to(torch.uint8), delta, t["key_zero"], t["key_scale"],
                              t["key_lut"], t["inv_freq"], rotary.attention_scaling, 3,
                              token_start=0, out=out)
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=2e-4)


@pytest.mark.parametrize(("group", "bits", "head_dim", "num_queries"), KERNEL_CASES)
def test_attend_values_triton_matches_reference(group, bits, head_dim, num_queries):
    calibration = random_calibration(head_dim=head_dim, outliers=0.02)
    t = _tables(calibration, bits)
    v = values_like(calibration, 2, 53, _generator(group, bits, head_dim))
    num_slots = reference.outlier_slots(0.02, head_dim)
    packed = reference.quantize_values(v, t["value_boundaries"], t["value_lut"], bits, num_slots)
    dense = reference.dequantize_values(*packed, t["value_lut"], bits, head_dim)
    p = torch.softmax(torch.randn(2, 2 * group, num_queries, 53), dim=-1)
    codes, scale, zero, index, delta = packed
    for token_start, tokens_per_split in ((0, None), (1, 16)):  # one split, then several
        out = triton_kernels.attend_values(p, codes, scale, zero, index.to(torch.uint8), delta,
                                           t["value_lut"], bits, token_start=token_start,
                                           tokens_per_split=tokens_per_split)
        expected = reference.attend(p[..., token_start:], dense[:, :, token_start:])
        torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_stored_outliers_are_recovered(bits):
    calibration = random_calibration(head_dim=64, outliers=0.02)
    t, k, (codes, index, delta) = _packed_keys(calibration, bits, 2, 64, (bits, 11))
    dense = reference.dequantize_keys(codes, index, delta, t["key_zero"], t["key_scale"],
                                      t["key_lut"], bits, 64)
    normalized = (k - t["key_zero"][None, :, None]) / t["key_scale"][None, :, None]
    stored = torch.zeros_like(k, dtype=torch.bool).scatter_(-1, index, delta != 0)
    assert stored.any()
    # a stored outlier comes back to fp16 precision of its delta; every stored one was outside
    torch.testing.assert_close(dense[stored], k[stored], rtol=2e-3, atol=2e-3)
    assert (normalized[stored].abs() > 1).all()
