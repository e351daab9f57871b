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
def _load_plane_words(row_words, word_offset, mask, NUM_CHANNELS: tl.constexpr,
                      PLANE_BITS: tl.constexpr, BLOCK_T: tl.constexpr):
    """Codes [BLOCK_T, NUM_CHANNELS] of one bit plane read as whole int32 words (16-byte loads
    instead of a byte gather per code): word w holds channels w*32/PLANE_BITS + i at bit
    i*PLANE_BITS (the byte layout viewed little-endian)."""
    PER_WORD: tl.constexpr = 32 // PLANE_BITS
    words = tl.load(row_words[:, None] + word_offset
                    + tl.arange(0, NUM_CHANNELS // PER_WORD)[None, :], mask=mask[:, None], other=0)
    shifts = tl.arange(0, PER_WORD) * PLANE_BITS
    codes = (words[:, :, None] >> shifts[None, None, :]) & ((1 << PLANE_BITS) - 1)
    return tl.reshape(codes, (BLOCK_T, NUM_CHANNELS))


@triton.jit
def _load_half_codes(row_words, half, mask, HEAD_DIM: tl.constexpr, BITS: tl.constexpr,
                     BLOCK_T: tl.constexpr):
    """Codes of channels [half*D/2, (half+1)*D/2) through `_load_plane_words`."""
    HALF: tl.constexpr = HEAD_DIM // 2
    if BITS == 3:
        low = _load_plane_words(row_words, half * HALF // 16, mask, HALF, 2, BLOCK_T)
        high = _load_plane_words(row_words, HEAD_DIM // 16 + half * HALF // 32, mask, HALF, 1,
                                 BLOCK_T)
        return low | (high << 2)
    else:
        return _load_plane_words(row_words, half * HALF * BITS // 32, mask, HALF, BITS, BLOCK_T)


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


@triton.jit
def _kvquant_key_scores_kernel(
    Q_ptr, stride_qb, stride_qh, stride_qt,
    Codes_ptr, stride_cb, stride_ch, stride_ct,
    Index_ptr, Delta_ptr, stride_ob, stride_oh, stride_ot,
    Zero_ptr, Scale_ptr, Lut_ptr, InvFreq_ptr,
    Out_ptr, stride_sb, stride_sh, stride_sq,
    num_kv_heads, num_query_tokens, group_size, token_start, num_tokens, attention_scaling,
    HEAD_DIM: tl.constexpr, BITS: tl.constexpr, NUM_SLOTS: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_M: tl.constexpr, USE_DOT: tl.constexpr,
    INPUT_PRECISION: tl.constexpr, WORDS: tl.constexpr,
):
    """score[m, t] = q_m . RoPE(k^_t, pos_t), k^ = lut[code] * scale_c + zero_c + sparse delta.

    HF rotate_half RoPE on the dequantized pre-RoPE key, split into halves k1 | k2:
    RoPE(k) = (k1 cos - k2 sin | k2 cos + k1 sin), angle = pos * inv_freq (KVQuant App. C).
    One program: BLOCK_T tokens x BLOCK_M query rows (group heads x query tokens) of one
    (batch row, KV head). NOTE: an earlier version looped over the KV heads inside the program to
    share cos/sin; on the H100 that loop made 8 heads cost 30x one head (bench/results/
    kvquant_ablations_h100_run2.json), while cos/sin themselves cost under 5%.
    A sparse outlier (channel c, delta) adds delta * (cos q[c] + sign sin q[(c + D/2) % D]),
    sign = +1 for c < D/2, else -1.
    """
    HALF: tl.constexpr = HEAD_DIM // 2
    pid_t = tl.program_id(0)
    pid_m = tl.program_id(1)
    pid_bh = tl.program_id(2).to(tl.int64)
    batch, kv_head = pid_bh // num_kv_heads, pid_bh % num_kv_heads
    tokens = token_start + pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    mask_t = tokens < num_tokens
    freq = tl.arange(0, HALF)
    positions = tokens.to(tl.float32)  # a token's RoPE position is its index in the cache
    inv_freq = tl.load(InvFreq_ptr + freq)
    angle = positions[:, None] * inv_freq[None, :]
    cos = tl.cos(angle) * attention_scaling
    sin = tl.sin(angle) * attention_scaling

    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = rows < group_size * num_query_tokens
    head_in_group = rows // num_query_tokens
    query_token = rows % num_query_tokens
    query_head = kv_head * group_size + head_in_group
    q_rows = Q_ptr + batch * stride_qb + query_head * stride_qh + query_token * stride_qt
    q1 = tl.load(q_rows[:, None] + freq[None, :], mask=mask_m[:, None], other=0.0)
    q2 = tl.load(q_rows[:, None] + HALF + freq[None, :], mask=mask_m[:, None], other=0.0)

    code_rows = Codes_ptr + batch * stride_cb + kv_head * stride_ch + tokens * stride_ct
    table = kv_head * HEAD_DIM
    if WORDS:  # Codes_ptr is an int32 view of the rows; strides count words
        codes1 = _load_half_codes(code_rows, 0, mask_t, HEAD_DIM, BITS, BLOCK_T)
        codes2 = _load_half_codes(code_rows, 1, mask_t, HEAD_DIM, BITS, BLOCK_T)
    else:
        codes1 = _load_codes(code_rows, freq, mask_t, HEAD_DIM, BITS)
        codes2 = _load_codes(code_rows, freq + HALF, mask_t, HEAD_DIM, BITS)
    k1 = tl.load(Lut_ptr + codes1)
    k1 = (k1 * tl.load(Scale_ptr + table + freq)[None, :]
          + tl.load(Zero_ptr + table + freq)[None, :])
    k2 = tl.load(Lut_ptr + codes2)
    k2 = (k2 * tl.load(Scale_ptr + table + HALF + freq)[None, :]
          + tl.load(Zero_ptr + table + HALF + freq)[None, :])
    rotated1 = (k1 * cos - k2 * sin).to(q1.dtype)
    rotated2 = (k2 * cos + k1 * sin).to(q1.dtype)
    acc = _matmul_nt(q1, rotated1, USE_DOT, INPUT_PRECISION)
    acc += _matmul_nt(q2, rotated2, USE_DOT, INPUT_PRECISION)

    slot_rows = batch * stride_ob + kv_head * stride_oh + tokens * stride_ot
    for slot in tl.static_range(NUM_SLOTS):
        channel = tl.load(Index_ptr + slot_rows + slot, mask=mask_t, other=0).to(tl.int32)
        delta = tl.load(Delta_ptr + slot_rows + slot, mask=mask_t, other=0.0).to(tl.float32)
        first_half = channel < HALF
        partner = tl.where(first_half, channel + HALF, channel - HALF)
        slot_angle = positions * tl.load(InvFreq_ptr + channel % HALF)
        sign = tl.where(first_half, 1.0, -1.0)
        q_own = tl.load(q_rows[:, None] + channel[None, :], mask=mask_m[:, None], other=0.0)
        q_partner = tl.load(q_rows[:, None] + partner[None, :], mask=mask_m[:, None], other=0.0)
        acc += (delta * tl.cos(slot_angle) * attention_scaling)[None, :] * q_own.to(tl.float32)
        acc += (delta * sign * tl.sin(slot_angle) * attention_scaling)[None, :] * q_partner.to(
            tl.float32)

    out_rows = Out_ptr + batch * stride_sb + query_head * stride_sh + query_token * stride_sq
    tl.store(out_rows[:, None] + tokens[None, :], acc, mask=mask_m[:, None] & mask_t[None, :])


def _input_precision(dtype: torch.dtype) -> str:
    # float32 inputs get exact float32 products (tf32 would cost ~3 decimal digits).
    return "ieee" if dtype == torch.float32 else "tf32"


def words_layout_fits(head_dim: int, bits: int) -> bool:
    """Whether each half row's codes are whole int32 words in every bit plane."""
    smallest_plane = 1 if bits == 3 else bits
    return (head_dim // 2 * smallest_plane) % 32 == 0


def key_scores(q, codes, index, delta, zero, scale, lut, inv_freq, attention_scaling,
               bits, token_start, out, block_t=None, num_warps=None, words=None):
    """Scores of post-RoPE q [B, H_q, T_q, D] against packed pre-RoPE keys (token t at RoPE
    position t), written into out[..., token_start:T] (out: float32 [B, H_q, T_q, T])."""
    batch, num_kv_heads, num_tokens, _ = codes.shape
    head_dim = q.shape[-1]
    group_size = query_group(q.shape[1], num_kv_heads)
    q = q if q.stride(-1) == 1 else q.contiguous()
    num_query_tokens = q.shape[2]
    rows = group_size * num_query_tokens
    block_m = max(16, min(64, triton.next_power_of_2(rows)))
    block_t = block_t or (16 if triton_interpret_enabled() else 64)
    input_precision = _input_precision(q.dtype)
    grid = (triton.cdiv(num_tokens - token_start, block_t), triton.cdiv(rows, block_m),
            batch * num_kv_heads)
    if grid[0] == 0:
        return out
    if words is None:
        words = words_layout_fits(head_dim, bits)
    code_rows = codes.view(torch.int32) if words else codes  # strides then count int32 words
    _kvquant_key_scores_kernel[grid](
        q, q.stride(0), q.stride(1), q.stride(2),
        code_rows, code_rows.stride(0), code_rows.stride(1), code_rows.stride(2),
        index, delta, index.stride(0), index.stride(1), index.stride(2),
        zero, scale, lut, inv_freq,
        out, out.stride(0), out.stride(1), out.stride(2),
        num_kv_heads, num_query_tokens, group_size, token_start, num_tokens,
        float(attention_scaling),
        HEAD_DIM=head_dim, BITS=bits, NUM_SLOTS=index.shape[-1], BLOCK_T=block_t, BLOCK_M=block_m,
        USE_DOT=head_dim // 2 >= 16, INPUT_PRECISION=input_precision, WORDS=words,
        **({} if num_warps is None else {"num_warps": num_warps}),
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
