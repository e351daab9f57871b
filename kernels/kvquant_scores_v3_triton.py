"""KVQuant key scores, version 3, for head_dim 128, 2 or 3 bits and 16-bit queries (`v3_fits`): the
key operand is built in registers in the tensor-core operand's own layout, the non-uniform codebook
is read with byte permutes (PTX prmt; a plain-Triton fallback with the same values on the CPU
interpreter), and there are no shared-memory layout conversions of the key operand. Same math and
packed layout as version 2 (`kvquant_triton._kvquant_key_scores_kernel`, whose launcher
`key_scores` picks this one where it fits a decode row tile) and as `kvquant_reference`; it shares
version 2's device helpers for the sparse outliers and the exact sink tokens.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .codec import triton_interpret_enabled
from .gqa import query_group
from .kvquant_triton import (
    _finish_tile,
    _heads_per_program,
    _sin_cos,
    _store_dense_scores,
    outlier_row_chunk_for,
)


@triton.jit
def _lut_bytes(Lut_ptr, FIRST: tl.constexpr, HIGH: tl.constexpr):
    """Byte HIGH (0 low, 1 high) of the fp16 lut entries FIRST..FIRST+3, packed into an int32
    (entry FIRST + e in byte e): two of these words are an 8-byte PRMT table."""
    e = tl.arange(0, 4)
    bits = tl.load(Lut_ptr + FIRST + e).to(tl.float16).to(tl.int16, bitcast=True).to(tl.int32)
    return tl.sum(((bits >> (8 * HIGH)) & 0xFF) << (8 * e), axis=0)


@triton.jit
def _lookup16(low_words, high_words, spread, lo0, lo1, hi0, hi1, Lut_ptr, cw_p, cw_u0, cw_u1,
              cw_u2, PRMT: tl.constexpr):
    """fp16 lut values of 16 channels whose 3-bit codes are in low_words (the 2-bit plane: channel
    i at bits 2i) and in the 16-bit half of high_words that `spread` picks (the 1-bit plane), as
    16 tensors shaped like the words; output i is channel 2 * (i % 8) + i // 8.

    PRMT (GPU): a byte-permute table lookup in inline PTX, per word: the high bits spread to bit 2
    of every nibble (prmt + 3 shift/or/and steps), merged with the low bits into two selectors of
    eight 3-bit codes (even / odd channels), then per four codes one prmt on the low-byte table,
    one on the high-byte table and two to interleave them into fp16 pairs: 29 instructions for 16
    values, no shared memory. Otherwise (CPU interpreter) the same values by shifts and loads."""
    if PRMT:
        return tl.inline_asm_elementwise(
            """{
            .reg .b32 x, t, se, so, s2, lo, hi, v;
            prmt.b32 x, $17, 0, $18;
            shl.b32 t, x, 4; or.b32 x, x, t; and.b32 x, x, 0x0F0F0F0F;
            shl.b32 t, x, 2; or.b32 x, x, t; and.b32 x, x, 0x33333333;
            shl.b32 t, x, 1; or.b32 x, x, t; and.b32 x, x, 0x55555555;
            shl.b32 t, x, 2; lop3.b32 se, $16, t, 0x33333333, 0xE4;
            shr.b32 t, $16, 2; lop3.b32 so, t, x, 0x33333333, 0xE4;
            prmt.b32 lo, $19, $20, se; prmt.b32 hi, $21, $22, se;
            prmt.b32 v, lo, hi, 0x5140; mov.b32 {$0, $1}, v;
            prmt.b32 v, lo, hi, 0x7362; mov.b32 {$2, $3}, v;
            shr.b32 s2, se, 16;
            prmt.b32 lo, $19, $20, s2; prmt.b32 hi, $21, $22, s2;
            prmt.b32 v, lo, hi, 0x5140; mov.b32 {$4, $5}, v;
            prmt.b32 v, lo, hi, 0x7362; mov.b32 {$6, $7}, v;
            prmt.b32 lo, $19, $20, so; prmt.b32 hi, $21, $22, so;
            prmt.b32 v, lo, hi, 0x5140; mov.b32 {$8, $9}, v;
            prmt.b32 v, lo, hi, 0x7362; mov.b32 {$10, $11}, v;
            shr.b32 s2, so, 16;
            prmt.b32 lo, $19, $20, s2; prmt.b32 hi, $21, $22, s2;
            prmt.b32 v, lo, hi, 0x5140; mov.b32 {$12, $13}, v;
            prmt.b32 v, lo, hi, 0x7362; mov.b32 {$14, $15}, v;
            }""",
            "=h,=h,=h,=h,=h,=h,=h,=h,=h,=h,=h,=h,=h,=h,=h,=h,r,r,r,r,r,r,r",
            [low_words, high_words, spread, lo0, lo1, hi0, hi1],
            dtype=(tl.float16,) * 16, is_pure=True, pack=1)
    else:
        # spread selects bytes 0-1 (0x4140) or 2-3 (0x4342) of high_words
        high = high_words >> (8 * ((spread >> 1) & 1) * 2)
        cw = cw_p + cw_u0 + cw_u1 + cw_u2  # [1, 1, 1, 1, 2, 2, 2, 2] channel in word
        code = ((low_words[:, :, :, :, None, None, None, None] >> (2 * cw)) & 3) | (
            ((high[:, :, :, :, None, None, None, None] >> cw) & 1) << 2)
        return tl.load(Lut_ptr + code).to(tl.float16)


@triton.jit
def _join16(o0, o1, o2, o3, o4, o5, o6, o7, o8, o9, o10, o11, o12, o13, o14, o15):
    """16 tensors -> [..., 2 (p), 2 (u0), 2 (u1), 2 (u2)], element i = p + 2 u0 + 4 u1 + 8 u2."""
    a0 = tl.join(tl.join(o0, o1), tl.join(o2, o3))
    a1 = tl.join(tl.join(o4, o5), tl.join(o6, o7))
    a2 = tl.join(tl.join(o8, o9), tl.join(o10, o11))
    a3 = tl.join(tl.join(o12, o13), tl.join(o14, o15))
    return tl.join(tl.join(a0, a1), tl.join(a2, a3))


@triton.jit
def _half_code_words(code_rows, HALF: tl.constexpr, group4, live4, BITS: tl.constexpr):
    """One key half's code words of one KV head's tile: the 2-bit plane word and the 1-bit plane
    word of each (row, j) in the per-element domain (see the kernel). 2-bit codes are the 2-bit
    plane alone (kvquant_reference's layout), so their 1-bit plane words are zero: the lookup
    then reads codebook entries 0-3 only."""
    HEAD_DIM: tl.constexpr = 128
    low = tl.load(code_rows + 4 * HALF + group4, mask=live4, other=0)
    if BITS == 3:
        high = tl.load(code_rows + HEAD_DIM // 16 + 2 * HALF + group4 // 2, mask=live4, other=0)
    else:
        high = tl.zeros_like(low)
    return low, high


@triton.jit
def _store_from_accumulator(acc, Out_ptr, stride_sb, stride_sh, stride_sq, batch, query_head,
                            rows, mask_m, num_query_tokens, tokens, mask_t, num_sink):
    """`_store_dense_scores` with one st.global per element in inline PTX, so the scores are
    stored from the accumulator's own register layout. (tl.store would first convert the
    accumulator to a layout with tokens across the lanes, through shared memory with four
    barriers per head; the accumulator layout already puts eight consecutive tokens of a query
    row on eight lanes, one full 32-byte sector per store.) GPU only (inline PTX)."""
    out_rows = Out_ptr + batch * stride_sb + query_head * stride_sh + (
        rows % num_query_tokens) * stride_sq
    address = (out_rows[None, :] + tokens[:, None]).to(tl.int64, bitcast=True)
    live = ((mask_t & (tokens >= num_sink))[:, None] & mask_m[None, :]).to(tl.int32)
    tl.inline_asm_elementwise(
        """{
        .reg .pred p;
        setp.ne.b32 p, $3, 0;
        @p st.global.f32 [$1], $2;
        mov.b32 $0, 0;
        }""",
        "=r,l,f,r", [address, acc, live], dtype=tl.int32, is_pure=False, pack=1)


@triton.jit
def _prefetch_outlier_lines(Index_ptr, Delta_ptr, stride_ob, stride_oh, stride_ot, batch,
                            first_head, tile_start, num_tokens, HEADS: tl.constexpr,
                            BLOCK_T: tl.constexpr):
    """Ask L2 for the tile's outlier index and delta lines (every 16th token of each head: <= 128
    bytes apart for up to 4 slots) before the head loop, so the outlier pass after it finds them
    there instead of waiting on DRAM (GPU only: `prefetch.global.L2` returns nothing; the dummy
    result is not used)."""
    heads = (first_head + tl.arange(0, HEADS))[:, None]
    tokens = tl.minimum(tile_start + tl.arange(0, BLOCK_T // 16)[None, :] * 16, num_tokens - 1)
    offsets = batch * stride_ob + heads * stride_oh + tokens * stride_ot
    _prefetch_l2(Index_ptr + offsets)
    _prefetch_l2(Delta_ptr + offsets)


@triton.jit
def _prefetch_l2(pointers):
    tl.inline_asm_elementwise("prefetch.global.L2 [$1]; mov.u32 $0, 0;", "=r,l", [pointers],
                              dtype=tl.int32, is_pure=False, pack=1)


@triton.jit
def _head_code_words(code_rows, group4, live4, BITS: tl.constexpr):
    """Both key halves' code words of one KV head's tile."""
    low0, high0 = _half_code_words(code_rows, 0, group4, live4, BITS)
    low1, high1 = _half_code_words(code_rows, 1, group4, live4, BITS)
    return low0, high0, low1, high1


@triton.jit
def _query_operand(pointers, mask_m, MASK_ROWS: tl.constexpr):
    """One query-side operand [BLOCK_M, 128]. MASK_ROWS: only the tile's real query rows are
    read; the padding rows (zeros in memory) come from `other`. A decode step of a GQA-4 model
    has 4 real rows of the 16-row tile, so this reads a quarter of the bytes: each 64-token tile
    otherwise reads 8 heads x 12 KB of operands from L2, four times its 24 KB of code words."""
    if MASK_ROWS:
        operand = tl.load(pointers, mask=mask_m[:, None], other=0.0)
    else:
        operand = tl.load(pointers)
    return operand


@triton.jit
def _rotated_operand(low, high, spread, lo0, lo1, hi0, hi1, Lut_ptr, cw_p, cw_u0, cw_u1, cw_u2,
                     cos, sin, BLOCK_T: tl.constexpr, PRMT: tl.constexpr):
    """One key half's dot operand [BLOCK_T, 128]: codebook values of the codes in low/high times
    cos and sin of their frequencies, in the A operand's register layout (see the kernel)."""
    HEAD_DIM: tl.constexpr = 128
    if PRMT:
        o0, o1, o2, o3, o4, o5, o6, o7, o8, o9, o10, o11, o12, o13, o14, o15 = _lookup16(
            low, high, spread, lo0, lo1, hi0, hi1, Lut_ptr, cw_p, cw_u0, cw_u1, cw_u2, PRMT)
        luts = _join16(o0, o1, o2, o3, o4, o5, o6, o7, o8, o9, o10, o11, o12, o13, o14, o15)
    else:
        luts = _lookup16(low, high, spread, lo0, lo1, hi0, hi1, Lut_ptr, cw_p, cw_u0, cw_u1,
                         cw_u2, PRMT)
    # [j, c, b, a, p, u0, u1, u2, kind] -> rows (b, a, c), columns (kind, u2, u1, u0, j, p)
    return tl.reshape(tl.permute(tl.join(luts * cos, luts * sin), (2, 3, 1, 8, 7, 6, 5, 0, 4)),
                      (BLOCK_T, HEAD_DIM))


