"""Fused decode attention on a packed cache: one query token per sequence, flash-decoding style.

    out = decode_attention(q, lengths, keys, values, key_layout, value_layout, scaling)

computes softmax(q·Kᵀ·scaling)·V over every token the cache holds, in two launches (a split
kernel and a combine kernel) instead of the score kernel, softmax, value kernel and the
full-precision tail's matmuls of the unfused path (PackedKVCodec.key_scores / attend_values, which
stay the reference: same math, tests compare both). The token counts are read from `lengths`, an
int64 device tensor [2] = (packed tokens, tail tokens), never from host integers, and the grid is
sized from the cache's capacity with empty splits exiting at once: a CUDA graph that captured one
call replays correctly while the cache grows.

Grid: (NUM_SPLITS + 1, B * H_kv). Split s < NUM_SPLITS covers an equal, BLOCK_T-aligned share of
the packed tokens; the last split covers the full-precision tail. Each keeps a running max, sum
and float32 accumulator over its tokens for the query heads of its KV head (rows of
kernels/gqa.py) and writes them out; the combine kernel rescales and adds them.

Packed layouts (kernels/cache.py fields, [B, H_kv, rows, ...] contiguous):
- EXACT: one field "data" [.., capacity, D] in the cache dtype (the fp16 codec).
- KIVI keys: "codes" [.., capacity, D*bits/8], per-channel "scale"/"zero" [.., capacity/G, D].
- PER_TOKEN values: "codes" [.., capacity, D*bits/8], "scale"/"zero" [.., capacity, D/Gc].
Keys and values are dequantized tile by tile in registers and fed to the tensor cores; KIVI
scores use queries divided by their largest magnitude in float16 (as kernels/kivi_triton.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .quant_triton import unpack_rows
from .triton_common import (
    PROGRAMS_PER_SM,
    dot_dtype,
    next_power_of_2,
    num_programs_target,
)

EXACT, KIVI_KEYS, PER_TOKEN_VALUES = 0, 1, 2
_LOG2E = 1.4426950408889634
_NEG_BIG = -1.0e30  # a finite "minus infinity" for running maxima (exp2 of differences stays 0)


@dataclass(frozen=True)
class DecodeLayout:
    """How one of keys / values is stored, for this kernel: `kind` EXACT / KIVI_KEYS /
    PER_TOKEN_VALUES, the code bits and the quantization group (tokens for KIVI keys, channels for
    per-token values); bits and group are unused for EXACT."""

    kind: int
    bits: int = 16
    group: int = 1


# Launch settings; bench/inference/bench_decode.py sweeps them on the GPU (--sweep). On the H100
# at 128K tokens (bench/results/inference_decode_h100*.json, "sweep") 64 / 4 / 2 / 4 was fastest
# for KIVI: 264 us per layer, about 380 GB/s of packed cache (the exact layout reaches ~2.6 TB/s;
# KIVI is bound by dequantization, not bandwidth). A bit-plane variant that avoids reshaping codes
# in registers measured 421-1036 us and was dropped.
DECODE_BLOCK_T = 64
DECODE_NUM_WARPS = 4
DECODE_NUM_STAGES = 2
DECODE_PROGRAMS_PER_SM = 4
# Register cap per thread (None: the compiler's choice, 128 at 64 / 4 / 2): fewer registers let
# more programs share a multiprocessor, which hides more of the loop's load and dot latency.
DECODE_MAX_REGISTERS = None


@triton.jit
def _codes_as(codes, DTYPE: tl.constexpr):
    """Small non-negative int32 codes as DTYPE. For 16-bit types the code is OR-ed into the bits
    of 1024.0 (float16) or 128.0 (bfloat16), which are then subtracted: exact for codes below 1024
    / 128, and two packed instructions per pair of codes instead of an integer-to-float
    conversion each and a packing instruction (the kernel is bound by instruction issue)."""
    if DTYPE == tl.float16:
        return (codes | 0x6400).to(tl.int16).to(tl.float16, bitcast=True) - 1024.0
    elif DTYPE == tl.bfloat16:
        return (codes | 0x4300).to(tl.int16).to(tl.bfloat16, bitcast=True) - 128.0
    else:
        return codes.to(DTYPE)


@triton.jit
def _key_tile(
    k0_ptr, k1_ptr, k2_ptr, bh, capacity, t0, tokens, token_mask,
    LAYOUT: tl.constexpr, HEAD_DIM: tl.constexpr, BITS: tl.constexpr, GROUP: tl.constexpr,
    BLOCK_T: tl.constexpr, DTYPE: tl.constexpr,
):  # fmt: skip
    """Keys of `tokens` ([BLOCK_T], starting at t0, a multiple of GROUP) as [BLOCK_T, HEAD_DIM]
    (KIVI: dequantized in DTYPE)."""
    cols = tl.arange(0, HEAD_DIM)
    if LAYOUT == 0:  # EXACT
        return tl.load(
            k0_ptr + (bh * capacity + tokens[:, None]) * HEAD_DIM + cols[None, :],
            mask=token_mask[:, None],
            other=0.0,
        )
    else:  # KIVI: per-channel scale and zero per group of GROUP tokens
        NUM_BYTES: tl.constexpr = HEAD_DIM * BITS // 8
        byte_cols = tl.arange(0, NUM_BYTES)
        packed = tl.load(
            k0_ptr + (bh * capacity + tokens[:, None]) * NUM_BYTES + byte_cols[None, :],
            mask=token_mask[:, None],
            other=0,
        )
        codes = _codes_as(unpack_rows(packed, BLOCK_T, NUM_BYTES, BITS), DTYPE)
        GROUPS: tl.constexpr = BLOCK_T // GROUP
        group_rows = t0 // GROUP + tl.arange(0, GROUPS)
        stats = (bh * (capacity // GROUP) + group_rows[:, None]) * HEAD_DIM + cols[None, :]
        group_mask = group_rows[:, None] * GROUP < capacity
        scale = tl.load(k1_ptr + stats, mask=group_mask, other=0.0).to(DTYPE)
        zero = tl.load(k2_ptr + stats, mask=group_mask, other=0.0).to(DTYPE)
        grouped = tl.reshape(codes, (GROUPS, GROUP, HEAD_DIM))
        keys = grouped * scale[:, None, :] + zero[:, None, :]
        return tl.reshape(keys, (BLOCK_T, HEAD_DIM))


@triton.jit
def _value_tile(
    v0_ptr, v1_ptr, v2_ptr, bh, capacity, tokens, token_mask,
    LAYOUT: tl.constexpr, HEAD_DIM: tl.constexpr, BITS: tl.constexpr, GROUP: tl.constexpr,
    BLOCK_T: tl.constexpr, DTYPE: tl.constexpr,
):  # fmt: skip
    """Values of `tokens` as [BLOCK_T, HEAD_DIM] (PER_TOKEN: dequantized in DTYPE)."""
    cols = tl.arange(0, HEAD_DIM)
    if LAYOUT == 0:  # EXACT
        return tl.load(
            v0_ptr + (bh * capacity + tokens[:, None]) * HEAD_DIM + cols[None, :],
            mask=token_mask[:, None],
            other=0.0,
        )
    else:  # PER_TOKEN: one scale and zero per group of GROUP channels of each token
        NUM_BYTES: tl.constexpr = HEAD_DIM * BITS // 8
        byte_cols = tl.arange(0, NUM_BYTES)
        packed = tl.load(
            v0_ptr + (bh * capacity + tokens[:, None]) * NUM_BYTES + byte_cols[None, :],
            mask=token_mask[:, None],
            other=0,
        )
        codes = _codes_as(unpack_rows(packed, BLOCK_T, NUM_BYTES, BITS), DTYPE)
        NUM_GROUPS: tl.constexpr = HEAD_DIM // GROUP
        group_cols = tl.arange(0, NUM_GROUPS)
        stats = (bh * capacity + tokens[:, None]) * NUM_GROUPS + group_cols[None, :]
        scale = tl.load(v1_ptr + stats, mask=token_mask[:, None], other=0.0).to(DTYPE)
        zero = tl.load(v2_ptr + stats, mask=token_mask[:, None], other=0.0).to(DTYPE)
        grouped = tl.reshape(codes, (BLOCK_T, NUM_GROUPS, GROUP))
        values = grouped * scale[:, :, None] + zero[:, :, None]
        return tl.reshape(values, (BLOCK_T, HEAD_DIM))


@triton.jit
def _attend_range(
    q, q_unit, q_max, m_i, l_i, acc, begin, end,
    k0_ptr, k1_ptr, k2_ptr, v0_ptr, v1_ptr, v2_ptr, bh, key_capacity, value_capacity, qk_scale,
    KEY_LAYOUT: tl.constexpr, VALUE_LAYOUT: tl.constexpr,
    KEY_BITS: tl.constexpr, KEY_GROUP: tl.constexpr,
    VALUE_BITS: tl.constexpr, VALUE_GROUP: tl.constexpr,
    HEAD_DIM: tl.constexpr, BLOCK_T: tl.constexpr,
    EXACT_DTYPE: tl.constexpr,
):  # fmt: skip
    """Online-softmax update of (m_i, l_i, acc) with tokens [begin, end) (base-2 exponentials)."""
    for t0 in range(begin, end, BLOCK_T):
        tokens = t0 + tl.arange(0, BLOCK_T)
        token_mask = tokens < end
        k = _key_tile(
            k0_ptr, k1_ptr, k2_ptr, bh, key_capacity, t0, tokens, token_mask,
            KEY_LAYOUT, HEAD_DIM, KEY_BITS, KEY_GROUP, BLOCK_T, EXACT_DTYPE,
        )  # fmt: skip
        if KEY_LAYOUT == 0:
            # exact keys: q rounded to the cache dtype, as torch.matmul in the reference
            s = tl.dot(q.to(EXACT_DTYPE), tl.trans(k.to(EXACT_DTYPE)))
        else:
            # keys dequantized in the cache dtype (bfloat16's rounding is far below the 2-4-bit
            # quantization error; dequantizing in float32 and converting cost 13% more issue)
            s = tl.dot(q_unit.to(EXACT_DTYPE), tl.trans(k)) * q_max[:, None]
        s = tl.where(token_mask[None, :], s * qk_scale, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v = _value_tile(
            v0_ptr, v1_ptr, v2_ptr, bh, value_capacity, tokens, token_mask,
            VALUE_LAYOUT, HEAD_DIM, VALUE_BITS, VALUE_GROUP, BLOCK_T, EXACT_DTYPE,
        )  # fmt: skip
        acc = acc * alpha[:, None] + tl.dot(p.to(EXACT_DTYPE), v.to(EXACT_DTYPE))
        m_i = m_new
    return m_i, l_i, acc


@triton.jit
def _decode_split_kernel(
    q_ptr,  # [B, H_q, 1, D], any strides
    lengths_ptr,  # int64 [2]: packed tokens, tail tokens
    k0_ptr, k1_ptr, k2_ptr,  # packed key fields (EXACT: data, data, data; KIVI: codes, scale, zero)
    v0_ptr, v1_ptr, v2_ptr,  # packed value fields (EXACT: data x3; PER_TOKEN: codes, scale, zero)
    key_tail_ptr, value_tail_ptr,  # [B, H_kv, tail_capacity, D] contiguous
    part_max_ptr, part_sum_ptr,  # [B * H_kv, NUM_SPLITS + 1, BLOCK_M] float32
    part_acc_ptr,  # [B * H_kv, NUM_SPLITS + 1, BLOCK_M, D] float32
    key_capacity, value_capacity, tail_capacity,
    stride_qb, stride_qh, stride_qd,
    qk_scale,  # softmax scaling * log2(e)
    H_KV: tl.constexpr, QUERY_GROUP: tl.constexpr, HEAD_DIM: tl.constexpr,
    KEY_LAYOUT: tl.constexpr, VALUE_LAYOUT: tl.constexpr,
    KEY_BITS: tl.constexpr, KEY_GROUP: tl.constexpr,
    VALUE_BITS: tl.constexpr, VALUE_GROUP: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_T: tl.constexpr, NUM_SPLITS: tl.constexpr,
    EXACT_DTYPE: tl.constexpr, NEG_BIG: tl.constexpr,
):  # fmt: skip
    split = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    batch = bh // H_KV
    head = bh % H_KV
    rows = tl.arange(0, BLOCK_M)
    row_mask = rows < QUERY_GROUP
    cols = tl.arange(0, HEAD_DIM)
    q = tl.load(
        q_ptr
        + batch * stride_qb
        + (head * QUERY_GROUP + rows[:, None]) * stride_qh
        + cols[None, :] * stride_qd,
        mask=row_mask[:, None],
        other=0.0,
    ).to(tl.float32)
    q_max = tl.maximum(tl.max(tl.abs(q), axis=1), 1e-30)
    q_unit = q / q_max[:, None]
    m_i = tl.full((BLOCK_M,), NEG_BIG, dtype=tl.float32)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_M, HEAD_DIM), dtype=tl.float32)
    if split < NUM_SPLITS:
        num_packed = tl.load(lengths_ptr)
        per_split = tl.cdiv(tl.cdiv(num_packed, NUM_SPLITS), BLOCK_T) * BLOCK_T
        begin = split * per_split
        end = tl.minimum(begin + per_split, num_packed)
        m_i, l_i, acc = _attend_range(
            q, q_unit, q_max, m_i, l_i, acc, begin, end,
            k0_ptr, k1_ptr, k2_ptr, v0_ptr, v1_ptr, v2_ptr, bh, key_capacity, value_capacity,
            qk_scale, KEY_LAYOUT, VALUE_LAYOUT, KEY_BITS, KEY_GROUP, VALUE_BITS, VALUE_GROUP,
            HEAD_DIM, BLOCK_T, EXACT_DTYPE,
        )  # fmt: skip
    else:  # the full-precision tail
        tail_len = tl.load(lengths_ptr + 1)
        m_i, l_i, acc = _attend_range(
            q, q_unit, q_max, m_i, l_i, acc, tail_len * 0, tail_len,
            key_tail_ptr, key_tail_ptr, key_tail_ptr, value_tail_ptr, value_tail_ptr,
            value_tail_ptr, bh, tail_capacity, tail_capacity,
            qk_scale, 0, 0, KEY_BITS, KEY_GROUP, VALUE_BITS, VALUE_GROUP,
            HEAD_DIM, BLOCK_T, EXACT_DTYPE,
        )  # fmt: skip
    part = bh * (NUM_SPLITS + 1) + split
    tl.store(part_max_ptr + part * BLOCK_M + rows, m_i)
    tl.store(part_sum_ptr + part * BLOCK_M + rows, l_i)
    tl.store(part_acc_ptr + (part * BLOCK_M + rows[:, None]) * HEAD_DIM + cols[None, :], acc)


@triton.jit
def _decode_combine_kernel(
    part_max_ptr, part_sum_ptr, part_acc_ptr,
    out_ptr,  # [B, H_q, 1, D], any strides
    stride_ob, stride_oh, stride_od,
    H_KV: tl.constexpr, QUERY_GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr,
    NUM_PARTS: tl.constexpr, PARTS_BLOCK: tl.constexpr, NEG_BIG: tl.constexpr,
):  # fmt: skip
    bh = tl.program_id(0).to(tl.int64)
    row = tl.program_id(1)
    parts = tl.arange(0, PARTS_BLOCK)
    part_mask = parts < NUM_PARTS
    slots = (bh * NUM_PARTS + parts) * BLOCK_M + row
    m = tl.load(part_max_ptr + slots, mask=part_mask, other=NEG_BIG)
    l = tl.load(part_sum_ptr + slots, mask=part_mask, other=0.0)  # noqa: E741
    weight = tl.exp2(m - tl.max(m, axis=0))
    cols = tl.arange(0, HEAD_DIM)
    acc = tl.load(
        part_acc_ptr + slots[:, None] * HEAD_DIM + cols[None, :], mask=part_mask[:, None], other=0.0
    )
    out = tl.sum(acc * weight[:, None], axis=0) / tl.sum(l * weight, axis=0)
    batch = bh // H_KV
    head = (bh % H_KV) * QUERY_GROUP + row
    target = out_ptr + batch * stride_ob + head * stride_oh + cols * stride_od
    tl.store(target, out.to(out_ptr.dtype.element_ty))


def _fields(layout: DecodeLayout, fields: dict[str, torch.Tensor]) -> tuple:
    if layout.kind == EXACT:
        return (fields["data"],) * 3
    return fields["codes"], fields["scale"], fields["zero"]


def num_splits(capacity: int, batch_heads: int, block_t: int, device: torch.device) -> int:
    """Splits of the packed tokens: DECODE_PROGRAMS_PER_SM programs per multiprocessor, no more
    than the capacity has token blocks (fixed by the capacity, not the length, so a captured
    launch stays valid)."""
    programs = num_programs_target(device) // PROGRAMS_PER_SM * DECODE_PROGRAMS_PER_SM
    return max(1, min(triton.cdiv(max(capacity, 1), block_t), programs // batch_heads))


def decode_attention(
    q: torch.Tensor,
    lengths: torch.Tensor,
    keys,
    values,
    key_layout: DecodeLayout,
    value_layout: DecodeLayout,
    scaling: float,
) -> torch.Tensor:
    """softmax(q·Kᵀ·scaling)·V for q [B, H_q, 1, D] on `keys` / `values` (kernels/cache.py
    PackedCache) holding lengths = (packed, tail) tokens (int64 device tensor [2]).

    Returns [B, H_q, 1, D] in q's dtype.
    """
    batch, num_query_heads, num_queries, head_dim = q.shape
    if num_queries != 1:
        raise ValueError(f"decode_attention takes one query token, got {num_queries}")
    if head_dim & (head_dim - 1):
        raise ValueError(f"decode_attention needs a power-of-two head_dim, got {head_dim}")
    num_kv_heads = keys.num_heads
    query_group = num_query_heads // num_kv_heads
    block_m = max(16, next_power_of_2(query_group))
    block_t = max(DECODE_BLOCK_T, key_layout.group if key_layout.kind == KIVI_KEYS else 1)
    key_capacity, value_capacity = keys.capacity, values.capacity
    splits = num_splits(max(key_capacity, value_capacity), batch * num_kv_heads, block_t, q.device)
    parts = splits + 1
    part_max = torch.empty(
        batch * num_kv_heads, parts, block_m, dtype=torch.float32, device=q.device
    )
    part_sum = torch.empty_like(part_max)
    part_acc = torch.empty(
        batch * num_kv_heads, parts, block_m, head_dim, dtype=torch.float32, device=q.device
    )
    out = torch.empty_like(q)
    interpreted = q.device.type != "cuda"
    launch = {} if interpreted else {"num_warps": DECODE_NUM_WARPS, "num_stages": DECODE_NUM_STAGES}
    if DECODE_MAX_REGISTERS and not interpreted:
        launch["maxnreg"] = DECODE_MAX_REGISTERS
    _decode_split_kernel[(parts, batch * num_kv_heads)](
        q, lengths, *_fields(key_layout, keys.fields), *_fields(value_layout, values.fields),
        keys.tail, values.tail, part_max, part_sum, part_acc,
        key_capacity, value_capacity, keys.tail.shape[2],
        q.stride(0), q.stride(1), q.stride(3),
        scaling * _LOG2E,
        H_KV=num_kv_heads, QUERY_GROUP=query_group, HEAD_DIM=head_dim,
        KEY_LAYOUT=key_layout.kind, VALUE_LAYOUT=0 if value_layout.kind == EXACT else 1,
        KEY_BITS=key_layout.bits, KEY_GROUP=key_layout.group,
        VALUE_BITS=value_layout.bits, VALUE_GROUP=value_layout.group,
        BLOCK_M=block_m, BLOCK_T=block_t, NUM_SPLITS=splits,
        EXACT_DTYPE=dot_dtype(keys.dtype), NEG_BIG=_NEG_BIG,
        **launch,
    )  # fmt: skip
    _decode_combine_kernel[(batch * num_kv_heads, query_group)](
        part_max, part_sum, part_acc, out, out.stride(0), out.stride(1), out.stride(3),
        H_KV=num_kv_heads, QUERY_GROUP=query_group, HEAD_DIM=head_dim, BLOCK_M=block_m,
        NUM_PARTS=parts, PARTS_BLOCK=next_power_of_2(parts), NEG_BIG=_NEG_BIG,
    )  # fmt: skip
    return out
