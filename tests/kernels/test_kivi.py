"""KIVI keys: per-channel quantization over token groups and scores on packed keys."""

from __future__ import annotations

import pytest
import torch
from kvpack.kernels import kivi_reference, kivi_triton


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("head_dim,bits,group", [(64, 2, 32), (48, 4, 16), (32, 2, 16)])
def test_quantize_matches_reference_bit_exactly(dtype, head_dim, bits, group):
    x = (torch.randn(2, 3, 2 * group, head_dim) * 2).to(dtype)
    expected = kivi_reference.quantize_keys(x, bits, group)
    actual = kivi_triton.quantize_keys(x, bits, group)
    for name in ("codes", "scale", "zero"):
        assert torch.equal(actual[name], expected[name]), name


def test_per_channel_statistics_and_error_bound():
    x = torch.randn(1, 1, 32, 16) * torch.linspace(0.1, 10, 16)  # very different channel ranges
    fields = kivi_reference.quantize_keys(x, 2, 32)
    assert torch.equal(fields["zero"][0, 0, 0], x[0, 0].amin(dim=0))
    restored = kivi_reference.dequantize_keys(fields, 32, 2, 32)
    step = fields["scale"][0, 0, 0]
    assert ((restored[0, 0] - x[0, 0]).abs() <= step / 2 + 1e-5).all()


def test_constant_channels_are_exact_not_nan():
    x = torch.ones(1, 2, 16, 32) * 3.5
    x[0, 1] = 0.0
    for impl in (kivi_reference, kivi_triton):
        fields = impl.quantize_keys(x, 2, 16)
        restored = kivi_reference.dequantize_keys(fields, 16, 2, 16)
        assert torch.equal(restored, x)


@pytest.mark.parametrize("group_heads", [1, 3, 4, 8])
@pytest.mark.parametrize("num_queries", [1, 6])
@pytest.mark.parametrize("head_dim,bits", [(64, 2), (48, 4)])
def test_scores_match_reference(group_heads, num_queries, head_dim, bits):
    kv_heads, tokens, group = 2, 64, 16
    k = torch.randn(2, kv_heads, tokens, head_dim)
    fields = kivi_reference.quantize_keys(k, bits, group)
    q = torch.randn(2, kv_heads * group_heads, num_queries, head_dim) * 4
    expected = kivi_reference.key_scores(q, fields, tokens, bits, group)
    out = torch.full((2, kv_heads * group_heads, num_queries, tokens + 5), float("nan"))
    kivi_triton.key_scores(q, fields, tokens, out[..., :tokens], bits, group)
    torch.testing.assert_close(out[..., :tokens], expected, rtol=1e-4, atol=1e-4)
    assert out[..., tokens:].isnan().all()  # nothing written past the packed part


def test_bfloat16_reference_path():
    # The CPU interpreter has no bfloat16 arithmetic: bfloat16 runs through the reference here and
    # through the kernels in bench/kernels/bench_kernels.py on a GPU.
    x = torch.randn(1, 2, 32, 64, dtype=torch.bfloat16)
    fields = kivi_reference.quantize_keys(x, 4, 32)
    assert fields["scale"].dtype == torch.bfloat16
    restored = kivi_reference.dequantize_keys(fields, 32, 4, 32)
    assert ((restored - x.float()).norm() / x.float().norm()) < 0.1