@triton.jit
def _column_frequency(k):
    """RoPE frequency of operand column k (bits p, j, u0, u1, u2 as in the kernel below)."""
    return 16 * (3 - (k // 2) % 4) + 2 * (k % 2) + 4 * ((k // 8) % 2) + 8 * ((k // 16) % 2) + (
        k // 32
    ) % 2


@triton.jit
def _kvquant_query_operands_v3_kernel(
    Q_ptr, stride_qb, stride_qh, stride_qt, Zero_ptr, Scale_ptr, QOp_ptr,
    num_kv_heads, num_query_tokens, group_size, num_m_blocks,
    BLOCK_M: tl.constexpr,
):
    """QOp[b, h, m_block] [BLOCK_M, 384] fp16: the query-side operands of the v3 score kernel
    (head_dim 128) in its key operand's column order. Column k < 256 (main part): half = k // 128
    (key half), kind = k // 64 % 2 (0 cos, 1 sin), u2 = k // 32 % 2, u1 = k // 16 % 2,
    u0 = k // 8 % 2, j = k // 2 % 4, p = k % 2, frequency f = 16 (3 - j) + 2 p + 4 u0 + 8 u1 + u2;
    value (as v2's) cos: q1 s1 | q2 s2, sin: q2 s1 | -q1 s2 for half 0 | 1. Columns 256 + k'
    (zero part), same bits without half: cos: q1 z1 + q2 z2, sin: q2 z1 - q1 z2."""
    HALF: tl.constexpr = 64
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    batch = (pid_bh // num_kv_heads).to(tl.int64)
    kv_head = pid_bh % num_kv_heads
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = rows < group_size * num_query_tokens
    query_head = kv_head * group_size + rows // num_query_tokens
    q_rows = (Q_ptr + batch * stride_qb + query_head * stride_qh
              + (rows % num_query_tokens) * stride_qt)[:, None]
    k = tl.arange(0, 256)
    half, kind = k // 128, (k // 64) % 2
    f = _column_frequency(k)
    q1 = tl.load(q_rows + f[None, :], mask=mask_m[:, None], other=0.0).to(tl.float32)
    q2 = tl.load(q_rows + HALF + f[None, :], mask=mask_m[:, None], other=0.0).to(tl.float32)
    table = kv_head * 2 * HALF
    s = tl.load(Scale_ptr + table + HALF * half + f)[None, :]
    first = (half == 0)[None, :]
    value = tl.where((kind == 0)[None, :], tl.where(first, q1, q2), tl.where(first, q2, -q1)) * s
    out_row = QOp_ptr + (pid_bh.to(tl.int64) * num_m_blocks + pid_m) * (BLOCK_M * 384) \
        + tl.arange(0, BLOCK_M)[:, None] * 384
    tl.store(out_row + k[None, :], value.to(tl.float16))
    z = tl.arange(0, 128)
    zkind = z // 64
    fz = _column_frequency(z)
    q1 = tl.load(q_rows + fz[None, :], mask=mask_m[:, None], other=0.0).to(tl.float32)
    q2 = tl.load(q_rows + HALF + fz[None, :], mask=mask_m[:, None], other=0.0).to(tl.float32)
    z1 = tl.load(Zero_ptr + table + fz)[None, :]
    z2 = tl.load(Zero_ptr + table + HALF + fz)[None, :]
    value = tl.where((zkind == 0)[None, :], q1 * z1 + q2 * z2, q2 * z1 - q1 * z2)
    tl.store(out_row + 256 + z[None, :], value.to(tl.float16))


@triton.jit
def _kvquant_key_scores_v3_kernel(
    Q_ptr, stride_qb, stride_qh, stride_qt,
    Codes_ptr, stride_cb, stride_ch, stride_ct,
    Index_ptr, Delta_ptr, stride_ob, stride_oh, stride_ot,
    Sink_ptr, stride_kb, stride_kh, stride_kt,
    Lut_ptr, InvFreq_ptr, QOp_ptr,
    Out_ptr, stride_sb, stride_sh, stride_sq,
    num_kv_heads, num_query_tokens, group_size, token_start, num_tokens, num_sink,
    num_m_blocks, attention_scaling,
    BITS: tl.constexpr, NUM_SLOTS: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_M: tl.constexpr,
    CORRECTION_ROWS: tl.constexpr, OUTLIER_ROW_CHUNK: tl.constexpr, HEADS: tl.constexpr,
    PRMT: tl.constexpr,
    PREFETCH: tl.constexpr, DIRECT_STORE: tl.constexpr, OUTLIER_PREFETCH: tl.constexpr,
    MASK_ROWS: tl.constexpr,
):
    """The v2 score kernel's math (see `_kvquant_key_scores_kernel`) for head_dim 128, 2- or 3-bit
    codes in int32 words and 16-bit queries, with the key operand built where the tensor cores
    read it: every per-element tensor has the shape [BLOCK_T, 2 (key half), 4 (j), 2 (p), 2 (u0),
    2 (u1), 2 (u2)] (x 2 kinds cos/sin), which permutes and reshapes into the register layout of
    the dot's A operand (column 128 kind + 64 half + 32 u2 + 16 u1 + 8 u0 + 2 j + p: lane j of a
    quad holds p, u0..u2, half, kind in its registers), so there is no layout conversion and no
    shared memory between the code words and the dot: each thread loads the code words of its
    own rows and channels (channel 64 half + 16 j + 2 p + 4 u0 + 8 u1 + u2 of the row: one 2-bit
    plane word and half a 1-bit plane word per (row, half, j)), looks the codes up with byte
    permutes (`_lookup16`), multiplies by cos/sin of its own frequencies (computed once per
    program, reused for both key halves and all HEADS heads). The query side [BLOCK_M, 384] comes
    from `_kvquant_query_operands_v3_kernel`; the scores are stored from the accumulator."""
    HEAD_DIM: tl.constexpr = 128
    pid_t = tl.program_id(0)
    pid_m = tl.program_id(1)
    pid_bh = tl.program_id(2)
    head_groups = num_kv_heads // HEADS
    batch = (pid_bh // head_groups).to(tl.int64)
    first_head = (pid_bh % head_groups) * HEADS
    tile_start = token_start + pid_t * BLOCK_T
    tokens = tile_start + tl.arange(0, BLOCK_T)
    mask_t = tokens < num_tokens

    # The per-element domain [4 (j), 8 (c), NB (b), 2 (a)] (x 2 (p), 2 (u0), 2 (u1), 2 (u2)
    # after the lookup): token c + 8 a + 16 b of the tile, channel 64 half + 16 (3 - j) +
    # channel-in-word of each key half. Triton's load layout for it (no dim contiguous: word
    # 3 - j, not j, so no vector load along j; then dim 0 is the fastest) puts j and c on the
    # lanes, b on the warps and a in registers: the dot operand's layout (row c + 8 a + 16 b: lane
    # row bits 0-2, register row bit 3, warp row bits 4+; lane column bits 1-2 = j), so the
    # permute + reshape into the operand needs no data movement.
    NB: tl.constexpr = BLOCK_T // 16
    j4 = tl.arange(0, 4)[:, None, None, None]
    c4 = tl.arange(0, 8)[None, :, None, None]
    b4 = tl.arange(0, NB)[None, None, :, None]
    a4 = tl.arange(0, 2)[None, None, None, :]
    group4 = 3 - j4  # channel group 16 (3 - j) .. + 15 of each key half
    t4 = c4 + 8 * a4 + 16 * b4
    cw_p = (2 * tl.arange(0, 2))[None, None, None, None, :, None, None, None]
    cw_u0 = (4 * tl.arange(0, 2))[None, None, None, None, None, :, None, None]
    cw_u1 = (8 * tl.arange(0, 2))[None, None, None, None, None, None, :, None]
    cw_u2 = tl.arange(0, 2)[None, None, None, None, None, None, None, :]

    # cos/sin [4, 8, NB, 2, 2, 2, 2, 2] of frequency 16 (3 - j) + channel-in-word, once for both
    # key halves and all HEADS heads
    freq = 16 * group4[:, :, :, :, None, None, None, None] + cw_p + cw_u0 + cw_u1 + cw_u2
    position = (tile_start + t4).to(tl.float32)[:, :, :, :, None, None, None, None]
    sin, cos = _sin_cos(position * tl.load(InvFreq_ptr + freq))
    cos = (cos * attention_scaling).to(tl.float16)
    sin = (sin * attention_scaling).to(tl.float16)
    # zero-point part of the key operand: cos/sin themselves (the same registers), column
    # 64 kind + 32 u2 + 16 u1 + 8 u0 + 2 j + p, as each key half's columns
    zero_key = tl.reshape(tl.permute(tl.join(cos, sin), (2, 3, 1, 8, 7, 6, 5, 0, 4)),
                          (BLOCK_T, HEAD_DIM))

    lo0 = _lut_bytes(Lut_ptr, 0, 0)
    hi0 = _lut_bytes(Lut_ptr, 0, 1)
    if BITS == 3:
        lo1 = _lut_bytes(Lut_ptr, 4, 0)
        hi1 = _lut_bytes(Lut_ptr, 4, 1)
    else:  # a 4-entry codebook: table bytes 4-7 are never selected (codes < 4)
        lo1 = lo0 * 0
        hi1 = hi0 * 0
    spread = 0x4140 + 0x202 * (group4 % 2) + 0 * t4
    live4 = (tile_start + t4 < num_tokens)

    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    num_rows = group_size * num_query_tokens
    mask_m = rows < num_rows
    columns = tl.arange(0, HEAD_DIM)[None, :]
    code_tile = Codes_ptr + batch * stride_cb + (tile_start + t4) * stride_ct
    operand_tile = QOp_ptr + (batch * num_kv_heads * num_m_blocks + pid_m) * (
        BLOCK_M * 3 * HEAD_DIM) + (tl.arange(0, BLOCK_M) * (3 * HEAD_DIM))[:, None] + columns
    operand_head = num_m_blocks * BLOCK_M * 3 * HEAD_DIM  # operand_tile's stride per KV head
    # PREFETCH 1: the next head's code words are loaded (into registers) before this head's
    # lookups and dots, so their DRAM latency overlaps a head's work instead of stalling every
    # warp at the start of each head.
    if PREFETCH:
        low0, high0, low1, high1 = _head_code_words(code_tile + first_head * stride_ch, group4,
                                                    live4, BITS)
    if OUTLIER_PREFETCH and NUM_SLOTS > 0:
        _prefetch_outlier_lines(Index_ptr, Delta_ptr, stride_ob, stride_oh, stride_ot, batch,
                                first_head, tile_start, num_tokens, HEADS, BLOCK_T)
    for i in range(0, HEADS):
        kv_head = first_head + i
        query_head = kv_head * group_size + rows // num_query_tokens
        if PREFETCH:
            next_live = live4 & (i + 1 < HEADS)
            n_low0, n_high0, n_low1, n_high1 = _head_code_words(
                code_tile + (kv_head + 1) * stride_ch, group4, next_live, BITS)
        else:  # each half's words loaded just before its lookups (as few live as possible)
            code_rows = code_tile + kv_head * stride_ch
        # each query operand loaded just before its dot: one live at a time
        operand_rows = operand_tile + kv_head * operand_head
        acc = tl.zeros((BLOCK_T, BLOCK_M), dtype=tl.float32)
        rot0 = _query_operand(operand_rows, mask_m, MASK_ROWS)
        if not PREFETCH:
            low0, high0 = _half_code_words(code_rows, 0, group4, live4, BITS)
        acc = tl.dot(_rotated_operand(low0, high0, spread, lo0, lo1, hi0, hi1, Lut_ptr, cw_p,
                                      cw_u0, cw_u1, cw_u2, cos, sin, BLOCK_T, PRMT),
                     tl.trans(rot0), acc)
        rot1 = _query_operand(operand_rows + HEAD_DIM, mask_m, MASK_ROWS)
        if not PREFETCH:
            low1, high1 = _half_code_words(code_rows, 1, group4, live4, BITS)
        acc = tl.dot(_rotated_operand(low1, high1, spread, lo0, lo1, hi0, hi1, Lut_ptr, cw_p,
                                      cw_u0, cw_u1, cw_u2, cos, sin, BLOCK_T, PRMT),
                     tl.trans(rot1), acc)
        zq = _query_operand(operand_rows + 2 * HEAD_DIM, mask_m, MASK_ROWS)
        acc = tl.dot(zero_key, tl.trans(zq), acc)

        if DIRECT_STORE:
            _store_from_accumulator(acc, Out_ptr, stride_sb, stride_sh, stride_sq, batch,
                                    query_head, rows, mask_m, num_query_tokens, tokens, mask_t,
                                    num_sink)
        else:
            _store_dense_scores(acc, Out_ptr, stride_sb, stride_sh, stride_sq, batch, query_head,
                                rows, mask_m, num_query_tokens, tokens, mask_t, num_sink)
        if PREFETCH:
            low0, high0, low1, high1 = n_low0, n_high0, n_low1, n_high1

    _finish_tile(Q_ptr, stride_qb, stride_qh, stride_qt, Index_ptr, Delta_ptr, stride_ob,
                 stride_oh, stride_ot, Sink_ptr, stride_kb, stride_kh, stride_kt, InvFreq_ptr,
                 Out_ptr, stride_sb, stride_sh, stride_sq, batch, first_head, tokens, mask_t,
                 pid_t, pid_m, rows, mask_m, num_rows, num_query_tokens, group_size,
                 token_start, num_sink, attention_scaling, HEAD_DIM, HEADS, NUM_SLOTS,
                 BLOCK_M, CORRECTION_ROWS, OUTLIER_ROW_CHUNK)




# Load the next head's code words one head ahead (1) or each half's just before its lookups (0).
# Measured and removed (bench/results/kvquant_h100_notes.md): the query operands one head ahead
# as well (spills at the 128-register cap: 0.162 ms at 128K on the H100, run 7), a head's three
# query operands in one shared-memory round (0.0926 vs 0.0898 ms, run 7) and the head loop
# software-pipelined by Triton in 2 / 3 / 4 stages (run 8: 0.101 / 0.094 / 0.107 ms vs 0.090 at
# 128K; the async copies' barriers cost what the overlap saves).
V3_PREFETCH = 1
# Prefetch the tile's outlier index/delta lines into L2 before the head loop (GPU only). Run 8 on
# the H100: 0.0893 vs 0.0904 ms at 128K, 0.3322 vs 0.3368 ms at 512K (1-1.5%, faster at both).
V3_OUTLIER_PREFETCH = True
# Store the scores from the accumulator's register layout (inline PTX) instead of tl.store's
# conversion through shared memory (see _store_from_accumulator)
V3_DIRECT_STORE = True
# Bit widths `kvquant_triton.key_scores` sends to version 3 by default (where it fits). Run 9 on
# the H100: 2 bits 0.0860 / 0.3232 ms at 128K / 512K against version 2's 0.1553 / 0.5968, within
# 3.1e-4 of the reference like version 2 (bench/results/kvquant_h100_run9*.json).
V3_DEFAULT_BITS = (2, 3)
# Read only the real query rows of the query operands (see _query_operand). Run 9 on the H100,
# 3 bits: 0.0881 vs 0.0899 ms at 128K, 0.3230 vs 0.3371 ms at 512K; bit-identical scores.
V3_MASK_ROWS = True


def v3_fits(q: torch.Tensor, head_dim: int, bits: int, words: bool | None = None) -> bool:
    """Whether `kvquant_triton.key_scores(version=3)` handles this call."""
    return (head_dim == 128 and bits in (2, 3) and q.dtype in (torch.float16, torch.bfloat16)
            and words is not False)


def key_scores_v3(q, codes, index, delta, zero, scale, lut, inv_freq, attention_scaling, bits,
                   token_start, out, sink, block_t, num_warps, words, heads_per_program,
                   num_stages, maxnreg, prefetch=None, direct_store=None,
                  outlier_row_chunk=None, outlier_prefetch=None, mask_rows=None):
    batch, num_kv_heads, num_tokens, _ = codes.shape
    head_dim = q.shape[-1]
    prefetch = V3_PREFETCH if prefetch is None else prefetch
    if prefetch not in (0, 1):
        raise ValueError(f"prefetch must be 0 or 1, got {prefetch}")
    if not v3_fits(q, head_dim, bits, words):
        raise ValueError(f"version=3 needs head_dim 128, 2 or 3 bits, int32 words and 16-bit "
                         f"queries, got head_dim {head_dim}, {bits} bits, words={words}, "
                         f"{q.dtype}")
    group_size = query_group(q.shape[1], num_kv_heads)
    q = q if q.stride(-1) == 1 else q.contiguous()
    num_query_tokens = q.shape[2]
    rows = group_size * num_query_tokens
    block_m = max(16, min(64, triton.next_power_of_2(rows)))
    interpret = triton_interpret_enabled()
    block_t = block_t or (16 if interpret else 64)
    num_warps = num_warps or max(1, block_t // 16)
    num_stages = num_stages or 1
    span = num_tokens - token_start
    if span <= 0:
        return out
    grid_t = triton.cdiv(span, block_t)
    heads = _heads_per_program(num_kv_heads, grid_t * batch * triton.cdiv(rows, block_m),
                               heads_per_program)
    num_m_blocks = triton.cdiv(rows, block_m)
    grid = (grid_t, num_m_blocks, batch * num_kv_heads // heads)
    code_rows = codes.view(torch.int32)
    if sink is None or sink.shape[2] == 0:
        sink, num_sink = codes, 0  # never read
    else:
        num_sink = sink.shape[2]
    operands = torch.empty(batch, num_kv_heads, num_m_blocks, block_m, 3 * head_dim,
                           dtype=torch.float16, device=q.device)
    _kvquant_query_operands_v3_kernel[(num_m_blocks, batch * num_kv_heads)](
        q, q.stride(0), q.stride(1), q.stride(2), zero, scale, operands,
        num_kv_heads, num_query_tokens, group_size, num_m_blocks, BLOCK_M=block_m, num_warps=4,
    )
    _kvquant_key_scores_v3_kernel[grid](
        q, q.stride(0), q.stride(1), q.stride(2),
        code_rows, code_rows.stride(0), code_rows.stride(1), code_rows.stride(2),
        index, delta, index.stride(0), index.stride(1), index.stride(2),
        sink, sink.stride(0), sink.stride(1), sink.stride(2),
        lut, inv_freq, operands,
        out, out.stride(0), out.stride(1), out.stride(2),
        num_kv_heads, num_query_tokens, group_size, token_start, num_tokens, num_sink,
        num_m_blocks, float(attention_scaling),
        BITS=bits, NUM_SLOTS=index.shape[-1], BLOCK_T=block_t, BLOCK_M=block_m,
        CORRECTION_ROWS=min(block_m, triton.next_power_of_2(rows)), HEADS=heads,
        OUTLIER_ROW_CHUNK=outlier_row_chunk_for(rows, block_m, outlier_row_chunk),
        PRMT=not interpret, PREFETCH=prefetch,
        DIRECT_STORE=not interpret and (V3_DIRECT_STORE if direct_store is None else direct_store),
        OUTLIER_PREFETCH=not interpret and (
            V3_OUTLIER_PREFETCH if outlier_prefetch is None else outlier_prefetch),
        MASK_ROWS=V3_MASK_ROWS if mask_rows is None else mask_rows,
        num_warps=num_warps, num_stages=num_stages,
        **({} if interpret or not maxnreg else {"maxnreg": maxnreg}),
    )
    return out
