"""Per-token value quantization and attention on packed values: Triton vs reference."""

from __future__ import annotations

import pytest
import torch
from kvpack.kernels import values_reference, values_triton
from kvpack.kernels.bitpack import unpack_codes


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize(
    "head_dim,bits,group", [(64, 2, 32), (48, 4, 16), (128, 2, 32), (32, 4, 32)]
)
def test_quantize_matches_reference_bit_exactly(dtype, head_dim, bits, group):
    x = torch.randn(2, 3, 21, head_dim, dtype=dtype) * 3
    expected = values_reference.quantize_values(x, bits, group)
    actual = values_triton.quantize_values(x, bits, group)
    for name in ("codes", "scale", "zero"):
        assert torch.equal(actual[name], expected[name]), name


@pytest.mark.parametrize("bits", [2, 4])
def test_dequantization_error_is_within_half_a_step(bits):
    x = torch.randn(4, 40, 64) * 5
    fields = values_reference.quantize_values(x, bits, 32)
    restored = values_reference.dequantize_values(
        fields["codes"], fields["scale"], fields["zero"], bits, 32
    )
    step = fields["scale"].float().repeat_interleave(32, dim=-1)
    assert ((restored - x).abs() <= step / 2 + 1e-5).all()


def test_constant_and_zero_groups_are_exact_and_finite():
    x = torch.zeros(1, 1, 4, 64)
    x[0, 0, 1] = 7.25  # a constant token
    x[0, 0, 2, :32] = -3.0  # one constant group, one varying group
    x[0, 0, 2, 32:] = torch.linspace(-1, 1, 32)
    for impl in (values_reference, values_triton):
        fields = impl.quantize_values(x, 2, 32)
        restored = values_reference.dequantize_values(
            fields["codes"], fields["scale"], fields["zero"], 2, 32
        )
        assert torch.isfinite(restored).all()
        assert torch.equal(restored[0, 0, :2], x[0, 0, :2])
        assert torch.equal(restored[0, 0, 2, :32], x[0, 0, 2, :32])
        assert (unpack_codes(fields["codes"][0, 0, 1], 2) == 0).all()


@pytest.mark.parametrize("group_heads", [1, 3, 4, 8])
@pytest.mark.parametrize("num_queries", [1, 5])
def test_attend_matches_reference(group_heads, num_queries):
    kv_heads, tokens, head_dim = 2, 150, 48
    v = torch.randn(2, kv_heads, tokens, head_dim)
    fields = values_reference.quantize_values(v, 2, 16)
    # a preallocated cache holds more rows than tokens: only the first `tokens` may be read
    padded = {name: torch.cat([t, torch.full_like(t, 77)], dim=2) for name, t in fields.items()}
    p = torch.softmax(torch.randn(2, kv_heads * group_heads, num_queries, tokens), dim=-1)
    expected = values_reference.attend_values(p, fields, tokens, 2, 16)
    actual = values_triton.attend_values(p, padded, tokens, 2, 16)
    assert actual.shape == (2, kv_heads * group_heads, num_queries, head_dim)
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)
    # and the packed result approximates p·v
    exact = torch.matmul(p, v.repeat_interleave(group_heads, dim=1))
    assert (actual - exact).norm() / exact.norm() < 0.35
