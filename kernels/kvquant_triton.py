"""KVQuant Triton kernels: pack keys/values, key scores with fused RoPE, value attention.

Same math and packed layout as `kvquant_reference.py` (read its docstring first); every kernel
here has its reference there and tests compare the two. All launchers take the packed cache as
[B, H, T, ...] views whose last dim is contiguous, so a preallocated cache is read in place.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .codec import triton_interpret_enabled
from .gqa import query_group

# --------------------------------------------------------------------------------------------
# device helpers


@triton.jit
def _nearest_codes(normalized, Bound_ptr, BITS: tl.constexpr):
    """Index of the nearest sorted centroid: how many midpoints lie below the value."""
    codes = tl.zeros(normalized.shape, dtype=tl.int32)
    for i in tl.static_range((1 << BITS) - 1):
        codes += (normalized > tl.load(Bound_ptr + i)).to(tl.int32)
    return codes


@triton.jit
def _store_plane(row_ptrs, codes, mask, HEAD_DIM: tl.constexpr, PLANE_BITS: tl.constexpr,
                 BLOCK_T: tl.constexpr):
    """Pack one bit plane of codes [BLOCK_T, HEAD_DIM] into bytes at row_ptrs [BLOCK_T]."""
    PER_BYTE: tl.constexpr = 8 // PLANE_BITS
    grouped = tl.reshape(codes, (BLOCK_T, HEAD_DIM // PER_BYTE, PER_BYTE))
    shifts = tl.arange(0, PER_BYTE) * PLANE_BITS
    packed = tl.sum(grouped << shifts[None, None, :], axis=2)
    offsets = tl.arange(0, HEAD_DIM // PER_BYTE)
    tl.store(row_ptrs[:, None] + offsets[None, :], packed.to(tl.uint8), mask=mask[:, None])


@triton.jit
def _store_codes(row_ptrs, codes, mask, HEAD_DIM: tl.constexpr, BITS: tl.constexpr,
                 BLOCK_T: tl.constexpr):
    if BITS == 3:
        _store_plane(row_ptrs, codes & 3, mask, HEAD_DIM, 2, BLOCK_T)
        _store_plane(row_ptrs + HEAD_DIM // 4, codes >> 2, mask, HEAD_DIM, 1, BLOCK_T)
    else:
        _store_plane(row_ptrs, codes, mask, HEAD_DIM, BITS, BLOCK_T)


@triton.jit
def _load_codes(row_ptrs, channels, mask, HEAD_DIM: tl.constexpr, BITS: tl.constexpr):
    """Codes [BLOCK_T, len(channels)] of the given channels from packed rows at row_ptrs."""
    if BITS == 3:
        low = tl.load(row_ptrs[:, None] + (channels // 4)[None, :], mask=mask[:, None], other=0)
        high = tl.load(row_ptrs[:, None] + (HEAD_DIM // 4 + channels // 8)[None, :],
                       mask=mask[:, None], other=0)
        low = (low.to(tl.int32) >> ((channels % 4) * 2)[None, :]) & 3
        high = (high.to(tl.int32) >> (channels % 8)[None, :]) & 1
        return low | (high << 2)
    else:
        PER_BYTE: tl.constexpr = 8 // BITS
        byte = tl.load(row_ptrs[:, None] + (channels // PER_BYTE)[None, :], mask=mask[:, None],
                       other=0)
        return (byte.to(tl.int32) >> ((channels % PER_BYTE) * BITS)[None, :]) & ((1 << BITS) - 1)


@triton.jit
def _matmul_nt(a, b, USE_DOT: tl.constexpr, INPUT_PRECISION: tl.constexpr):
    """a [M, K] . b [N, K]^T -> float32 [M, N]; tl.dot needs K >= 16, else broadcast and sum."""
    if USE_DOT:
        return tl.dot(a, tl.trans(b), input_precision=INPUT_PRECISION)
    else:
        return tl.sum(a.to(tl.float32)[:, None, :] * b.to(tl.float32)[None, :, :], axis=2)


@triton.jit
def _matmul_nn(a, b, USE_DOT: tl.constexpr, INPUT_PRECISION: tl.constexpr):
    """a [M, K] . b [K, N] -> float32 [M, N]."""
    if USE_DOT:
        return tl.dot(a, b, input_precision=INPUT_PRECISION)
    else:
        return tl.sum(a.to(tl.float32)[:, :, None] * b.to(tl.float32)[None, :, :], axis=1)


# --------------------------------------------------------------------------------------------
# pack


@triton.jit
def _kvquant_pack_kernel(
    X_ptr, stride_xb, stride_xh, stride_xt,
    Zero_ptr, Scale_ptr,
    Bound_ptr, Lut_ptr,
    Codes_ptr, stride_cb, stride_ch, stride_ct,
    Index_ptr, Delta_ptr, stride_ob, stride_oh, stride_ot,
    TokenScale_ptr, TokenZero_ptr, stride_sb, stride_sh,
    num_heads, num_tokens,
    PER_TOKEN: tl.constexpr, HEAD_DIM: tl.constexpr, BITS: tl.constexpr,
    NUM_SLOTS: tl.constexpr, BLOCK_T: tl.constexpr,
):
    """Quantize BLOCK_T vectors of one (batch, head): dense codes plus NUM_SLOTS sparse outliers.

    Keys (PER_TOKEN=False): x_n = (x - zero_c) / scale_c with calibrated per-channel constants;
    outliers are |x_n| > 1, largest first. Values (PER_TOKEN=True): outliers are the NUM_SLOTS
    elements farthest from the mean; zero/scale (stored fp16) from the min/max of the rest.
    """
    pid_t = tl.program_id(0)
    pid_bh = tl.program_id(1).to(tl.int64)
    batch, head = pid_bh // num_heads, pid_bh % num_heads
    tokens = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    mask = tokens < num_tokens
    channels = tl.arange(0, HEAD_DIM)
    x = tl.load(X_ptr + batch * stride_xb + head * stride_xh + tokens[:, None] * stride_xt
                + channels[None, :], mask=mask[:, None], other=0.0).to(tl.float32)
    if PER_TOKEN:
        deviation = tl.abs(x - (tl.sum(x, axis=1) / HEAD_DIM)[:, None])
        is_outlier = channels[None, :] < 0
        for _ in tl.static_range(NUM_SLOTS):
            top = tl.argmax(deviation, axis=1)
            is_slot = channels[None, :] == top[:, None]
            is_outlier = is_outlier | is_slot
            deviation = tl.where(is_slot, -1.0, deviation)
        high = tl.max(tl.where(is_outlier, -float("inf"), x), axis=1)
        low = tl.min(tl.where(is_outlier, float("inf"), x), axis=1)
        zero = ((high + low) / 2).to(tl.float16)
        scale = tl.maximum((high - low) / 2, 1e-4).to(tl.float16)
        token_offsets = batch * stride_sb + head * stride_sh + tokens
        tl.store(TokenZero_ptr + token_offsets, zero, mask=mask)
        tl.store(TokenScale_ptr + token_offsets, scale, mask=mask)
        zero = zero.to(tl.float32)[:, None]
        scale = scale.to(tl.float32)[:, None]
    else:
        zero = tl.load(Zero_ptr + head * HEAD_DIM + channels)[None, :]
        scale = tl.load(Scale_ptr + head * HEAD_DIM + channels)[None, :]
    normalized = (x - zero) / scale
    codes = _nearest_codes(normalized, Bound_ptr, BITS)
    error = x - (tl.load(Lut_ptr + codes) * scale + zero)
    _store_codes(Codes_ptr + batch * stride_cb + head * stride_ch + tokens * stride_ct, codes, mask,
                 HEAD_DIM, BITS, BLOCK_T)

    out_ptrs = batch * stride_ob + head * stride_oh + tokens * stride_ot
    if PER_TOKEN:
        # The same argmax sequence as above, now also storing each slot's residual.
        score = tl.abs(x - (tl.sum(x, axis=1) / HEAD_DIM)[:, None])
    else:
        score = tl.where(tl.abs(normalized) > 1.0, tl.abs(normalized), 0.0)
    for slot in tl.static_range(NUM_SLOTS):
        top = tl.argmax(score, axis=1)
        picked = tl.max(score, axis=1)
        is_slot = channels[None, :] == top[:, None]
        delta = tl.sum(tl.where(is_slot, error, 0.0), axis=1)
        if not PER_TOKEN:
            chosen = picked > 1.0
            delta = tl.where(chosen, delta, 0.0)
            top = tl.where(chosen, top, 0)
        tl.store(Index_ptr + out_ptrs + slot, top.to(Index_ptr.dtype.element_ty), mask=mask)
        tl.store(Delta_ptr + out_ptrs + slot, delta.to(tl.float16), mask=mask)
        score = tl.where(is_slot, -1.0, score)


def _pack_launch(x, *, zero, scale, boundaries, lut, bits, num_slots, index_dtype, per_token):
    batch, heads, tokens, head_dim = x.shape
    x = x.contiguous() if x.stride(-1) != 1 else x
    device = x.device
    codes = torch.empty(batch, heads, tokens, head_dim * bits // 8, dtype=torch.uint8,
                        device=device)
    index = torch.empty(batch, heads, tokens, num_slots, dtype=index_dtype, device=device)
    delta = torch.empty(batch, heads, tokens, num_slots, dtype=torch.float16, device=device)
    token_scale = torch.empty(batch, heads, tokens, dtype=torch.float16, device=device)
    token_zero = torch.empty_like(token_scale)
    dummy = boundaries  # unused pointer argument on the path that does not read it
    block_t = 16 if triton_interpret_enabled() else 32
    grid = (triton.cdiv(tokens, block_t), batch * heads)
    _kvquant_pack_kernel[grid](
        x, x.stride(0), x.stride(1), x.stride(2),
        dummy if zero is None else zero, dummy if scale is None else scale,
        boundaries, lut,
        codes, codes.stride(0), codes.stride(1), codes.stride(2),
        index, delta, index.stride(0), index.stride(1), index.stride(2),
        token_scale, token_zero, token_scale.stride(0), token_scale.stride(1),
        heads, tokens,
        PER_TOKEN=per_token, HEAD_DIM=head_dim, BITS=bits, NUM_SLOTS=num_slots, BLOCK_T=block_t,
    )
    return codes, index, delta, token_scale, token_zero


def quantize_keys(k, zero, scale, boundaries, lut, bits, num_slots, index_dtype=torch.uint8):
    """Triton twin of `kvquant_reference.quantize_keys` -> (codes, index, delta)."""
    codes, index, delta, _, _ = _pack_launch(
        k, zero=zero, scale=scale, boundaries=boundaries, lut=lut, bits=bits,
        num_slots=num_slots, index_dtype=index_dtype, per_token=False,
    )
    return codes, index, delta


def quantize_values(v, boundaries, lut, bits, num_slots, index_dtype=torch.uint8):
    """Triton twin of `kvquant_reference.quantize_values` -> (codes, scale, zero, index, delta)."""
    codes, index, delta, scale, zero = _pack_launch(
        v, zero=None, scale=None, boundaries=boundaries, lut=lut, bits=bits,
        num_slots=num_slots, index_dtype=index_dtype, per_token=True,
    )
    return codes, scale, zero, index, delta


# --------------------------------------------------------------------------------------------
# key scores with fused RoPE

# pi/2 in two float32 parts: HIGH = fl(pi/2), LOW = fl(pi/2 - HIGH).
_HALF_PI_HIGH = tl.constexpr(1.5707963705062866)
_HALF_PI_LOW = tl.constexpr(-4.371139000186241e-08)


@triton.jit
def _sin_cos(angle):
    """(sin, cos) of float32 angles to ~2e-7 absolute, for any angle a float32 RoPE position
    times a frequency reaches (< 2**24). Quadrant n = round(angle / (pi/2)), then
    r = angle - n * HIGH - n * LOW with fused multiply-adds: angle and n * HIGH are both multiples
    of 2**-23 once angle >= 1 (n = 0 below pi/4), so the first fma is exact and r keeps float32
    accuracy even at 500K-token angles. Taylor polynomials on |r| <= pi/4 (truncation < 4e-9).
    Why not tl.sin/tl.cos: libdevice's exact reduction switches to a slow path above ~1e5 rad,
    which every long context reaches on the low channels; this is also plain arithmetic, so the
    CPU interpreter runs the same code."""
    quadrant = tl.floor(angle * 0.6366197723675814 + 0.5)
    r = tl.fma(quadrant, -_HALF_PI_HIGH, angle)
    r = tl.fma(quadrant, -_HALF_PI_LOW, r)
    r2 = r * r
    sin_r = tl.fma(r2, 2.7557319223985893e-06, -1.984126984126984e-04)
    sin_r = tl.fma(r2, sin_r, 8.333333333333333e-03)
    sin_r = tl.fma(r2, sin_r, -1.6666666666666666e-01)
    sin_r = tl.fma(r * r2, sin_r, r)
    cos_r = tl.fma(r2, 2.48015873015873e-05, -1.388888888888889e-03)
    cos_r = tl.fma(r2, cos_r, 4.1666666666666664e-02)
    cos_r = tl.fma(r2, cos_r, -0.5)
    cos_r = tl.fma(r2, cos_r, 1.0)
    # angle = n pi/2 + r: quadrant 1 -> (cos r, -sin r), 2 -> (-sin r, -cos r), 3 -> (-cos r, sin r)
    q = quadrant.to(tl.int32)
    odd = (q & 1) != 0
    sin_a = tl.where(odd, cos_r, sin_r)
    cos_a = tl.where(odd, sin_r, cos_r)
    sin_a = tl.where((q & 2) != 0, -sin_a, sin_a)
    cos_a = tl.where(((q + 1) & 2) != 0, -cos_a, cos_a)
    return sin_a, cos_a


@triton.jit
def _split_fields(words, SHIFT: tl.constexpr, STRIDE: tl.constexpr, WIDTH: tl.constexpr,
                  COUNT: tl.constexpr):
    """Fields i = 0..COUNT-1 of `words` [..., N], WIDTH bits at bit SHIFT + i * STRIDE * WIDTH,
    as [..., N, 2, ..., 2] (log2 COUNT new dims, most significant bit of i first), built by
    tl.join so that all of a word's fields stay in the registers of the thread that loaded it
    (constant shifts, no layout conversion; broadcasting over a new dim would spread them
    over the lanes instead)."""
    if COUNT == 1:
        return (words >> SHIFT) & ((1 << WIDTH) - 1)
    else:
        even = _split_fields(words, SHIFT, 2 * STRIDE, WIDTH, COUNT // 2)
        odd = _split_fields(words, SHIFT + STRIDE * WIDTH, 2 * STRIDE, WIDTH, COUNT // 2)
        return tl.join(even, odd)


@triton.jit
def _pair_table(Lut_ptr, BITS: tl.constexpr):
    """lut values of the two channels of every pair code, interleaved: entry 2p + i is the value
    of channel i of pair code p. A pair code is what the packed row holds for two neighbouring
    channels: b = 2/4: code0 | code1 << b; b = 3: low0 | low1 << 2 | high0 << 4 | high1 << 5."""
    entry = tl.arange(0, 2 << (2 * BITS))
    pair, second = entry // 2, entry % 2
    if BITS == 3:
        code = ((pair >> (2 * second)) & 3) | (((pair >> (4 + second)) & 1) << 2)
    else:
        code = (pair >> (BITS * second)) & ((1 << BITS) - 1)
    return tl.load(Lut_ptr + code)


@triton.jit
def _half_pair_codes(code_rows, half, mask_t, HEAD_DIM: tl.constexpr, BITS: tl.constexpr,
                     WORDS: tl.constexpr, BLOCK_T: tl.constexpr):
    """Pair codes (see `_pair_table`) of channels half * D/2 + 2p, + 2p + 1 of the rows at
    code_rows, as [BLOCK_T * D/4] (element t * D/4 + p): the "pair domain" in which every
    per-element tensor of the score kernel lives, so none needs a layout conversion.

    WORDS: code_rows point to int32 words. Half a row's low plane (2 bits a code for 2/3-bit,
    4 for 4-bit) is whole words; each is split into pair codes with constant shifts in the
    registers of the thread that loaded it (3 bits: plus the two channels' bits of the 1-bit
    plane): about half the integer work of decoding every code on its own, and integer work is
    what bounds this kernel. Else code_rows are byte pointers and every code is a byte gather
    (any head_dim)."""
    HALF: tl.constexpr = HEAD_DIM // 2
    if WORDS:
        LOW_BITS: tl.constexpr = 4 if BITS == 4 else 2
        PER_WORD: tl.constexpr = 32 // LOW_BITS  # channels per low-plane word
        NW: tl.constexpr = HALF // PER_WORD
        w = tl.arange(0, NW)
        low = tl.load(code_rows[:, None] + (half * NW + w)[None, :], mask=mask_t[:, None],
                      other=0)
        pair = tl.reshape(_split_fields(low, 0, 1, 2 * LOW_BITS, PER_WORD // 2),
                          (BLOCK_T * HALF // 2,))
        if BITS == 3:  # the 1-bit plane after the D/4 bytes of the 2-bit plane: 32 per word
            first = half * HALF + w * PER_WORD
            high = tl.load(code_rows[:, None] + (HEAD_DIM // 16 + first // 32)[None, :],
                           mask=mask_t[:, None], other=0)
            high = high >> (first % 32)[None, :]
            pair = pair | (tl.reshape(_split_fields(high, 0, 1, 2, PER_WORD // 2),
                                      (BLOCK_T * HALF // 2,)) << 4)
    else:
        channels = half * HALF + 2 * tl.arange(0, HALF // 2)
        first = _load_codes(code_rows, channels, mask_t, HEAD_DIM, BITS)
        second = _load_codes(code_rows, channels + 1, mask_t, HEAD_DIM, BITS)
        if BITS == 3:
            pair = (first & 3) | ((second & 3) << 2) | ((first >> 2) << 4) | ((second >> 2) << 5)
        else:
            pair = first | (second << BITS)
        pair = tl.reshape(pair, (BLOCK_T * HALF // 2,))
    return pair


@triton.jit
def _add_outliers(Q_ptr, stride_qb, stride_qh, stride_qt, Index_ptr, Delta_ptr, stride_ob,
                  stride_oh, stride_ot, InvFreq_ptr, Out_ptr, stride_sb, stride_sh, stride_sq,
                  batch, first_head, tokens, live_t, first_row, num_rows, num_query_tokens,
                  group_size, attention_scaling, HEAD_DIM: tl.constexpr, HEADS: tl.constexpr,
                  NUM_SLOTS: tl.constexpr, ROWS: tl.constexpr, ROW_CHUNK: tl.constexpr):
    """Adds the sparse outliers of HEADS KV heads to their stored scores (tokens where live_t),
    query rows [first_row, first_row + ROWS): an outlier (channel c, delta) adds
    delta * (cos q[c] + sign sin q[partner]) to the score, partner = the channel c rotates with,
    sign = +1 for c < D/2, else -1.

    One pass over [tokens, heads] after the head loop: the per-outlier work (loads, sin/cos) is
    spread over all threads once instead of being repeated by the threads of each head's tile,
    and only the real query rows (not the padded tile) gather q and update the scores (only
    where a slot holds an outlier: unused slots carry delta 0). ROW_CHUNK rows at a time as one
    [tokens, heads, rows] tensor, all slots summed before one read-modify-write of the scores,
    so the gathers and updates of all rows and slots are in flight together (one row and slot at
    a time, a chain of dependent memory round trips, was 7% slower for the whole v3 kernel at
    128K on the H100, bench/results/kvquant_h100_notes.md run 7)."""
    HALF: tl.constexpr = HEAD_DIM // 2
    kv_head = first_head + tl.arange(0, HEADS)
    live = live_t[:, None] & (kv_head >= 0)[None, :]  # [T, H]
    slots = batch * stride_ob + kv_head[None, :] * stride_oh + tokens[:, None] * stride_ot
    positions = tokens.to(tl.float32)[:, None]
    for chunk in tl.static_range(0, ROWS, ROW_CHUNK):
        row = first_row + chunk + tl.arange(0, ROW_CHUNK)
        row_live = (row < num_rows)[None, None, :]
        query_head = kv_head[None, :, None] * group_size + (row // num_query_tokens)[None, None, :]
        query_token = (row % num_query_tokens)[None, None, :]
        q_rows = Q_ptr + batch * stride_qb + query_head * stride_qh + query_token * stride_qt
        fix = tl.zeros((tokens.shape[0], HEADS, ROW_CHUNK), tl.float32)
        touched = live & False
        for slot in tl.static_range(NUM_SLOTS):
            channel = tl.load(Index_ptr + slots + slot, mask=live, other=0).to(tl.int32)
            delta = tl.load(Delta_ptr + slots + slot, mask=live, other=0.0).to(tl.float32)
            first_half = channel < HALF
            partner = tl.where(first_half, channel + HALF, channel - HALF)
            sin, cos = _sin_cos(positions * tl.load(
                InvFreq_ptr + tl.where(first_half, channel, partner)))
            own = (delta * cos * attention_scaling)[:, :, None]
            cross = (tl.where(first_half, delta, -delta) * sin * attention_scaling)[:, :, None]
            used = live & (delta != 0.0)
            gather = used[:, :, None] & row_live
            fix += (own * tl.load(q_rows + channel[:, :, None], mask=gather,
                                  other=0.0).to(tl.float32)
                    + cross * tl.load(q_rows + partner[:, :, None], mask=gather,
                                      other=0.0).to(tl.float32))
            touched = touched | used
        update = touched[:, :, None] & row_live
        out = (Out_ptr + batch * stride_sb + query_head * stride_sh + query_token * stride_sq
               + tokens[:, None, None])
        tl.store(out, tl.load(out, mask=update, other=0.0) + fix, mask=update)


@triton.jit
def _sink_scores(Q_ptr, stride_qb, stride_qh, stride_qt, Sink_ptr, stride_kb, stride_kh,
                 stride_kt, InvFreq_ptr, Out_ptr, stride_sb, stride_sh, stride_sq, batch,
                 first_head, rows, mask_m, num_query_tokens, group_size, token_start, num_sink,
                 attention_scaling, HEAD_DIM: tl.constexpr, HEADS: tl.constexpr,
                 BLOCK_M: tl.constexpr):
    """Scores of the exact fp16 sink keys [token_start, num_sink) of HEADS KV heads, the plain
    way (rotate the key, multiply, sum): a few tokens, so simple code beats fast code."""
    SINK_BLOCK: tl.constexpr = 16
    HALF: tl.constexpr = HEAD_DIM // 2
    freq = tl.arange(0, HALF)
    for i in range(HEADS):
        kv_head = first_head + i
        query_head = kv_head * group_size + rows // num_query_tokens
        q_rows = Q_ptr + batch * stride_qb + query_head * stride_qh + (
            rows % num_query_tokens) * stride_qt
        q1 = tl.load(q_rows[:, None] + freq[None, :], mask=mask_m[:, None],
                     other=0.0).to(tl.float32)
        q2 = tl.load(q_rows[:, None] + HALF + freq[None, :], mask=mask_m[:, None],
                     other=0.0).to(tl.float32)
        out_rows = Out_ptr + batch * stride_sb + query_head * stride_sh + (
            rows % num_query_tokens) * stride_sq
        for start in range(token_start, num_sink, SINK_BLOCK):
            tokens = start + tl.arange(0, SINK_BLOCK)
            is_sink = tokens < num_sink
            key_rows = Sink_ptr + batch * stride_kb + kv_head * stride_kh + tokens * stride_kt
            k1 = tl.load(key_rows[:, None] + freq[None, :], mask=is_sink[:, None],
                         other=0.0).to(tl.float32)
            k2 = tl.load(key_rows[:, None] + HALF + freq[None, :], mask=is_sink[:, None],
                         other=0.0).to(tl.float32)
            sin, cos = _sin_cos(tokens.to(tl.float32)[:, None] * tl.load(InvFreq_ptr + freq))
            cos = cos * attention_scaling
            sin = sin * attention_scaling
            rotated1 = k1 * cos - k2 * sin
            rotated2 = k2 * cos + k1 * sin
            score = tl.sum(rotated1[None, :, :] * q1[:, None, :]
                           + rotated2[None, :, :] * q2[:, None, :], axis=2)
            tl.store(out_rows[:, None] + tokens[None, :], score,
                     mask=mask_m[:, None] & is_sink[None, :])


@triton.jit
def _store_dense_scores(acc, Out_ptr, stride_sb, stride_sh, stride_sq, batch, query_head, rows,
                        mask_m, num_query_tokens, tokens, mask_t, num_sink):
    """Store one KV head's dense scores acc [BLOCK_T, BLOCK_M] (sink tokens are _sink_scores')."""
    out_rows = Out_ptr + batch * stride_sb + query_head * stride_sh + (
        rows % num_query_tokens) * stride_sq
    tl.store(out_rows[None, :] + tokens[:, None], acc,
             mask=(mask_t & (tokens >= num_sink))[:, None] & mask_m[None, :])


@triton.jit
def _finish_tile(Q_ptr, stride_qb, stride_qh, stride_qt, Index_ptr, Delta_ptr, stride_ob,
                 stride_oh, stride_ot, Sink_ptr, stride_kb, stride_kh, stride_kt, InvFreq_ptr,
                 Out_ptr, stride_sb, stride_sh, stride_sq, batch, first_head, tokens, mask_t,
                 pid_t, pid_m, rows, mask_m, num_rows, num_query_tokens, group_size,
                 token_start, num_sink, attention_scaling, HEAD_DIM: tl.constexpr,
                 HEADS: tl.constexpr, NUM_SLOTS: tl.constexpr, BLOCK_M: tl.constexpr,
                 CORRECTION_ROWS: tl.constexpr, ROW_CHUNK: tl.constexpr):
    """After a score kernel stored every head's dense scores of its tile: add the sparse
    outliers to them, and (first tile only) write the exact sink tokens' scores."""
    if NUM_SLOTS > 0:  # after every head's dense scores are stored (barrier: other threads')
        tl.debug_barrier()
        _add_outliers(Q_ptr, stride_qb, stride_qh, stride_qt, Index_ptr, Delta_ptr, stride_ob,
                      stride_oh, stride_ot, InvFreq_ptr, Out_ptr, stride_sb, stride_sh,
                      stride_sq, batch, first_head, tokens, mask_t & (tokens >= num_sink),
                      pid_m * BLOCK_M, num_rows, num_query_tokens, group_size,
                      attention_scaling, HEAD_DIM, HEADS, NUM_SLOTS, CORRECTION_ROWS, ROW_CHUNK)

    if pid_t == 0:  # the exact sink tokens of all tiles, kept out of the tile loop
        _sink_scores(Q_ptr, stride_qb, stride_qh, stride_qt, Sink_ptr, stride_kb, stride_kh,
                     stride_kt, InvFreq_ptr, Out_ptr, stride_sb, stride_sh, stride_sq, batch,
                     first_head, rows, mask_m, num_query_tokens, group_size, token_start,
                     num_sink, attention_scaling, HEAD_DIM, HEADS, BLOCK_M)


