"""The fused per-layer kernels of the decode step (kernels/model_ops_triton.py, under the Triton
interpreter) against HF's own math: RMSNorm with and without the residual add, rotary embedding
of strided q/k views, SiLU-and-multiply on the halves of one tensor."""

from __future__ import annotations

import pytest
import torch
from kvpack.kernels.model_ops_triton import (
    rms_norm,
    rms_norm_reference,
    rotary,
    rotary_reference,
    silu_mul,
    silu_mul_reference,
)
from transformers.models.llama.modeling_llama import LlamaRMSNorm, apply_rotary_pos_emb

TOLERANCE = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.float16: dict(rtol=2e-3, atol=2e-3)}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("with_residual", [False, True])
def test_rms_norm_matches_hf(dtype, with_residual):
    generator = torch.Generator().manual_seed(3)
    x = (torch.randn(2, 3, 96, generator=generator) * 3).to(dtype)
    residual = torch.randn(2, 3, 96, generator=generator).to(dtype) if with_residual else None
    module = LlamaRMSNorm(96, eps=1e-5)
    module.weight.data = torch.rand(96, generator=generator).to(dtype) + 0.5
    normed, total = rms_norm(x, module.weight, 1e-5, residual=residual)
    expected_total = x + residual if with_residual else x
    torch.testing.assert_close(total, expected_total)
    torch.testing.assert_close(normed, module(expected_total), **TOLERANCE[dtype])
    torch.testing.assert_close(
        normed, rms_norm_reference(x, module.weight, 1e-5, residual)[0], **TOLERANCE[dtype]
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_rotary_matches_hf_on_strided_views(dtype):
    generator = torch.Generator().manual_seed(4)
    batch, length, q_heads, k_heads, head_dim = 2, 5, 6, 2, 32
    # [N, T, H, D] projections seen as [N, H, T, D], as the runner has them
    q = torch.randn(batch, length, q_heads, head_dim, generator=generator).to(dtype).transpose(1, 2)
    k = torch.randn(batch, length, k_heads, head_dim, generator=generator).to(dtype).transpose(1, 2)
    angles = torch.rand(batch, length, head_dim // 2, generator=generator) * 100
    angles = torch.cat([angles, angles], dim=-1)
    cos, sin = angles.cos().to(dtype), angles.sin().to(dtype)
    q_rot, k_rot = rotary(q, k, cos, sin)
    expected_q, expected_k = apply_rotary_pos_emb(q, k, cos, sin)
    torch.testing.assert_close(q_rot, expected_q, **TOLERANCE[dtype])
    torch.testing.assert_close(k_rot, expected_k, **TOLERANCE[dtype])
    reference_q, _ = rotary_reference(q, k, cos, sin)
    torch.testing.assert_close(q_rot, reference_q, **TOLERANCE[dtype])
    assert q_rot.is_contiguous() and k_rot.is_contiguous()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_silu_mul_on_halves_of_one_tensor(dtype):
    generator = torch.Generator().manual_seed(5)
    gate_up = (torch.randn(3, 1, 2 * 1500, generator=generator) * 4).to(dtype)
    gate, up = gate_up.chunk(2, dim=-1)
    torch.testing.assert_close(silu_mul(gate, up), silu_mul_reference(gate, up), **TOLERANCE[dtype])
