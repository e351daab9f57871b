"""Triton building blocks of the min-max quantizer (math in kernels/quant_reference.py)."""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def minmax_codes(x, mn, mx, LEVELS: tl.constexpr, EPS: tl.constexpr, STAT_DTYPE: tl.constexpr):
    """x float32, mn/mx broadcastable to x -> (int32 codes, stored scale, stored zero) as float32.

    The scale and zero are rounded to the stored dtype before the codes are computed, exactly as
    the reference does.
    """
    scale = (tl.maximum(mx - mn, EPS) / LEVELS).to(STAT_DTYPE).to(tl.float32)
    zero = mn.to(STAT_DTYPE).to(tl.float32)
    codes = tl.floor((x - zero) / scale + 0.5)
    codes = tl.minimum(tl.maximum(codes, 0.0), LEVELS).to(tl.int32)
    return codes, scale, zero


@triton.jit
def pack_rows(codes, ROWS: tl.constexpr, WIDTH: tl.constexpr, BITS: tl.constexpr):
    """int32 codes [ROWS, WIDTH] -> int32 bytes [ROWS, WIDTH * BITS // 8] (kernels/bitpack.py)."""
    PER_BYTE: tl.constexpr = 8 // BITS
    grouped = tl.reshape(codes, (ROWS, WIDTH // PER_BYTE, PER_BYTE))
    shifts = tl.arange(0, PER_BYTE) * BITS
    return tl.sum(grouped << shifts[None, None, :], axis=2)


@triton.jit
def unpack_rows(packed, ROWS: tl.constexpr, NUM_BYTES: tl.constexpr, BITS: tl.constexpr):
    """bytes [ROWS, NUM_BYTES] (any int dtype) -> int32 codes [ROWS, NUM_BYTES * 8 // BITS]."""
    PER_BYTE: tl.constexpr = 8 // BITS
    MASK: tl.constexpr = (1 << BITS) - 1
    words = packed.to(tl.int32)
    # tl.join keeps the codes of one byte in the thread that loaded it (a broadcast-and-shift
    # over a new axis lets the compiler spread them over threads and reload bytes one by one)
    if PER_BYTE == 4:
        low = tl.join(words & MASK, (words >> 4) & MASK)
        high = tl.join((words >> 2) & MASK, (words >> 6) & MASK)
        codes = tl.join(low, high)  # [ROWS, NUM_BYTES, 2, 2]: index (i, j) holds code 2 * i + j
    elif PER_BYTE == 2:
        codes = tl.join(words & MASK, (words >> 4) & MASK)
    else:
        codes = words
    return tl.reshape(codes, (ROWS, NUM_BYTES * PER_BYTE))