@triton.jit
def _query_operands(Q_ptr, stride_qb, stride_qh, stride_qt, Zero_ptr, Scale_ptr, batch, kv_head,
                    rows, mask_m, num_query_tokens, group_size, HEAD_DIM: tl.constexpr,
                    BLOCK_M: tl.constexpr, COMPUTE: tl.constexpr):
    """Query-side dot operands of one KV head for query rows `rows` (see the score kernel):
    [BLOCK_M, 2D] in the key operand's column order 4f + 2j + h (j = 0 cos / 1 sin, key half h)
    and [BLOCK_M, D] column 2f + j for the zero point; zero for rows outside mask_m."""
    HALF: tl.constexpr = HEAD_DIM // 2
    freq = tl.arange(0, HALF)
    table = kv_head * HEAD_DIM
    query_head = kv_head * group_size + rows // num_query_tokens
    q_rows = Q_ptr + batch * stride_qb + query_head * stride_qh + (
        rows % num_query_tokens) * stride_qt
    q1 = tl.load(q_rows[:, None] + freq[None, :], mask=mask_m[:, None], other=0.0).to(tl.float32)
    q2 = tl.load(q_rows[:, None] + HALF + freq[None, :], mask=mask_m[:, None],
                 other=0.0).to(tl.float32)
    scale1 = tl.load(Scale_ptr + table + freq)[None, :]
    scale2 = tl.load(Scale_ptr + table + HALF + freq)[None, :]
    zero1 = tl.load(Zero_ptr + table + freq)[None, :]
    zero2 = tl.load(Zero_ptr + table + HALF + freq)[None, :]
    with_cos = tl.join((q1 * scale1).to(COMPUTE), (q2 * scale2).to(COMPUTE))
    with_sin = tl.join((q2 * scale1).to(COMPUTE), (-q1 * scale2).to(COMPUTE))
    with_rotation = tl.reshape(tl.permute(tl.join(with_cos, with_sin), (0, 1, 3, 2)),
                               (BLOCK_M, 2 * HEAD_DIM))
    with_zero = tl.reshape(tl.join((q1 * zero1 + q2 * zero2).to(COMPUTE),
                                   (q2 * zero1 - q1 * zero2).to(COMPUTE)), (BLOCK_M, HEAD_DIM))
    return with_rotation, with_zero


