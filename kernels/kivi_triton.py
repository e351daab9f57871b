"""Triton kernels for KIVI keys: fused per-channel quantize + pack, and scores on packed keys.

Same math as kernels/kivi_reference.py. The score kernel never dequantizes the cache: for a token
group g with per-channel scale s and zero z,

    q·k_t = Σ_c (q_c s_c) code_{c,t} + Σ_c q_c z_c

so each group costs one small elementwise product q∘s, one dot product q·z, and one tensor-core
dot per bit plane of the codes (plane j holds channels j, j + per_byte, ...; kernels/bitpack.py).
Queries are divided by their largest magnitude before the float16 dot (range safety) and the
scores multiplied back.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .quant_reference import EPS
from .quant_triton import minmax_codes, pack_rows
from .queries_triton import prepare_queries
from .triton_common import next_power_of_2, num_programs_target, score_dot_dtype, triton_dtype


@triton.jit
def _quantize_keys_kernel(
    x_ptr,  # [num_groups * GROUP, HEAD_DIM] contiguous
    codes_ptr,  # [num_groups * GROUP, HEAD_DIM * BITS // 8] uint8
    scale_ptr,  # [num_groups, HEAD_DIM]
    zero_ptr,
    HEAD_DIM: tl.constexpr,
    D_PAD: tl.constexpr,
    GROUP: tl.constexpr,
    BITS: tl.constexpr,
    STAT_DTYPE: tl.constexpr,
    EPS: tl.constexpr,
):
    group = tl.program_id(0).to(tl.int64)
    tokens = group * GROUP + tl.arange(0, GROUP)
    cols = tl.arange(0, D_PAD)
    col_mask = cols < HEAD_DIM
    x = tl.load(
        x_ptr + tokens[:, None] * HEAD_DIM + cols[None, :], mask=col_mask[None, :], other=0.0
    )
    x = x.to(tl.float32)
    mn = tl.min(x, axis=0)
    mx = tl.max(x, axis=0)
    codes, scale, zero = minmax_codes(x, mn[None, :], mx[None, :], (1 << BITS) - 1, EPS, STAT_DTYPE)
    packed = pack_rows(codes, GROUP, D_PAD, BITS)
    NUM_BYTES: tl.constexpr = HEAD_DIM * BITS // 8
    byte_cols = tl.arange(0, D_PAD * BITS // 8)
    tl.store(
        codes_ptr + tokens[:, None] * NUM_BYTES + byte_cols[None, :],
        packed.to(tl.uint8),
        mask=byte_cols[None, :] < NUM_BYTES,
    )
    tl.store(
        scale_ptr + group * HEAD_DIM + cols,
        tl.reshape(scale, (D_PAD,)).to(STAT_DTYPE),
        mask=col_mask,
    )
    tl.store(
        zero_ptr + group * HEAD_DIM + cols, tl.reshape(zero, (D_PAD,)).to(STAT_DTYPE), mask=col_mask
    )


def quantize_keys(x: torch.Tensor, bits: int, group_size: int) -> dict[str, torch.Tensor]:
    """x [B, H, T, D] (contiguous, T a multiple of group_size) -> {"codes", "scale", "zero"}."""
    batch, heads, num_tokens, head_dim = x.shape
    num_groups = batch * heads * (num_tokens // group_size)
    codes = torch.empty(
        batch, heads, num_tokens, head_dim * bits // 8, dtype=torch.uint8, device=x.device
    )
    scale = torch.empty(
        batch, heads, num_tokens // group_size, head_dim, dtype=x.dtype, device=x.device
    )
    zero = torch.empty_like(scale)
    if num_groups:
        _quantize_keys_kernel[(num_groups,)](
            x, codes, scale, zero,
            HEAD_DIM=head_dim, D_PAD=next_power_of_2(head_dim), GROUP=group_size, BITS=bits,
            STAT_DTYPE=triton_dtype(x.dtype), EPS=EPS,
        )  # fmt: skip
    return {"codes": codes, "scale": scale, "zero": zero}


@triton.jit
def _key_scores_kernel(
    q_ptr,  # [B * H_KV, num_rows, HEAD_DIM] float32, each row divided by its max |q|
    q_max_ptr,  # [B * H_KV, num_rows] float32
    codes_ptr,  # [B * H_KV, capacity, HEAD_DIM * BITS // 8] uint8
    scale_ptr,  # [B * H_KV, capacity // GROUP, HEAD_DIM]
    zero_ptr,
    out_ptr,  # rows view [B, H_KV, num_rows, >= num_tokens] float32
    num_groups,
    groups_per_program,
    num_rows,
    capacity,
    stride_ob,
    stride_oh,
    stride_om,
    stride_ot,
    H_KV: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    D_PAD: tl.constexpr,
    GROUP: tl.constexpr,
    BITS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
):
    program = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    rows = tl.program_id(2) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = rows < num_rows
    PER_BYTE: tl.constexpr = 8 // BITS
    NUM_BYTES: tl.constexpr = HEAD_DIM * BITS // 8
    NB_PAD: tl.constexpr = D_PAD // PER_BYTE
    byte_cols = tl.arange(0, NB_PAD)
    byte_mask = byte_cols < NUM_BYTES
    cols = tl.arange(0, D_PAD)
    q_rows = q_ptr + (bh * num_rows + rows[:, None]) * HEAD_DIM
    q = tl.load(
        q_rows + cols[None, :], mask=row_mask[:, None] & (cols[None, :] < HEAD_DIM), other=0.0
    )
    q_max = tl.load(q_max_ptr + bh * num_rows + rows, mask=row_mask, other=0.0)
    out_base = (
        out_ptr + (bh // H_KV) * stride_ob + (bh % H_KV) * stride_oh + rows[:, None] * stride_om
    )
    first = program * groups_per_program
    for group in range(first, tl.minimum(first + groups_per_program, num_groups)):
        tokens = group * GROUP + tl.arange(0, GROUP)
        packed = tl.load(
            codes_ptr + (bh * capacity + tokens[:, None]) * NUM_BYTES + byte_cols[None, :],
            mask=byte_mask[None, :],
            other=0,
        ).to(tl.int32)
        stats = (bh * (capacity // GROUP) + group) * HEAD_DIM
        zero = tl.load(zero_ptr + stats + cols, mask=cols < HEAD_DIM, other=0.0).to(tl.float32)
        acc = (
            tl.zeros((BLOCK_M, GROUP), dtype=tl.float32)
            + tl.sum(q * zero[None, :], axis=1)[:, None]
        )
        for plane in tl.static_range(PER_BYTE):
            channels = byte_cols * PER_BYTE + plane
            q_plane = tl.load(
                q_rows + channels[None, :], mask=row_mask[:, None] & byte_mask[None, :], other=0.0
            )
            scale = tl.load(scale_ptr + stats + channels, mask=byte_mask, other=0.0).to(tl.float32)
            codes = (packed >> (plane * BITS)) & ((1 << BITS) - 1)
            acc += tl.dot((q_plane * scale[None, :]).to(DOT_DTYPE), tl.trans(codes.to(DOT_DTYPE)))
        tl.store(
            out_base + tokens[None, :] * stride_ot, acc * q_max[:, None], mask=row_mask[:, None]
        )


def score_launch_shape(
    num_groups: int, batch_heads: int, row_tiles: int, device: torch.device
) -> tuple[int, int]:
    """(groups per program, programs along the token axis) for the group-tiled score kernels."""
    programs = max(1, num_programs_target(device) // (batch_heads * row_tiles))
    groups_per_program = max(1, triton.cdiv(num_groups, programs))
    return groups_per_program, triton.cdiv(num_groups, groups_per_program)


def key_scores(q, fields, num_tokens: int, out: torch.Tensor, bits: int, group_size: int) -> None:
    """Scores of q [B, H_q, T_q, D] against the first num_tokens packed keys, written into
    out [B, H_q, T_q, num_tokens] (float32; a view with unit stride on its last axis is fine)."""
    codes, scale, zero = fields["codes"], fields["scale"], fields["zero"]
    batch, num_kv_heads, capacity, _ = codes.shape
    head_dim = scale.shape[-1]
    operand = score_dot_dtype(q.dtype)
    prepared = prepare_queries(q, num_kv_heads)
    num_rows = prepared["query"].shape[1]
    out_rows = out.view(batch, num_kv_heads, num_rows, num_tokens)
    block_m = max(16, min(64, next_power_of_2(num_rows)))
    row_tiles = triton.cdiv(num_rows, block_m)
    num_groups = num_tokens // group_size
    groups_per_program, programs = score_launch_shape(
        num_groups, batch * num_kv_heads, row_tiles, q.device
    )
    _key_scores_kernel[(programs, batch * num_kv_heads, row_tiles)](
        prepared["query"], prepared["query_max"], codes, scale, zero, out_rows,
        num_groups, groups_per_program, num_rows, capacity, *out_rows.stride(),
        H_KV=num_kv_heads, HEAD_DIM=head_dim, D_PAD=next_power_of_2(head_dim), GROUP=group_size,
        BITS=bits, BLOCK_M=block_m, DOT_DTYPE=operand,
        # float32 operands: one pipeline stage fits shared memory.
        num_stages=1 if operand == tl.float32 else 3,
    )  # fmt: skip
