"""Fused Triton kernels for the small per-layer operations of a Llama-family decode step.

A decode step on a GPU is one CUDA graph (services/inference/decode_graph.py), in which HF's
modules still cost a kernel per elementwise operation: RMSNorm is six (cast, square, mean,
rsqrt-add, multiply, weight), rotary embedding about ten for q and k (slices, negation, cat,
products, sums), SiLU-and-multiply two, and each residual add one: ~700 launches per step at
~2 us each for a 32-layer model. Here each is one launch:

    rms_norm(x, weight, eps, residual=None) -> (normed, x + residual)   [one program per row]
    rotary(q, k, cos, sin) -> (q_rotated, k_rotated)                    [q and k in one launch]
    silu_mul(gate, up) -> silu(gate) * up

The plain-PyTorch references beside them are HF's own math (LlamaRMSNorm, apply_rotary_pos_emb,
act_fn(gate) * up); the kernels compute in float32 and round once where HF rounds after every
operation in the model dtype, so they agree to the model dtype's rounding (tests compare both).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .triton_common import next_power_of_2

# -- references (HF's math) -------------------------------------------------------------------


def rms_norm_reference(x, weight, eps, residual=None):
    if residual is not None:
        x = x + residual
    normed = x.float()
    normed = normed * torch.rsqrt(normed.pow(2).mean(-1, keepdim=True) + eps)
    return weight * normed.to(x.dtype), x


def rotary_reference(q, k, cos, sin):
    def rotate_half(x):
        half = x.shape[-1] // 2
        return torch.cat((-x[..., half:], x[..., :half]), dim=-1)

    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin


def silu_mul_reference(gate, up):
    return torch.nn.functional.silu(gate) * up


# -- kernels ----------------------------------------------------------------------------------


@triton.jit
def _rms_norm_kernel(
    x_ptr, residual_ptr, weight_ptr, out_ptr, sum_ptr, eps, width,
    HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < width
    x = tl.load(x_ptr + row * width + cols, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        # rounded to the model dtype, as the residual stream is kept in it
        x = x.to(tl.float32) + tl.load(residual_ptr + row * width + cols, mask=mask, other=0.0)
        x = x.to(sum_ptr.dtype.element_ty)
        tl.store(sum_ptr + row * width + cols, x, mask=mask)
    xf = x.to(tl.float32)
    inverse = 1.0 / tl.sqrt(tl.sum(xf * xf, axis=0) / width + eps)
    normed = (xf * inverse).to(out_ptr.dtype.element_ty)
    weight = tl.load(weight_ptr + cols, mask=mask, other=0.0)
    tl.store(out_ptr + row * width + cols, normed * weight, mask=mask)


def rms_norm(x, weight, eps: float, residual=None):
    """RMSNorm of (x + residual) over the last dim; returns (normed, x + residual or x)."""
    width = x.shape[-1]
    x2 = x.reshape(-1, width).contiguous()
    out = torch.empty_like(x2)
    if residual is not None:
        total = torch.empty_like(x2)
        residual2 = residual.reshape(-1, width).contiguous()
    else:
        total, residual2 = x2, x2
    _rms_norm_kernel[(x2.shape[0],)](
        x2, residual2, weight, out, total, eps, width,
        HAS_RESIDUAL=residual is not None, BLOCK=next_power_of_2(width),
    )  # fmt: skip
    return out.view(x.shape), total.view(x.shape)


@triton.jit
def _rotary_kernel(
    q_ptr, k_ptr, cos_ptr, sin_ptr, q_out_ptr, k_out_ptr, length,
    q_sb, q_sh, q_st, k_sb, k_sh, k_st,
    Q_HEADS: tl.constexpr, K_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr,
):  # fmt: skip
    # one program per (sequence, token) and head of q or k: out = x cos + rotate_half(x) sin
    row = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1)
    batch = row // length
    token = row % length
    cols = tl.arange(0, HEAD_DIM)
    HALF: tl.constexpr = HEAD_DIM // 2
    partner = (cols + HALF) % HEAD_DIM
    sign = tl.where(cols < HALF, -1.0, 1.0)
    cos = tl.load(cos_ptr + row * HEAD_DIM + cols).to(tl.float32)
    sin = tl.load(sin_ptr + row * HEAD_DIM + cols).to(tl.float32)
    if head < Q_HEADS:
        base = q_ptr + batch * q_sb + head * q_sh + token * q_st
        out = q_out_ptr + ((batch * Q_HEADS + head) * length + token) * HEAD_DIM
    else:
        base = k_ptr + batch * k_sb + (head - Q_HEADS) * k_sh + token * k_st
        out = k_out_ptr + ((batch * K_HEADS + head - Q_HEADS) * length + token) * HEAD_DIM
    x = tl.load(base + cols).to(tl.float32)
    x_partner = tl.load(base + partner).to(tl.float32)
    tl.store(out + cols, (x * cos + sign * x_partner * sin).to(out.dtype.element_ty))


def rotary(q, k, cos, sin):
    """q [N, H_q, T, D], k [N, H_k, T, D] (any strides, last dim contiguous), cos/sin [N, T, D]
    -> rotated q and k, contiguous [N, H, T, D]."""
    batch, q_heads, length, head_dim = q.shape
    k_heads = k.shape[1]
    if q.stride(3) != 1 or k.stride(3) != 1:
        raise ValueError("rotary needs a contiguous last dim")
    cos = cos.expand(batch, length, head_dim).contiguous()
    sin = sin.expand(batch, length, head_dim).contiguous()
    q_out = torch.empty(batch, q_heads, length, head_dim, dtype=q.dtype, device=q.device)
    k_out = torch.empty(batch, k_heads, length, head_dim, dtype=k.dtype, device=k.device)
    _rotary_kernel[(batch * length, q_heads + k_heads)](
        q, k, cos, sin, q_out, k_out, length,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        Q_HEADS=q_heads, K_HEADS=k_heads, HEAD_DIM=head_dim,
    )  # fmt: skip
    return q_out, k_out


@triton.jit
def _silu_mul_kernel(gate_ptr, up_ptr, out_ptr, width, gate_stride, up_stride,
                     BLOCK: tl.constexpr):  # fmt: skip
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < width
    gate = tl.load(gate_ptr + row * gate_stride + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(up_ptr + row * up_stride + cols, mask=mask, other=0.0).to(tl.float32)
    out = gate / (1.0 + tl.exp(-gate)) * up
    tl.store(out_ptr + row * width + cols, out.to(out_ptr.dtype.element_ty), mask=mask)


_SILU_BLOCK = 1024


def silu_mul(gate, up):
    """silu(gate) * up for gate/up [..., I] whose rows may be strided (halves of one tensor)."""
    width = gate.shape[-1]
    gate2, up2 = gate.reshape(-1, width), up.reshape(-1, width)
    if gate2.stride(1) != 1 or up2.stride(1) != 1:
        raise ValueError("silu_mul needs a contiguous last dim")
    out = torch.empty(gate2.shape, dtype=gate.dtype, device=gate.device)
    grid = (gate2.shape[0], triton.cdiv(width, _SILU_BLOCK))
    _silu_mul_kernel[grid](
        gate2, up2, out, width, gate2.stride(0), up2.stride(0), BLOCK=_SILU_BLOCK
    )
    return out.view(gate.shape)