@triton.jit
def _kvquant_query_operands_kernel(
    Q_ptr, stride_qb, stride_qh, stride_qt, Zero_ptr, Scale_ptr, QOp_ptr,
    num_kv_heads, num_query_tokens, group_size, num_m_blocks,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, COMPUTE: tl.constexpr,
):
    """QOp[b, h, m_block] = (with_rotation | with_zero) [BLOCK_M, 3D] of `_query_operands`, once
    per call, so the score kernel's head loop loads them instead of rebuilding them per tile."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    batch = (pid_bh // num_kv_heads).to(tl.int64)
    kv_head = pid_bh % num_kv_heads
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = rows < group_size * num_query_tokens
    with_rotation, with_zero = _query_operands(
        Q_ptr, stride_qb, stride_qh, stride_qt, Zero_ptr, Scale_ptr, batch, kv_head, rows,
        mask_m, num_query_tokens, group_size, HEAD_DIM, BLOCK_M, COMPUTE)
    out_row = QOp_ptr + (pid_bh.to(tl.int64) * num_m_blocks + pid_m) * (BLOCK_M * 3 * HEAD_DIM) \
        + tl.arange(0, BLOCK_M) * (3 * HEAD_DIM)
    tl.store(out_row[:, None] + tl.arange(0, 2 * HEAD_DIM)[None, :], with_rotation)
    tl.store(out_row[:, None] + 2 * HEAD_DIM + tl.arange(0, HEAD_DIM)[None, :], with_zero)


@triton.jit
def _kvquant_key_scores_kernel(
    Q_ptr, stride_qb, stride_qh, stride_qt,
    Codes_ptr, stride_cb, stride_ch, stride_ct,
    Index_ptr, Delta_ptr, stride_ob, stride_oh, stride_ot,
    Sink_ptr, stride_kb, stride_kh, stride_kt,
    Zero_ptr, Scale_ptr, Lut_ptr, InvFreq_ptr, QOp_ptr,
    Out_ptr, stride_sb, stride_sh, stride_sq,
    num_kv_heads, num_query_tokens, group_size, token_start, num_tokens, num_sink,
    num_m_blocks, attention_scaling,
    HEAD_DIM: tl.constexpr, BITS: tl.constexpr, NUM_SLOTS: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_M: tl.constexpr, CORRECTION_ROWS: tl.constexpr,
    OUTLIER_ROW_CHUNK: tl.constexpr,
    HEADS: tl.constexpr, USE_DOT: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    WORDS: tl.constexpr, COMPUTE: tl.constexpr, PREPARED: tl.constexpr,
):
    """score[m, t] = q_m . RoPE(k^_t, t), k^ = lut[code] * scale_c + zero_c + sparse deltas;
    tokens t < num_sink read their exact fp16 key from the sink instead.

    HF rotate_half RoPE of the dequantized pre-RoPE key, halves k1 | k2 (KVQuant App. C):
    RoPE(k) = (k1 cos - k2 sin | k2 cos + k1 sin), angle = fl32(t * inv_freq). With
    k = s L + z (L = lut[code]) the score regroups per frequency f as
        q1 RoPE1 + q2 RoPE2 = cos L1 (q1 s1) + cos L2 (q2 s2) + sin L1 (q2 s1) - sin L2 (q1 s2)
                              + cos (q1 z1 + q2 z2) + sin (q2 z1 - q1 z2),
    so per key element only cos * L and sin * L are computed (packed fp16 multiplies for 16-bit
    queries: L1, L2 of one frequency share a register), and the per-channel scale, zero point
    and the queries form the other operand of two tensor-core dots (cos L | sin L with K = 2D,
    cos | sin with K = D), built once per KV head for all the group's query rows.

    One program: BLOCK_T tokens x BLOCK_M query rows (group heads x query tokens) of HEADS KV heads
    of one batch row; cos/sin depend on (token, frequency) only and are computed once for the
    HEADS heads. The sparse outliers (about 1% of channels) are not added into the dense tile
    (a compare per element per slot) but to the stored scores afterwards (`_add_outliers`, the
    group's CORRECTION_ROWS real rows, not the padded BLOCK_M). COMPUTE: float16 for 16-bit queries
    (|q| * scale and the keys must fit fp16, as the fp16 sink and deltas already must), float32
    (exact products, ieee dots) for float32 queries. PREPARED: the query-side operands come
    from QOp_ptr (`_kvquant_query_operands_kernel`, once per call) instead of being rebuilt
    here for every tile and head.
    """
    HALF: tl.constexpr = HEAD_DIM // 2
    PAIRS: tl.constexpr = BLOCK_T * HALF // 2  # pair domain: element t * D/4 + p
    pid_t = tl.program_id(0)
    pid_m = tl.program_id(1)
    pid_bh = tl.program_id(2)
    head_groups = num_kv_heads // HEADS
    batch = (pid_bh // head_groups).to(tl.int64)
    first_head = (pid_bh % head_groups) * HEADS
    tile_start = token_start + pid_t * BLOCK_T
    tokens = tile_start + tl.arange(0, BLOCK_T)
    mask_t = tokens < num_tokens

    # cos/sin [PAIRS, 2 (parity i)]: frequency 2p + i of the element's token (a token's RoPE
    # position is its index in the cache)
    element = tl.arange(0, PAIRS)
    pair_token = tile_start + element // (HALF // 2)
    even = 2 * (element % (HALF // 2))
    pair_position = pair_token.to(tl.float32)
    sin0, cos0 = _sin_cos(pair_position * tl.load(InvFreq_ptr + even))
    sin1, cos1 = _sin_cos(pair_position * tl.load(InvFreq_ptr + even + 1))
    cos_sin = tl.join((tl.join(cos0, cos1) * attention_scaling).to(COMPUTE),
                      (tl.join(sin0, sin1) * attention_scaling).to(COMPUTE))
    zero_key = tl.reshape(cos_sin, (BLOCK_T, HEAD_DIM))  # [PAIRS, 2 (i), 2 (j)]: column 2f + j
    cos_sin = cos_sin[:, :, :, None]  # j = 0 cos, 1 sin; broadcast over the key half h
    pairs = _pair_table(Lut_ptr, BITS).to(COMPUTE)

    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    num_rows = group_size * num_query_tokens
    mask_m = rows < num_rows

    for i in range(HEADS):
        kv_head = first_head + i
        query_head = kv_head * group_size + rows // num_query_tokens
        if PREPARED:  # operands built once per call by _kvquant_query_operands_kernel
            operand_row = QOp_ptr + ((batch * num_kv_heads + kv_head) * num_m_blocks + pid_m) * (
                BLOCK_M * 3 * HEAD_DIM) + tl.arange(0, BLOCK_M) * (3 * HEAD_DIM)
            with_rotation = tl.load(operand_row[:, None] + tl.arange(0, 2 * HEAD_DIM)[None, :])
            with_zero = tl.load(operand_row[:, None] + 2 * HEAD_DIM
                                + tl.arange(0, HEAD_DIM)[None, :])
        else:
            with_rotation, with_zero = _query_operands(
                Q_ptr, stride_qb, stride_qh, stride_qt, Zero_ptr, Scale_ptr, batch, kv_head,
                rows, mask_m, num_query_tokens, group_size, HEAD_DIM, BLOCK_M, COMPUTE)

        code_rows = Codes_ptr + batch * stride_cb + kv_head * stride_ch + tokens * stride_ct
        pair1 = 2 * _half_pair_codes(code_rows, 0, mask_t, HEAD_DIM, BITS, WORDS, BLOCK_T)
        pair2 = 2 * _half_pair_codes(code_rows, 1, mask_t, HEAD_DIM, BITS, WORDS, BLOCK_T)
        # L [PAIRS, 2 (parity i), 2 (half h)]: one gather from the pair table (shared memory)
        luts = tl.reshape(tl.gather(pairs, tl.reshape(
            tl.join(tl.join(pair1, pair1 + 1), tl.join(pair2, pair2 + 1)), (4 * PAIRS,)), 0),
            (PAIRS, 2, 2))
        # cos L and sin L as one operand [BLOCK_T, 2D] (column 4f + 2j + h): L1, L2 of one
        # frequency stay packed side by side for the fp16 multiplies, one operand to convert
        rotated = tl.reshape(cos_sin * luts[:, :, None, :], (BLOCK_T, 2 * HEAD_DIM))
        acc = _matmul_nt(rotated, with_rotation, USE_DOT, INPUT_PRECISION)
        acc += _matmul_nt(zero_key, with_zero, USE_DOT, INPUT_PRECISION)

        _store_dense_scores(acc, Out_ptr, stride_sb, stride_sh, stride_sq, batch, query_head,
                            rows, mask_m, num_query_tokens, tokens, mask_t, num_sink)

    _finish_tile(Q_ptr, stride_qb, stride_qh, stride_qt, Index_ptr, Delta_ptr, stride_ob,
                 stride_oh, stride_ot, Sink_ptr, stride_kb, stride_kh, stride_kt, InvFreq_ptr,
                 Out_ptr, stride_sb, stride_sh, stride_sq, batch, first_head, tokens, mask_t,
                 pid_t, pid_m, rows, mask_m, num_rows, num_query_tokens, group_size,
                 token_start, num_sink, attention_scaling, HEAD_DIM, HEADS, NUM_SLOTS,
                 BLOCK_M, CORRECTION_ROWS, OUTLIER_ROW_CHUNK)




# Query rows the sparse-outlier pass of a score kernel handles as one tensor (_add_outliers):
# [tokens, heads, rows] elements per thread grow with it, so prefill-sized row tiles go in chunks
OUTLIER_ROW_CHUNK = 4


def outlier_row_chunk_for(rows: int, block_m: int, chunk: int | None) -> int:
    """ROW_CHUNK of `_add_outliers` for a tile of `rows` query rows (of block_m)."""
    correction_rows = min(block_m, triton.next_power_of_2(rows))
    chunk = OUTLIER_ROW_CHUNK if chunk is None else chunk
    if chunk < 1 or chunk & (chunk - 1):
        raise ValueError(f"outlier_row_chunk must be a power of two >= 1, got {chunk}")
    return min(correction_rows, chunk)


# ptxas register cap of the v3 score kernel: 4 programs of 4 warps per SM (see key_scores)
V3_MAXNREG = 128


def _compute_dtype(dtype: torch.dtype):
    # float32 queries keep float32 products and exact (ieee) dots; 16-bit queries get packed fp16
    # products (rounding 2**-11, finer than the bf16 rotated keys of the first version) and fp16
    # tensor-core dots.
    return (tl.float32, "ieee") if dtype == torch.float32 else (tl.float16, "tf32")


def words_layout_fits(head_dim: int, bits: int) -> bool:
    """Whether each half row's codes are whole int32 words in every bit plane."""
    smallest_plane = 1 if bits == 3 else bits
    return (head_dim // 2 * smallest_plane) % 32 == 0


def _heads_per_program(num_kv_heads: int, programs_per_head: int, want: int | None) -> int:
    """KV heads one program loops over (they share its cos/sin): the most (a power of two, up to
    8, dividing the KV heads) that keeps the grid at >= 4 programs per SM of an H100 (132)."""
    if want is not None:
        if num_kv_heads % want or want & (want - 1):
            raise ValueError(f"heads_per_program={want} must be a power of two dividing "
                             f"{num_kv_heads} KV heads")
        return want
    heads = 1
    for candidate in (2, 4, 8):
        if num_kv_heads % candidate == 0 and (
                programs_per_head * num_kv_heads // candidate >= 4 * 132):
            heads = candidate
    return heads


def key_scores(q, codes, index, delta, zero, scale, lut, inv_freq, attention_scaling,
               bits, token_start, out, sink=None, block_t=None, num_warps=None, words=None,
               heads_per_program=None, num_stages=None, prepared_queries=True, version=None,
               maxnreg=V3_MAXNREG, prefetch=None, direct_store=None, outlier_row_chunk=None,
               outlier_prefetch=None, mask_rows=None):
    """Scores of post-RoPE q [B, H_q, T_q, D] against packed pre-RoPE keys (token t at RoPE
    position t), written into out[..., token_start:T] (out: float32 [B, H_q, T_q, T]).
    sink: the exact pre-RoPE keys [B, H_kv, s, D] of tokens [0, s), used instead of their codes.
    The launch settings (block_t, num_warps, words, heads_per_program, num_stages) are for
    benchmarks; the defaults are the fastest measured on the H100 (bench/README.md).
    prepared_queries: build the query-side dot operands (q * scale, q * zero in the key operand's
    column order) once per call in a small kernel and load them in the head loop (default);
    False rebuilds them for every token tile and head inside the score kernel (the first
    version, kept to time both).
    version: 2 the kernel above; 3 `kvquant_scores_v3_triton` (key operand built in the
    tensor-core operand's register layout with byte-permute lookups, no shared-memory layout
    conversions), for head_dim 128, 2 or 3 bits, int32 words and 16-bit queries (`v3_fits`); None
    (default) picks 3 for the bit widths in V3_DEFAULT_BITS where it fits a decode-sized row
    tile (<= 16 query rows per KV head: 0.090 vs 0.180 ms at 128K on the H100,
    bench/results/kvquant_h100_run7.json) and 2 elsewhere.
    maxnreg: ptxas register cap of the version-3 kernel (None: uncapped). Its head loop fits 128
    registers without spilling (offline sm_90 compile); uncapped, the rarely run sink and prologue
    code push it to 254, one 4-warp program per SM less than half as many as at 128.
    prefetch, direct_store: whether the version-3 head loop loads the next KV head's code words
    one head ahead (0 or 1) and stores scores from the accumulator's registers (None:
    `kvquant_scores_v3_triton`'s V3_PREFETCH / V3_DIRECT_STORE).
    outlier_prefetch: version 3 asks L2 for the tile's outlier index/delta lines before its head
    loop (None: V3_OUTLIER_PREFETCH).
    mask_rows: version 3 reads only the real query rows of its query operands (None:
    V3_MASK_ROWS).
    outlier_row_chunk: query rows the sparse-outlier pass updates at once (`_add_outliers`;
    None: `outlier_row_chunk_for`'s default)."""
    from . import kvquant_scores_v3_triton as v3  # it imports this module's device helpers

    if version is None:
        decode_rows = q.shape[1] // codes.shape[1] * q.shape[2] <= 16
        version = 3 if (decode_rows and bits in v3.V3_DEFAULT_BITS
                        and v3.v3_fits(q, q.shape[-1], bits, words)) else 2
    if version == 3:
        return v3.key_scores_v3(q, codes, index, delta, zero, scale, lut, inv_freq,
                              attention_scaling, bits, token_start, out, sink, block_t,
                              num_warps, words, heads_per_program, num_stages, maxnreg,
                              prefetch, direct_store, outlier_row_chunk, outlier_prefetch,
                              mask_rows)
    if version != 2:
        raise ValueError(f"version must be 2 or 3, got {version}")
    batch, num_kv_heads, num_tokens, _ = codes.shape
    head_dim = q.shape[-1]
    group_size = query_group(q.shape[1], num_kv_heads)
    q = q if q.stride(-1) == 1 else q.contiguous()
    num_query_tokens = q.shape[2]
    rows = group_size * num_query_tokens
    block_m = max(16, min(64, triton.next_power_of_2(rows)))
    compute, input_precision = _compute_dtype(q.dtype)
    # Decode-sized row tiles of 16-bit queries: 64 tokens and 4 warps, the fastest setting on the
    # H100 with prepared query operands (0.180 vs 0.216 ms for 128 tokens / 8 warps at 128K,
    # bench/results/kvquant_h100_run5.json); other shapes keep the register-sized settings.
    decode_tile = compute == tl.float16 and block_m == 16
    if block_t is None:  # sized for registers and shared memory (ptxas reports for sm_90)
        block_t = 128 if compute == tl.float16 else 64
        block_t = block_t // (1 if block_m == 16 else 2) // (2 if decode_tile else 1)
        block_t = 16 if triton_interpret_enabled() else block_t
    num_warps = num_warps or (4 if decode_tile else 8)
    num_stages = num_stages or 1  # the head loop's loads need no deeper pipeline, registers do
    span = num_tokens - token_start
    if span <= 0:
        return out
    if words is None:
        words = words_layout_fits(head_dim, bits)
    elif words and not words_layout_fits(head_dim, bits):
        raise ValueError(f"head_dim {head_dim} at {bits} bits does not fit the int32-word reading")
    grid_t = triton.cdiv(span, block_t)
    heads = _heads_per_program(num_kv_heads, grid_t * batch * triton.cdiv(rows, block_m),
                               heads_per_program)
    grid = (grid_t, triton.cdiv(rows, block_m), batch * num_kv_heads // heads)
    code_rows = codes.view(torch.int32) if words else codes  # strides then count int32 words
    if sink is None or sink.shape[2] == 0:
        sink, num_sink = codes, 0  # never read
    else:
        num_sink = sink.shape[2]
    num_m_blocks = triton.cdiv(rows, block_m)
    if prepared_queries:
        operands = torch.empty(batch, num_kv_heads, num_m_blocks, block_m, 3 * head_dim,
                               dtype=torch.float32 if compute == tl.float32 else torch.float16,
                               device=q.device)
        _kvquant_query_operands_kernel[(num_m_blocks, batch * num_kv_heads)](
            q, q.stride(0), q.stride(1), q.stride(2), zero, scale, operands,
            num_kv_heads, num_query_tokens, group_size, num_m_blocks,
            HEAD_DIM=head_dim, BLOCK_M=block_m, COMPUTE=compute, num_warps=4,
        )
    else:
        operands = zero  # never read
    _kvquant_key_scores_kernel[grid](
        q, q.stride(0), q.stride(1), q.stride(2),
        code_rows, code_rows.stride(0), code_rows.stride(1), code_rows.stride(2),
        index, delta, index.stride(0), index.stride(1), index.stride(2),
        sink, sink.stride(0), sink.stride(1), sink.stride(2),
        zero, scale, lut, inv_freq, operands,
        out, out.stride(0), out.stride(1), out.stride(2),
        num_kv_heads, num_query_tokens, group_size, token_start, num_tokens, num_sink,
        num_m_blocks, float(attention_scaling),
        HEAD_DIM=head_dim, BITS=bits, NUM_SLOTS=index.shape[-1], BLOCK_T=block_t, BLOCK_M=block_m,
        CORRECTION_ROWS=min(block_m, triton.next_power_of_2(rows)), HEADS=heads,
        OUTLIER_ROW_CHUNK=outlier_row_chunk_for(rows, block_m, outlier_row_chunk),
        USE_DOT=head_dim >= 16, INPUT_PRECISION=input_precision, WORDS=words, COMPUTE=compute,
        PREPARED=prepared_queries, num_warps=num_warps, num_stages=num_stages,
    )
    return out


# --------------------------------------------------------------------------------------------
# value attention


@triton.jit
def _kvquant_attend_values_kernel(
    P_ptr, stride_pb, stride_ph, stride_pq,
    Codes_ptr, stride_cb, stride_ch, stride_ct,
    Scale_ptr, Zero_ptr, stride_sb, stride_sh,
    Index_ptr, Delta_ptr, stride_ob, stride_oh, stride_ot,
    Lut_ptr,
    Partial_ptr, stride_ws, stride_wb, stride_wh, stride_wq,
    num_kv_heads, num_query_tokens, group_size, token_start, num_tokens, tokens_per_split,
    HEAD_DIM: tl.constexpr, BITS: tl.constexpr, NUM_SLOTS: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_M: tl.constexpr, USE_DOT: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
):
    """partial[split, m, :] = sum over this split's tokens t of p[m, t] * v^_t,
    v^_t = lut[code] * scale_t + zero_t + sparse deltas. Splits are summed by the launcher."""
    pid_split = tl.program_id(0)
    pid_m = tl.program_id(1)
    pid_bh = tl.program_id(2).to(tl.int64)
    batch, kv_head = pid_bh // num_kv_heads, pid_bh % num_kv_heads
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = rows < group_size * num_query_tokens
    query_head = kv_head * group_size + rows // num_query_tokens
    query_token = rows % num_query_tokens
    p_rows = P_ptr + batch * stride_pb + query_head * stride_ph + query_token * stride_pq
    channels = tl.arange(0, HEAD_DIM)
    acc = tl.zeros((BLOCK_M, HEAD_DIM), dtype=tl.float32)
    split_start = token_start + pid_split * tokens_per_split
    for offset in range(0, tokens_per_split, BLOCK_T):
        tokens = split_start + offset + tl.arange(0, BLOCK_T)
        mask_t = tokens < num_tokens
        p = tl.load(p_rows[:, None] + tokens[None, :], mask=mask_m[:, None] & mask_t[None, :],
                    other=0.0)
        code_rows = Codes_ptr + batch * stride_cb + kv_head * stride_ch + tokens * stride_ct
        v = tl.load(Lut_ptr + _load_codes(code_rows, channels, mask_t, HEAD_DIM, BITS))
        token_offsets = batch * stride_sb + kv_head * stride_sh + tokens
        scale = tl.load(Scale_ptr + token_offsets, mask=mask_t, other=0.0).to(tl.float32)
        zero = tl.load(Zero_ptr + token_offsets, mask=mask_t, other=0.0).to(tl.float32)
        v = v * scale[:, None] + zero[:, None]
        slot_rows = batch * stride_ob + kv_head * stride_oh + tokens * stride_ot
        for slot in tl.static_range(NUM_SLOTS):
            channel = tl.load(Index_ptr + slot_rows + slot, mask=mask_t, other=0).to(tl.int32)
            delta = tl.load(Delta_ptr + slot_rows + slot, mask=mask_t, other=0.0).to(tl.float32)
            v += tl.where(channels[None, :] == channel[:, None], delta[:, None], 0.0)
        v = tl.where(mask_t[:, None], v, 0.0)
        acc += _matmul_nn(p, v.to(p.dtype), USE_DOT, INPUT_PRECISION)
    out_rows = (Partial_ptr + pid_split * stride_ws + batch * stride_wb + query_head * stride_wh
                + query_token * stride_wq)
    tl.store(out_rows[:, None] + channels[None, :], acc, mask=mask_m[:, None])


def attend_values(p, codes, scale, zero, index, delta, lut, bits, token_start,
                  tokens_per_split=None):
    """sum_t p[..., t] v^_t over t in [token_start, T) -> float32 [B, H_q, T_q, D]."""
    batch, num_kv_heads, num_tokens, _ = codes.shape
    head_dim = codes.shape[-1] * 8 // bits
    group_size = query_group(p.shape[1], num_kv_heads)
    if p.shape[-1] != num_tokens:
        raise ValueError(f"p has {p.shape[-1]} keys, the cache holds {num_tokens} tokens")
    p = p if p.stride(-1) == 1 else p.contiguous()
    num_query_tokens = p.shape[2]
    rows = group_size * num_query_tokens
    block_m = max(16, min(64, triton.next_power_of_2(rows)))
    block_t = 16 if triton_interpret_enabled() else 64
    span = max(num_tokens - token_start, 0)
    tokens_per_split = tokens_per_split or max(block_t, triton.cdiv(span, 256 * block_t) * block_t)
    num_splits = max(1, triton.cdiv(span, tokens_per_split))
    partial = torch.zeros(num_splits, batch, p.shape[1], num_query_tokens, head_dim,
                          dtype=torch.float32, device=p.device)
    if span == 0:
        return partial[0]
    # NOTE: float32 p runs the dot in tf32 (10-bit mantissa, about p's bf16 precision): an exact
    # float32 dot made this kernel 5.7x slower on the H100 (kvquant_ablations_h100_run2.json).
    input_precision = "tf32"
    grid = (num_splits, triton.cdiv(rows, block_m), batch * num_kv_heads)
    _kvquant_attend_values_kernel[grid](
        p, p.stride(0), p.stride(1), p.stride(2),
        codes, codes.stride(0), codes.stride(1), codes.stride(2),
        scale, zero, scale.stride(0), scale.stride(1),
        index, delta, index.stride(0), index.stride(1), index.stride(2),
        lut,
        partial, partial.stride(0), partial.stride(1), partial.stride(2), partial.stride(3),
        num_kv_heads, num_query_tokens, group_size, token_start, num_tokens, tokens_per_split,
        HEAD_DIM=head_dim, BITS=bits, NUM_SLOTS=index.shape[-1], BLOCK_T=block_t, BLOCK_M=block_m,
        USE_DOT=head_dim >= 16, INPUT_PRECISION=input_precision,
    )
    return partial.sum(0)
