"""Triton kernels for per-token value quantization and attention on packed values.

Same math as kernels/values_reference.py. `attend_values` dequantizes tiles in registers and
feeds them to the tensor cores; no full-precision copy of the cache is ever materialized. Decode
has few query rows, so the token axis is split across programs (flash-decoding style) and the
float32 partial sums are added afterwards.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .gqa import per_query_head, rows_per_kv_head
from .quant_reference import EPS
from .quant_triton import minmax_codes, pack_rows, unpack_rows
from .triton_common import dot_dtype, next_power_of_2, num_programs_target, triton_dtype


@triton.jit
def _quantize_values_kernel(
    x_ptr,  # [num_rows, HEAD_DIM] contiguous
    codes_ptr,  # [num_rows, HEAD_DIM * BITS // 8] uint8
    scale_ptr,  # [num_rows, HEAD_DIM // GROUP]
    zero_ptr,
    num_rows,
    HEAD_DIM: tl.constexpr,
    D_PAD: tl.constexpr,
    GROUP: tl.constexpr,
    BITS: tl.constexpr,
    BLOCK_ROWS: tl.constexpr,
    STAT_DTYPE: tl.constexpr,
    EPS: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    rows = pid * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    cols = tl.arange(0, D_PAD)
    row_mask = rows < num_rows
    mask = row_mask[:, None] & (cols[None, :] < HEAD_DIM)
    x = tl.load(x_ptr + rows[:, None] * HEAD_DIM + cols[None, :], mask=mask, other=0.0).to(
        tl.float32
    )
    NUM_GROUPS_PAD: tl.constexpr = D_PAD // GROUP
    grouped = tl.reshape(x, (BLOCK_ROWS, NUM_GROUPS_PAD, GROUP))
    mn = tl.min(grouped, axis=2)
    mx = tl.max(grouped, axis=2)
    codes, scale, zero = minmax_codes(
        grouped, mn[:, :, None], mx[:, :, None], (1 << BITS) - 1, EPS, STAT_DTYPE
    )
    packed = pack_rows(tl.reshape(codes, (BLOCK_ROWS, D_PAD)), BLOCK_ROWS, D_PAD, BITS)
    NUM_BYTES: tl.constexpr = HEAD_DIM * BITS // 8
    byte_cols = tl.arange(0, D_PAD * BITS // 8)
    tl.store(
        codes_ptr + rows[:, None] * NUM_BYTES + byte_cols[None, :],
        packed.to(tl.uint8),
        mask=row_mask[:, None] & (byte_cols[None, :] < NUM_BYTES),
    )
    NUM_GROUPS: tl.constexpr = HEAD_DIM // GROUP
    group_cols = tl.arange(0, NUM_GROUPS_PAD)
    stat_offsets = rows[:, None] * NUM_GROUPS + group_cols[None, :]
    stat_mask = row_mask[:, None] & (group_cols[None, :] < NUM_GROUPS)
    scale_stored = tl.reshape(scale, (BLOCK_ROWS, NUM_GROUPS_PAD))
    zero_stored = tl.reshape(zero, (BLOCK_ROWS, NUM_GROUPS_PAD))
    tl.store(scale_ptr + stat_offsets, scale_stored.to(STAT_DTYPE), mask=stat_mask)
    tl.store(zero_ptr + stat_offsets, zero_stored.to(STAT_DTYPE), mask=stat_mask)


def quantize_values(x: torch.Tensor, bits: int, group_size: int) -> dict[str, torch.Tensor]:
    """x [..., T, D] contiguous -> {"codes", "scale", "zero"}, as values_reference does."""
    *lead, head_dim = x.shape
    flat = x.reshape(-1, head_dim)
    num_rows = flat.shape[0]
    codes = torch.empty(*lead, head_dim * bits // 8, dtype=torch.uint8, device=x.device)
    scale = torch.empty(*lead, head_dim // group_size, dtype=x.dtype, device=x.device)
    zero = torch.empty_like(scale)
    block_rows = 32
    if num_rows:
        _quantize_values_kernel[(triton.cdiv(num_rows, block_rows),)](
            flat, codes, scale, zero, num_rows,
            HEAD_DIM=head_dim, D_PAD=next_power_of_2(head_dim), GROUP=group_size, BITS=bits,
            BLOCK_ROWS=block_rows, STAT_DTYPE=triton_dtype(x.dtype), EPS=EPS,
        )  # fmt: skip
    return {"codes": codes, "scale": scale, "zero": zero}


@triton.jit
def _attend_values_kernel(
    p_ptr,  # rows view [B, H_KV, M, >= num_tokens] (any strides)
    codes_ptr,  # [B, H_KV, capacity, HEAD_DIM * BITS // 8] contiguous
    scale_ptr,  # [B, H_KV, capacity, HEAD_DIM // GROUP] contiguous
    zero_ptr,
    partial_ptr,  # [num_splits, B * H_KV, M, HEAD_DIM] float32
    num_tokens,
    tokens_per_split,
    num_rows,
    capacity,
    stride_pb,
    stride_ph,
    stride_pm,
    stride_pt,
    H_KV: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    D_PAD: tl.constexpr,
    GROUP: tl.constexpr,
    BITS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_T: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
):
    bh = tl.program_id(0).to(tl.int64)
    row_tile = tl.program_id(1)
    split = tl.program_id(2)
    batch = bh // H_KV
    head = bh % H_KV
    rows = row_tile * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = rows < num_rows
    cols = tl.arange(0, D_PAD)
    col_mask = cols < HEAD_DIM
    NUM_BYTES: tl.constexpr = HEAD_DIM * BITS // 8
    byte_cols = tl.arange(0, D_PAD * BITS // 8)
    NUM_GROUPS: tl.constexpr = HEAD_DIM // GROUP
    NUM_GROUPS_PAD: tl.constexpr = D_PAD // GROUP
    group_cols = tl.arange(0, NUM_GROUPS_PAD)
    p_base = p_ptr + batch * stride_pb + head * stride_ph
    codes_base = codes_ptr + bh * capacity * NUM_BYTES
    stat_base = bh * capacity * NUM_GROUPS
    acc = tl.zeros((BLOCK_M, D_PAD), dtype=tl.float32)
    t_begin = split * tokens_per_split
    t_end = tl.minimum(t_begin + tokens_per_split, num_tokens)
    for t0 in range(t_begin, t_end, BLOCK_T):
        tokens = t0 + tl.arange(0, BLOCK_T)
        token_mask = tokens < t_end
        p = tl.load(
            p_base + rows[:, None] * stride_pm + tokens[None, :] * stride_pt,
            mask=row_mask[:, None] & token_mask[None, :],
            other=0.0,
        )
        packed = tl.load(
            codes_base + tokens[:, None] * NUM_BYTES + byte_cols[None, :],
            mask=token_mask[:, None] & (byte_cols[None, :] < NUM_BYTES),
            other=0,
        )
        codes = unpack_rows(packed, BLOCK_T, D_PAD * BITS // 8, BITS)
        # One scale and zero per channel group, broadcast over the group's channels in registers.
        stat_offsets = stat_base + tokens[:, None] * NUM_GROUPS + group_cols[None, :]
        stat_mask = token_mask[:, None] & (group_cols[None, :] < NUM_GROUPS)
        scale = tl.load(scale_ptr + stat_offsets, mask=stat_mask, other=0.0).to(tl.float32)
        zero = tl.load(zero_ptr + stat_offsets, mask=stat_mask, other=0.0).to(tl.float32)
        grouped = tl.reshape(codes.to(tl.float32), (BLOCK_T, NUM_GROUPS_PAD, GROUP))
        values = tl.reshape(grouped * scale[:, :, None] + zero[:, :, None], (BLOCK_T, D_PAD))
        acc += tl.dot(p.to(DOT_DTYPE), values.to(DOT_DTYPE))
    out = (
        partial_ptr
        + ((split * tl.num_programs(0) + bh) * num_rows + rows[:, None]) * HEAD_DIM
        + cols[None, :]
    )
    tl.store(out, acc, mask=row_mask[:, None] & col_mask[None, :])


# Launch settings of attend_values; 64 and 4 measured fastest on the H100
# (bench/results/kernels_h100.json, "sweep").
ATTEND_BLOCK_T = 64
ATTEND_NUM_WARPS = 4


def attend_values(p, fields, num_tokens: int, bits: int, group_size: int) -> torch.Tensor:
    """p [B, H_q, T_q, num_tokens] @ packed values -> float32 [B, H_q, T_q, D]."""
    codes, scale, zero = fields["codes"], fields["scale"], fields["zero"]
    batch, num_kv_heads, capacity, _ = codes.shape
    head_dim = scale.shape[-1] * group_size
    rows = rows_per_kv_head(p, num_kv_heads)
    num_rows = rows.shape[2]
    block_m = max(16, min(64, next_power_of_2(num_rows)))
    block_t = ATTEND_BLOCK_T
    row_tiles = triton.cdiv(num_rows, block_m)
    splits = max(
        1,
        min(
            triton.cdiv(num_tokens, block_t),
            num_programs_target(p.device) // (batch * num_kv_heads * row_tiles),
        ),
    )
    tokens_per_split = triton.cdiv(triton.cdiv(num_tokens, splits), block_t) * block_t
    splits = triton.cdiv(num_tokens, tokens_per_split)
    partial = torch.empty(
        splits, batch * num_kv_heads, num_rows, head_dim, dtype=torch.float32, device=p.device
    )
    _attend_values_kernel[(batch * num_kv_heads, row_tiles, splits)](
        rows, codes, scale, zero, partial,
        num_tokens, tokens_per_split, num_rows, capacity,
        rows.stride(0), rows.stride(1), rows.stride(2), rows.stride(3),
        H_KV=num_kv_heads, HEAD_DIM=head_dim, D_PAD=next_power_of_2(head_dim), GROUP=group_size,
        BITS=bits, BLOCK_M=block_m, BLOCK_T=block_t, DOT_DTYPE=dot_dtype(scale.dtype),
        # float32 operands: one pipeline stage fits shared memory.
        num_stages=1 if dot_dtype(scale.dtype) == tl.float32 else 3,
        num_warps=ATTEND_NUM_WARPS,
    )  # fmt: skip
    out = partial.sum(dim=0) if splits > 1 else partial[0]
    return per_query_head(out.view(batch, num_kv_heads, num_rows, head_dim), p.shape[1], p.shape[2])
